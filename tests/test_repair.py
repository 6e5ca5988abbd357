"""`doctor --repair` rebuilds what survives damage (issue 23): each case damages a real
codebook built through the CLI with the tiny LLaVA, repairs it through the CLI, and
checks that `ask` answers exactly as before the damage and that no file was deleted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reasonedit_cli.cli import app
from reasonedit_cli.datasets import read_edits
from reasonedit_cli.repair import repair_codebook
from reasonedit_cli.store import Codebook

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llava):
    """A codebook of two add-edit commits (e1, e2 then e3) and its `ask` answers."""
    from conftest import shape_image

    d = tmp_path_factory.mktemp("repair")
    imgs = d / "images"
    imgs.mkdir()
    shape_image(imgs / "red_circle.png", "circle", "red")
    shape_image(imgs / "blue_triangle.png", "triangle", "blue")
    shape_image(imgs / "green_rect.png", "rectangle", "green")
    rows = [
        ("e1", "red_circle", "what shape is in the image?", "circle", ["No corners.", "Round."]),
        ("e2", "blue_triangle", "what color is the shape?", "blue", ["The shape is blue."]),
        ("e3", "green_rect", "how many corners?", "four", ["A rectangle.", "Four corners."]),
    ]
    model = ["--model", str(tiny_llava), "--device", "cpu"]
    cb = d / "cb"
    for part in (rows[:2], rows[2:]):
        f = d / f"{part[0][0]}.jsonl"
        lines = []
        for eid, img, q, a, r in part:
            rec = {"id": eid, "image": f"images/{img}.png", "question": q, "answer": a}
            rec["reasoning"] = r
            if eid == "e3":
                rec["boxes"] = [[8, 8, 56, 56], None]
            lines.append(json.dumps(rec))
        f.write_text("\n".join(lines) + "\n")
        _editor(cb, model, create=True).add_edits(read_edits(str(f))[0], patches="none")
    return {"dir": d, "cb": cb, "model": model, "answers": _answers(cb, d, model)}


QUESTIONS = [
    ("red_circle", "what shape is in the image?"),
    ("blue_triangle", "what color is the shape?"),
    ("green_rect", "how many corners?"),
]


_SHARED: dict = {}


def _editor(cb: Path | None, model: list[str], create: bool = False):
    """An Editor on cb sharing one loaded tiny VLM across the module (speed)."""
    from reasonedit_cli.editor import Editor

    ed = Editor(cb, model=model[1], device="cpu", create=create)
    if "vlm" in _SHARED:
        ed.attach_vlm(_SHARED["vlm"])
    _SHARED["vlm"] = ed.vlm
    return ed


def _shared_embedder(model: list[str]):
    """editor_factory for repair_codebook: the codebook's settings, the shared VLM."""

    def make(path: Path):
        from reasonedit_cli.embedding import DEFAULT_LAYER

        cfg = Codebook.open(path).config
        ed = _editor(None, model)
        ed.use_embedding(cfg.get("layer") or DEFAULT_LAYER, cfg.get("w"))
        return ed

    return make


def _answers(cb: Path, d: Path, model: list[str]) -> list[dict]:
    """ask on the three edit images (in process, one VLM load for the module)."""
    from PIL import Image

    ed = _editor(cb, model)
    imgs = [Image.open(d / "images" / f"{img}.png").convert("RGB") for img, _ in QUESTIONS]
    out = ed.ask(imgs, [q for _, q in QUESTIONS])
    return [{"answer": a.answer, "facts": a.facts, "prompt": a.prompt} for a in out]


