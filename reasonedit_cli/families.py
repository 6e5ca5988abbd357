"""Model families as records: what the VLM backend knows about each family, in one table.

One `Family` per config `model_type` in `FAMILIES`. `vlm.VLM` reads everything
family-specific from its record (`VLM.spec`) and has no `if model_type == ...` branch:

* where the layers live (`Roles`: the module names of the vision tower, projector and
  language model; hook points are then found from the module tree);
* the prompt used when a checkpoint ships no chat template;
* how the rows of a vision-side tensor map to samples (`image_split`, used to pool);
* batch fix-ups: processor outputs to drop, the token types of appended answer tokens,
  one image list per prompt;
* processor quirks: parts that must pad right, a processor assembled without its video
  processor where torchvision is missing, Python packages the processor imports;
* whether the language model is an encoder-decoder (answers are decoder tokens).

Adding a family is one entry here and one tiny model in `tests/tiny_models.py`
(docs/models.md, "Adding a family"). This module imports neither torch nor
transformers at import time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

#: A family's image-split rule: (processor batch, model config) -> how many rows of a
#: vision-side tensor belong to each sample, or None where it is one row per image.
ImageSplit = Callable[[Any, Any], "list[int] | None"]


def split_grid_thw(batch: Any, config: Any) -> list[int] | None:
    """Qwen2-VL and later flatten all patches of a batch into one (total_patches, D)
    tensor; `image_grid_thw` (t, h, w per image) gives each image's share."""
    if "image_grid_thw" not in batch:
        return None
    return [int(x) for x in batch["image_grid_thw"].prod(-1).tolist()]


def split_crops(batch: Any, config: Any) -> list[int] | None:
    """LLaVA-NeXT / OneVision run the vision tower on a varying number of crops per
    image: the base image plus the tiles of the best grid pinpoint for its size."""
    if "image_sizes" not in batch:
        return None
    count = _anyres_crop_count()
    return [
        int(
            count(
                image_size=tuple(size),
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
        )
        for size in batch["image_sizes"].tolist()
    ]


def split_tiles(batch: Any, config: Any) -> list[int] | None:
    """Idefics3 / SmolVLM pad every sample to the same number of tiles with all-zero
    tiles, which the model drops before its vision tower (the same test as the model's:
    a tile whose values are all 0.0 is padding)."""
    pv = batch.get("pixel_values") if hasattr(batch, "get") else None
    if pv is None or pv.dim() != 5:  # (batch, tiles, C, H, W)
        return None
    per_tile = pv[0, 0].numel()
    real = (pv == 0.0).flatten(2).sum(-1) != per_tile
    return [max(int(r), 1) for r in real.sum(1).tolist()]


def _anyres_crop_count() -> Callable[..., int]:
    """transformers' crop count of an "anyres" image (LLaVA-NeXT's processor and model
    use the same function).

    NON-PUBLIC NAME (transformers 5.24): `image_size_to_num_patches` is a module-level
    function of `modeling_llava_next`, not exported. Kept in this one place on purpose;
    `tests/test_families.py` runs both crop families, so a rename fails there.
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches


@dataclass(frozen=True)
class Roles:
    """Where a family's layers live: the module names of its three parts.

    Matched against `model.named_modules()` with the block structure every family
    shares (an optional `model.` prefix; vision blocks under `encoder.layers`, `blocks`
    or `layer`; language blocks under `layers`, or a T5 stack's `encoder.block` /
    `decoder.block`). The first matching role wins, in the order vision, projector,
    language.
    """

    vision: str  # e.g. "vision_tower"
    projector: str  # e.g. "multi_modal_projector"; dotted paths allowed ("visual.merger")
    language: str  # e.g. "language_model"

    @cached_property
    def patterns(self) -> tuple[tuple[str, re.Pattern[str]], ...]:
        """(role, pattern) pairs; a block pattern names its index `index`, and a T5 block
        its stack `stack` (encoder or decoder)."""
        v, p, lang = (re.escape(s) for s in (self.vision, self.projector, self.language))
        return (
            (
                "vision",
                re.compile(
                    rf"^(?:model\.)?{v}(?:\.vision_model)?\.(?:encoder\.)?"
                    r"(?:layers|blocks|layer)\.(?P<index>\d+)$"
                ),
            ),
            ("projector", re.compile(rf"^(?:model\.)?{p}$")),
            ("language", re.compile(rf"^(?:model\.)?{lang}(?:\.model)?\.layers\.(?P<index>\d+)$")),
            # an encoder-decoder language model (InstructBLIP-Flan-T5): encoder blocks are
            # language.0 .. language.E-1, decoder blocks continue at language.E
            (
                "language",
                re.compile(
                    rf"^(?:model\.)?{lang}\.(?:model\.)?"
                    r"(?P<stack>encoder|decoder)\.block\.(?P<index>\d+)$"
                ),
            ),
        )


#: The prompt around one image when a checkpoint ships no chat template: `{image}` is the
#: processor's image token, `{prompt}` the user's text (the LLaVA 1.5 conversation format).
DEFAULT_PROMPT = "USER: {image}\n{prompt} ASSISTANT:"


@dataclass(frozen=True)
class Family:
    """Everything family-specific the backend needs, as data (see the module docstring)."""

    name: str  # shown to users
    roles: Roles
    #: the prompt around one image when the checkpoint ships no chat template
    #: (placeholders `{image}`, `{prompt}`)
    prompt: str = DEFAULT_PROMPT
    #: how the rows of a vision-side tensor map to samples (None: one row per image)
    image_split: ImageSplit | None = None
    #: role -> sub-module whose OUTPUT is the normed point, where no Linear follows the
    #: norm (otherwise the point is found from the module tree)
    normed_output: Mapping[str, str] = field(default_factory=dict)
    #: the processor wants one list of images per prompt (Gemma 3), not a flat list
    nested_images: bool = False
    #: processor outputs the model must not get (PaliGemma's training `labels`)
    drop_keys: tuple[str, ...] = ()
    #: per-token type tensors the processor returns -> the type of an appended answer
    #: token (the prompt keeps its own types). PaliGemma: 1, its causal suffix.
    answer_token_types: Mapping[str, int] = field(default_factory=dict)
    #: processor parts (attributes) that always pad right: InstructBLIP's Q-Former
    #: tokenizer reads the text too, and its pooled query output must not see padding
    right_padded: tuple[str, ...] = ()
    #: the transformers processor class, where it carries a video processor: without
    #: torchvision (which every video processor needs) it is assembled from its other
    #: parts and a video processor that never runs (`vlm.images_only_processor`)
    images_only_processor: str | None = None
    #: Python packages the processor imports (checked at load, one line if missing)
    requires: tuple[str, ...] = ()
    #: the language model is an encoder-decoder (answers are decoder tokens); None: the
    #: text config says (InstructBLIP ships with Vicuna or with Flan-T5)
    encoder_decoder: bool | None = False

    def fallback_prompt(self, prompt: str, image_token: str) -> str:
        """The prompt for a checkpoint without a chat template."""
        return self.prompt.format(image=image_token, prompt=prompt)

    def is_encoder_decoder(self, config: Any) -> bool:
        """Whether this checkpoint's language model is an encoder-decoder."""
        if self.encoder_decoder is not None:
            return self.encoder_decoder
        return bool(getattr(config.get_text_config(), "is_encoder_decoder", False))


_LLAVA = Roles(vision="vision_tower", projector="multi_modal_projector", language="language_model")
_QWEN = Roles(vision="visual", projector="visual.merger", language="language_model")
_IDEFICS = Roles(vision="vision_model", projector="connector", language="text_model")
#: InstructBLIP: the projector's input is the Q-Former's query output
_BLIP = Roles(vision="vision_model", projector="language_projection", language="language_model")

_QWEN_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}"
    "<|im_end|>\n<|im_start|>assistant\n"
)
_IDEFICS_PROMPT = "User:<image>{prompt}<end_of_utterance>\nAssistant:"
#: Qwen2-VL and later mark image tokens in `mm_token_type_ids`; answer tokens are text (0)
_QWEN_TYPES = {"mm_token_type_ids": 0}

