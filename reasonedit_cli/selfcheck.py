"""Does a codebook still retrieve its own edits? The check `calibrate` runs before it commits.

Calibration picks a layer and w from modularity scores, which say nothing directly about
retrieval; on the demo VLM it has chosen w ~20x the auto w, where a rephrased question on
the edited image no longer finds its edit (issue #19). So before new settings replace the
old ones, the codebook's own edits are asked back three ways under both settings:

* ``edit``: the edit's own image and question;
* ``rephrased``: the question lightly reworded (`augment.perturb_text`);
* ``perturbed``: the image slightly rotated, jittered and cropped (`augment.augment_image`).

A probe counts as retrieved when retrieval under tau returns a fact of its edit. The
augmentations are seeded by the edit id, so old and new settings see the same probes
and a rerun gives the same numbers. New settings *lose retrieval* when any of the three
counts drops.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reasonedit_cli.errors import ReasonEditError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from reasonedit_cli.store import Codebook

PROBE_KINDS = ("edit", "rephrased", "perturbed")
MAX_CHECK_EDITS = 200  # a seeded sample of edits beyond this: the check stays a few batches


@dataclass
class Probe:
    """One question asked back: an edit's image and question, as is or augmented."""

    edit_id: str
    kind: str  # one of PROBE_KINDS
    image: Image.Image
    question: str


@dataclass
class RetrievalCheck:
    """Probes retrieving their own edit, per kind, under the old and the new settings."""

    total: dict[str, int]
    old: dict[str, int]
    new: dict[str, int]
    old_settings: dict[str, Any] = field(default_factory=dict)
    new_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> list[str]:
        """The kinds the new settings retrieve fewer of (empty: the choice is safe)."""
        return [k for k in PROBE_KINDS if self.new.get(k, 0) < self.old.get(k, 0)]

    @property
    def loses_retrieval(self) -> bool:
        return bool(self.lost)

    def describe(self, kinds: Sequence[str] | None = None) -> str:
        """`rephrased 6/6 -> 3/6, ...` for the kinds given (default all)."""
        return ", ".join(
            f"{k} {self.old.get(k, 0)}/{self.total[k]} -> {self.new.get(k, 0)}/{self.total[k]}"
            for k in (kinds or PROBE_KINDS)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kinds": {
                k: {"total": self.total[k], "old": self.old.get(k, 0), "new": self.new.get(k, 0)}
                for k in PROBE_KINDS
            },
            "old_settings": self.old_settings,
            "new_settings": self.new_settings,
            "loses_retrieval": self.loses_retrieval,
            "lost": self.lost,
        }


class CalibrationRefused(ReasonEditError):
    """New settings would retrieve fewer of the codebook's own edits; nothing was written.

    Carries the calibration result and the check so the CLI can show both settings
    before its one-line error.
    """

    def __init__(self, result: Any, check: RetrievalCheck):
        self.result = result
        self.check = check
        s = check.new_settings
        super().__init__(
            f"calibration chose layer {s.get('layer')}, w = {float(s.get('w') or 0):.4g}, "
            f"which retrieves fewer of the codebook's own edits ({check.describe(check.lost)}); "
            "the codebook is unchanged (`force` commits it anyway)"
        )


def _seed(edit_id: str, kind: str) -> int:
    h = hashlib.sha256(f"selfcheck\x00{edit_id}\x00{kind}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def check_probes(cb: Codebook, max_edits: int = MAX_CHECK_EDITS, seed: int = 0) -> list[Probe]:
    """The codebook's live edits asked back as is, rephrased and on a perturbed image."""
    import numpy as np

    from reasonedit_cli.augment import augment_image, perturb_text
    from reasonedit_cli.edits import decode_image

    records = cb.edits()
    if len(records) > max_edits:
        pick = np.random.default_rng(seed).choice(len(records), size=max_edits, replace=False)
        records = [records[i] for i in sorted(pick)]
    probes: list[Probe] = []
    for rec in records:
        img = decode_image(cb.read_image_bytes(rec.image_sha256), f"edit {rec.edit_id}")
        rng = np.random.default_rng
        probes += [
            Probe(rec.edit_id, "edit", img, rec.question),
            Probe(
                rec.edit_id,
                "rephrased",
                img,
                perturb_text(rec.question, rng(_seed(rec.edit_id, "q"))),
            ),
            Probe(
                rec.edit_id,
                "perturbed",
                augment_image(img, rng(_seed(rec.edit_id, "i"))),
                rec.question,
            ),
        ]
    return probes


def count_retrieved(
    cb: Codebook,
    embed: Callable[[list[Any], list[str]], Any],
    probes: Sequence[Probe],
    *,
    k: int = 5,
    batch_size: int = 32,
) -> dict[str, int]:
    """Per kind, the probes whose retrieval from `cb` returns a fact of their own edit.

    `embed(images, texts)` must embed queries the way `cb`'s keys were embedded.
    """
    from reasonedit_cli.retrieval import retrieve

    counts = dict.fromkeys(PROBE_KINDS, 0)
    for start in range(0, len(probes), batch_size):
        chunk = probes[start : start + batch_size]
        vectors = embed([p.image for p in chunk], [p.question for p in chunk])
        for p, vec in zip(chunk, vectors):
            r = retrieve(cb, vec, k=k)
            counts[p.kind] += int(not r.rejected and p.edit_id in r.edit_ids)
    return counts


def totals(probes: Sequence[Probe]) -> dict[str, int]:
    out = dict.fromkeys(PROBE_KINDS, 0)
    for p in probes:
        out[p.kind] += 1
    return out