def _copy(built, tmp_path) -> Path:
    work = tmp_path / "cb"
    shutil.copytree(built["cb"], work)
    return work


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _flip(f: Path, at: float = 0.5) -> None:
    data = bytearray(f.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    f.write_bytes(bytes(data))


def _segment(cb: Path, kind: str, version: int) -> Path:
    m = json.loads((cb / "manifest.json").read_text())
    (s,) = [s for s in m["segments"] if s["kind"] == kind and s["version"] == version]
    return cb / s["path"]


def _repair_and_compare(built, work: Path, before: set[str], cli: bool = True) -> list[str]:
    """doctor fails, doctor --repair (CLI, or the core with the shared VLM) fixes it,
    doctor passes, no file is gone, ask answers as before the damage."""
    bad = invoke("doctor", "-c", work)
    assert bad.exit_code == 1
    if cli:
        rep = invoke("doctor", "-c", work, "--repair", "--json")
        assert rep.exit_code == 0, rep.output
        report = json.loads(rep.stdout)
    else:
        r = repair_codebook(work, editor_factory=_shared_embedder(built["model"]))
        report = {"ok": r.ok, "repaired": r.repaired, "problems": r.problems}
    assert report["ok"] and report["repaired"], report
    assert invoke("doctor", "-c", work).exit_code == 0
    after = _files(work)
    # nothing deleted but the derived cache of older versions (the usual index/ gc)
    gone = {f for f in before - after if not f.startswith("index/")}
    assert gone <= {"manifest.json"} and "manifest.json" in after, gone
    assert _answers(work, built["dir"], built["model"]) == built["answers"]
    return report["repaired"]


def test_damaged_manifest_is_restored_from_versions(built, tmp_path):
    work = _copy(built, tmp_path)
    before = _files(work)
    _flip(work / "manifest.json")
    img = built["dir"] / "images/red_circle.png"
    ask = invoke("ask", "-c", work, "-i", img, "-q", "what?", *built["model"])
    assert ask.exit_code == 1 and "doctor --repair" in ask.stderr
    steps = _repair_and_compare(built, work, before)
    assert any("restored manifest.json from versions/v000002.json" in s for s in steps)
    assert list((work / "damaged").iterdir())  # the damaged copy is kept, not deleted


def test_missing_manifest_is_restored_and_add_edit_refuses_to_recreate(built, tmp_path):
    work = _copy(built, tmp_path)
    before = _files(work)
    (work / "manifest.json").unlink()
    img = built["dir"] / "images/red_circle.png"
    res = invoke(
        "add-edit", "-c", work, "-i", img, "-q", "q?", "-a", "a", "-r", "r.", *built["model"]
    )
    assert res.exit_code == 1 and "versions/ holds 3 versions" in res.stderr
    assert not (work / "manifest.json").exists()
    _repair_and_compare(built, work, before - {"manifest.json"})


def test_manifest_and_newest_version_damaged_restores_older_as_new_version(built, tmp_path):
    work = _copy(built, tmp_path)
    _flip(work / "manifest.json")
    _flip(work / "versions" / "v000002.json")
    rep = invoke("doctor", "-c", work, "--repair", "--json")
    assert rep.exit_code == 0, rep.output
    steps = json.loads(rep.stdout)["repaired"]
    assert any("versions/v000002.json passed over" in s for s in steps)
    assert any("committed as version 3" in s and "are lost" in s for s in steps), steps
    cb = Codebook.open(work)
    assert cb.version >= 3 and cb.edit_ids() == {"e1", "e2"}  # version 1's content
    assert (work / "versions" / "v000002.json").exists()  # kept, not overwritten


@pytest.mark.parametrize(
    "version,cli", [(1, False), (2, False), pytest.param(2, True, marks=pytest.mark.slow)]
)
def test_damaged_keys_segment_is_re_embedded(built, tmp_path, version, cli):
    work = _copy(built, tmp_path)
    before = _files(work)
    _flip(_segment(work, "keys", version))
    steps = _repair_and_compare(built, work, before, cli=cli)
    assert any(s.startswith("keys: re-embedded") for s in steps), steps
    cb = Codebook.open(work)
    assert cb.n_keys == Codebook.open(built["cb"]).n_keys


def test_damaged_edits_segment_is_rebuilt_from_keys(built, tmp_path):
    work = _copy(built, tmp_path)
    before = _files(work)
    _flip(_segment(work, "edits", 2))
    steps = _repair_and_compare(built, work, before)
    assert any("edit e3: rebuilt from its keys" in s and "source" in s for s in steps), steps
    old = {e.edit_id: e for e in Codebook.open(built["cb"]).edits()}
    for e in Codebook.open(work).edits():
        o = old[e.edit_id]
        assert (e.question, e.answer, e.reasoning, e.image_sha256) == (
            o.question,
            o.answer,
            o.reasoning,
            o.image_sha256,
        )
        assert e.boxes == o.boxes


def test_edits_and_keys_of_one_commit_damaged_says_what_is_lost(built, tmp_path):
    work = _copy(built, tmp_path)
    _flip(_segment(work, "edits", 2))
    _flip(_segment(work, "keys", 2))
    rep = invoke("doctor", "-c", work, "--repair", "--json")
    assert rep.exit_code == 1, rep.output  # a loss is a problem, never silent
    report = json.loads(rep.stdout)
    (line,) = [p for p in report["problems"] if "not recoverable" in p]
    assert line.startswith("1 edit(s) of segments/edits-000002-"), line
    assert "images/" in line  # e3's image is all that is left of it, and named
    cb = Codebook.open(work)
    assert cb.edit_ids() == {"e1", "e2"}  # e3 is gone with both of its segments
    assert invoke("doctor", "-c", work).exit_code == 0  # what is left is consistent


def test_repair_core_api_reports_each_step(built, tmp_path):
    work = _copy(built, tmp_path)
    _flip(work / "manifest.json")
    _flip(_segment(work, "keys", 1))
    rep = repair_codebook(work, editor_factory=_shared_embedder(built["model"]))
    assert rep.ok, rep.problems
    text = "\n".join(rep.repaired)
    assert "restored manifest.json from versions/v000002.json" in text, text
    assert "versions/v000002.json lists 1 damaged segments" in text, text
    assert "re-embedded" in text
    assert "committed the rebuilt segments" in text


def test_damaged_merged_keys_segment_is_re_embedded_and_re_merged(built, tmp_path):
    """e4 repeats e1's image and question: merge-keys folds their answer keys into one
    key holding both edits' values; losing that segment, repair re-embeds and re-merges."""
    work = _copy(built, tmp_path)
    rows = [json.dumps({"id": "e4", "image": "images/red_circle.png",
                        "question": "what shape is in the image?", "answer": "circle",
                        "reasoning": ["A circle has no corners."]})]  # fmt: skip
    f = built["dir"] / "e4.jsonl"
    f.write_text("\n".join(rows) + "\n")
    _editor(work, built["model"]).add_edits(read_edits(str(f))[0], patches="none")
    plan, _ = _editor(work, built["model"]).merge_keys()
    assert plan.merged_into, "the duplicate answer key must merge"
    answers = _answers(work, built["dir"], built["model"])
    n_keys = Codebook.open(work).n_keys
    before = _files(work)
    (seg,) = [s for s in Codebook.open(work).manifest["segments"] if s["kind"] == "keys"]
    _flip(work / seg["path"])
    r = repair_codebook(work, editor_factory=_shared_embedder(built["model"]))
    assert r.ok, r.problems
    assert any("re-ran merge-keys" in x for x in r.repaired), r.repaired
    assert Codebook.open(work).n_keys == n_keys
    assert _answers(work, built["dir"], built["model"]) == answers
    gone = {x for x in before - _files(work) if not x.startswith("index/")}
    assert not gone, gone


def test_read_only_mounted_codebook_answers_ask(built, tmp_path):
    """A read-only bind mount of a real codebook: `ask` answers as before; writes fail
    with one line (the hostile tests cover the writes in more commands)."""
    from test_hostile import _ro_bind

    ro = tmp_path / "ro"
    if not _ro_bind(built["cb"], ro):
        pytest.skip("cannot make a read-only bind mount here (needs root and mount rights)")
    try:
        assert _answers(ro, built["dir"], built["model"]) == built["answers"]
        res = invoke("remove-edit", "e1", "-c", ro)
        assert res.exit_code == 1 and "Read-only file system" in res.stderr, res.output
        assert len([x for x in res.stderr.splitlines() if x.strip()]) == 1
    finally:
        import subprocess

        subprocess.run(["umount", str(ro)], capture_output=True)
