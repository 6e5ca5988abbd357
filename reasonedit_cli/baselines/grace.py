"""GRACE (Hartvigsen et al., 2023, "Aging with GRACE: Lifelong Model Editing with
Discrete Key-Value Adaptors") as a baseline on any supported VLM family.

An adaptor wraps ONE layer of the language model (by default `language.mid`) through a
forward hook on `VLM.layer_module`; the model's weights never change. It holds a
codebook of entries `(key, value, epsilon, label)`:

* key: the layer's *input* hidden state at the last prompt token of the edited
  (image, question);
* value: a vector that replaces the layer's *output* at that position, trained by a few
  gradient steps (Adam on the value alone, the model frozen) until the model's greedy
  answer tokens are the edit's answer;
* epsilon: the deferral radius (L2, in the layer's hidden-state units).

At inference the hook compares the query (the layer input at the current last token)
with every key; when the nearest key is within its epsilon, the output at that position
is replaced by the key's value, else the layer runs unchanged. During generation with a
KV cache the first forward is the whole prompt (its last token is the last prompt
token) and each later step is one new token, which is compared the same way.

Codebook rules when an edit arrives (the paper's, with its `coverage` expansion):

* no key within `epsilon_nearest + eps_init`: a new entry with radius `eps_init`;
* the nearest key's label is the same answer: expand its radius to the distance
  (when outside) and train its value on this edit too;
* a different answer: split — a new entry, and both radii become half the distance, so
  the two balls touch but do not overlap.

The published `eps_init` is 1.0 (the authors' ReasonEdit code uses 0.1), in the units
of the wrapped layer. A radius only means something against the scale of the hidden
states: on the bundled demo VLM the keys at `language.2` have norm ~140, two images
asked the same question lie a median 42 apart (60 images), and a rephrased question on
the same image 0.15 x that. An absolute 1.0 or 0.1 would therefore only ever match the
exact edited prompt. So the default here is relative: `eps_init = EPS_FACTOR (0.2) x`
the median distance between the keys of different images asked the same question
(`calibrate_eps`, on the first edits' images): most rephrasings fall inside, 7% of
other images asked the same question do. An absolute `eps_init` can be passed instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_LAYER = "language.mid"
EPS_FACTOR = 0.2  # eps_init relative to the median key distance between other images
STEPS = 40  # gradient steps per edit, at most (stops when the answer is produced)
LR = 0.5  # Adam on the value vector


@dataclass
class GraceEntry:
    key: Any  # torch (D,) float32
    value: Any  # torch (D,) float32, trained
    eps: float
    label: str
    edit_ids: list[str] = field(default_factory=list)


@dataclass
class EditLog:
    """What adding one edit did to the codebook."""

    edit_id: str
    action: str  # add | expand | split
    distance: float | None
    steps: int
    loss: float
    solved: bool


def _hidden(value: Any) -> Any:
    """The hidden-state tensor of a layer output (a tensor or a tuple starting with one)."""
    return value[0] if isinstance(value, tuple) else value


def _layer_input(args: tuple, kwargs: dict) -> Any:
    if args and hasattr(args[0], "shape"):
        return args[0]
    for key in ("hidden_states", "x", "input"):
        if key in kwargs and hasattr(kwargs[key], "shape"):
            return kwargs[key]
    raise RuntimeError("GRACE: cannot find the hooked layer's input hidden states")


class GraceAdaptor:
    """A GRACE codebook at one layer of `vlm`'s language model (see the module docstring)."""

    def __init__(
        self,
        vlm: Any,
        layer: str = DEFAULT_LAYER,
        *,
        eps_init: float | None = None,
        steps: int = STEPS,
        lr: float = LR,
    ) -> None:
        if not hasattr(vlm, "layer_module"):
            from reasonedit_cli.errors import InputError

            raise InputError("GRACE needs the model in this process (not --engine ray)")
        from reasonedit_cli.errors import UsageError

        self.vlm = vlm
        info = vlm.resolve_layer(layer)
        self.layer = info.label
        if info.role != "language" or getattr(info, "normed", False):
            raise UsageError(f"GRACE wraps a language-model block, not {self.layer!r}")
        if getattr(vlm, "encoder_decoder", False):
            raise UsageError("GRACE here needs a decoder-only language model")
        self.module = vlm.layer_module(self.layer)
        self.eps_init = eps_init
        self.steps = steps
        self.lr = lr
        self.entries: list[GraceEntry] = []
        self.log: list[EditLog] = []
        # hook state: mode "off" | "capture" | "train" | "infer"
        self._mode = "off"
        self._positions: Any = None  # (B,) token positions, None = the last one
        self._train_value: Any = None
        self._captured: dict[str, Any] = {}
        self.hits: list[int] = []  # per prompt of the prefill forwards: entry index or -1
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)

    def close(self) -> None:
        """Remove the hook: the model runs exactly as before the adaptor existed."""
        self._handle.remove()

    # ----------------------------------------------------------------- the hook
    def _hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._mode == "off":
            return None
        import torch

        h_in = _layer_input(args, kwargs)
        h_out = _hidden(output)
        b, t = h_out.shape[0], h_out.shape[1]
        rows = torch.arange(b, device=h_out.device)
        pos = (
            torch.full((b,), t - 1, device=h_out.device, dtype=torch.long)
            if self._positions is None
            else self._positions.to(h_out.device).long()
        )
        query = h_in[rows, pos].float()
        if self._mode == "capture":
            self._captured = {"key": query.detach(), "out": h_out[rows, pos].detach().float()}
            return None
        new = h_out.clone()
        if self._mode == "train":
            new[rows, pos] = self._train_value.to(new.dtype).unsqueeze(0).expand(b, -1)
        else:  # infer
            hit = self._lookup(query)
            if t > 1:
                self.hits.extend(hit.tolist())
            sel = hit >= 0
            if not bool(sel.any()):
                return None
            values = torch.stack([self.entries[int(j)].value for j in hit[sel].tolist()])
            new[rows[sel], pos[sel]] = values.to(device=new.device, dtype=new.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _lookup(self, query: Any) -> Any:
        """Per query row, the nearest entry whose radius covers it, else -1."""
        import torch

        if not self.entries:
            return torch.full((query.shape[0],), -1, dtype=torch.long)
        keys = torch.stack([e.key for e in self.entries]).to(query.device)
        eps = torch.tensor([e.eps for e in self.entries], device=query.device)
        d = torch.cdist(query, keys)
        dmin, j = d.min(1)
        return torch.where(dmin <= eps[j], j, torch.full_like(j, -1)).cpu()

    @contextmanager
    def _state(self, mode: str, positions: Any = None, value: Any = None) -> Iterator[None]:
        self._mode, self._positions, self._train_value = mode, positions, value
        try:
            yield
        finally:
            self._mode, self._positions, self._train_value = "off", None, None

    # ----------------------------------------------------------------- keys
    def keys_of(self, images: Sequence[Any], prompts: Sequence[str]) -> np.ndarray:
        """The layer input at the last prompt token of each (image, prompt), float32."""
        out = []
        for img, prompt in zip(images, prompts):
            batch, _, n_prompt = self.vlm.answer_inputs([img], [prompt], [""])
            with self._state("capture", n_prompt - 1):
                self.vlm.model(**batch, use_cache=False)
            out.append(self._captured["key"][0].cpu().numpy())
        return np.stack(out).astype(np.float32)

    def calibrate_eps(self, images: Sequence[Any], prompts: Sequence[str]) -> float:
        """eps_init = EPS_FACTOR x the median key distance between different images asked
        the same prompt (the scale at which this layer tells images apart)."""
        k = self.keys_of(images, prompts)
        same_q: list[float] = []
        for i in range(len(k)):
            for j in range(i + 1, len(k)):
                if prompts[i] == prompts[j]:
                    same_q.append(float(np.linalg.norm(k[i] - k[j])))
        if not same_q:  # every prompt differs: all pairs
            same_q = [
                float(np.linalg.norm(k[i] - k[j]))
                for i in range(len(k))
                for j in range(i + 1, len(k))
            ]
        scale = float(np.median(same_q)) if same_q else 1.0
        self.eps_init = EPS_FACTOR * scale
        return self.eps_init

    # ----------------------------------------------------------------- editing
    def add_edit(self, image: Any, question: str, answer: str, edit_id: str = "") -> EditLog:
        """Insert one edit by the codebook rules and train the value it uses."""
        import torch

        from reasonedit_cli.evaluation import normalize_answer

        if self.eps_init is None:
            self.eps_init = 1.0
        batch, labels, n_prompt = self.vlm.answer_inputs([image], [question], [answer])
        pos = n_prompt - 1
        with self._state("capture", pos):
            self.vlm.model(**batch, use_cache=False)
        key, out = self._captured["key"][0], self._captured["out"][0]
        label = normalize_answer(answer)
        action, dist = "add", None  # dist: to the nearest entry, None when there is none
        nearest = 0.0  # the same as a float, for expand and split (which need an entry)
        target: GraceEntry
        if self.entries:
            keys = torch.stack([e.key for e in self.entries])
            d = torch.linalg.vector_norm(keys - key.unsqueeze(0), dim=1)
            j = int(d.argmin())
            dist = nearest = float(d[j])
            near = self.entries[j]
            if nearest > near.eps + self.eps_init:
                action = "add"
            elif near.label == label:
                action = "expand"
            else:
                action = "split"
        if action == "expand":
            target = near
            target.eps = max(target.eps, nearest)
            target.edit_ids.append(edit_id)
        else:
            eps = self.eps_init
            if action == "split":
                near.eps = eps = nearest / 2.0
            target = GraceEntry(key.clone(), out.clone(), eps, label, [edit_id])
            self.entries.append(target)
        steps, loss, solved = self._train(target, batch, labels, pos)
        entry = EditLog(edit_id, action, dist, steps, loss, solved)
        self.log.append(entry)
        return entry

    def _train(self, entry: GraceEntry, batch: Any, labels: Any, pos: Any) -> tuple:
        """Adam on the entry's value until the greedy answer tokens are the labels."""
        import torch

        from reasonedit_cli.vlm import answer_token_loss

        model = self.vlm.model
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)  # frozen: gradients reach the value alone
        value = entry.value.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([value], lr=self.lr)
        mask = labels[:, 1:] != -100
        steps, loss_v, solved = 0, float("nan"), False
        try:
            with torch.enable_grad():
                for steps in range(self.steps + 1):
                    with self._state("train", pos, value):
                        logits = model(**batch, use_cache=False).logits
                    loss = answer_token_loss(logits, labels).mean()
                    loss_v = float(loss.detach())
                    pred = logits[:, :-1].argmax(-1)
                    solved = bool((pred[mask] == labels[:, 1:][mask]).all())
                    if solved or steps == self.steps:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
        entry.value = value.detach()
        return steps, loss_v, solved

    # --------------------------------------------------------------- inference
    def generate(
        self, images: Sequence[Any], prompts: Sequence[str], *, batch_size: int = 16
    ) -> tuple[list[str], list[int]]:
        """Greedy answers with the adaptor on, and per prompt the entry it used (-1: none)."""
        answers: list[str] = []
        hits: list[int] = []
        for start in range(0, len(prompts), batch_size):
            self.hits = []
            imgs, prs = images[start : start + batch_size], prompts[start : start + batch_size]
            with self._state("infer"):
                answers += self.vlm.generate(imgs, prs, batch_size=batch_size)
            hits += self.hits[: len(prs)]
        return answers, hits

    def answer_loss(
        self, images: Sequence[Any], prompts: Sequence[str], answers: Sequence[str]
    ) -> np.ndarray:
        """Like `VLM.answer_loss`, with the adaptor on (multiple-choice scoring)."""
        from reasonedit_cli.vlm import answer_token_loss

        out = []
        for img, prompt, ans in zip(images, prompts, answers):
            batch, labels, n_prompt = self.vlm.answer_inputs([img], [prompt], [ans])
            with self._state("infer", n_prompt - 1):
                logits = self.vlm.model(**batch, use_cache=False).logits
            out.append(float(answer_token_loss(logits, labels)[0]))
        return np.asarray(out, dtype=np.float32)
