"""The commands end to end through Typer's CliRunner, on a tiny LLaVA and the real MiniLM.

Tests of plumbing (parsing, bookkeeping, rendering) run on the fake backend
(`fake_models`, tests/fake_backend.py); the main paths run on the real models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from reasonedit_cli.cli import app

runner = CliRunner()


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("add-edit", "ask", "calibrate", "merge-keys", "evaluate"):
        assert command in result.output


def test_help_does_not_import_torch():
    code = (
        "import sys; from reasonedit_cli import cli; "
        "print('torch' in sys.modules, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


@pytest.fixture
def codebook(tmp_path, edits_jsonl, model_args):
    cb = tmp_path / "cb"
    result = invoke(
        "add-edit",
        "--from",
        str(edits_jsonl),
        "--codebook",
        str(cb),
        *model_args,
        "--patches",
        "none",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["added"] == ["e1", "e2", "e3"]
    # answer key + one key per sentence (2 each) + one manual box key on e3
    assert report["keys"] == 3 * 3 + 1
    assert report["boxes"]["e3"] == [[[8, 8, 56, 56]], []]
    return cb


@pytest.fixture
def fake_codebook(tmp_path, edits_jsonl, fake_models):
    """The `codebook` fixture's three edits, added with the fake backend."""
    cb = tmp_path / "cb"
    result = invoke(
        "add-edit", "--from", str(edits_jsonl), "--codebook", str(cb), "--patches", "none"
    )
    assert result.exit_code == 0, result.output
    return cb


