"""`--preset default|reference`: what each selects, stored in the manifest, followed by ask."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from reasonedit_cli import patches as P
from reasonedit_cli import presets
from reasonedit_cli.cli import app
from reasonedit_cli.errors import UsageError

runner = CliRunner()


def test_presets_and_hook_names() -> None:
    assert presets.get_preset(None) is presets.DEFAULT
    assert presets.get_preset("reference").tau_rule == "reference"
    with pytest.raises(UsageError, match="`preset` must be one of default, reference"):
        presets.get_preset("paper")
    ref = presets.REFERENCE
    assert presets.hook_layer("projector", ref) == "projector.normed"
    assert presets.hook_layer("language.3", ref) == "language.3.normed"
    assert presets.hook_layer("vision.2.normed", ref) == "vision.2.normed"
    assert presets.hook_layer("language.3", presets.DEFAULT) == "language.3"
    # codebooks from before presets record none: they open as default
    assert presets.preset_of({}) is presets.DEFAULT
    assert presets.preset_of({"preset": "reference"}) is presets.REFERENCE
    cfg = ref.to_config()
    assert cfg["percentile"] == 1.0 and cfg["hits_rule"] == "reference"
    assert cfg["merge_on_insert"] is True and ref.uncalibrated_w == 30.0


def test_missing_hook_point_is_a_one_line_error() -> None:
    class NoNormed:
        def resolve_layer(self, name):
            if name.endswith(".normed"):
                raise UsageError(f"unknown layer {name!r}; this model has: projector")
            return type("L", (), {"label": name})()

    assert presets.check_hook(NoNormed(), "projector", presets.DEFAULT) == "projector"
    with pytest.raises(UsageError) as err:
        presets.check_hook(NoNormed(), "projector", presets.REFERENCE)
    msg = str(err.value)
    assert "\n" not in msg and "'projector.normed'" in msg and "`preset` reference" in msg


def test_reference_verification_prompt() -> None:
    assert P.sentence_question_reference("The shape is red.") == (
        "Does the image show the shape is red?"
    )
    # every "." becomes "?", the whole sentence is lower-cased, nothing is appended
    assert P.sentence_question_reference("NASA has 3.5 m. Mirrors!") == (
        "Does the image show nasa has 3?5 m? mirrors!"
    )
    assert P.question_for("The shape is red.") == "Does the image show the shape is red?"
    assert P.question_for("It costs 3.5 USD.") == "Does the image show it costs 3.5 USD?"
    with pytest.raises(ValueError):
        P.question_for("x", "paper")


def test_cli_rejects_an_unknown_preset_before_loading_a_model(tmp_path) -> None:
    for command in (
        ["add-edit", "-i", "x.png", "-q", "q", "-a", "a", "-r", "r."],
        ["calibrate"],
        ["evaluate", "--dataset", "easy-vqa"],
    ):
        result = runner.invoke(
            app, [*command, "--preset", "paper", "--codebook", str(tmp_path / "cb")]
        )
        assert result.exit_code == 2, result.output
        assert "--preset must be one of default, reference" in result.output
    assert not (tmp_path / "cb").exists()


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def ref_input():
    """A library variant of the reference preset at the raw block input."""
    return dataclasses.replace(presets.REFERENCE, hook="input")


def test_cli_reference_preset_end_to_end(tmp_path, edits_jsonl, model_args):
    """add-edit --preset reference hooks projector.normed and stores the preset; ask,
    given no preset, follows the manifest."""
    from reasonedit_cli.store import Codebook

    cb = tmp_path / "cb"
    args = ["--codebook", str(cb), *model_args, "--json"]
    result = runner.invoke(
        app,
        ["add-edit", "--from", str(edits_jsonl), "--patches", "none", "--preset", "reference"]
        + args,
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["merged"] is not None  # merge on insert
    cfg = Codebook.open(cb).config
    assert cfg["layer"] == "projector.normed" and cfg["preset"] == "reference"
    assert cfg["w"] == 30.0 and cfg["tau_rule"] == "reference" and cfg["hook"] == "normed"
    image = edits_jsonl.parent / "images" / "red_circle.png"
    result = runner.invoke(
        app, ["ask", "-i", str(image), "-q", "what shape is in the image?", *args]
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert not record["rejected"] and 1 <= len(record["retrieved"]) <= 5
    dists = [h["distance"] for h in record["retrieved"]]
    assert dists == sorted(dists) and record["facts"][0] in record["retrieved"][0]["values"]
    # adding with the default preset is refused, exit 2, codebook unchanged
    version = Codebook.open(cb).version
    result = runner.invoke(
        app,
        ["add-edit", "--from", str(edits_jsonl), "--patches", "none", "--preset", "default"] + args,
    )
    assert result.exit_code == 2 and "built with --preset reference" in result.output
    assert Codebook.open(cb).version == version


def _editor(path, tiny_llava, preset=None):
    from reasonedit_cli.editor import Editor

    ed = Editor(path, model=str(tiny_llava), device="cpu", create=True)
    if preset is not None:
        ed.preset = preset
    return ed


def test_reference_preset_variant_is_stored_and_followed(
    tmp_path, tiny_llava, edits_jsonl, ref_input
):
    from reasonedit_cli.datasets import read_edits
    from reasonedit_cli.editor import Editor
    from reasonedit_cli.store import Codebook

    edits, _ = read_edits(str(edits_jsonl), "jsonl")
    ed = _editor(tmp_path / "cb", tiny_llava, ref_input)
    report = ed.add_edits(edits, patches="none")
    assert report.merge is not None  # merge on insert under the reference preset
    cfg = Codebook.open(tmp_path / "cb").config
    assert cfg["preset"] == "reference" and cfg["tau_rule"] == "reference"
    assert cfg["percentile"] == 1.0 and cfg["hits_rule"] == "reference"
    assert cfg["w"] == 30.0  # the reference's text scaler before calibration
    # a new editor (as `ask` makes) follows the stored preset
    again = Editor(tmp_path / "cb", model=str(tiny_llava), device="cpu")
    assert again.preset.name == "reference" and again.codebook.tau_rule == "reference"
    from PIL import Image

    img = Image.open(edits_jsonl.parent / "images" / "red_circle.png")
    ans = again.ask([img], ["what shape is in the image?"], max_new_tokens=2)[0]
    r = ans.retrieval
    assert not r.rejected and 1 <= len(r.hits) <= 5
    assert [h.distance for h in r.hits] == sorted(h.distance for h in r.hits)
    assert r.facts[0] in r.hits[0].values  # nearest first under the reference rule
    # adding with another preset is refused, codebook unchanged
    version = again.codebook.version
    with pytest.raises(UsageError, match="built with `preset` reference"):
        Editor(tmp_path / "cb", model=str(tiny_llava), device="cpu", preset="default").add_edits(
            edits[:1], patches="none"
        )
    assert Codebook.open(tmp_path / "cb").version == version


def test_old_codebook_without_preset_opens_as_default(tmp_path) -> None:
    import hashlib

    from reasonedit_cli.editor import Editor
    from reasonedit_cli.store import Codebook, EditRecord, KeyRecord

    cb = Codebook.open(tmp_path / "cb", create=True)
    sha = hashlib.sha256(b"img").hexdigest()
    with cb.writer() as w:  # a 0.1 manifest: no preset, no hits_rule
        w.set_config(model="bundled:demo_vlm", tau_rule="edits", percentile=25.0, dim=2)
        w.add(
            [EditRecord("e", sha, "q", "a", ["f."], None, "t")],
            [KeyRecord("e", "answer", "v", "q", sha, None, np.zeros(2, np.float32))],
        )
    assert "preset" not in Codebook.open(tmp_path / "cb").config
    ed = Editor(tmp_path / "cb")  # opening loads no model
    assert ed.preset is presets.DEFAULT and ed.stored_preset == "default"
    with pytest.raises(UsageError, match="built with `preset` default"):
        Editor(tmp_path / "cb", preset="reference").plan_add([])


def _fake_editor(path):
    """An editor on the fake backend (tests/fake_backend.py): for the presets' plumbing."""
    from fake_backend import FakeText, FakeVLM

    from reasonedit_cli.editor import Editor

    return Editor(path, create=True, vlm=FakeVLM(), text=FakeText())


