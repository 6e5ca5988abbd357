"""The evaluation protocol: matching, summaries, the easy-vqa builder, baselines, sweeps."""

from __future__ import annotations

import json

import pytest
from test_cli import invoke

from reasonedit_cli.evaluation import (
    METHODS,
    Generations,
    Outcome,
    Probe,
    easyvqa_asker,
    evaluate,
    exact_match,
    normalize_answer,
    summarize,
)


def test_normalisation_and_exact_match():
    assert normalize_answer("  The Triangle. ") == "triangle"
    assert exact_match("A circle!", "circle")
    assert exact_match("YES", "yes")
    assert not exact_match("circles", "circle")
    assert not exact_match("", "no")


def test_summarize_on_hand_made_results():
    probes = [
        Probe(b"", "q1", "circle", "acc", "e1"),
        Probe(b"", "q2", "circle", "t_gen", "e1"),
        Probe(b"", "q3", "yes", "r_gen", "e1"),
        Probe(b"", "q4", "red", "loc"),
        Probe(b"", "q5", "blue", "loc"),
    ]
    results = {
        "unedited": [Outcome(a, [], True) for a in ("square", "square", "no", "red", "blue")],
        "reasonedit": [
            Outcome("circle", ["e1"], False),
            Outcome("the circle", ["e1", "e2"], False),
            Outcome("no", [], True),
            Outcome("red", [], True),
            Outcome("green", ["e2"], False),
        ],
    }
    rep = summarize(probes, results)
    m = rep["methods"]["reasonedit"]
    assert m["Acc"] == 1.0 and m["T-Gen"] == 1.0 and m["R-Gen"] == 0.0 and m["Loc"] == 0.5
    assert m["I-Gen"] is None and m["Gen-mean"] == 0.5
    assert rep["methods"]["unedited"]["Loc"] == 1.0
    r = rep["retrieval_by_method"]["reasonedit"]
    assert r["t_gen"] == {"recall": 1.0, "precision": 0.5}
    assert r["r_gen"]["recall"] == 0.0 and r["loc"]["recall"] == 0.5
    assert rep["retrieval"]["acc"] == 1.0
    assert rep["counts"] == {"acc": 1, "t_gen": 1, "r_gen": 1, "loc": 2}


@pytest.fixture(scope="module")
def tiny_editor(tiny_llava, tmp_path_factory):
    from reasonedit_cli.editor import Editor

    return Editor(
        tmp_path_factory.mktemp("cb") / "cb", model=str(tiny_llava), device="cpu", create=True
    )


@pytest.fixture(scope="module")
def easy(tiny_editor):
    from reasonedit_cli.easyvqa import build_easyvqa

    gen = Generations(tiny_editor.vlm, 32)
    edits, probes, info = build_easyvqa(
        easyvqa_asker(gen), n_edits=3, seed=1, limit=80, max_asked=40
    )
    return gen, edits, probes, info


def test_easyvqa_builder_structure(easy, tiny_editor):
    from reasonedit_cli.easyvqa import build_easyvqa

    gen, edits, probes, info = easy
    assert len(edits) == 3 and info["mistakes_found"] == 3
    ids = {e.id for e in edits}
    assert len({e.image_sha256 for e in edits}) == 3  # one edit per image
    for e in edits:
        assert e.answer in ("circle", "rectangle", "triangle") or "colour" in e.reasoning[0]
        assert len(e.reasoning) == 2
    kinds = {p.kind for p in probes}
    assert {"t_gen", "i_gen", "r_gen"} <= kinds
    for p in probes:
        if p.kind == "loc":
            assert p.edit_id is None
            assert p.image_bytes not in {e.image_bytes for e in edits}
        else:
            assert p.edit_id in ids
    per_edit = {}
    for p in probes:
        if p.edit_id:
            per_edit.setdefault((p.edit_id, p.kind), 0)
            per_edit[(p.edit_id, p.kind)] += 1
    assert max(per_edit.values()) == 1  # at most one probe per kind per edit
    for p in probes:
        if p.kind == "r_gen":
            assert p.answer == "yes"
        if p.kind == "t_gen":
            e = next(e for e in edits if e.id == p.edit_id)
            assert p.image_bytes == e.image_bytes and p.question != e.question
            assert p.answer == e.answer
    # deterministic with the seed, and the cache means nothing is asked twice
    calls = gen.calls
    again = build_easyvqa(easyvqa_asker(gen), n_edits=3, seed=1, limit=80, max_asked=40)
    assert [e.id for e in again[0]] == [e.id for e in edits]
    assert [(p.question, p.kind) for p in again[1]] == [(p.question, p.kind) for p in probes]
    assert gen.calls == calls


