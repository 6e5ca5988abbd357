"""Seeing and managing a codebook (#19): list, show, export, history, id conflicts, the
calibration check. Through Typer's CliRunner and through `Editor` directly, on the tiny
real-architecture LLaVA and the real MiniLM."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import shape_image
from typer.testing import CliRunner

from reasonedit_cli.cli import app
from reasonedit_cli.editor import Editor
from reasonedit_cli.store import Codebook

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def _add(cb, edits_jsonl, model_args, *extra):
    result = invoke(
        "add-edit", "--from", str(edits_jsonl), "-c", str(cb), *model_args, "--patches", "none",
        *extra,
    )  # fmt: skip
    return result


def _write_edits(d: Path) -> Path:
    """conftest's three edits (e1-e3) with their images, in folder `d`."""
    (d / "images").mkdir()
    shape_image(d / "images" / "red_circle.png", "circle", "red")
    shape_image(d / "images" / "blue_triangle.png", "triangle", "blue")
    shape_image(d / "images" / "green_rect.png", "rectangle", "green")
    rows = [  # the records of conftest's edits_jsonl
        {"id": "e1", "image": "images/red_circle.png", "question": "what shape is in the image?",
         "answer": "circle",
         "reasoning": "The shape has no corners. A shape with no corners is a circle."},
        {"id": "e2", "image": "images/blue_triangle.png", "question": "what color is the shape?",
         "answer": "blue",
         "reasoning": ["The shape is the colour of the sky.", "The sky is blue."]},
        {"id": "e3", "image": "images/green_rect.png", "question": "is there a triangle?",
         "answer": "no", "reasoning": "The shape has four corners. A triangle has three corners.",
         "boxes": [[8, 8, 56, 56], None]},
    ]  # fmt: skip
    (d / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "edits.jsonl"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llava):
    """The conftest edits (e1-e3) added once per module; tests get a copy."""
    d = tmp_path_factory.mktemp("catalog")
    cb = d / "cb"
    result = _add(cb, _write_edits(d), ["--model", str(tiny_llava), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # add-edit names the ids it added
    assert "Added: e1, e2, e3" in result.stdout
    return cb


@pytest.fixture
def codebook(built, tmp_path):
    return Path(shutil.copytree(built, tmp_path / "cb"))


@pytest.fixture
def fake_codebook(tmp_path, fake_models):
    """The same edits added with the fake backend, for tests of plumbing."""
    (tmp_path / "src").mkdir()
    result = _add(tmp_path / "fake-cb", _write_edits(tmp_path / "src"), [])
    assert result.exit_code == 0, result.output
    return tmp_path / "fake-cb"


def _flag_edit(cb, images, model_args, answer, *extra):
    return invoke(
        "add-edit", "-c", str(cb), "--id", "e1", "-i", str(images["red_circle"]),
        "-q", "what shape is in the image?", "-a", answer,
        "-r", "The shape has no corners. A shape with no corners is a circle.",
        *model_args, "--patches", "none", *extra,
    )  # fmt: skip


# ------------------------------------------------------------- id conflicts
def test_same_id_other_content_is_an_error_unless_replace(codebook, images, model_args):
    before = Codebook.open(codebook)
    # same id, same content: a no-op
    same = _flag_edit(codebook, images, model_args, "circle", "--json")
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["skipped"] == ["e1"]
    assert Codebook.open(codebook).version == before.version
    # same id, another answer: exit 1, one line naming the id and both sources
    other = _flag_edit(codebook, images, model_args, "square")
    assert other.exit_code == 1
    err = other.stderr.strip()
    assert err.count("Error:") == 1 and "'e1'" in err and "--replace" in err
    assert "added in version 1 from jsonl" in err and "command line" in err and "answer" in err
    assert Codebook.open(codebook).version == before.version
    # --replace: ONE new version without the old edit's keys, with the new ones
    rep = _flag_edit(codebook, images, model_args, "square", "--replace", "--json")
    assert rep.exit_code == 0, rep.output
    report = json.loads(rep.stdout)
    assert report["added"] == ["e1"] and report["replaced"] == ["e1"]
    after = Codebook.open(codebook)
    assert after.version == before.version + 1
    assert {e.edit_id: e.answer for e in after.edits()}["e1"] == "square"
    values = after.keys_table().column("value").to_pylist()
    assert "The answer to 'what shape is in the image?' is square." in values
    assert "The answer to 'what shape is in the image?' is circle." not in values
    assert after.n_keys == before.n_keys  # 3 keys out, 3 keys in
    assert after.edit_versions()["e1"] == after.version
    assert Editor(codebook).history()[-1]["action"] == "added 1 edit; replaced e1"
    # the replacement is undone by restore, like any version
    with after.writer() as w:
        w.restore(before.version)
    assert {e.edit_id: e.answer for e in Codebook.open(codebook).edits()}["e1"] == "circle"


def test_two_conflicting_records_in_one_input_name_both_lines(tmp_path, edits_jsonl, model_args):
    lines = edits_jsonl.read_text().splitlines()
    clash = json.loads(lines[0]) | {"answer": "square"}
    edits_jsonl.write_text("\n".join([*lines, json.dumps(clash)]) + "\n")
    cb = tmp_path / "cb2"
    result = _add(cb, edits_jsonl, model_args)
    assert result.exit_code == 1
    assert f"{edits_jsonl}:1" in result.stderr and f"{edits_jsonl}:4" in result.stderr
    assert "'e1'" in result.stderr
    assert not (cb / "manifest.json").exists() or Codebook.open(cb).n_keys == 0
    # the same record twice is stored once
    edits_jsonl.write_text("\n".join([*lines, lines[0]]) + "\n")
    ok = _add(cb, edits_jsonl, model_args, "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["added"] == ["e1", "e2", "e3"]


# ------------------------------------------------------------- list / show
def test_list_filters_and_json(codebook):
    table = invoke("list", "-c", str(codebook))
    assert table.exit_code == 0, table.output
    for text in ("e1", "e2", "e3", "what color is the shape?", "circle", "v1"):
        assert text in table.stdout
    rows = json.loads(invoke("list", "-c", str(codebook), "--json").stdout)
    assert [r["id"] for r in rows] == ["e1", "e2", "e3"]
    assert [r["keys"] for r in rows] == [3, 3, 4] and {r["version"] for r in rows} == {1}
    assert all(re.fullmatch(r"[0-9a-f]{64}", r["image"]) for r in rows)
    only = json.loads(invoke("list", "-c", str(codebook), "--question", "COLOR", "--json").stdout)
    assert [r["id"] for r in only] == ["e2"]
    assert [r["id"] for r in Editor(codebook).list_edits(answer="no")] == ["e3"]
    assert Editor(codebook).list_edits(edit_id="e1", answer="blue") == []
    prefix = rows[2]["image"][:8]
    assert [r["id"] for r in Editor(codebook).list_edits(image=prefix)] == ["e3"]


def test_show_lists_facts_and_keys_and_draws_boxes(codebook, tmp_path):
    info = json.loads(invoke("show", "e3", "-c", str(codebook), "--json").stdout)
    assert info["facts"] == [
        "The answer to 'is there a triangle?' is no.",
        "The shape has four corners.",
        "A triangle has three corners.",
    ]
    assert sorted(k["kind"] for k in info["keys"]) == ["answer", "patch", "sentence", "sentence"]
    patch = next(k for k in info["keys"] if k["kind"] == "patch")
    assert patch["box"] == [8, 8, 56, 56] and patch["radius"] > 0
    out = tmp_path / "e3.png"
    text = invoke("show", "e3", "-c", str(codebook), "--image-out", str(out))
    assert text.exit_code == 0, text.output
    assert "The shape has four corners." in text.stdout and "8,8,56,56" in text.stdout
    from PIL import Image

    img = np.asarray(Image.open(out).convert("RGB"))
    scale = img.shape[0] // 64
    assert scale >= 4  # the 64 px image is enlarged so the box is visible
    edge = img[8 * scale + 1, 30 * scale]  # on the top edge of box 1, drawn in red
    assert edge[0] > 200 and edge[1] < 100
    assert Editor(codebook).show_edit("e1")["keys"][0]["kind"] == "answer"
    missing = invoke("show", "nope", "-c", str(codebook))
    assert missing.exit_code == 1 and "no such edit" in missing.stderr


# -------------------------------------------------------------------- export
def test_export_then_add_edit_gives_an_identical_codebook(fake_codebook, tmp_path):
    codebook, model_args = fake_codebook, []
    out = tmp_path / "export"
    result = invoke("export", str(out), "-c", str(codebook))
    assert result.exit_code == 0, result.output
    assert (out / "edits.jsonl").exists() and len(list((out / "images").iterdir())) == 3
    copy = tmp_path / "copy"
    back = _add(copy, out / "edits.jsonl", model_args)
    assert back.exit_code == 0, back.output
    a, b = Codebook.open(codebook), Codebook.open(copy)
    assert [e.edit_id for e in a.edits()] == [e.edit_id for e in b.edits()]
    for x, y in zip(a.edits(), b.edits()):
        assert (x.question, x.answer, x.reasoning, x.boxes, x.image_sha256, x.source) == (
            y.question,
            y.answer,
            y.reasoning,
            y.boxes,
            y.image_sha256,
            y.source,
        )
    cols = ["key_id", "edit_id", "kind", "value", "key_text", "box"]
    assert a.keys_table().select(cols).to_pylist() == b.keys_table().select(cols).to_pylist()
    assert np.allclose(a.vectors(), b.vectors(), atol=1e-5) and a.tau == pytest.approx(b.tau)
    # read back into the codebook it came from: nothing changes
    again = _add(codebook, out / "edits.jsonl", model_args, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["added"] == []
    # a non-empty target is refused; the core call exports a subset
    assert invoke("export", str(out), "-c", str(codebook)).exit_code == 1
    sub = Editor(codebook).export(tmp_path / "sub", edit_ids=["e2"])
    assert sub == {"edits": 1, "images": 1, "path": str(tmp_path / "sub")}


# ------------------------------------------------------------------- history
def test_history_says_what_each_version_did(codebook, tmp_path):
    editor = Editor(codebook)
    removed = editor.remove_edits(["e1", "e2"])
    assert removed == {"removed": ["e1", "e2"], "version": 2, "previous": 1}
    with Codebook.open(codebook).writer() as w:
        w.restore(1)
    with pytest.raises(Exception, match="no such edit"):
        editor.remove_edits(["nope"])
    actions = [r["action"] for r in editor.history()]
    assert actions == ["created the codebook", "added 3 edits", "removed e1, e2", "restored v1"]
    result = invoke("history", "-c", str(codebook))
    assert result.exit_code == 0, result.output
    # piped (not a terminal): full timestamps, nothing cut
    stamps = re.findall(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", result.stdout)
    assert len(stamps) == 4 and "removed e1, e2" in result.stdout


# ------------------------------------------------------- the calibration check
def test_check_with_unchanged_settings_finds_no_loss(codebook, model_args):
    """The real check: re-embedding with the same layer and w retrieves exactly as before."""
    editor = Editor(codebook, model=model_args[1], device="cpu")
    old = editor.embedder
    editor.use_embedding(old.layer, old.w)
    same = editor.embedder
    assert same is not old
    check = editor.check_settings(old, same, editor.reembed_keys())
    assert check.total == {"edit": 3, "rephrased": 3, "perturbed": 3}
    assert check.new == check.old and not check.loses_retrieval
    assert check.old["edit"] == 3  # the edits themselves are always found


def test_refused_calibration_writes_nothing_and_force_commits(fake_codebook, monkeypatch):
    """Plumbing: a check that loses retrieval (forced here) refuses unless --force."""
    codebook, model_args = fake_codebook, []
    from reasonedit_cli.selfcheck import RetrievalCheck

    def losing(self, old, new, keys, baseline=None):
        return RetrievalCheck(
            total=dict.fromkeys(("edit", "rephrased", "perturbed"), 3),
            old={"edit": 3, "rephrased": 3, "perturbed": 1},
            new={"edit": 3, "rephrased": 1, "perturbed": 2},
            old_settings={"layer": old.layer, "w": float(old.w)},
            new_settings={"layer": new.layer, "w": float(new.w)},
        )

    monkeypatch.setattr(Editor, "check_settings", losing)
    before = Codebook.open(codebook)
    args = ["calibrate", "-c", str(codebook), *model_args, "--max-pairs", "24",
            "--bootstrap", "0", "--layer", "projector", "--layer", "vision.0"]  # fmt: skip
    refused = invoke(*args)
    assert refused.exit_code == 1
    assert refused.stderr.count("Error:") == 1
    assert "rephrased 3/3 -> 1/3" in refused.stderr and "--force" in refused.stderr
    # both settings are shown before the error
    assert "Own edits retrieved" in refused.stdout and "1/3 (lost)" in refused.stdout
    assert "41 points, 0.1x..100x" in refused.stdout
    assert Codebook.open(codebook).manifest == before.manifest
    forced = invoke(*args, "--force")
    assert forced.exit_code == 0, forced.output
    assert Codebook.open(codebook).version == before.version + 1
    assert Editor(codebook).history()[-1]["action"].startswith("calibrated: layer ")
