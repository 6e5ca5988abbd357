"""The dual embedding `E(i, t) = concat(pool(h_L(i, t)), w * S(t))` (DESIGN 1.4).

`h_L` is the VLM's mean-pooled input of layer L for the image with the text as prompt,
`S` the sentence embedding of the text alone. Until `calibrate` has chosen them:

* layer: the middle language-decoder block (`language.mid`), where image and text
  tokens have mixed but the representation is not yet specialised to the next token;
* w: `auto` — on the first insert, w is set so both halves spread equally over that
  batch's keys (`calibration.reference_w`: the ratio of mean pairwise distances). Spread,
  not norm: decoder activations carry a large shared offset that inflates every norm but
  no distance, and a norm-matched w lets the text half swamp the image. The value is
  stored in the manifest and never changes silently afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from reasonedit_cli.text import TextEncoder
    from reasonedit_cli.vlm import VLM

DEFAULT_LAYER = "language.mid"


@dataclass
class DualEmbedder:
    """Computes keys and queries for one (VLM, text encoder, layer, w) setting."""

    vlm: VLM
    text: TextEncoder
    layer: str = DEFAULT_LAYER
    w: float | None = None  # None = auto, fixed at the first call

    def __post_init__(self) -> None:
        # resolve `language.mid` to a concrete label so the manifest records a real layer
        self.layer = self.vlm.resolve_layer(self.layer).label

    @property
    def dim(self) -> int:
        return self.vlm_dim() + self.text.dim

    def vlm_dim(self) -> int:
        return int(self.vlm_half([_probe_image()], ["probe"]).shape[1])

    def vlm_half(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        return self.vlm.pooled_inputs(images, texts, [self.layer])[self.layer]

    def embed(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """Keys (or queries) for aligned lists of images and texts, float32 (n, dim)."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        # calibration is imported here: it pulls in the augmentations, which `ask` never needs
        from reasonedit_cli.calibration import dual_concat, reference_w

        h = self.vlm_half(images, texts)
        s = self.text.encode(list(texts))
        if self.w is None:
            self.w = reference_w(h, s)
        return dual_concat(h, s, self.w)


def _probe_image() -> Image.Image:
    from PIL import Image

    return Image.new("RGB", (32, 32), (127, 127, 127))
