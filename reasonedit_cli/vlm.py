"""The VLM backend: a thin, batched layer over transformers image-text-to-text models.

Everything ReasonEdit needs from a VLM goes through `VLM`:

* `generate` — answer prompts about images (greedy, batched, left padding);
* `pooled_inputs` — the mean-pooled *input* of any named layers, captured with forward
  pre-hooks in ONE forward pass (the vision half of the dual key, DESIGN 1.4);
* `yes_probability` — P(yes) / (P(yes) + P(no)) of the next token (patch verification);
* `answer_loss` — the mean token loss of an answer text (patch scoring);
* `candidate_layers` — vision blocks, projector and language blocks, named by role.

torch and transformers are imported inside functions so that importing this module
(and `reasonedit --help`) stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reasonedit_cli.errors import ReasonEditError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

#: The model used when `--model` is not given: the demo LLaVA trained on easy-vqa.
DEFAULT_MODEL = str(Path(__file__).parent / "models" / "demo_vlm")

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")

#: The families `--model` accepts (config `model_type` -> name shown to users). Each is
#: loaded with AutoModelForImageTextToText and has its layers named by `_ROLE_PATTERNS`.
SUPPORTED_FAMILIES: dict[str, str] = {
    "llava": "LLaVA 1.5",
    "llava_next": "LLaVA-NeXT (1.6)",
    "llava_onevision": "LLaVA-OneVision",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "idefics3": "Idefics3",
    "smolvlm": "SmolVLM",
    "instructblip": "InstructBLIP (decoder-only language model)",
}

# Module-name patterns that identify layer roles across families. The first group of a
# block pattern is the block index. Order matters: the first matching role wins.
#   LLaVA / NeXT / OneVision: model.vision_tower.vision_model.encoder.layers.N,
#       model.multi_modal_projector, model.language_model.layers.N
#   Qwen2-VL / Qwen2.5-VL: model.visual.blocks.N, model.visual.merger,
#       model.language_model.layers.N
#   Idefics3 / SmolVLM: model.vision_model.encoder.layers.N, model.connector,
#       model.text_model.layers.N
#   InstructBLIP: vision_model.encoder.layers.N, language_projection (its input is the
#       Q-Former's query output), language_model.layers.N
_ROLE_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (
        "vision",
        re.compile(
            r"^(?:model\.)?(?:vision_tower|vision_model|visual)(?:\.vision_model)?"
            r"\.(?:encoder\.)?(?:layers|blocks|layer)\.(\d+)$"
        ),
    ),
    (
        "projector",
        re.compile(
            r"^(?:model\.)?(?:multi_modal_projector|visual\.merger|connector"
            r"|language_projection)$"
        ),
    ),
    (
        "language",
        re.compile(
            r"^(?:model\.)?(?:language_model|text_model)(?:\.model)?"
            r"\.layers\.(\d+)$"
        ),
    ),
]

# The prompt around one image when the processor has no chat template.
_FALLBACK_PROMPTS: dict[str, str] = {
    "qwen2_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}"
    "<|im_end|>\n<|im_start|>assistant\n",
    "idefics3": "User:<image>{prompt}<end_of_utterance>\nAssistant:",
    # InstructBLIP's processor puts the query tokens in front of the text itself.
    "instructblip": "{prompt}",
    "llava_onevision": "<|im_start|>user <image>\n{prompt}<|im_end|><|im_start|>assistant\n",
}
_FALLBACK_PROMPTS["qwen2_5_vl"] = _FALLBACK_PROMPTS["qwen2_vl"]
_FALLBACK_PROMPTS["smolvlm"] = _FALLBACK_PROMPTS["idefics3"]


@dataclass(frozen=True)
class LayerInfo:
    """A layer whose input can serve as the VLM half of a key."""

    name: str  # the module path inside the model, e.g. model.language_model.layers.2
    role: str  # "vision" | "projector" | "language"
    index: int  # position within its role (0 for the projector)

    @property
    def label(self) -> str:
        """Short human name such as `language.2`, accepted wherever a layer is named."""
        return self.role if self.role == "projector" else f"{self.role}.{self.index}"


def resolve_device(device: str) -> str:
    """Map `auto` to the best available device; reject devices that are not there."""
    import torch

    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for but MPS is not available")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """float32 on CPU (fast and exact there); bfloat16 on GPUs that support it."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def model_revision(path: str) -> str:
    """A stable identifier of the weights: the hub snapshot hash, or a hash of the files.

    Recorded in the codebook manifest so a codebook built with other weights is noticed.
    """
    p = Path(path)
    if not p.is_dir():
        return "hub:" + path
    if p.parent.name == "snapshots":  # a Hugging Face cache snapshot directory
        return p.name
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".jinja"}:
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.suffix != ".safetensors":
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