#: One record per supported family (config `model_type`). Each is loaded with
#: AutoModelForImageTextToText.
FAMILIES: dict[str, Family] = {
    "llava": Family("LLaVA 1.5", _LLAVA),
    "llava_next": Family("LLaVA-NeXT (1.6)", _LLAVA, image_split=split_crops),
    "llava_onevision": Family(
        "LLaVA-OneVision",
        _LLAVA,
        prompt="<|im_start|>user <image>\n{prompt}<|im_end|><|im_start|>assistant\n",
        image_split=split_crops,
        images_only_processor="LlavaOnevisionProcessor",
    ),
    "qwen2_vl": Family(
        "Qwen2-VL",
        _QWEN,
        prompt=_QWEN_PROMPT,
        image_split=split_grid_thw,
        answer_token_types=_QWEN_TYPES,
        images_only_processor="Qwen2VLProcessor",
    ),
    "qwen2_5_vl": Family(
        "Qwen2.5-VL",
        _QWEN,
        prompt=_QWEN_PROMPT,
        image_split=split_grid_thw,
        answer_token_types=_QWEN_TYPES,
        images_only_processor="Qwen2_5_VLProcessor",
    ),
    "idefics3": Family("Idefics3", _IDEFICS, prompt=_IDEFICS_PROMPT, image_split=split_tiles),
    "smolvlm": Family(
        "SmolVLM",
        _IDEFICS,
        prompt=_IDEFICS_PROMPT,
        image_split=split_tiles,
        nested_images=True,
        images_only_processor="SmolVLMProcessor",
        requires=("num2words",),  # the processor spells out numbers in its video prompt
    ),
    # InstructBLIP with a decoder-only (Vicuna) or an encoder-decoder (Flan-T5) language
    # model; its processor puts the query tokens in front of the text itself
    "instructblip": Family(
        "InstructBLIP",
        _BLIP,
        prompt="{prompt}",
        right_padded=("qformer_tokenizer",),
        encoder_decoder=None,
    ),
    "qwen3_vl": Family(
        "Qwen3-VL",
        _QWEN,
        prompt=_QWEN_PROMPT,
        image_split=split_grid_thw,
        answer_token_types=_QWEN_TYPES,
        images_only_processor="Qwen3VLProcessor",
    ),
    # the projector pools and norms, then multiplies by a weight (no Linear module)
    "gemma3": Family(
        "Gemma 3",
        _LLAVA,
        prompt="<start_of_turn>user\n<start_of_image>{prompt}<end_of_turn>\n<start_of_turn>model\n",
        normed_output={"projector": "mm_soft_emb_norm"},
        nested_images=True,
        answer_token_types={"token_type_ids": 0},
    ),
    # the processor adds image tokens, BOS and the closing newline; the prompt is a prefix
    # attended bidirectionally (token type 0), an answer is causal suffix (type 1)
    "paligemma": Family(
        "PaliGemma",
        _LLAVA,
        prompt="<image>{prompt}",
        drop_keys=("labels",),
        answer_token_types={"token_type_ids": 1},
    ),
}
