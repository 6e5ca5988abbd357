"""Presets: reasonedit's own choices (`default`) or the authors' code (`reference`).

`--preset reference` on `add-edit`, `calibrate` and `evaluate` selects, in one place,
every behaviour of the authors' published code (JiaxingQiu/reasonedit) that differs from
ours; docs/reference.md lists them row by row with their measured effect. The preset is
stored in the codebook's manifest (config `preset`, plus the retrieval settings it
implies), so `ask` follows it. Codebooks written before presets existed have no `preset`
and open as `default`.

What the two presets share: the crop shapes (row 1, a bug fix) and the 2-decimal loss
ties (row 2), the MiniLM text encoder (row 9: mpnet is not installable here) and the
masked mean pooling (row 10, a fix: padding no longer changes a key).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from reasonedit_cli.errors import UsageError
from reasonedit_cli.retrieval import DEFAULT_PERCENTILE, DEFAULT_TAU_RULE
from reasonedit_cli.vlm import NORMED_SUFFIX  # the layer-name suffix of the normed point


@dataclass(frozen=True)
class Preset:
    """The behaviours a preset selects (REFERENCE row numbers in brackets)."""

    name: str
    #: hook point: "input" (the raw block input) or "normed" (the input of the block's
    #: first Linear, after its norm) [3]
    hook: str
    #: calibration: "groups" (ours, calibration.calibrate) or "reference"
    #: (calibration_reference.calibrate_reference: n x n, global shift, mean of per-run
    #: harmonics, 10 fresh runs, layers on the activation alone) [4-8]
    calibration: str
    #: w before calibration: None = auto (0.1 x equal spread), or this text scaler [9]
    uncalibrated_w: float | None
    #: retrieval.TAU_RULES entry [11, 12]
    tau_rule: str
    #: rejection percentile p [12]
    percentile: float
    #: retrieval.HIT_RULES entry [13]
    hits_rule: str
    #: merge new keys into existing ones on insert [14]
    merge_on_insert: bool
    #: merging.MERGE_RULES entry: "ours" (nearest of 8, overlap along the line) or
    #: "reference" (first touching key, 2-D disc intersection over area > 0.9) [14]
    merge_rule: str
    #: verification prompt of the patch search: "default" or "reference" [15]
    question_rule: str

    def to_config(self) -> dict[str, Any]:
        """The manifest config keys this preset sets (retrieval reads them at `ask`)."""
        return {
            "preset": self.name,
            "tau_rule": self.tau_rule,
            "percentile": self.percentile,
            "hits_rule": self.hits_rule,
            "merge_on_insert": self.merge_on_insert,
            "merge_rule": self.merge_rule,
            "question_rule": self.question_rule,
            "hook": self.hook,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT = Preset(
    name="default",
    hook="input",
    calibration="groups",
    uncalibrated_w=None,
    tau_rule=DEFAULT_TAU_RULE,
    percentile=DEFAULT_PERCENTILE,
    hits_rule="tau",
    merge_on_insert=False,
    merge_rule="ours",
    question_rule="default",
)
REFERENCE = Preset(
    name="reference",
    hook="normed",
    calibration="reference",
    uncalibrated_w=30.0,  # lang_scaler_sbert default of revlm/editors/reasonedit.py
    tau_rule="reference",
    percentile=1.0,  # reject_threshold_pct default
    hits_rule="reference",
    merge_on_insert=True,  # merge_keys default True
    merge_rule="reference",  # _try_merge_key: first overlapping key, circle IoA > 0.9
    question_rule="reference",
)
PRESETS: dict[str, Preset] = {p.name: p for p in (DEFAULT, REFERENCE)}
PRESET_NAMES = tuple(PRESETS)
DEFAULT_PRESET = "default"


def get_preset(name: str | None) -> Preset:
    """The preset called `name` (None: default); a usage error for anything else."""
    if name is None:
        return DEFAULT
    if name not in PRESETS:
        raise UsageError(f"`preset` must be one of {', '.join(PRESET_NAMES)}, got {name!r}")
    return PRESETS[name]


def preset_of(config: dict[str, Any]) -> Preset:
    """The preset a codebook was written with: its config `preset`, `default` when the
    manifest has none (codebooks from before presets)."""
    name = config.get("preset")
    preset = PRESETS.get(name, DEFAULT) if isinstance(name, str) else DEFAULT
    hook = config.get("hook")
    if hook in ("input", "normed") and hook != preset.hook:
        # the hook point the codebook was built at (a library variant of the preset)
        preset = replace(preset, hook=hook)
    return preset


def hook_layer(layer: str, preset: Preset) -> str:
    """The layer label to hook under `preset`: the `.normed` variant for "normed".

    A name transformation only (`projector` -> `projector.normed`, `language.3` ->
    `language.3.normed`, unchanged when already normed); whether the model offers the
    name is checked by `check_hook`.
    """
    if preset.hook == "normed" and not layer.endswith(NORMED_SUFFIX):
        return layer + NORMED_SUFFIX
    return layer


def check_hook(vlm: Any, layer: str, preset: Preset) -> str:
    """`hook_layer`, resolved on the model; a one-line error when the model lacks it."""
    name = hook_layer(layer, preset)
    try:
        return str(vlm.resolve_layer(name).label)
    except UsageError:
        if name == layer:
            raise
        raise UsageError(
            f"`preset` {preset.name} hooks {name!r} (the input of the block's first Linear, "
            f"after its norm), which this model does not offer"
        ) from None