class VLM:
    """A loaded image-text-to-text model with its processor."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        self.name = model
        self.device = resolve_device(device)
        self.torch_dtype = resolve_dtype(dtype, self.device)
        path = Path(model)
        if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
            raise UsageError(f"model directory {model} does not exist")
        try:
            config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            model_type = load_config_json(model).get("model_type") if path.is_dir() else None
            if model_type and model_type not in SUPPORTED_FAMILIES:  # unknown to transformers
                raise ReasonEditError(_unsupported_message(model, model_type)) from None
            raise ReasonEditError(f"cannot load model {model}: {_first_line(exc)}") from None
        self.family = config.model_type
        _check_supported(model, config)
        try:
            self.processor = _load_processor(model, config, trust_remote_code)
            self.model = AutoModelForImageTextToText.from_pretrained(
                model,
                dtype=self.torch_dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
            )
        except ValueError as exc:
            msg = _first_line(exc)
            if "Unrecognized configuration class" in msg or "does not recognize" in msg:
                raise ReasonEditError(_unsupported_message(model, config.model_type)) from None
            raise ReasonEditError(f"cannot load model {model}: {msg}") from None
        except (OSError, ImportError) as exc:
            raise ReasonEditError(f"cannot load model {model}: {_first_line(exc)}") from None
        self.model.to(self.device).eval()
        torch.set_grad_enabled(False)
        self.revision = model_revision(model)
        self.tokenizer = self.processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        qformer_tokenizer = getattr(self.processor, "qformer_tokenizer", None)
        if qformer_tokenizer is not None:  # InstructBLIP: the Q-Former's view of the text
            qformer_tokenizer.padding_side = "right"
        self._splits: list[int] | None = None  # images/patches per sample of the last batch
        self._yes_ids = self._word_token_ids(["yes", "Yes", " yes", " Yes"])
        self._no_ids = self._word_token_ids(["no", "No", " no", " No"])
        self.forward_calls = 0  # counted for benchmarks (patch search, batching)

    # ------------------------------------------------------------------ layers
    def candidate_layers(self) -> list[LayerInfo]:
        """Vision blocks, the projector and language blocks, in model order."""
        found: list[LayerInfo] = []
        for name, _module in self.model.named_modules():
            for role, pattern in _ROLE_PATTERNS:
                m = pattern.match(name)
                if m:
                    idx = int(m.group(1)) if m.groups() else 0
                    found.append(LayerInfo(name=name, role=role, index=idx))
                    break
        order = {"vision": 0, "projector": 1, "language": 2}
        found.sort(key=lambda li: (order[li.role], li.index))
        return found

    def resolve_layer(self, layer: str) -> LayerInfo:
        """Accept a short label (`language.2`, `vision.0`, `projector`) or a module path."""
        layers = self.candidate_layers()
        for li in layers:
            if layer in (li.label, li.name):
                return li
        if layer == "language.mid":
            lang = [li for li in layers if li.role == "language"]
            return lang[len(lang) // 2]
        labels = ", ".join(li.label for li in layers)
        raise UsageError(f"unknown layer {layer!r}; this model has: {labels}")

    # ----------------------------------------------------------------- prompts
    def chat_text(self, prompt: str) -> str:
        """The model's own chat template around one image and one user prompt."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        template = getattr(self.processor, "chat_template", None)
        if template:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        fallback = _FALLBACK_PROMPTS.get(self.family)
        if fallback is not None:
            return fallback.format(prompt=prompt)
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        image_token = getattr(image_token, "content", image_token)
        return f"USER: {image_token}\n{prompt} ASSISTANT:"

    def _inputs(self, images: Sequence[Image.Image], prompts: Sequence[str], padding_side: str):
        texts = [self.chat_text(p) for p in prompts]
        self.tokenizer.padding_side = padding_side
        batch = self.processor(images=list(images), text=texts, padding=True, return_tensors="pt")
        self._splits = self._image_splits(batch, len(texts))
        return batch.to(self.device)

    def _image_splits(self, batch: Any, n: int) -> list[int] | None:
        """How many rows of a vision-side tensor belong to each sample, where not one each.

        Qwen2-VL flattens all patches of a batch into one (total_patches, D) tensor
        (`image_grid_thw` gives each image's share); LLaVA-NeXT/OneVision run the vision
        tower on a varying number of crops per image (`image_sizes`); Idefics3/SmolVLM on
        the real (not padding) tiles of each sample. `_pool` means per sample with these.
        """
        if "image_grid_thw" in batch:
            return [int(x) for x in batch["image_grid_thw"].prod(-1).tolist()]
        if "image_sizes" in batch and self.family in ("llava_next", "llava_onevision"):
            import importlib

            module = importlib.import_module(
                f"transformers.models.{self.family}.modeling_{self.family}"
            )
            cfg = self.model.config
            return [
                int(
                    module.image_size_to_num_patches(
                        image_size=tuple(size),
                        grid_pinpoints=cfg.image_grid_pinpoints,
                        patch_size=cfg.vision_config.image_size,
                    )
                )
                for size in batch["image_sizes"].tolist()
            ]
        pv = batch.get("pixel_values") if hasattr(batch, "get") else None
        if pv is not None and pv.dim() == 5:  # (batch, tiles, C, H, W), zero-padded tiles
            per_tile = pv[0, 0].numel()
            real = (pv == 0.0).flatten(2).sum(-1) != per_tile
            return [max(int(r), 1) for r in real.sum(1).tolist()]
        return None

    def _forward(self, batch: dict) -> Any:
        self.forward_calls += 1
        out = self.model(**batch, use_cache=False)
        return out

    # --------------------------------------------------------------- generate
    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 16,
        batch_size: int = 16,
    ) -> list[str]:
        """Greedy answers, one per (image, prompt), batched with left padding."""
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            imgs = images[start : start + batch_size]
            prs = prompts[start : start + batch_size]
            batch = self._inputs(imgs, prs, "left")
            self.forward_calls += 1
            out = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            for seq in self.tokenizer.batch_decode(new, skip_special_tokens=True):
                answers.append(seq.strip())
        return answers

    # ------------------------------------------------------- hooked embeddings
    def pooled_inputs(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        layers: Sequence[str],
        *,
        batch_size: int = 16,
    ) -> dict[str, np.ndarray]:
        """Mean-pooled float32 inputs of `layers`, all captured in one forward per batch.

        Language layers are pooled over real tokens only (the attention mask), so padding
        never changes a key: a batched embedding equals the one computed alone.
        """
        infos = [self.resolve_layer(name) for name in layers]
        result: dict[str, list[np.ndarray]] = {li.label: [] for li in infos}
        modules = dict(self.model.named_modules())
        for start in range(0, len(prompts), batch_size):
            imgs = images[start : start + batch_size]
            prs = prompts[start : start + batch_size]
            batch = self._inputs(imgs, prs, "right")
            mask = batch["attention_mask"]
            captured: dict[str, Any] = {}
            handles = []
            for li in infos:
                handles.append(
                    modules[li.name].register_forward_pre_hook(
                        _capture(captured, li.label), with_kwargs=True
                    )
                )
            try:
                self._forward(batch)
            finally:
                for h in handles:
                    h.remove()
            for li in infos:
                if li.label not in captured:
                    raise ReasonEditError(f"layer {li.label} was not run by the model's forward")
                result[li.label].append(_pool(captured[li.label], mask, len(prs), self._splits))
        return {k: np.concatenate(v, axis=0) for k, v in result.items()}

    # ---------------------------------------------------------- yes/no, loss
    def yes_probability(
        self, images: Sequence[Image.Image], prompts: Sequence[str], *, batch_size: int = 16
    ) -> np.ndarray:
        """P(yes) / (P(yes) + P(no)) of the first answer token for each prompt."""
        import torch

        out: list[np.ndarray] = []
        for start in range(0, len(prompts), batch_size):
            batch = self._inputs(
                images[start : start + batch_size], prompts[start : start + batch_size], "right"
            )
            logits = self._forward(batch).logits
            last = batch["attention_mask"].sum(dim=1) - 1
            nxt = logits[torch.arange(logits.shape[0]), last].float().softmax(-1)
            p_yes = nxt[:, self._yes_ids].sum(-1)
            p_no = nxt[:, self._no_ids].sum(-1)
            out.append((p_yes / (p_yes + p_no).clamp_min(1e-12)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def answer_loss(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        answers: Sequence[str],
        *,
        batch_size: int = 16,
    ) -> np.ndarray:
        """Mean cross-entropy of each answer's tokens given image and prompt (lower = better)."""
        losses: list[float] = []
        for start in range(0, len(prompts), batch_size):
            batch, labels, _ = self.answer_inputs(
                images[start : start + batch_size],
                prompts[start : start + batch_size],
                answers[start : start + batch_size],
            )
            per = answer_token_loss(self._forward(batch).logits, labels)
            losses.extend(per.cpu().tolist())
        return np.asarray(losses, dtype=np.float32)

    def answer_inputs(
        self, images: Sequence[Image.Image], prompts: Sequence[str], answers: Sequence[str]
    ) -> tuple[Any, Any, Any]:
        """One right-padded batch of prompt + answer tokens, for scoring or training.

        Returns `(batch, labels, prompt_lengths)`: the model inputs, the label ids (-100
        outside the answer) and each sample's prompt length in tokens, so position
        `prompt_lengths[i] - 1` is the last prompt token (where an adaptor such as
        GRACE reads its key and writes its value).
        """
        import torch

        batch = self._inputs(images, prompts, "right")
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
        n_prompt = mask.sum(dim=1)
        ans_ids = [
            self.tokenizer(" " + a.strip(), add_special_tokens=False)["input_ids"] for a in answers
        ]
        total = int((n_prompt + torch.tensor([len(a) for a in ans_ids])).max())
        pad = self.tokenizer.pad_token_id
        new_ids = torch.full((len(prompts), total), pad, dtype=ids.dtype)
        new_mask = torch.zeros((len(prompts), total), dtype=mask.dtype)
        labels = torch.full((len(prompts), total), -100, dtype=torch.long)
        for i, a in enumerate(ans_ids):
            n = int(n_prompt[i])
            new_ids[i, :n] = ids[i, :n]
            new_ids[i, n : n + len(a)] = torch.tensor(a, dtype=ids.dtype)
            new_mask[i, : n + len(a)] = 1
            labels[i, n : n + len(a)] = torch.tensor(a)
        batch["input_ids"] = new_ids.to(self.device)
        batch["attention_mask"] = new_mask.to(self.device)
        if "token_type_ids" in batch:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        if "mm_token_type_ids" in batch:
            mm = torch.zeros_like(batch["input_ids"])
            mm[:, : batch["mm_token_type_ids"].shape[1]] = batch["mm_token_type_ids"]
            batch["mm_token_type_ids"] = mm
        return batch, labels.to(self.device), n_prompt.to(self.device)

    def layer_module(self, layer: str) -> Any:
        """The torch module of a named layer (`language.2`, `projector`, a module path).

        The seam for adaptors that hook one layer (the GRACE baseline): they register
        their own forward hooks on it and remove them when done.
        """
        return self.model.get_submodule(self.resolve_layer(layer).name)

    # ---------------------------------------------------------------- helpers
    def _word_token_ids(self, words: list[str]) -> list[int]:
        """First-token ids of the spellings of a word, for the yes/no probability."""
        ids: set[int] = set()
        for w in words:
            toks = self.tokenizer(w, add_special_tokens=False)["input_ids"]
            if toks:
                ids.add(toks[0])
        return sorted(ids)


def answer_token_loss(logits: Any, labels: Any) -> Any:
    """Per sample, the mean next-token cross-entropy over its answer tokens (labels != -100).

    A torch tensor (differentiable when the logits are), shared by `VLM.answer_loss` and
    the adaptors that train against the same loss.
    """
    import torch

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    valid = (shift_labels != -100).float()
    return (ce * valid).sum(1) / valid.sum(1).clamp_min(1)


def _capture(store: dict[str, Any], label: str):
    """A forward pre-hook that records a layer's input hidden states."""

    def hook(module, args, kwargs):
        if args and hasattr(args[0], "shape"):
            store[label] = args[0].detach()
        else:
            for key in ("hidden_states", "x", "image_features", "input"):
                if key in kwargs and hasattr(kwargs[key], "shape"):
                    store[label] = kwargs[key].detach()
                    break
        return None

    return hook


def _pool(hidden: Any, mask: Any, batch: int, splits: Sequence[int] | None = None) -> np.ndarray:
    """Mean over tokens in float32; language layers use the attention mask.

    `splits` (rows per sample) groups vision-side tensors whose first dimension is not
    the batch: flattened Qwen2-VL patches, LLaVA-NeXT crops, Idefics3 tiles.
    """
    import torch

    h = hidden.float()
    if h.dim() == 3 and h.shape[0] == batch and h.shape[1] == mask.shape[1]:
        m = mask.to(h.device).unsqueeze(-1).float()
        return ((h * m).sum(1) / m.sum(1).clamp_min(1)).cpu().numpy()
    if splits is not None and len(splits) == batch and h.shape[0] == sum(splits) != batch:
        flat = h.reshape(h.shape[0], -1, h.shape[-1])
        parts = torch.split(flat, list(splits), dim=0)
        return torch.stack([p.reshape(-1, h.shape[-1]).mean(0) for p in parts]).cpu().numpy()
    if h.dim() == 3 and h.shape[0] == batch:
        return h.mean(1).cpu().numpy()
    if h.dim() == 3 and h.shape[0] % batch == 0:  # several crops/tiles per sample
        return h.reshape(batch, -1, h.shape[-1]).mean(1).cpu().numpy()
    if h.dim() == 2 and h.shape[0] % batch == 0:  # flattened patches, equal shares
        return h.reshape(batch, -1, h.shape[-1]).mean(1).cpu().numpy()
    raise ReasonEditError(f"cannot pool a layer input of shape {tuple(h.shape)}")


def _unsupported_message(model: str, model_type: str) -> str:
    return (
        f"model {model} ({model_type}) is not a supported image-text-to-text model; "
        f"supported: {', '.join(SUPPORTED_FAMILIES)}"
    )


def _check_supported(model: str, config: Any) -> None:
    """Refuse text-only models, unknown families and encoder-decoder language models."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_FAMILIES:
        raise ReasonEditError(_unsupported_message(model, model_type))
    text = getattr(config, "text_config", None)
    if text is not None and getattr(text, "is_encoder_decoder", False):
        raise ReasonEditError(
            f"model {model} ({model_type} with a {text.model_type} language model) is not "
            "supported: only decoder-only language models are (e.g. InstructBLIP-Vicuna, "
            "not InstructBLIP-Flan-T5)"
        )


@contextmanager
def _without_processor_type_checks():
    """Let a processor be built with a missing part (None) — see `_load_processor`."""
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, argument_name, argument):
        if argument is None:
            return None
        return original(self, argument_name, argument)

    ProcessorMixin.check_argument_for_proper_class = lenient
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def _load_processor(model: str, config: Any, trust_remote_code: bool) -> Any:
    """AutoProcessor, or — when its video processor needs torchvision, which is not
    installed — the family's processor built from its image processor, tokenizer and
    chat template with no video processor (ReasonEdit never sends videos)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.processing_utils import ProcessorMixin

    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[config.model_type])
    processor_dict, _ = ProcessorMixin.get_processor_dict(model)
    parts = {
        "image_processor": AutoImageProcessor.from_pretrained(model),
        "tokenizer": AutoTokenizer.from_pretrained(model),
    }
    if "video_processor" in cls.get_attributes():
        parts["video_processor"] = None
    skip = {"processor_class", "auto_map", *cls.get_attributes()}
    kwargs = {k: v for k, v in processor_dict.items() if k not in skip}
    with _without_processor_type_checks():
        return cls(**parts, **kwargs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_config_json(path: str) -> dict[str, Any]:
    """The raw config.json of a local model directory (empty for hub ids)."""
    p = Path(path) / "config.json"
    return json.loads(p.read_text()) if p.is_file() else {}