def test_calibrate_with_the_reference_preset(tmp_path, edits_jsonl):
    from reasonedit_cli.calibration_reference import REFERENCE_W_GRID
    from reasonedit_cli.datasets import read_edits
    from reasonedit_cli.store import Codebook

    edits, _ = read_edits(str(edits_jsonl), "jsonl")
    ed = _fake_editor(tmp_path / "cb")
    ed.add_edits(edits, patches="none")
    ed.preset = presets.REFERENCE  # switching preset: calibrate re-embeds every key
    # force: the self-check of #19 judges a random tiny model, not the rule under test
    result, version = ed.calibrate(bootstrap=2, seed=0, force=True)
    # every candidate at its normed point
    assert all(r["layer"].endswith(".normed") for r in result.layer_table)
    assert len(result.layer_table) == len(
        {li.label for li in ed.vlm.candidate_layers() if li.label.endswith(".normed")}
    )
    assert result.w in REFERENCE_W_GRID and result.shift == "global" and result.bootstrap == 2
    assert result.extra["n_samples"] == 3  # three edits: three (image, question) samples
    cfg = Codebook.open(tmp_path / "cb").config
    assert cfg["preset"] == "reference" and cfg["w"] == result.w and cfg["calibrated"]
    assert cfg["layer"] == result.layer and cfg["tau_rule"] == "reference"
    assert np.isfinite([r["harmonic"] for r in result.w_table]).all()


def test_evaluate_reports_both_presets_in_one_table(tmp_path, edits_jsonl):
    from reasonedit_cli import evaluation as E
    from reasonedit_cli.datasets import read_edits

    edits, _ = read_edits(str(edits_jsonl), "jsonl")
    ed = _fake_editor(tmp_path / "cb")
    report = E.evaluate(
        ed,
        edits,
        [],
        methods=("reasonedit", "reasonedit-reference"),
        sweep_p=True,
        workdir=tmp_path / "v",
    )
    assert set(report["methods"]) == {"reasonedit", "reasonedit-reference"}
    assert [r["p"] for r in report["sweep_p"]][:2] == [1, 5]
    assert [r["p"] for r in report["sweep_p_reference"]] == list(E.SWEEP_P)
    table = E.markdown_table(report)
    assert "| reasonedit-reference |" in table
    assert "reasonedit-reference" in E.sweep_markdown(report)
    json.dumps(report)
