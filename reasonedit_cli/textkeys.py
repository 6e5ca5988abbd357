"""Text halves that weigh what tells a codebook's questions apart (issue #18, hard locality).

The dual key's text half is MiniLM's sentence embedding: the mean of its token states.
On a scene with several edits the edits' keys share the image half, so only the text
half tells `what color is the star?` from `what color is the circle?`, and the plain
mean is ruled by the words the two share.

`IdfText` pools the same token states with inverse-document-frequency weights measured
on a codebook's own key texts (its questions and reasoning sentences): a word every key
text holds (`what`, `is`, `the`, `?`, the special tokens) weighs about nothing, a word
few hold (the object's name or colour) weighs most. No list of words is written by
hand; the weights come from the texts they are fitted on. Modes:

* `idf`: `log((1 + N) / (1 + df))`, N distinct fitted texts, df how many hold the
  token; a token none holds gets the largest weight, log(1 + N);
* `idf0`: the same, but a token no fitted text holds weighs 0 (it cannot tell one key
  from another: a rewording's new word, `hue`, no longer outweighs the object's name);
* `mix0`: the unit `idf0` pooling plus the unit plain mean, normalised.

Measured, not adopted as a default (docs/evaluation.md, "Retrieval levers"): `idf0`
separates rewordings from other-object questions better than the plain mean on the
scenes world, but only pays off at a w about 3x the auto w, which loses rephrasings on
easy-vqa. `scripts/scenes_keys.py` and `scripts/scenes_regions.py evaluate --settings`
measure it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: pooling modes of IdfText ("mean" is the plain sentence embedding)
TEXT_POOLINGS = ("mean", "idf", "idf0", "mix0")


@dataclass
class IdfText:
    """MiniLM token states pooled with idf weights fitted on a set of key texts."""

    text: Any  # a TextEncoder (its token_states)
    n_docs: int
    df: dict[int, int] = field(default_factory=dict)
    mode: str = "idf0"
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def fit(cls, text: Any, texts: Sequence[str], mode: str = "idf0") -> IdfText:
        """Document frequencies of every token over the distinct `texts`."""
        if mode not in TEXT_POOLINGS or mode == "mean":
            raise ValueError(f"IdfText mode must be one of {TEXT_POOLINGS[1:]}, got {mode!r}")
        docs = sorted(set(texts))
        df: dict[int, int] = {}
        for ids, _ in text.token_states(docs):
            for t in {int(i) for i in ids}:
                df[t] = df.get(t, 0) + 1
        return cls(text, len(docs), df, mode)

    @property
    def dim(self) -> int:
        return int(self.text.dim)

    def weight(self, token: int) -> float:
        df = self.df.get(token, 0)
        if df == 0 and self.mode != "idf":
            return 0.0
        return math.log((1 + self.n_docs) / (1 + df))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length pooled vectors, float32 (n, dim); uniform weights for a text none
        of whose tokens weighs anything."""
        todo = sorted({t for t in texts if t not in self._cache})
        for t, (ids, h) in zip(todo, self.text.token_states(todo)):
            wts = np.array([self.weight(int(i)) for i in ids], dtype=np.float64)
            if wts.sum() <= 0:
                wts = np.ones(len(ids))
            v = (wts[:, None] * h).sum(0) / wts.sum()
            v = v / max(float(np.linalg.norm(v)), 1e-12)
            if self.mode == "mix0":
                m = h.mean(0)
                v = v + m / max(float(np.linalg.norm(m)), 1e-12)
                v = v / max(float(np.linalg.norm(v)), 1e-12)
            self._cache[t] = v.astype(np.float32)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts]).astype(np.float32)
