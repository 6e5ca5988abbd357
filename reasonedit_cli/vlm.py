"""The VLM backend: a thin, batched layer over transformers image-text-to-text models.

Everything ReasonEdit needs from a VLM goes through `VLM`:

* `generate` — answer prompts about images (greedy, batched, left padding);
* `pooled_inputs` — the mean-pooled *input* of any named layers, captured with forward
  pre-hooks in ONE forward pass (the vision half of the dual key, docs/method.md#dual-key);
* `yes_probability` — P(yes) / (P(yes) + P(no)) of the next token (patch verification);
* `answer_loss` — the mean token loss of an answer text (patch scoring);
* `candidate_layers` — vision blocks, projector and language blocks, named by role.

What differs between model families (where the layers are, prompt fallback, image
splits, batch fix-ups, processor quirks) is data: one `families.Family` record each,
read through `VLM.spec`. torch and transformers are imported inside functions so that
importing this module (and `reasonedit --help`) stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reasonedit_cli.errors import ReasonEditError, UsageError
from reasonedit_cli.errors import first_line as _first_line
from reasonedit_cli.families import FAMILIES, Family
from reasonedit_cli.validation import DEVICES, DTYPES  # the CLI checks the same lists

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

#: The model used when `--model` is not given: the demo LLaVA trained on easy-vqa.
DEFAULT_MODEL = str(Path(__file__).parent / "models" / "demo_vlm")

#: Short `--model` names of the bundled models -> their directory under models/
#: (docs/demo_vlm.md, docs/scenes_vlm.md). Codebooks record them as `bundled:<dir>`.
BUNDLED_MODELS = {"demo": "demo_vlm", "scenes": "scenes_vlm"}


def bundled_name(model: str) -> str:
    """`demo` / `scenes` -> `bundled:demo_vlm` / `bundled:scenes_vlm`; others unchanged."""
    return f"bundled:{BUNDLED_MODELS[model]}" if model in BUNDLED_MODELS else model


def model_path(model: str) -> str:
    """Where a recorded model name loads from: `bundled:<dir>` is a packaged directory."""
    if model.startswith("bundled:") and model[len("bundled:") :] in BUNDLED_MODELS.values():
        return str(Path(__file__).parent / "models" / model[len("bundled:") :])
    return model


#: The families `--model` accepts (config `model_type` -> name shown to users).
SUPPORTED_FAMILIES: dict[str, str] = {k: f.name for k, f in FAMILIES.items()}

#: The two hook points offered for every candidate layer (REFERENCE row 3).
#:   "input":  the raw input of the block / projector (the residual stream); label `language.12`
#:   "normed": the input of the block's MLP's first `Linear`, i.e. after its norm (`mlp.fc1`
#:             of a CLIP block, `mlp.gate_proj` of a Llama/Qwen block, `linear_1` of the LLaVA
#:             projector) — the authors' point; label `language.12.normed`
POINTS = ("input", "normed")
NORMED_SUFFIX = ".normed"


@dataclass(frozen=True)
class LayerInfo:
    """A hook point whose captured tensor can serve as the VLM half of a key."""

    name: str  # the block's module path inside the model, e.g. model.language_model.layers.2
    role: str  # "vision" | "projector" | "language"
    index: int  # position within its role (0 for the projector)
    point: str = "input"  # "input" (the block's raw input) or "normed" (see POINTS)
    hook: str = ""  # the module actually hooked; "" = the block itself
    hook_output: bool = False  # capture the hooked module's output instead of its input

    @property
    def label(self) -> str:
        """Short human name such as `language.2` or `language.2.normed`, accepted wherever
        a layer is named."""
        base = self.role if self.role == "projector" else f"{self.role}.{self.index}"
        return base + (NORMED_SUFFIX if self.point == "normed" else "")

    @property
    def normed(self) -> bool:
        return self.point == "normed"

    @property
    def module(self) -> str:
        """The module path the capture hook is registered on."""
        return self.hook or self.name


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
        from reasonedit_cli.hub import resolve_model

        self.name = model
        path = Path(model)
        if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
            raise UsageError(f"model directory {model} does not exist")
        # a hub id: its cached snapshot, or one line at once when it cannot be had
        requested, model = model, resolve_model(model)
        from transformers import AutoConfig, AutoModelForImageTextToText

        self.device = resolve_device(device)
        self.torch_dtype = resolve_dtype(dtype, self.device)
        try:
            config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            model_type = load_config_json(model).get("model_type") if path.is_dir() else None
            if model_type and model_type not in SUPPORTED_FAMILIES:  # unknown to transformers
                raise ReasonEditError(_unsupported_message(model, model_type)) from None
            raise ReasonEditError(f"cannot load model {model}: {_first_line(exc)}") from None
        #: the config `model_type` (recorded in codebook manifests)
        self.family: str = config.model_type
        _check_supported(model, config)
        #: the family's record: everything family-specific is read from it
        self.spec: Family = FAMILIES[self.family]
        #: an encoder-decoder language model (InstructBLIP with Flan-T5): answers are
        #: decoder tokens, see `_decoder_start`
        self.encoder_decoder = self.spec.is_encoder_decoder(config)
        _check_requirements(model, self.spec)
        loader: Any = AutoModelForImageTextToText  # its from_pretrained is typed too narrowly
        try:
            self.processor = _load_processor(model, self.spec, trust_remote_code)
            self.model = loader.from_pretrained(
                model,
                dtype=self.torch_dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
            )
        except ReasonEditError:
            raise
        except ValueError as exc:
            msg = _first_line(exc)
            if "Unrecognized configuration class" in msg or "does not recognize" in msg:
                raise ReasonEditError(_unsupported_message(model, config.model_type)) from None
            raise ReasonEditError(_load_failure(model, self.family, exc)) from None
        except Exception as exc:  # any other load failure: one line, never a traceback
            raise ReasonEditError(_load_failure(model, self.family, exc)) from None
        self.model.to(self.device).eval()
        # Frozen, not grad mode off: no forward builds a graph over the weights, and the
        # caller's own autograd (a training script, GRACE's value) keeps working.
        self.model.requires_grad_(False)
        self.revision = model_revision(requested)
        self.tokenizer = self.processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        for part in self.spec.right_padded:  # e.g. InstructBLIP's Q-Former tokenizer
            getattr(self.processor, part).padding_side = "right"
        self._splits: list[int] | None = None  # images/patches per sample of the last batch
        self._layers: list[LayerInfo] | None = None  # candidate_layers, found once
        self._adds_bos: bool | None = None  # does the tokenizer add BOS itself?
        self._yes_ids = self._word_token_ids(["yes", "Yes", " yes", " Yes"])
        self._no_ids = self._word_token_ids(["no", "No", " no", " No"])
        self.forward_calls = 0  # counted for benchmarks (patch search, batching)

    # ------------------------------------------------------------------ layers
    def candidate_layers(self) -> list[LayerInfo]:
        """Vision blocks, the projector and language blocks, in model order, each with
        both hook points: the raw block input (`language.2`) and the input of its MLP's
        first Linear after the norm (`language.2.normed`)."""
        if self._layers is None:
            self._layers = _find_layers(self.model, self.spec)
        return list(self._layers)

    def resolve_layer(self, layer: str) -> LayerInfo:
        """Accept a short label (`language.2`, `vision.0.normed`, `projector`,
        `language.mid`, `language.mid.normed`) or a module path (a block: its raw input;
        the hooked Linear: the normed point)."""
        layers = self.candidate_layers()
        for li in layers:
            if layer == li.label or (layer == li.name and not li.normed):
                return li
        for li in layers:
            if li.normed and layer == li.hook:
                return li
        normed = layer.endswith(NORMED_SUFFIX)
        base = layer[: -len(NORMED_SUFFIX)] if normed else layer
        if base == "language.mid":
            lang = [li for li in layers if li.role == "language" and not li.normed]
            if lang:
                mid = lang[len(lang) // 2]
                return self.resolve_layer(mid.label + (NORMED_SUFFIX if normed else ""))
        labels = ", ".join(li.label for li in layers if not li.normed)
        raise UsageError(
            f"unknown layer {layer!r}; this model has: {labels} "
            f"(each also as LABEL{NORMED_SUFFIX}: the input of its first Linear after the norm)"
        )

    # ----------------------------------------------------------------- prompts
    def chat_text(self, prompt: str) -> str:
        """The model's own chat template around one image and one user prompt."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        template = getattr(self.processor, "chat_template", None)
        if template:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        return self.spec.fallback_prompt(prompt, getattr(image_token, "content", image_token))

    def _inputs(self, images: Sequence[Image.Image], prompts: Sequence[str], padding_side: str):
        texts = [self._without_double_bos(self.chat_text(p)) for p in prompts]
        self.tokenizer.padding_side = padding_side
        imgs: list[Any] = [[i] for i in images] if self.spec.nested_images else list(images)
        batch = self.processor(images=imgs, text=texts, padding=True, return_tensors="pt")
        for key in self.spec.drop_keys:  # e.g. PaliGemma's training labels
            batch.pop(key, None)
        self._splits = self._image_splits(batch, len(texts))
        return batch.to(self.device)

    def _without_double_bos(self, text: str) -> str:
        """Drop a BOS the chat template wrote when the tokenizer adds one itself (Gemma 3,
        Idefics3 templates start with it), as `apply_chat_template(tokenize=True)` does."""
        if self._adds_bos is None:
            bos_id = self.tokenizer.bos_token_id
            ids = self.tokenizer("a")["input_ids"]
            self._adds_bos = bos_id is not None and ids[:1] == [bos_id]
        bos = self.tokenizer.bos_token
        if self._adds_bos and bos and text.startswith(bos):
            return text[len(bos) :]
        return text

    def _image_splits(self, batch: Any, n: int) -> list[int] | None:
        """How many rows of a vision-side tensor belong to each sample, where not one
        each: the family's `image_split` rule (flattened Qwen2-VL patches, LLaVA-NeXT
        crops, Idefics3 tiles). `_pool` means per sample with these."""
        split = self.spec.image_split
        return split(batch, self.model.config) if split is not None else None

    def _forward(self, batch: dict) -> Any:
        """One forward pass. An encoder-decoder model gets the decoder's start token as its
        only decoder input unless the batch brings its own (the answer loss)."""
        self.forward_calls += 1
        if self.encoder_decoder and "decoder_input_ids" not in batch:
            batch = {**batch, "decoder_input_ids": self._decoder_start(len(batch["input_ids"]))}
        with self._model_errors("forward"):
            return self.model(**batch, use_cache=False)

    def _decoder_start(self, n: int) -> Any:
        """(n, 1) decoder start tokens: the decoder state that predicts the first answer
        token (P(yes), the decoder-block keys)."""
        import torch

        start = self.model.config.get_text_config().decoder_start_token_id
        if start is None:
            start = self.tokenizer.pad_token_id
        return torch.full((n, 1), int(start), dtype=torch.long, device=self.device)

    @contextmanager
    def _model_errors(self, what: str):
        """A family quirk that makes the model itself fail becomes one line naming the
        model and what to do (the CLI prints it; no traceback)."""
        try:
            yield
        except ReasonEditError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            raise ReasonEditError(
                f"model {self.name} ({self.family}) failed in {what}: {_first_line(e)}; "
                f"{_WHAT_TO_DO}"
            ) from None

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
        done = self.complete(images, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return [c.text for c in done]

    def complete(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        *,
        max_new_tokens: int | Sequence[int] = 16,
        batch_size: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[Completion]:
        """Answers with their token counts, one per (image, prompt), batched.

        `generate` is this with one token budget and greedy decoding, so a server answer
        and an `ask` answer come from the same code. `max_new_tokens` may differ per
        prompt: a batch runs to its largest budget and each row is cut at its own, which
        leaves a greedy row exactly as if run alone with that budget. `temperature` > 0
        samples (with `top_p`). `on_tokens(row, ids)` is called after every decoding step
        with the ids generated so far for each row still running (streaming).
        """
        budgets = (
            [int(max_new_tokens)] * len(prompts)
            if isinstance(max_new_tokens, int)
            else [int(b) for b in max_new_tokens]
        )
        if len(budgets) != len(prompts):
            raise ReasonEditError("complete needs one token budget per prompt")
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": float(temperature), "top_p": top_p}
        eos = _eos_ids(self.model, self.tokenizer)
        out_all: list[Completion] = []
        for start in range(0, len(prompts), batch_size):
            imgs = images[start : start + batch_size]
            prs = prompts[start : start + batch_size]
            limits = budgets[start : start + batch_size]
            # an encoder reads right-padded text; a decoder-only model continues at the end
            batch = self._inputs(imgs, prs, "right" if self.encoder_decoder else "left")
            self.forward_calls += 1
            streamer = None
            if on_tokens is not None:
                streamer = _StepStreamer(on_tokens, start, limits, eos)
            with self._model_errors("generate"):
                out = self.model.generate(
                    **batch,
                    max_new_tokens=max(limits),
                    pad_token_id=self.tokenizer.pad_token_id,
                    streamer=streamer,
                    **sampling,
                )
            # encoder-decoder: the output is the decoder's sequence alone, its start token
            # first (the streamer's first put); decoder-only: the prompt, then the answer
            new = out[:, 1:] if self.encoder_decoder else out[:, batch["input_ids"].shape[1] :]
            prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
            for ids, limit, n_prompt in zip(new.tolist(), limits, prompt_lengths):
                ids = ids[:limit]
                cut = next((i for i, t in enumerate(ids) if t in eos), None)
                finished = cut is not None
                if finished:
                    ids = ids[:cut]
                out_all.append(
                    Completion(
                        text=self.decode(ids),
                        tokens=len(ids),
                        finished=finished,
                        prompt_tokens=int(n_prompt),
                    )
                )
        return out_all

    def decode(self, ids: Sequence[int]) -> str:
        """Generated token ids as answer text (special tokens dropped, stripped)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

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
                module = modules[li.module]
                if li.hook_output:
                    handle = module.register_forward_hook(_capture_output(captured, li.label))
                else:
                    handle = module.register_forward_pre_hook(
                        _capture(captured, li.label, _input_name(module)), with_kwargs=True
                    )
                handles.append(handle)
            try:
                self._forward(batch)
            finally:
                for h in handles:
                    h.remove()
            for li in infos:
                if li.label not in captured:
                    raise ReasonEditError(f"layer {li.label} was not run by the model's forward")
                hidden = captured[li.label]
                text = li.role == "language"
                result[li.label].append(_pool(hidden, mask, len(prs), self._splits, text=text))
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
            if self.encoder_decoder:  # the decoder's first step
                last = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            else:
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
            imgs = images[start : start + batch_size]
            prs = prompts[start : start + batch_size]
            ans = answers[start : start + batch_size]
            if self.encoder_decoder:
                ans_ids = [
                    self.tokenizer(" " + a.strip(), add_special_tokens=False)["input_ids"]
                    for a in ans
                ]
                losses.extend(self._decoder_answer_loss(self._inputs(imgs, prs, "right"), ans_ids))
                continue
            batch, labels, _ = self.answer_inputs(imgs, prs, ans)
            per = answer_token_loss(self._forward(batch).logits, labels)
            losses.extend(per.cpu().tolist())
        return np.asarray(losses, dtype=np.float32)

    def answer_inputs(
        self, images: Sequence[Image.Image], prompts: Sequence[str], answers: Sequence[str]
    ) -> tuple[Any, Any, Any]:
        """One right-padded batch of prompt + answer tokens, for scoring or training
        (decoder-only language models).

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
        for key, answer_type in self.spec.answer_token_types.items():
            if key in batch:  # the prompt keeps its types; answer tokens get the family's
                types = torch.zeros_like(batch["input_ids"])
                old = batch[key]
                for i, a in enumerate(ans_ids):
                    n = int(n_prompt[i])
                    types[i, :n] = old[i, :n]
                    types[i, n : n + len(a)] = answer_type
                batch[key] = types
        return batch, labels.to(self.device), n_prompt.to(self.device)

    def layer_module(self, layer: str) -> Any:
        """The torch module a layer name denotes: the block for `language.2`, the hooked
        Linear for `language.2.normed`, the projector for `projector`.

        The seam for adaptors that hook one layer (the GRACE baseline): they register
        their own forward hooks on it and remove them when done.
        """
        return self.model.get_submodule(self.resolve_layer(layer).module)

    def _decoder_answer_loss(self, batch: Any, ans_ids: list[list[int]]) -> list[float]:
        """Encoder-decoder answer loss: the encoder reads the prompt, the decoder is
        teacher-forced on the answer (start token, then the answer shifted right)."""
        import torch

        n = len(ans_ids)
        length = max(1, max(len(a) for a in ans_ids))
        start = self._decoder_start(n)
        dec = torch.full((n, length), self.tokenizer.pad_token_id, dtype=torch.long)
        dec_mask = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        for i, a in enumerate(ans_ids):
            dec[i, 0] = int(start[i, 0])
            dec[i, 1 : len(a)] = torch.tensor(a[:-1], dtype=torch.long)
            dec_mask[i, : max(1, len(a))] = 1
            labels[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        batch["decoder_input_ids"] = dec.to(self.device)
        batch["decoder_attention_mask"] = dec_mask.to(self.device)
        logits = self._forward(batch).logits
        # the decoder's logits already line up with its labels (teacher forcing)
        return answer_token_loss(logits, labels.to(self.device), shift=False).cpu().tolist()

    # ---------------------------------------------------------------- helpers
    def _word_token_ids(self, words: list[str]) -> list[int]:
        """First-token ids of the spellings of a word, for the yes/no probability."""
        ids: set[int] = set()
        for w in words:
            toks = self.tokenizer(w, add_special_tokens=False)["input_ids"]
            if toks:
                ids.add(toks[0])
        return sorted(ids)


def answer_token_loss(logits: Any, labels: Any, *, shift: bool = True) -> Any:
    """Per sample, the mean next-token cross-entropy over its answer tokens (labels != -100).

    A torch tensor (differentiable when the logits are), shared by `VLM.answer_loss` and
    the adaptors that train against the same loss. `shift=False` when position t's logits
    already predict label t (an encoder-decoder's decoder).
    """
    import torch

    shift_logits = (logits[:, :-1] if shift else logits).float()
    shift_labels = labels[:, 1:] if shift else labels
    ce = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    valid = (shift_labels != -100).float()
    return (ce * valid).sum(1) / valid.sum(1).clamp_min(1)


def _capture(store: dict[str, Any], label: str, name: str):
    """A forward pre-hook that records a layer's input hidden states: the first positional
    argument, or the keyword `name` (the forward's first parameter, `_input_name`)."""

    def hook(module, args, kwargs):
        value = args[0] if args else kwargs.get(name)
        if hasattr(value, "shape"):
            store[label] = value.detach()
        return None

    return hook


def _input_name(module: Any) -> str:
    """The name of a module's input: the first parameter of its `forward`
    (`hidden_states` of a block, `input` of a Linear, `x` of Qwen's merger)."""
    import inspect

    params = iter(inspect.signature(module.forward).parameters)
    return next(params, "hidden_states")


def _capture_output(store: dict[str, Any], label: str):
    """A forward hook that records a module's output (a norm with no Linear after it)."""

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        store[label] = out.detach()

    return hook


def _pool(
    hidden: Any, mask: Any, batch: int, splits: Sequence[int] | None = None, *, text: bool
) -> np.ndarray:
    """Mean over tokens in float32, per sample.

    A language layer (`text`) means over the prompt's real tokens (the attention mask),
    or, for an encoder-decoder's decoder blocks, over the decoder's own (start) tokens.
    A vision-side tensor means per image: `splits` (rows per sample, the family's
    `image_split` rule) groups a tensor whose first dimension is not the batch
    (flattened Qwen2-VL patches, LLaVA-NeXT crops, Idefics3 tiles); otherwise it is
    (batch, tokens, D).
    """
    import torch

    h = hidden.float()
    if text and h.dim() == 3 and h.shape[0] == batch:
        if h.shape[1] == mask.shape[1]:  # the prompt's tokens
            m = mask.to(h.device).unsqueeze(-1).float()
            return ((h * m).sum(1) / m.sum(1).clamp_min(1)).cpu().numpy()
        return h.mean(1).cpu().numpy()  # decoder states
    if not text and splits is not None and len(splits) == batch:
        total = sum(splits)
        if h.shape[0] != total and h.shape[0] and total % h.shape[0] == 0 and h.shape[0] != batch:
            # a tensor after a patch merge (Qwen's merger MLP input): rows = patches / ratio
            ratio = total // h.shape[0]
            if all(s % ratio == 0 for s in splits):
                splits = [s // ratio for s in splits]
        if h.shape[0] == sum(splits) != batch:
            flat = h.reshape(h.shape[0], -1, h.shape[-1])
            parts = torch.split(flat, list(splits), dim=0)
            return torch.stack([p.reshape(-1, h.shape[-1]).mean(0) for p in parts]).cpu().numpy()
    if not text and h.dim() == 3 and h.shape[0] == batch:
        return h.mean(1).cpu().numpy()
    raise ReasonEditError(
        f"cannot pool a layer input of shape {tuple(h.shape)} for a batch of {batch}; "
        "does the family's record need an image_split rule?"
    )


def _find_layers(model: Any, spec: Family) -> list[LayerInfo]:
    """Both hook points of every vision block, the projector and every language block.

    Blocks are found by the family's `Roles`. The normed point is found from the module
    tree, not from names: the first `Linear` of the block's MLP (a child `mlp`; a T5
    block's last sub-layer, its feed-forward), or, for a projector, its first `Linear`
    (the module itself when it is one). A family whose projector has no Linear after its
    norm names the norm whose output is the point instead (`normed_output` of its
    record, e.g. Gemma 3).
    """
    found: list[LayerInfo] = []
    overrides = spec.normed_output
    modules = dict(model.named_modules())
    matches: list[tuple[str, Any, str, re.Match[str]]] = []
    for name, module in modules.items():
        for role, pattern in spec.roles.patterns:
            m = pattern.match(name)
            if m:
                matches.append((name, module, role, m))
                break
    # an encoder-decoder language model: decoder blocks are numbered after the encoder's
    n_encoder = sum(1 for *_, m in matches if m.groupdict().get("stack") == "encoder")
    for name, module, role, m in matches:
        groups = m.groupdict()
        idx = int(groups.get("index") or 0)
        if groups.get("stack") == "decoder":
            idx += n_encoder
        found.append(LayerInfo(name=name, role=role, index=idx))
        hook: str | None
        if role in overrides:
            hook, output = f"{name}.{overrides[role]}", True
        else:
            hook, output = _first_mlp_linear(name, module), False
        if hook is not None:
            found.append(
                LayerInfo(
                    name=name, role=role, index=idx, point="normed", hook=hook, hook_output=output
                )
            )
    order = {"vision": 0, "projector": 1, "language": 2}
    found.sort(key=lambda li: (order[li.role], li.index, POINTS.index(li.point)))
    return found


def _first_mlp_linear(name: str, block: Any) -> str | None:
    """The module path of the first Linear after a block's norm (see `_find_layers`)."""
    import torch

    scope, prefix = block, name
    if isinstance(getattr(block, "mlp", None), torch.nn.Module):
        scope, prefix = block.mlp, f"{name}.mlp"
    elif isinstance(getattr(block, "layer", None), torch.nn.ModuleList):  # T5 block
        scope, prefix = block.layer[-1], f"{name}.layer.{len(block.layer) - 1}"
    for sub, module in scope.named_modules():
        if isinstance(module, torch.nn.Linear):
            return f"{prefix}.{sub}" if sub else prefix
    return None


def _unsupported_message(model: str, model_type: str) -> str:
    return (
        f"model {model} ({model_type}) is not a supported image-text-to-text model; "
        f"supported: {', '.join(SUPPORTED_FAMILIES)}"
    )


def _check_supported(model: str, config: Any) -> None:
    """Refuse text-only models and unknown families (the message lists the supported)."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_FAMILIES:
        raise ReasonEditError(_unsupported_message(model, model_type))


#: The transformers releases the families are tested against (pyproject pins the same).
TESTED_TRANSFORMERS = ">=5.24,<5.25"

#: The advice closing every model failure message.
_WHAT_TO_DO = (
    f"check that the checkpoint is complete and that transformers{TESTED_TRANSFORMERS} "
    "is installed (the tested range), or report the model id"
)


def _load_failure(model: str, family: str, exc: BaseException) -> str:
    return f"cannot load model {model} ({family}): {_first_line(exc)}; {_WHAT_TO_DO}"


def _check_requirements(model: str, spec: Family) -> None:
    """A package the family's processor imports is missing: one line saying which."""
    import importlib.util

    missing = [p for p in spec.requires if importlib.util.find_spec(p) is None]
    if missing:
        raise ReasonEditError(
            f"cannot load model {model}: the {spec.name} processor needs the Python "
            f"package {', '.join(missing)} (pip install {' '.join(missing)})"
        )


def _load_processor(model: str, spec: Family, trust_remote_code: bool) -> Any:
    """The model's processor: `AutoProcessor`, except for a family whose processor carries
    a video processor (`images_only_processor` of its record) while torchvision (which
    every video processor needs) is missing. That one is built from its image processor,
    tokenizer and saved settings, with a video processor that never runs
    (`images_only_processor`): ReasonEdit sends images only."""
    import transformers
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if spec.images_only_processor is not None and not is_torchvision_available():
        return images_only_processor(model, getattr(transformers, spec.images_only_processor))
    return AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)


@lru_cache(maxsize=1)
def no_video_processor_class() -> type:
    """A video processor that never runs, for a processor built without torchvision.

    A `VideoProcessorMixin` (importable without torchvision; serialisable like any
    processor part) that carries the attributes processors read while formatting a
    prompt (SmolVLM's chat template reads `num_frames` and `fps`) and refuses videos.
    """
    from transformers.video_processing_utils import VideoProcessorMixin

    class NoVideoProcessor(VideoProcessorMixin):
        num_frames = None
        fps = None

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            raise ReasonEditError("this backend sends images only; videos are not supported")

        def preprocess(self, *args: Any, **kwargs: Any) -> Any:
            return self(*args, **kwargs)

    return NoVideoProcessor


def images_only_processor(model: str, cls: Any) -> Any:
    """`cls` (a processor with a video processor) built from public loaders with a video
    processor that never runs.

    The parts come from `AutoImageProcessor`, `AutoTokenizer` and the processor's saved
    settings (`get_processor_dict`, chat template included), assembled with the public
    `from_args_and_dict`. The one private seam is `processor_type_checks_allowing`: a
    processor checks each part's base class, and a video processor's base class cannot
    be resolved without torchvision. `tests/test_families.py` fails loudly if it changes.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    parts = {
        "image_processor": AutoImageProcessor.from_pretrained(model),
        "tokenizer": AutoTokenizer.from_pretrained(model),
        "video_processor": no_video_processor_class()(),
    }
    names = cls.get_attributes()
    missing = [n for n in names if n not in parts]
    if missing:
        raise ReasonEditError(
            f"cannot build the {cls.__name__} of {model} without torchvision (it also needs "
            f"{', '.join(missing)}); install torchvision or report the model id"
        )
    processor_dict, _ = cls.get_processor_dict(model)
    build = processor_type_checks_allowing(cls, no_video_processor_class())
    return build.from_args_and_dict([parts[n] for n in names], processor_dict)


def processor_type_checks_allowing(cls: Any, extra: type) -> Any:
    """A subclass of processor class `cls` whose part-type check also accepts `extra`.

    PRIVATE SEAM (transformers 5.24): `ProcessorMixin.__init__` calls
    `self.check_argument_for_proper_class(name, part)` for every part, and for a video
    processor that looks up `VideoProcessorMixin`, which transformers exports only with
    torchvision installed. Overriding it in a subclass (no global patch) lets the stand-in
    through; every other part is still checked. Kept in this one place on purpose.
    """
    original = cls.check_argument_for_proper_class

    def check_argument_for_proper_class(self, argument_name, argument):
        if isinstance(argument, extra):
            return extra
        return original(self, argument_name, argument)

    return type(
        cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class}
    )


def load_config_json(path: str) -> dict[str, Any]:
    """The raw config.json of a local model directory (empty for hub ids)."""
    p = Path(path) / "config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


@dataclass
class Completion:
    """One generated answer: its text, the tokens it took, and whether the model ended it
    (end of sequence) rather than the token budget."""

    text: str
    tokens: int
    finished: bool
    prompt_tokens: int = 0  # the prompt's tokens, image tokens included


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end an answer: those `generate` stops on (the generation config's
    eos ids), else the tokenizer's end of sequence."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = tokenizer.eos_token_id
    if value is None:
        return set()
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


class _StepStreamer:
    """A transformers streamer for a whole batch: after each decoding step, hands every
    still-running row's ids so far to `on_tokens(row, ids)` (the first `put` is the prompt)."""

    def __init__(
        self, on_tokens: Callable[[int, list[int]], None], offset: int, limits, eos: set[int]
    ):
        self.on_tokens = on_tokens
        self.offset = offset
        self.limits = list(limits)
        self.eos = eos
        self.ids: list[list[int]] = [[] for _ in self.limits]
        self.done = [False] * len(self.limits)
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        step = value.reshape(len(self.limits), -1)[:, -1].tolist()
        for row, tok in enumerate(step):
            if self.done[row]:
                continue
            if int(tok) in self.eos:
                self.done[row] = True
                continue
            self.ids[row].append(int(tok))
            if len(self.ids[row]) >= self.limits[row]:
                self.done[row] = True
            self.on_tokens(self.offset + row, list(self.ids[row]))

    def end(self) -> None:
        pass
