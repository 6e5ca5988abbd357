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


def test_harmonic_gen_mean_and_its_zero_and_missing_rules():
    from reasonedit_cli.evaluation import gen_hmean, gen_mean

    assert gen_hmean([0.5, 1.0, 1.0]) == pytest.approx(3 / (2 + 1 + 1))
    assert gen_mean([0.5, 1.0, 1.0]) == pytest.approx(2.5 / 3)
    assert gen_hmean([0.9, 0.0, 1.0]) == 0.0  # one kind never generalised
    assert gen_hmean([0.5, None, 1.0]) == pytest.approx(2 / 3)  # a kind without probes
    assert gen_hmean([None, None, None]) is None and gen_mean([None]) is None


def test_hard_locality_and_multiple_choice_in_the_summary():
    probes = [
        Probe(b"", "q1", "circle", "acc", "e1", choices=["square", "circle"]),
        Probe(b"", "q2", "red", "hard_loc", "e1", choices=["Red ", "blue"]),
        Probe(b"", "q3", "blue", "hard_loc", "e1"),
    ]
    outcomes = [
        Outcome("a circle", ["e1"], False, choice="circle"),
        Outcome("red", ["e1"], False, choice="Red "),  # strip().lower() match
        Outcome("green", ["e1"], False),
    ]
    rep = summarize(probes, {"m": outcomes})
    m = rep["methods"]["m"]
    assert m["Acc"] == 1.0 and m["Hard-Loc"] == 0.5
    assert m["MC-Acc"] == 1.0 and m["MC-Hard-Loc"] == 1.0  # over the probes with choices
    # locality retrieval: the share that retrieved nothing
    assert rep["retrieval_by_method"]["m"]["hard_loc"] == {"recall": 0.0, "precision": None}


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
        elif p.kind == "hard_loc":  # the edited image, asked about its other attribute
            e = next(e for e in edits if e.id == p.edit_id)
            assert p.image_bytes == e.image_bytes and p.answer != e.answer
            assert (e.answer in ("circle", "rectangle", "triangle")) == ("color" in p.question)
            assert exact_match(gen.answer([p.image_bytes], [p.question])[0], p.answer)
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
    assert rep["retrieval_by_method"]["answer-lookup"]["acc"]["recall"] == 1.0  # own radius
    # answer lookup replaces the answer on its own edits
    assert rep["methods"]["answer-lookup"]["Acc"] == 1.0
    # the real GRACE trained one value per codebook entry and reports what it did
    assert rep["grace"]["edits"] == len(edits) and sum(rep["grace"]["actions"].values()) == 3
    assert "Hard-Loc" in rep["methods"]["grace"] and "Gen-hmean" in rep["methods"]["grace"]
    taus = [r["tau"] for r in rep["sweep_p"]]
    assert [r["p"] for r in rep["sweep_p"]] == [1, 5, *range(10, 100, 10)]
    assert taus == sorted(taus)
    # reasonedit-reference (in METHODS) gets its own sweep, tau by the reference rule
    ref_taus = [r["tau"] for r in rep["sweep_p_reference"]]
    assert ref_taus == sorted(ref_taus) and ref_taus[0] is not None


@pytest.fixture
def fake_easy(tmp_path):
    """An editor on the fake backend and easy-vqa edits of its mistakes (it calls every
    shape a square): for the evaluation's bookkeeping, where the model adds nothing."""
    from fake_backend import FakeText, FakeVLM

    from reasonedit_cli.easyvqa import build_easyvqa
    from reasonedit_cli.editor import Editor

    editor = Editor(tmp_path / "cb", create=True, vlm=FakeVLM(), text=FakeText())
    gen = Generations(editor.vlm, 32)
    edits, probes, _ = build_easyvqa(easyvqa_asker(gen), n_edits=3, seed=1, limit=80, max_asked=40)
    return editor, gen, edits, probes


def test_retrieval_rejects_more_loc_probes_at_low_p(fake_easy):
    """Loc retrieval (share retrieving nothing) is non-increasing in p."""
    from reasonedit_cli.evaluation import Evaluation

    tiny_editor, gen, edits, probes = fake_easy
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


def test_aokvqa_through_evaluate_with_grace(tmp_path, images, model_args):
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
    # both records have choices: the highest-likelihood choice is scored too
    for metrics in rep["methods"].values():
        assert 0.0 <= metrics["MC-Acc"] <= 1.0


def test_rationalevqa_through_evaluate_with_its_choices_and_report(tmp_path, images, fake_models):
    import pyarrow as pa
    import pyarrow.parquet as pq

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
        "--json",
    )
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["counts"] == {"acc": 2} and len(rep["sweep_p"]) == 11  # p = 1, 5, 10..90
    assert {"MC-Acc"} <= set(rep["methods"]["ike"])  # the `choices` column
    for name in ("metrics.json", "metrics.md", "sweep.md", "sweep.png"):
        assert (report_dir / name).is_file()


