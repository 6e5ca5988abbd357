"""The dual embedding `E(i, t) = concat(pool(h_L(i, t)), w * S(t))` (docs/method.md#dual-key).

`h_L` is the VLM's mean-pooled input of layer L for the image with the text as prompt,
`S` the sentence embedding of the text alone. Until `calibrate` has chosen them:

* layer: the input of the vision-to-language projector (`projector`): the image as the
  language model is about to see it, untouched by the prompt, so the two halves carry
  one modality each (models without a projector fall back to `language.mid`);
* w: `auto` -- on the first insert, w is set so the text half spreads a tenth as far as
  the image half over that batch's keys (`AUTO_W_SHARE` x `calibration.reference_w`,
  the ratio of mean pairwise distances). The keys of one edit share its image, so the
  image half should decide WHICH edit a query is about and the text half only which of
  its facts comes nearest. Measured on easy-vqa with the demo VLM (100 edits, README):
  at 0.03-0.1 of the equal-spread w a rephrased question on the edited image retrieves
  its edit every time; at 0.3 only 55-80% of the time, at 1 (equal spread) under 40%.
  Spread, not norm: decoder activations carry a large shared offset that inflates every
  norm but no distance. The value is stored in the manifest and never changes silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from reasonedit_cli.backend import TextBackend, VLMBackend

DEFAULT_LAYER = "projector"
FALLBACK_LAYER = "language.mid"
AUTO_W_SHARE = 0.1  # text-half spread relative to the image half for `auto` w


@dataclass
class DualEmbedder:
    """Computes keys and queries for one (VLM, text encoder, layer, w) setting."""

    vlm: VLMBackend
    text: TextBackend
    layer: str = DEFAULT_LAYER
    w: float | None = None  # None = auto, fixed at the first call

    def __post_init__(self) -> None:
        # resolve aliases to a concrete label so the manifest records a real layer
        labels = {li.label for li in self.vlm.candidate_layers()}
        if self.layer == DEFAULT_LAYER and DEFAULT_LAYER not in labels:
            self.layer = FALLBACK_LAYER
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
        from reasonedit_cli.calibration import dual_concat

        h = self.vlm_half(images, texts)
        s = self.text.encode(list(texts))
        if self.w is None:
            self.w = auto_w(h, s)
        return dual_concat(h, s, self.w)


def auto_w(h: np.ndarray, s: np.ndarray) -> float:
    """The `auto` w for keys with VLM half `h` and text half `s` (see the module doc)."""
    from reasonedit_cli.calibration import reference_w

    return AUTO_W_SHARE * reference_w(h, s)


def _probe_image() -> Image.Image:
    from PIL import Image

    return Image.new("RGB", (32, 32), (127, 127, 127))