def test_every_baseline_reports_every_metric_and_p_sweep(easy, tiny_editor):
    gen, edits, probes, _ = easy
    rep = evaluate(tiny_editor, edits, probes, methods=METHODS, sweep_p=True, gen=gen)
    assert list(rep["methods"]) == list(METHODS)
    for metrics in rep["methods"].values():
        assert {"Acc", "T-Gen", "I-Gen", "R-Gen", "CoE-Gen", "Loc", "Gen-mean"} <= set(metrics)
        assert metrics["Acc"] is not None
    assert rep["retrieval_by_method"]["reasonedit"]["acc"]["recall"] == 1.0
    assert rep["retrieval_by_method"]["grace"]["acc"]["recall"] == 1.0  # inside own radius
    # GRACE replaces the answer on its own edits
    assert rep["methods"]["grace"]["Acc"] == 1.0
    taus = [r["tau"] for r in rep["sweep_p"]]
    assert [r["p"] for r in rep["sweep_p"]] == [1, 5, *range(10, 100, 10)]
    assert taus == sorted(taus)
    # reasonedit-reference (in METHODS) gets its own sweep, tau by the reference rule
    ref_taus = [r["tau"] for r in rep["sweep_p_reference"]]
    assert ref_taus == sorted(ref_taus) and ref_taus[0] is not None


def test_retrieval_rejects_more_loc_probes_at_low_p(tiny_editor, easy):
    """Loc retrieval (share retrieving nothing) is non-increasing in p."""
    from reasonedit_cli.evaluation import Evaluation

    gen, edits, probes, _ = easy
    import tempfile
    from pathlib import Path

    loc = [
        Probe(p.image_bytes, q, "x", "loc")
        for p in probes[:4]
        for q in ("how many people sit on the bench?", "what is the capital of France?")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        ev = Evaluation(tiny_editor, edits, loc, workdir=Path(tmp), gen=gen)
        rows = ev.sweep_p()
    rejected = [r["loc_rejected"] for r in rows]
    assert all(a >= b for a, b in zip(rejected, rejected[1:]))


def _aokvqa_fixture(tmp_path, images):
    import shutil

    from PIL import Image

    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    for i, name in ((42, "red_circle"), (7, "blue_triangle")):
        Image.open(images[name]).convert("RGB").save(root / "val2017" / f"{i:012d}.jpg")
    data = [
        {
            "question_id": "q42",
            "image_id": 42,
            "question": "what shape is in the image?",
            "choices": ["square", "circle", "triangle", "star"],
            "correct_choice_idx": 1,
            "direct_answers": ["circle"] * 10,
            "rationales": ["The shape has no corners.", "A shape with no corners is a circle."],
        },
        {
            "question_id": "q7",
            "image_id": 7,
            "question": "what color is the shape?",
            "choices": ["red", "blue"],
            "correct_choice_idx": 1,
            "direct_answers": ["blue"] * 10,
            "rationales": ["The shape is the colour of the sky. The sky is blue."],
        },
    ]
    path = tmp_path / "aokvqa_val.json"
    path.write_text(json.dumps(data))
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)
    return path, root


def test_aokvqa_and_rationalevqa_through_evaluate(tmp_path, images, model_args):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, root = _aokvqa_fixture(tmp_path, images)
    result = invoke(
        "evaluate",
        "--edits",
        str(path),
        "--format",
        "aokvqa",
        "--images-root",
        str(root),
        "--methods",
        "unedited,reasonedit,grace",
        "--no-sweep-p",
        *model_args,
        "--json",
    )
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["counts"] == {"acc": 2} and set(rep["methods"]) == {
        "unedited",
        "reasonedit",
        "grace",
    }
    table = pa.table(
        {
            "uid": ["u1", "u2"],
            "image_path": ["images/green_rect.png", "images/red_circle.png"],
            "question": ["what shape is in the image?", "what color is the shape?"],
            "answer": ["rectangle", "red"],
            "rationale": [
                "The shape has four corners. A shape with four corners is a rectangle.",
                "The shape is the colour of a stop sign. Stop signs are red.",
            ],
            "choices": [["circle", "rectangle"], ["red", "blue"]],
            "idx_choices": [1, 0],
        }
    )
    pq.write_table(table, tmp_path / "rvqa.parquet")
    report_dir = tmp_path / "rep"
    result = invoke(
        "evaluate",
        "--edits",
        str(tmp_path / "rvqa.parquet"),
        "--format",
        "rationalevqa",
        "--images-root",
        str(tmp_path),
        "--methods",
        "unedited,reasonedit,ike",
        "--report",
        str(report_dir),
        *model_args,
        "--json",
    )
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["counts"] == {"acc": 2} and len(rep["sweep_p"]) == 11  # p = 1, 5, 10..90
    for name in ("metrics.json", "metrics.md", "sweep.md", "sweep.png"):
        assert (report_dir / name).is_file()


def test_unknown_method_is_a_usage_error(edits_jsonl, model_args):
    result = invoke("evaluate", "--edits", str(edits_jsonl), "--methods", "nope", *model_args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