def test_unknown_method_is_a_usage_error(edits_jsonl, model_args):
    result = invoke("evaluate", "--edits", str(edits_jsonl), "--methods", "nope", *model_args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_easyvqa_hard_locality_probes_with_a_scripted_model():
    """A scripted asker (wrong on every shape question, right on the rest): every shape
    edit gets a colour question on its own image as Hard-Loc, answered right unedited."""
    import easy_vqa

    from reasonedit_cli.easyvqa import SHAPES, build_easyvqa, image_attributes

    qs, ans, ids = easy_vqa.get_test_questions()
    attrs = image_attributes(qs[:200], ans[:200], ids[:200])

    def ask(paths, questions):
        out = []
        for p, q in zip(paths, questions):
            a = attrs.get(int(p.stem), {})
            out.append(a.get("color", "?") if q.startswith("what") and "color" in q else "no")
        return out

    edits, probes, info = build_easyvqa(ask, n_edits=5, seed=0, limit=200)
    hard = [p for p in probes if p.kind == "hard_loc"]
    assert edits and all(e.answer in SHAPES for e in edits)
    assert info["hard_loc"] == len(hard) >= 1
    by_id = {e.id: e for e in edits}
    for p in hard:
        e = by_id[p.edit_id]
        assert p.image_bytes == e.image_bytes and "color" in p.question
        assert p.answer not in SHAPES and ask([e.image_path], [p.question]) == [p.answer]


def _aokvqa_layout(tmp_path):
    """A small file in the official A-OKVQA layout, COCO-named images under val2017/."""
    from conftest import shape_image

    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    for i, shape, colour in (
        (42, "circle", "red"),
        (7, "triangle", "blue"),
        (9, "circle", "green"),
        (11, "rectangle", "yellow"),
    ):
        shape_image(root / "val2017" / f"{i:012d}.jpg", shape, colour)

    def rec(qid, image_id, question, choices, idx, **extra):
        return {
            "question_id": qid,
            "image_id": image_id,
            "question": question,
            "choices": choices,
            "correct_choice_idx": idx,
            "direct_answers": [choices[idx]] * 10,
            "difficult_direct_answer": False,
            "rationales": [f"The answer is {choices[idx]}."],
            **extra,
        }

    shapes = ["circle", "triangle", "rectangle", "star"]
    data = [
        rec(
            "q1",
            42,
            "what shape is in the image?",
            shapes,
            0,
            rephrasings=["which shape is shown?"],
        ),
        rec("q2", 7, "what color is the shape?", ["red", "blue"], 1),
        rec("q3", 42, "what color is the shape?", ["red", "blue"], 0),  # edited image
        rec("q4", 9, "What shape is in the image?", shapes, 0),  # q1 on another image
        rec("q5", 11, "is the sky blue?", ["yes", "no"], 0),  # unrelated
        rec("q6", 11, "what shape is in the image?", shapes, 2),  # a question an edit asks
    ]
    path = tmp_path / "aokvqa_val2017.json"
    path.write_text(json.dumps(data))
    return path, root


def test_aokvqa_probes_and_locality_come_from_the_file(tmp_path):
    from reasonedit_cli.fileprobes import build_aokvqa

    path, root = _aokvqa_layout(tmp_path)
    right = {"what color is the shape?": "red", "is the sky blue?": "yes"}

    def ask(images, questions):  # scripted: wrong on shapes and on the blue shape
        return [right.get(q, "no idea") for q in questions]

    edits, probes, choices, info = build_aokvqa(str(path), root, ask)
    assert [e.id for e in edits] == ["q1", "q2", "q6"]
    assert choices["q1"] == ["circle", "triangle", "rectangle", "star"]
    got = {(p.kind, p.question, p.edit_id) for p in probes}
    assert got == {
        ("t_gen", "which shape is shown?", "q1"),  # the record's rephrasing
        ("i_gen", "What shape is in the image?", "q1"),  # same question and answer
        ("hard_loc", "what color is the shape?", "q1"),  # another question, image 42
        ("hard_loc", "is the sky blue?", "q6"),  # image 11 is edited by q6
    }
    assert all(p.choices for p in probes)
    assert info["unedited_right"] == 2 and info["edits"] == 3


def test_evaluate_aokvqa_end_to_end_with_choices(tmp_path, fake_models):
    path, root = _aokvqa_layout(tmp_path)
    result = invoke(
        "evaluate",
        "--edits",
        str(path),
        "--format",
        "aokvqa",
        "--images-root",
        str(root),
        "--methods",
        "unedited,reasonedit,ike-reference,answer-lookup",
        "--no-sweep-p",
        "--json",
    )
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["dataset"]["dataset"] == "aokvqa" and rep["counts"]["acc"] >= 1
    assert sum(rep["counts"].values()) >= rep["dataset"]["edits"] + 1  # probes beyond Acc
    for metrics in rep["methods"].values():
        assert "MC-Acc" in metrics and "Gen-hmean" in metrics


def test_probe_file_accepts_hard_loc_and_checks_choices(tmp_path, images):
    from reasonedit_cli.errors import InputError
    from reasonedit_cli.evaluation import read_probes

    good = {"image": str(images["red_circle"]), "question": "what color is the shape?"}
    path = tmp_path / "probes.jsonl"
    path.write_text(
        json.dumps({**good, "answer": "red", "kind": "hard_loc", "choices": ["red", "blue"]}) + "\n"
    )
    (probe,) = read_probes(str(path))
    assert probe.kind == "hard_loc" and probe.edit_id is None and probe.choices == ["red", "blue"]
    path.write_text(json.dumps({**good, "answer": "red", "kind": "loc", "choices": "red"}) + "\n")
    with pytest.raises(InputError, match="choices"):
        read_probes(str(path))