def test_add_then_ask_in_a_new_process_returns_the_facts(codebook, images, tiny_llava):
    cmd = [
        sys.executable,
        "-m",
        "reasonedit_cli",
        "ask",
        "--codebook",
        str(codebook),
        "--image",
        str(images["red_circle"]),
        "--question",
        "what shape is in the image?",
        "--model",
        str(tiny_llava),
        "--device",
        "cpu",
        "--json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["rejected"] is False
    assert record["facts"][-1] == "The answer to 'what shape is in the image?' is circle."
    assert record["retrieved"][0]["edit_id"] == "e1"
    assert record["retrieved"][0]["distance"] == pytest.approx(0.0, abs=1e-4)
    assert record["prompt"] == " ".join(record["facts"]) + " what shape is in the image?"
    assert set(record) >= {"answer", "facts", "rejected", "retrieved"}


def test_unrelated_question_retrieves_nothing(codebook, tmp_path, model_args):
    # an unrelated query: a picture unlike any edited one (a colour gradient, not a flat
    # shape) with a question no edit is about. The default key leans on the image (the
    # image decides which edit applies), so another circle is not "unrelated" to an edit
    # about a circle.
    import numpy as np
    from PIL import Image

    g = np.zeros((64, 64, 3), np.uint8)
    g[..., 0] = np.arange(64)[None] * 4
    g[..., 2] = np.arange(64)[:, None] * 4
    photo = tmp_path / "gradient.png"
    Image.fromarray(g).save(photo)
    result = invoke(
        "ask",
        "--codebook",
        str(codebook),
        "--image",
        str(photo),
        "--question",
        "How many people are sitting on the bench?",
        *model_args,
        "--json",
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["rejected"] is True
    assert record["facts"] == [] and record["retrieved"] == []
    assert record["prompt"] == "How many people are sitting on the bench?"


def test_same_edits_twice_are_stored_once(fake_codebook, edits_jsonl):
    codebook = fake_codebook
    result = invoke("add-edit", "--from", str(edits_jsonl), "--codebook", str(codebook), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["added"] == [] and sorted(report["skipped"]) == ["e1", "e2", "e3"]
    from reasonedit_cli.store import Codebook

    cb = Codebook.open(codebook)
    assert sorted(cb.edit_ids()) == ["e1", "e2", "e3"]
    assert cb.keys_table().num_rows == 10


def test_add_from_flags_and_stdin(tmp_path, images, fake_models):
    model_args: list[str] = []
    cb = tmp_path / "cb"
    result = invoke(
        "add-edit",
        "--codebook",
        str(cb),
        *model_args,
        "--image",
        str(images["blue_triangle"]),
        "--question",
        "what shape is in the image?",
        "--answer",
        "triangle",
        "--reason",
        "The shape has three corners. A shape with three corners is a triangle.",
        "--box",
        "0,0,64,64",
        "--box",
        "none",
        "--patches",
        "none",
        "--json",
    )
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)
    # answer, two sentences, the first sentence's manual box
    assert len(first["added"]) == 1 and first["keys"] == 4
    line = json.dumps(
        {
            "image": str(images["red_circle"]),
            "question": "what color is the shape?",
            "answer": "red",
            "reasoning": "The shape is the colour of blood.",
        }
    )
    result = invoke(
        "add-edit", "--codebook", str(cb), *model_args, "--from", "-", "--json", input=line + "\n"
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["added"]) == 1


def test_ask_batch_from_jsonl_and_no_edit(fake_codebook, images, tmp_path):
    codebook, model_args = fake_codebook, []
    q = tmp_path / "questions.jsonl"
    q.write_text(
        json.dumps(
            {
                "id": "q1",
                "image": str(images["red_circle"]),
                "question": "what shape is in the image?",
            }
        )
        + "\n"
        + json.dumps(
            {"id": "q2", "image": str(images["green_rect"]), "question": "is there a triangle?"}
        )
        + "\n"
    )
    result = invoke("ask", "--codebook", str(codebook), "--from", str(q), *model_args, "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == ["q1", "q2"]
    assert all(not r["rejected"] for r in records)
    plain = invoke(
        "ask", "--codebook", str(codebook), "--from", str(q), *model_args, "--json", "--no-edit"
    )
    assert plain.exit_code == 0, plain.output
    for r in map(json.loads, plain.stdout.splitlines()):
        assert (
            r["edited"] is False
            and r["facts"] == []
            and r["prompt"] in ("what shape is in the image?", "is there a triangle?")
        )


def test_ask_explain_renders_a_table(fake_codebook, images):
    codebook, model_args = fake_codebook, []
    result = invoke(
        "ask",
        "--codebook",
        str(codebook),
        "--image",
        str(images["red_circle"]),
        "--question",
        "what shape is in the image?",
        *model_args,
        "--explain",
    )
    assert result.exit_code == 0, result.output
    assert "Retrieved keys" in result.output and "circle" in result.output


def test_no_edit_without_a_codebook(tmp_path, images, fake_models):
    model_args: list[str] = []
    result = invoke(
        "ask",
        "--codebook",
        str(tmp_path / "none"),
        "--image",
        str(images["red_circle"]),
        "--question",
        "what?",
        "--no-edit",
        *model_args,
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["ask", "--question", "q"], 2, "give --image and --question"),
        (["add-edit", "--question", "q"], 2, "missing --image"),
        (["ask", "--image", "nope.png", "--question", "q"], 1, "does not exist"),
    ],
)
def test_usage_errors_are_one_line(args, code, message, tmp_path):
    result = invoke(*args, "--codebook", str(tmp_path / "cb"))
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_calibrate_writes_layer_and_w_and_reembeds(codebook, model_args, tmp_path):
    from reasonedit_cli.store import Codebook

    before = Codebook.open(codebook)
    plot = tmp_path / "cal.png"
    args = [
        "calibrate",
        "--codebook",
        str(codebook),
        *model_args,
        "--max-pairs",
        "40",
        "--bootstrap",
        "2",
        "--plot",
        str(plot),
        "--json",
    ]
    # the choice is checked on the codebook's own edits before anything is written (#19)
    first = invoke(*args)
    check = json.loads(first.stdout)["check"]
    assert {k: v["total"] for k, v in check["kinds"].items()} == dict.fromkeys(
        ("edit", "rephrased", "perturbed"), 3
    )
    assert check["old_settings"]["layer"] == "projector"
    lost = [k for k, v in check["kinds"].items() if v["new"] < v["old"]]
    assert check["lost"] == lost and check["loses_retrieval"] is bool(lost)
    if lost:  # refused: exit 1, one line naming what was lost, nothing written
        assert first.exit_code == 1
        assert first.stderr.count("Error:") == 1 and lost[0] in first.stderr
        assert "--force" in first.stderr
        assert Codebook.open(codebook).version == before.version
    else:  # checked selection (the default) found a choice that loses nothing: committed
        assert first.exit_code == 0, first.output
        assert json.loads(first.stdout)["committed"] is True
        before = Codebook.open(codebook)
    selection = json.loads(first.stdout)["selection"]
    assert selection["select"] == "checked" and selection["n_checks"] >= 1
    assert selection["passed"] is not bool(lost)
    # the paper's choice is the first candidate checked
    assert selection["tried"][0]["layer"] == selection["paper"]["layer"]
    assert selection["tried"][0]["checks"][0]["w"] == selection["paper"]["w"]
    # --select balance: the balance score's choice alone, as the paper makes it
    paper = invoke(*args, "--select", "balance", "--dry-run")
    assert paper.exit_code == 0, paper.output
    summary = json.loads(paper.stdout)
    assert "selection" not in summary
    assert (summary["layer"], summary["w"]) == (
        selection["paper"]["layer"],
        selection["paper"]["w"],
    )
    assert invoke(*args, "--select", "best").exit_code == 2
    result = invoke(*args, "--force")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["committed"] is True
    if lost:
        assert summary["check"] == check
    raw = ["vision.0", "vision.1", "projector", "language.0", "language.1"]
    # both hook points of every layer are candidates (#17 item 3)
    assert [r["layer"] for r in summary["layer_table"]] == [
        x for name in raw for x in (name, name + ".normed")
    ]
    assert summary["layer"] in {r["layer"] for r in summary["layer_table"]}
    assert {"q_vis", "q_lang", "q_bi"} <= set(summary["layer_table"][0])
    after = Codebook.open(codebook)
    assert after.version == before.version + 1
    assert after.config["layer"] == summary["layer"] and after.config["w"] == summary["w"]
    assert after.config["calibrated"] is True
    assert after.keys_table().num_rows == before.keys_table().num_rows
    assert plot.stat().st_size > 1000
    # the edited question still retrieves its own answer after re-embedding
    result = invoke(
        "ask",
        "--codebook",
        str(codebook),
        "--image",
        str(codebook.parent / "images" / "red_circle.png"),
        "--question",
        "what shape is in the image?",
        *model_args,
        "--json",
    )
    assert json.loads(result.stdout)["facts"][-1].endswith("is circle.")


def test_merge_keys_merges_duplicate_facts(tmp_path, images, model_args):
    cb = tmp_path / "cb"
    rows = [
        {
            "id": f"dup{i}",
            "image": str(images["red_circle"]),
            "question": "what shape is in the image?",
            "answer": "circle",
            "reasoning": "The shape has no corners.",
        }
        for i in range(3)
    ]
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        invoke("add-edit", "--from", str(path), "--codebook", str(cb), *model_args).exit_code == 0
    )
    dry = invoke("merge-keys", "--codebook", str(cb), "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["before"] == 6 and plan["after"] == 2 and plan["dry_run"]
    assert plan["values_collected"] == 0  # the same facts: nothing new to collect
    # merge on insert: one more duplicate's keys fold into existing keys; only the new
    # keys are candidates, so the (unmerged) older duplicates stay for merge-keys
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({**rows[0], "id": "dup9"}) + "\n")
    added = invoke(
        "add-edit", "--from", str(more), "--codebook", str(cb), *model_args, "--merge", "--json"
    )
    assert added.exit_code == 0, added.output
    merged = json.loads(added.stdout)["merged"]
    assert (merged["before"], merged["after"], merged["merged"]) == (8, 6, 2)
    done = json.loads(invoke("merge-keys", "--codebook", str(cb), "--json").stdout)
    assert done["before"] == 6 and done["after"] == 2
    # every edit is recorded on the surviving keys, so removing one keeps the facts
    assert sorted(done["groups"][0]["edit_ids"]) == ["dup0", "dup1", "dup2", "dup9"]
    from reasonedit_cli.store import Codebook

    assert Codebook.open(cb).keys_table().num_rows == 2
    result = invoke(
        "ask",
        "--codebook",
        str(cb),
        "--image",
        str(images["red_circle"]),
        "--question",
        "what shape is in the image?",
        *model_args,
        "--json",
    )
    assert (
        json.loads(result.stdout)["facts"][-1]
        == "The answer to 'what shape is in the image?' is circle."
    )


