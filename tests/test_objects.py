"""The object index (reasonedit_cli/objects.py) through the CLI, on the bundled scenes VLM:
add-edit writes it as a nested codebook linked from the main manifest, ask (a new
command run, reading it back from disk) unions its retrieval, --no-objects turns it off,
a codebook whose reasoning names no region is unchanged, and a stale or damaged object
index is ignored by ask, reported by doctor and rebuilt by doctor --repair."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from typer.testing import CliRunner

from reasonedit_cli import scenes as S
from reasonedit_cli.cli import app
from reasonedit_cli.store import Codebook

runner = CliRunner()
SCENES = ("--model", "scenes")


def invoke(*args: str):
    return runner.invoke(app, list(args))


def _scene_edit(tmp, name: str, seed: int, fixed=("star", "red"), region_words=True) -> dict:
    """An edit on a generated scene holding `fixed`: its colour question, the chain."""
    sc = S.make_scene(random.Random(seed), fixed=(fixed,))
    S.render(sc).save(tmp / f"{name}.png")
    o = sc.by_shape(fixed[0])
    assert o is not None
    reasoning = S.color_chain(o)
    if not region_words:
        reasoning = [
            f"The {o.shape} is the colour of {S.COLOR_THING[o.color][0]}.",
            S.COLOR_THING[o.color][1],
        ]
    return {
        "id": name,
        "image": f"{name}.png",
        "question": f"what color is the {o.shape}?",
        "answer": o.color,
        "reasoning": reasoning,
    }


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scenes")
    edits = [_scene_edit(tmp, "a", 1), _scene_edit(tmp, "b", 2, fixed=("circle", "blue"))]
    (tmp / "edits.jsonl").write_text("".join(json.dumps(e) + "\n" for e in edits))
    other = _scene_edit(tmp, "other", 7)  # the same red star in another scene
    asks = [
        {"image": "a.png", "question": edits[0]["question"]},
        {"image": "other.png", "question": other["question"]},
    ]
    (tmp / "ask.jsonl").write_text("".join(json.dumps(a) + "\n" for a in asks))
    return tmp


def _add(cb, jsonl, *extra: str) -> dict:
    r = invoke(
        "add-edit",
        "--from",
        str(jsonl),
        "-c",
        str(cb),
        *SCENES,
        "--patches",
        "none",
        "--json",
        *extra,
    )
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _ask(cb, jsonl, *extra: str) -> list[dict]:
    r = invoke("ask", "--from", str(jsonl), "-c", str(cb), *SCENES, "--json", *extra)
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def built(scene_files, tmp_path_factory):
    cb = tmp_path_factory.mktemp("cb") / "cb"
    report = _add(cb, scene_files / "edits.jsonl")
    return cb, report


def test_add_edit_writes_the_object_index_and_ask_reads_it_back(built, scene_files):
    cb, report = built
    assert report["object_keys"] == 2 and report["objects_problem"] is None
    main = Codebook.open(cb)
    link = main.config["objects"]
    nested = Codebook.open(cb / "objects")
    assert link["version"] == nested.version and link["checksum"] == nested.manifest["checksum"]
    assert link["keys"] == 2 and link["edits"] == 2 and link["layer"] == main.config["layer"]
    assert nested.config["role"] == "objects" and nested.config["main_version"] == main.version
    assert nested.config["w"] == pytest.approx(link["w"]) and link["w"] > main.config["w"]
    kinds = nested.keys_table().column("kind").to_pylist()
    boxes = nested.keys_table().column("box").to_pylist()
    assert kinds == ["answer", "answer"] and all(b is not None for b in boxes)
    # the edit's own question on its own image: its object window is in the query set
    same, other = _ask(cb, scene_files / "ask.jsonl")
    obj = same["object_index"]
    assert obj["used"] and not obj["rejected"] and "a" in obj["edit_ids"]
    assert obj["nearest_distance"] == pytest.approx(0.0, abs=1e-3)
    assert "object_index" in other and other["object_index"]["used"]
    # --no-objects: the whole-image keys alone, no object fields
    plain = _ask(cb, scene_files / "ask.jsonl", "--no-objects")
    assert all("object_index" not in p for p in plain)
    assert plain[0]["facts"] == [f for f in same["facts"] if f not in obj["facts"]]


def test_add_edit_no_objects_writes_none(scene_files, tmp_path):
    cb = tmp_path / "cb"
    report = _add(cb, scene_files / "edits.jsonl", "--no-objects")
    assert report["object_keys"] == 0
    assert "objects" not in Codebook.open(cb).config and not (cb / "objects").exists()
    assert all("object_index" not in a for a in _ask(cb, scene_files / "ask.jsonl"))


def test_reasoning_naming_no_region_answers_byte_for_byte_as_before(tmp_path):
    """The sample edits (easy-vqa) name no region: no object index, ask's output
    identical to a codebook written with --no-objects (the behaviour before it)."""
    src = "sample_edits"
    outs = []
    for name, extra in (("on", ()), ("off", ("--no-objects",))):
        cb = tmp_path / name
        r = invoke(
            "add-edit",
            "--from",
            f"{src}/edits.jsonl",
            "-c",
            str(cb),
            "--patches",
            "none",
            "--json",
            *extra,
        )
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["object_keys"] == 0
        assert "objects" not in Codebook.open(cb).config and not (cb / "objects").exists()
        r = invoke("ask", "--from", f"{src}/probes.jsonl", "-c", str(cb), "--json")
        assert r.exit_code == 0, r.output
        outs.append(r.stdout)
    assert outs[0] == outs[1] and "object_index" not in outs[0]


def test_stale_object_index_is_ignored_then_restored(built, scene_files, tmp_path):
    """A writer that died between the object index's commit and the main one leaves the
    object index ahead of its link: ask keeps the linked version, doctor notes it, and
    the next writer restores it before changing it."""
    cb = tmp_path / "cb"
    shutil.copytree(built[0], cb)
    before = _ask(cb, scene_files / "ask.jsonl")
    nested = Codebook.open(cb / "objects")
    with nested.writer() as w:  # the object index's half of a remove-edit, no main commit
        w.remove_edits(["a"])
    assert (
        Codebook.open(cb / "objects").version == Codebook.open(cb).config["objects"]["version"] + 1
    )
    assert _ask(cb, scene_files / "ask.jsonl") == before
    r = invoke("doctor", "-c", str(cb), "--json")
    assert r.exit_code == 0, r.output
    assert any("interrupted write" in n for n in json.loads(r.stdout)["notes"])
    r = invoke("remove-edit", "b", "-c", str(cb), "--json")
    assert r.exit_code == 0, r.output
    nested = Codebook.open(cb / "objects")
    assert nested.edit_ids() == {"a"}  # restored to the link (a back), then b removed
    assert Codebook.open(cb).config["objects"]["version"] == nested.version
    # restore brings the earlier link back; ask reads that object index version again
    r = invoke("restore", str(Codebook.open(cb).version - 1), "-c", str(cb))
    assert r.exit_code == 0, r.output
    assert _ask(cb, scene_files / "ask.jsonl") == before


def test_damaged_object_index_is_skipped_reported_and_rebuilt(built, scene_files, tmp_path):
    cb = tmp_path / "cb"
    shutil.copytree(built[0], cb)
    before = _ask(cb, scene_files / "ask.jsonl")
    nested = Codebook.open(cb / "objects")
    seg = next(s for s in nested.manifest["segments"] if s["kind"] == "keys")
    f = cb / "objects" / seg["path"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    got = _ask(cb, scene_files / "ask.jsonl")
    assert all(not g["object_index"]["used"] and g["object_index"]["problem"] for g in got)
    assert got[1]["facts"] == _ask(cb, scene_files / "ask.jsonl", "--no-objects")[1]["facts"]
    r = invoke("doctor", "-c", str(cb), "--json")
    assert r.exit_code == 1 and any("object index" in p for p in json.loads(r.stdout)["problems"])
    r = invoke("doctor", "-c", str(cb), "--repair", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert any("object index: rebuilt 2 key(s)" in x for x in rep["repaired"])
    assert any((cb / "damaged").glob("objects.*"))  # moved aside, not deleted
    after = _ask(cb, scene_files / "ask.jsonl")
    assert [a["facts"] for a in after] == [b["facts"] for b in before]
    assert after[0]["object_index"]["used"]


def test_damage_to_any_object_index_file_never_breaks_ask(built, scene_files, tmp_path):
    """The damage fuzz's rule for the object index (tests/test_reliability.py has the
    main codebook's): a bit flip in any kind of its files leaves `ask` answering (exit 0,
    no traceback); `doctor` exits 0 or 1, and after `doctor --repair` it is clean."""
    from helpers_reliability import apply_damage, file_kind

    src = built[0]
    nested = src / "objects"
    picked: dict[str, str] = {}
    for p in sorted(nested.rglob("*")):
        if p.is_file():
            picked.setdefault(file_kind(p.relative_to(nested)), str(p.relative_to(src)))
    assert {"manifest", "versions", "segments", "images", "index-npy"} <= set(picked)
    for n, (kind, rel) in enumerate(sorted(picked.items())):
        cb = tmp_path / f"cb{n}"
        shutil.copytree(src, cb)
        size = (cb / rel).stat().st_size
        apply_damage(cb, {"file": rel, "op": "flip", "arg": [size // 2, n % 8]})
        r = invoke(
            "ask", "--from", str(scene_files / "ask.jsonl"), "-c", str(cb), *SCENES, "--json"
        )
        assert r.exit_code == 0 and "Traceback" not in r.output, (kind, r.output)
        doc = invoke("doctor", "-c", str(cb))
        assert doc.exit_code in (0, 1) and "Traceback" not in doc.output, (kind, doc.output)
        if doc.exit_code == 1:
            rep = invoke("doctor", "-c", str(cb), "--repair")
            assert rep.exit_code == 0, (kind, rep.output)
            assert invoke("doctor", "-c", str(cb)).exit_code == 0, kind
