"""The dual embedding `E(i, t) = concat(pool(h_L(i, t)), w * S(t))` (docs/method.md#dual-key).

`h_L` is the VLM's mean-pooled input of layer L for the image with the text as prompt,
`S` the sentence embedding of the text alone. Until `calibrate` has chosen them:

* layer: the input of the vision-to-language projector (`projector`): the image as the
  language model is about to see it, untouched by the prompt, so the two halves carry
  one modality each (models without a projector fall back to `language.mid`);
* w: `auto` -- on the first insert, w is set so the text half spreads a tenth as far as
  the image half over that batch's keys (`AUTO_W_SHARE` x `calibration.reference_w`,
  the ratio of mean pairwise distances); where an image of that batch holds several
  edits, it is raised by `sibling_w` until the text half tells them apart
  (`first_batch_w`, issue #18; no change where every image holds one edit, as on
  easy-vqa). The keys of one edit share its image, so the image half should decide
  WHICH edit a query is about and the text half only which of its facts comes nearest.
  Measured on easy-vqa with the demo VLM (100 edits, README): at 0.03-0.1 of the
  equal-spread w a rephrased question on the edited image retrieves its edit every
  time; at 0.3 only 55-80% of the time, at 1 (equal spread) under 40%. Spread, not
  norm: decoder activations carry a large shared offset that inflates every norm but
  no distance. The value is stored in the manifest and never changes silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

    def fix_w(
        self,
        images: Sequence[Image.Image],
        texts: Sequence[str],
        image_codes: Sequence[Any],
        edit_codes: Sequence[Any],
        p: float = 25.0,
    ) -> None:
        """Set a still unset w from a codebook's first batch of keys (`first_batch_w`);
        codes: each key's image and edit. A w already set is left alone."""
        if self.w is None and texts:
            h = self.vlm_half(images, texts)
            self.w = first_batch_w(h, self.text.encode(list(texts)), image_codes, edit_codes, p)

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


def first_batch_w(
    h: np.ndarray,
    s: np.ndarray,
    image_codes: Sequence[Any],
    edit_codes: Sequence[Any],
    p: float = 25.0,
) -> float:
    """The uncalibrated w of a new codebook from its first batch of keys: `auto_w`, raised
    by `sibling_w` where an image holds several edits (issue #18 item 5: on the scenes
    VLM, unseen seeds 3 / 5, Gen-mean 0.683 / 0.708 -> 0.717 / 0.750 and Hard-Loc
    0.148 / 0.100 -> 0.407 / 0.400 at Loc 1.000; easy-vqa and the sample edits hold one
    edit per image, so their w is the `auto` one; docs/evaluation.md)."""
    return sibling_w(h, s, image_codes, edit_codes, auto_w(h, s), p)


def sibling_w(
    h: np.ndarray,
    s: np.ndarray,
    image_codes: Sequence[Any],
    edit_codes: Sequence[Any],
    w_auto: float,
    p: float = 25.0,
    top: float = 10.0,
) -> float:
    """The w for codebooks whose images carry several edits (issue #18; the default
    through `first_batch_w` since the 2026-12-02 scenes weights: docs/evaluation.md).

    The smallest w >= `w_auto` (steps of x1.1, at most `top` x) at which the p-th
    percentile of every key's corrected distance to the nearest key of ANOTHER edit on
    ITS OWN image reaches tau (rule "images"): from there an edit's own question no
    longer retrieves the other edits of its image, the text half doing the job the
    image half cannot. `h`, `s`: the keys' VLM and text halves; codes: each key's image
    and edit. With no image holding two edits it returns `w_auto` unchanged.
    """
    from reasonedit_cli import retrieval as R

    icodes = np.unique(np.asarray(image_codes), return_inverse=True)[1]
    ecodes = np.unique(np.asarray(edit_codes), return_inverse=True)[1]
    siblings = (icodes[:, None] == icodes[None, :]) & (ecodes[:, None] != ecodes[None, :])
    if not siblings.any():
        return float(w_auto)
    f = 1.0
    while f <= top:
        w = w_auto * f
        kv = np.concatenate([h, w * s], axis=1)
        knn_i, knn_d = R.knn_lists(kv)
        sigma = R.sigma_from_knn(knn_d)
        tau = R.other_image_threshold(knn_i, knn_d, sigma, icodes, ecodes, p)
        gap = np.where(siblings, R.pairwise_l2(kv, kv) / sigma[:, None], np.inf).min(axis=1)
        gap = gap[np.isfinite(gap)]
        if tau is not None and float(np.percentile(gap, p)) >= tau:
            return float(w)
        f *= 1.1
    return float(w_auto * top)


def _probe_image() -> Image.Image:
    from PIL import Image

    return Image.new("RGB", (32, 32), (127, 127, 127))