def test_merge_keys_with_different_values_keeps_every_answer(tmp_path, images, model_args):
    """Duplicated and near-duplicate edits with DIFFERENT answers: fewer keys, and each
    edit's answer is still retrieved; remove-edit drops just its value; restore undoes."""
    from PIL import Image

    from reasonedit_cli.store import Codebook

    near = tmp_path / "red_circle_copy.png"  # a near-duplicate image: one pixel differs
    img = Image.open(images["red_circle"]).convert("RGB")
    img.putpixel((0, 0), (250, 250, 250))
    img.save(near)
    q = "what shape is in the image?"
    rows = [
        {"id": "a", "image": str(images["red_circle"]), "answer": "circle",
         "reasoning": "The shape has no corners."},
        # the same image and question, another answer: its answer key duplicates a's
        {"id": "b", "image": str(images["red_circle"]), "answer": "round",
         "reasoning": "The outline is one smooth curve."},
        # a near-duplicate image: both keys land next to a's (the sentence is a's too)
        {"id": "c", "image": str(near), "answer": "a circle",
         "reasoning": "The shape has no corners."},
        {"id": "x", "image": str(images["blue_triangle"]), "question": "what color is it?",
         "answer": "blue", "reasoning": "The shape is the colour of the sky."},
    ]  # fmt: skip
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps({"question": q, **r}) + "\n" for r in rows))
    cb = tmp_path / "cb"
    added = invoke(
        "add-edit", "--from", str(path), "--codebook", str(cb), *model_args, "--patches", "none"
    )
    assert added.exit_code == 0, added.output
    assert Codebook.open(cb).n_keys == 8
    answers = {r["id"]: f"The answer to '{r.get('question', q)}' is {r['answer']}." for r in rows}

    dry = invoke("merge-keys", "--codebook", str(cb), "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert (plan["before"], plan["after"], plan["dry_run"]) == (8, 5, True)
    assert plan["values_collected"] == 2 and plan["multi_value_keys"] == 1
    groups = {tuple(g["edit_ids"]): g["values"] for g in plan["groups"]}
    assert groups[("a", "b", "c")] == [answers["a"], answers["b"], answers["c"]]
    assert groups[("a", "c")] == ["The shape has no corners."]
    assert Codebook.open(cb).n_keys == 8  # a dry run changes nothing
    human = invoke("merge-keys", "--codebook", str(cb), "--dry-run")
    assert "8 -> 5" in human.output and "2 value(s) collected" in human.output

    done = json.loads(invoke("merge-keys", "--codebook", str(cb), "--json").stdout)
    assert done["after"] == 5 and Codebook.open(cb).n_keys == 5

    def ask(image: str, question: str, *extra: str):
        res = invoke(
            "ask", "--codebook", str(cb), "--image", image, "--question", question,
            *model_args, *extra,
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        return res

    for r in rows:  # every edit's own answer is still retrieved by its question
        out = json.loads(ask(r["image"], r.get("question", q), "--json").stdout)
        assert answers[r["id"]] in out["facts"], (r["id"], out["facts"])
    out = json.loads(ask(str(images["red_circle"]), q, "--json").stdout)
    top = out["retrieved"][0]
    assert top["values"] == [answers["a"], answers["b"], answers["c"]]
    assert top["edit_ids"] == ["a", "b", "c"] and top["value"] == answers["a"]
    assert out["facts"][-1] == answers["a"]  # the nearest key's own fact stands last
    explained = ask(str(images["red_circle"]), q, "--explain").output
    assert "is round." in explained and "is a circle." in explained

    removed = json.loads(invoke("remove-edit", "a", "--codebook", str(cb), "--json").stdout)
    assert Codebook.open(cb).n_keys == 5  # a's keys hold b's and c's values too
    out = json.loads(ask(str(images["red_circle"]), q, "--json").stdout)
    assert answers["a"] not in out["facts"]
    assert answers["b"] in out["facts"] and answers["c"] in out["facts"]
    assert "a" not in out["retrieved"][0]["edit_ids"]

    restored = invoke("restore", str(removed["previous"]), "--codebook", str(cb), "--json")
    assert restored.exit_code == 0, restored.output
    out = json.loads(ask(str(images["red_circle"]), q, "--json").stdout)
    assert out["retrieved"][0]["values"] == [answers["a"], answers["b"], answers["c"]]


def test_evaluate_reports_every_metric(tmp_path, edits_jsonl, images, model_args):
    probes = tmp_path / "probes.jsonl"
    rows = [
        {
            "image": "images/red_circle.png",
            "question": "what is the shape?",
            "answer": "circle",
            "kind": "t_gen",
            "edit_id": "e1",
        },
        {
            "image": "images/yellow_circle.png",
            "question": "what shape is in the image?",
            "answer": "circle",
            "kind": "i_gen",
            "edit_id": "e1",
        },
        {
            "image": "images/yellow_circle.png",
            "question": "How many people sit on the bench?",
            "answer": "two",
            "kind": "loc",
        },
    ]
    probes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report_dir = tmp_path / "report"
    result = invoke(
        "evaluate",
        "--edits",
        str(edits_jsonl),
        "--probes",
        str(probes),
        *model_args,
        "--report",
        str(report_dir),
        "--methods",
        "unedited,reasonedit",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["methods"]) == {"unedited", "reasonedit"}
    assert report["counts"] == {"acc": 3, "t_gen": 1, "i_gen": 1, "loc": 1}
    assert report["retrieval"]["acc"] == 1.0
    md = (report_dir / "metrics.md").read_text()
    assert md.startswith("# reasonedit evaluation") and "\n| method |" in md


def test_doctor_reports_ok_and_damage(fake_codebook):
    codebook = fake_codebook
    ok = invoke("doctor", "--codebook", str(codebook), "--json")
    assert ok.exit_code == 0, ok.output and json.loads(ok.stdout)["ok"]
    seg = next((codebook / "segments").glob("keys-*.parquet"))
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    bad = invoke("doctor", "--codebook", str(codebook))
    assert bad.exit_code == 1
    assert "Traceback" not in bad.output


def test_remove_then_restore_round_trips(fake_codebook, images):
    codebook, model_args = fake_codebook, []
    from reasonedit_cli.store import Codebook

    before = Codebook.open(codebook)
    removed = invoke("remove-edit", "e1", "--codebook", str(codebook), "--json")
    assert removed.exit_code == 0, removed.output
    info = json.loads(removed.stdout)
    assert Codebook.open(codebook).edit_ids() == {"e2", "e3"}
    ask_args = [
        "ask",
        "--codebook",
        str(codebook),
        "--image",
        str(images["red_circle"]),
        "--question",
        "what shape is in the image?",
        *model_args,
        "--json",
    ]
    facts = json.loads(invoke(*ask_args).stdout)["facts"]
    assert "The answer to 'what shape is in the image?' is circle." not in facts
    restored = invoke("restore", str(info["previous"]), "--codebook", str(codebook), "--json")
    assert restored.exit_code == 0, restored.output
    after = Codebook.open(codebook)
    assert after.edit_ids() == before.edit_ids()
    assert (
        after.keys_table().column("key_id").to_pylist()
        == before.keys_table().column("key_id").to_pylist()
    )
    assert json.loads(invoke(*ask_args).stdout)["facts"][-1].endswith("is circle.")
    hist = json.loads(invoke("history", "--codebook", str(codebook), "--json").stdout)
    assert [h["version"] for h in hist][-3:] == [
        before.version,
        before.version + 1,
        before.version + 2,
    ]
    assert hist[-1]["current"] is True
    missing = invoke("remove-edit", "nope", "--codebook", str(codebook))
    assert missing.exit_code == 1 and "no such edit" in missing.output


def test_evaluate_sequential_tracks_every_n_edits(tmp_path, edits_jsonl, images, fake_models):
    model_args: list[str] = []
    probes = tmp_path / "probes.jsonl"
    probes.write_text(
        json.dumps(
            {
                "image": "images/red_circle.png",
                "question": "what is the shape?",
                "answer": "circle",
                "kind": "t_gen",
                "edit_id": "e1",
            }
        )
        + "\n"
        + json.dumps(
            {
                "image": "images/yellow_circle.png",
                "question": "How many people?",
                "answer": "two",
                "kind": "loc",
            }
        )
        + "\n"
    )
    result = invoke(
        "evaluate",
        "--edits",
        str(edits_jsonl),
        "--probes",
        str(probes),
        *model_args,
        "--methods",
        "reasonedit",
        "--no-sweep-p",
        "--sequential",
        "--eval-every",
        "2",
        "--report",
        str(tmp_path / "rep"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["sequential"]
    assert [r["edits"] for r in rows] == [2, 3]  # every 2 edits, and after the last one
    assert rows[-1]["keys"] >= 9 and rows[0]["keys"] < rows[-1]["keys"]
    assert "sequential editing" in (tmp_path / "rep" / "sweep.md").read_text()


def test_new_codebook_records_its_threshold_rule(fake_codebook):
    codebook = fake_codebook
    config = json.loads((codebook / "manifest.json").read_text())["config"]
    assert config["tau_rule"] == "images" and config["percentile"] == 25.0
    assert config["layer"] == "projector"  # the default key layer: the image as the LM sees it
