"""A fake VLM and text encoder through the `reasonedit_cli.backend` protocols.

For unit tests of plumbing (option parsing, errors, rendering, bookkeeping), where a
real model adds nothing but seconds. Everything is a deterministic function of the
inputs, so results can be reasoned about:

* features: an image's 4x4 RGB thumbnail, mapped per layer by a fixed projection seeded
  by the layer's label; language layers add hashed words of the prompt; the text encoder
  is hashed words and word pairs, unit norm. Same (image, text) -> same key; an
  augmented copy lands near it, an unrelated image far away.
* answers: a prompt holding a fact `The answer to '...' is A.` is answered A (the last
  such fact, as the nearest key's stands last); otherwise the "unedited" answer reads
  the image: its dominant colour for colour questions, "square" for shape questions,
  "no" for anything else. So a shape edit fixes a real mistake of this model.
* `yes_probability`: the share of non-white pixels (a crop holding the shape says yes);
  `answer_loss`: low for the answer the model would give, high otherwise.

`fake_models` (a fixture, imported by conftest) makes every CLI command build its
`Editor` with these backends instead of loading a model.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from reasonedit_cli.errors import UsageError
from reasonedit_cli.vlm import NORMED_SUFFIX, Completion, LayerInfo

_FACT = re.compile(r"The answer to '(.*?)' is (.*?)\.(?:\s|$)")
_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 30),
    "black": (0, 0, 0),
}
_BLOCKS = [("vision", 0), ("vision", 1), ("projector", 0), ("language", 0), ("language", 1)]


def _seed(text: str) -> int:
    return zlib.crc32(text.encode())


def _thumb(image: Any) -> np.ndarray:
    """48 numbers: the image as 4x4 RGB, in [0, 1]."""
    small = image.convert("RGB").resize((4, 4), resample=2)  # bilinear: deterministic
    return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0


def _words(text: str, dim: int, pairs: bool = False) -> np.ndarray:
    """Hashed bag of words (and word pairs), unit norm; zeros for no words."""
    tokens = re.findall(r"[a-z0-9]+", text.lower())
    grams = tokens + ([" ".join(p) for p in zip(tokens, tokens[1:])] if pairs else [])
    v = np.zeros(dim, dtype=np.float32)
    for g in grams:
        h = _seed(g)
        v[h % dim] += 1.0 if (h >> 16) & 1 else -1.0
    n = float(np.linalg.norm(v))
    return v / n if n else v


def _projection(label: str, rows: int, cols: int) -> np.ndarray:
    return np.random.default_rng(_seed(label)).normal(size=(rows, cols)).astype(np.float32)


def _dominant_colour(image: Any) -> str:
    px = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    ink = px[px.min(axis=1) < 200]
    if not len(ink):
        return "white"
    mean = ink.mean(axis=0)
    return min(_COLOURS, key=lambda c: float(np.sum((mean - np.array(_COLOURS[c])) ** 2)))


class FakeVLM:
    """A `backend.CompletingBackend` (and so a `VLMBackend`) without a model."""

    def __init__(self, name: str = "fake-vlm", revision: str = "fake-rev-1") -> None:
        self.name = name
        self.revision = revision
        self.family = "fake"
        self.calls: dict[str, int] = {}
        self._layers = [
            LayerInfo(f"blocks.{role}.{i}", role, i, point=point)
            for role, i in _BLOCKS
            for point in ("input", "normed")
        ]

    def _count(self, method: str, n: int) -> None:
        self.calls[method] = self.calls.get(method, 0) + n

    # -------------------------------------------------------------- layers
    def candidate_layers(self) -> list[LayerInfo]:
        return list(self._layers)

    def resolve_layer(self, layer: str) -> LayerInfo:
        for li in self._layers:
            if li.label == layer:
                return li
        if layer.startswith("language.mid"):
            return self.resolve_layer(layer.replace("mid", "1", 1))
        labels = ", ".join(li.label for li in self._layers if not li.normed)
        raise UsageError(f"unknown layer {layer!r}; this model has: {labels} (+{NORMED_SUFFIX})")

    # ------------------------------------------------------------ features
    def _feature(self, image: Any, prompt: str, label: str) -> np.ndarray:
        li = self.resolve_layer(label)
        width = {"vision": 24, "projector": 32, "language": 40}[li.role]
        h = _thumb(image) @ _projection(label, 48, width)
        if li.role == "language":
            h = np.concatenate([h, 2.0 * _words(prompt, 16)])
        return h.astype(np.float32)

    def pooled_inputs(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        layers: Sequence[str],
        *,
        batch_size: int = 16,
    ) -> dict[str, np.ndarray]:
        self._count("pooled_inputs", len(prompts))
        labels = [self.resolve_layer(name).label for name in layers]
        return {
            label: np.stack([self._feature(i, p, label) for i, p in zip(images, prompts)])
            if prompts
            else np.zeros((0, 1), dtype=np.float32)
            for label in labels
        }

    # ------------------------------------------------------------- answers
    def answer(self, image: Any, prompt: str) -> str:
        """The answer this model gives: the prompt's fact, else what the image shows."""
        facts = _FACT.findall(prompt)
        if facts:
            return facts[-1][1]
        q = prompt.lower()
        if "colo" in q:
            return _dominant_colour(image)
        if "shape" in q:
            return "square"
        return "no"

    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 16,
        batch_size: int = 16,
    ) -> list[str]:
        self._count("generate", len(prompts))
        answers = [self.answer(i, p) for i, p in zip(images, prompts)]
        return [" ".join(a.split()[:max_new_tokens]) for a in answers]

    def complete(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        *,
        max_new_tokens: int | Sequence[int] = 16,
        batch_size: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[Completion]:
        self._count("complete", len(prompts))
        budgets = (
            [max_new_tokens] * len(prompts)
            if isinstance(max_new_tokens, int)
            else list(max_new_tokens)
        )
        out = []
        for row, (image, prompt, budget) in enumerate(zip(images, prompts, budgets)):
            words = self.answer(image, prompt).split()
            text = " ".join(words[:budget])
            if on_tokens is not None:
                for n in range(1, min(len(words), budget) + 1):
                    on_tokens(row, list(" ".join(words[:n]).encode()))
            out.append(
                Completion(
                    text=text,
                    tokens=min(len(words), budget),
                    finished=len(words) <= budget,
                    prompt_tokens=len(prompt.split()) + 16,
                )
            )
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode().strip()

    def yes_probability(
        self, images: Sequence[Any], prompts: Sequence[str], *, batch_size: int = 16
    ) -> np.ndarray:
        self._count("yes_probability", len(prompts))
        out = []
        for image in images:
            px = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
            out.append(min(0.95, max(0.05, float(np.mean(px.min(axis=1) < 200)))))
        return np.asarray(out, dtype=np.float32)

    def answer_loss(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        answers: Sequence[str],
        *,
        batch_size: int = 16,
    ) -> np.ndarray:
        self._count("answer_loss", len(prompts))
        out = []
        for image, prompt, answer in zip(images, prompts, answers):
            said = self.answer(image, prompt).strip().lower()
            out.append(0.1 if said == answer.strip().lower() else 1.0 + _seed(answer) % 97 / 1000)
        return np.asarray(out, dtype=np.float32)


class FakeText:
    """A `backend.TextBackend`: hashed words and word pairs, unit norm."""

    def __init__(self, name: str = "fake-text", dim: int = 32) -> None:
        self.name = name
        self.dim = dim

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([_words(t, self.dim, pairs=True) for t in texts])


@pytest.fixture
def fake_models(monkeypatch):
    """Every command's `Editor` gets a FakeVLM and a FakeText (one pair per test, shared
    by the commands the test runs), instead of loading models. Returns the pair."""
    from reasonedit_cli import cli_support

    vlm, text = FakeVLM(), FakeText()
    build = cli_support.ModelOptions.editor

    def editor(self, codebook, **kwargs):
        return build(self, codebook, vlm=vlm, text=text, **kwargs)

    monkeypatch.setattr(cli_support.ModelOptions, "editor", editor)
    return vlm, text
