"""Reliability of input handling and of the codebook (issue 8), fast part.

- a catalogue of bad inputs through the CLI: one-line error, exit 1 or 2, no traceback,
  the codebook byte-for-byte unchanged;
- `--skip-invalid` with a mix of valid and invalid records;
- the writer lock: a second writer fails clearly, a reader still works;
- a damage fuzz subset (the full one is in test_reliability_slow.py) and crafted manifests;
- a security scan of the package source.

The slow harnesses (crash safety, full fuzz, concurrency) are in test_reliability_slow.py.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from helpers_reliability import (
    build_synthetic_codebook,
    damage_cases,
    run_fuzz,
    summarize,
    tree_hashes,
)
from typer.testing import CliRunner

from reasonedit_cli.cli import app

runner = CliRunner()
PKG = Path(__file__).resolve().parents[1] / "reasonedit_cli"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_llava):
    """A codebook built through the CLI (2 edits) and a folder of good and bad inputs."""
    from conftest import shape_image

    d = tmp_path_factory.mktemp("reliability")
    img = d / "images"
    img.mkdir()
    shape_image(img / "ok.png", "circle", "red")
    shape_image(img / "tri.png", "triangle", "blue")
    good = d / "good.jsonl"
    rows = [
        {
            "id": "g1",
            "image": "images/ok.png",
            "question": "what shape is in the image?",
            "answer": "circle",
            "reasoning": "The shape has no corners. A shape with no corners is a circle.",
        },
        {
            "id": "g2",
            "image": "images/tri.png",
            "question": "what color is the shape?",
            "answer": "blue",
            "reasoning": "The shape is blue.",
        },
    ]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cb = d / "cb"
    model = ["--model", str(tiny_llava), "--device", "cpu"]
    res = runner.invoke(
        app, ["add-edit", "--from", str(good), "-c", str(cb), *model, "--patches", "none"]
    )
    assert res.exit_code == 0, res.output
    _bad_files(d)
    return {"dir": d, "cb": cb, "model": model, "good": good}


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (a decompression bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def _png_iend() -> bytes:
    return struct.pack(">I", 0) + b"IDAT" + struct.pack(">I", zlib.crc32(b"IDAT"))


def _bad_files(d: Path) -> None:
    img = d / "images"
    ok = (img / "ok.png").read_bytes()
    (img / "truncated.png").write_bytes(ok[: len(ok) // 2])
    (img / "not_image.png").write_text("this is not an image\n")
    (img / "empty.png").write_bytes(b"")
    from PIL import Image

    # 289 M pixels > MAX_IMAGE_PIXELS (250 M), a few kB on disk
    Image.new("1", (17000, 17000)).save(img / "bomb.png")
    (img / "bomb_header.png").write_bytes(_png_header(100_000, 100_000) + _png_iend())
    (img / "a_dir.png").mkdir()
    os.mkfifo(img / "fifo.png")
    (img / "noperm.png").write_bytes(ok)
    os.chmod(img / "noperm.png", 0)
    (d / "not_codebook").mkdir()
    (d / "not_codebook" / "notes.txt").write_text("hello")
    (d / "cb_file").write_text("I am a file")
    os.mkfifo(d / "fifo.jsonl")


def _rec(**over):
    r = {
        "image": "images/ok.png",
        "question": "what shape is in the image?",
        "answer": "circle",
        "reasoning": "The shape is round.",
    }
    for k, v in over.items():
        if v is _DROP:
            r.pop(k, None)
        else:
            r[k] = v
    return json.dumps(r)


_DROP = object()
LONG = "word " * 1000  # > MAX_TEXT_CHARS (2000)

# name -> (jsonl lines or None, kind of call, expected text in the error, expected line no)
# kinds: "edit" = add-edit --from FILE, "ask" = ask --from FILE, "probes" = evaluate --probes
JSONL_CASES = {
    "malformed-json": (["{not json"], "edit", "invalid JSON", 1),
    "malformed-json-line-3": ([_rec(id="a1"), "", '{"image": "x",'], "edit", "invalid JSON", 3),
    "top-level-array": (["[1, 2]"], "edit", "expected a JSON object", 1),
    "missing-question": ([_rec(question=_DROP)], "edit", "missing field question", 1),
    "missing-all": (["{}"], "edit", "missing fields", 1),
    "unknown-field": ([_rec(colour="red")], "edit", "unknown field", 1),
    "number-question": ([_rec(question=42)], "edit", "must be a string", 1),
    "dict-reasoning": ([_rec(reasoning={"a": 1})], "edit", "reasoning", 1),
    "list-reasoning-with-number": ([_rec(reasoning=["ok.", 3])], "edit", "must be a string", 1),
    "empty-reasoning": ([_rec(reasoning="")], "edit", "is empty", 1),
    "empty-reasoning-list": ([_rec(reasoning=[])], "edit", "is empty", 1),
    "whitespace-answer": ([_rec(answer="  \t ")], "edit", "'answer' is empty", 1),
    "bool-box": ([_rec(boxes=[True])], "edit", "box must be", 1),
    "boxes-not-list": ([_rec(boxes=True)], "edit", "'boxes' must be a list", 1),
    "box-outside-image": ([_rec(boxes=[[0, 0, 500, 500]])], "edit", "outside", 1),
    "box-empty": ([_rec(boxes=[[10, 10, 10, 20]])], "edit", "is empty", 1),
    "box-3-numbers": ([_rec(boxes=[[1, 2, 3]])], "edit", "box must be", 1),
    "box-count-mismatch": ([_rec(boxes=[None, None])], "edit", "2 entries for 1", 1),
    "box-nan": (
        [
            '{"image": "images/ok.png", "question": "q?", "answer": "a", '
            '"reasoning": "R.", "boxes": [[NaN, 0, 4, 4]]}'
        ],
        "edit",
        "box must be",
        1,
    ),
    "box-infinity": (
        [
            '{"image": "images/ok.png", "question": "q?", "answer": "a", '
            '"reasoning": "R.", "boxes": [[0, 0, 1e400, 4]]}'
        ],
        "edit",
        "box must",
        1,
    ),
    "missing-image": ([_rec(image="images/nope.png")], "edit", "does not exist", 1),
    "not-an-image": ([_rec(image="images/not_image.png")], "edit", "not a readable image", 1),
    "empty-image": ([_rec(image="images/empty.png")], "edit", "not a readable image", 1),
    "truncated-png": ([_rec(image="images/truncated.png")], "edit", "not a readable image", 1),
    "decompression-bomb": ([_rec(image="images/bomb.png")], "edit", "too many pixels", 1),
    "bomb-header-only": ([_rec(image="images/bomb_header.png")], "edit", "too many pixels", 1),
    "directory-image": ([_rec(image="images/a_dir.png")], "edit", "not a regular file", 1),
    "fifo-image": ([_rec(image="images/fifo.png")], "edit", "not a regular file", 1),
    "unreadable-image": ([_rec(image="images/noperm.png")], "edit", "cannot read", 1),
    "huge-text": ([_rec(question=LONG)], "edit", "too long", 1),
    "huge-line": (['{"a": "' + "x" * 1_000_001 + '"}'], "edit", "line is too long", 1),
    "nul-character": ([_rec(answer="cir\u0000cle")], "edit", "U+0000", 1),
    "lone-surrogate": (
        ['{"image": "images/ok.png", "question": "q\\ud800?", "answer": "a", "reasoning": "R."}'],
        "edit",
        "U+D800",
        1,
    ),
    "bad-id": ([_rec(id="a b/c")], "edit", "may only use", 1),
    "source-not-string": ([_rec(source={"a": 1})], "edit", "'source' must be a string", 1),
    "deep-nesting": (["[" * 100_000 + "]" * 100_000], "edit", "invalid JSON", 1),
    "huge-integer": (['{"id": 1' + "0" * 5000 + "}"], "edit", "invalid JSON", 1),
    "only-blank-lines": (["", "   "], "edit", "no edits found", None),
    "empty-file": ([], "edit", "no edits found", None),
    "ask-missing-image": (
        ['{"image": "images/nope.png", "question": "q?"}'],
        "ask",
        "does not exist",
        1,
    ),
    "ask-malformed": (
        ['{"image": "images/ok.png", "question": "q?"}', "{oops"],
        "ask",
        "invalid JSON",
        2,
    ),
    "ask-number-question": (
        ['{"image": "images/ok.png", "question": 7}'],
        "ask",
        "must be a string",
        1,
    ),
    "ask-empty-file": ([], "ask", "no questions found", None),
    "probe-bad-kind": (
        ['{"image": "images/ok.png", "question": "q?", "answer": "a", "kind": "nope"}'],
        "probes",
        "'kind' must be one of",
        1,
    ),
    "probe-no-answer": (
        ['{"image": "images/ok.png", "question": "q?", "kind": "loc"}'],
        "probes",
        "non-empty string 'answer'",
        1,
    ),
    "probe-no-edit-id": (
        ['{"image": "images/ok.png", "question": "q?", "answer": "a", "kind": "t_gen"}'],
        "probes",
        "needs the 'edit_id'",
        1,
    ),
}


def _error_lines(stderr: str) -> list[str]:
    """stderr without blank lines and transformers' weight-loading progress bars."""
    return [x for x in stderr.splitlines() if x.strip() and "Loading weights" not in x]


def _check_failure(res, cb: Path, before: dict, must: str | None, codes=(1, 2)):
    err = res.stderr
    assert res.exit_code in codes, (res.exit_code, res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output + err
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    if must:
        assert must in lines[0], lines[0]
    assert tree_hashes(cb) == before, "the codebook changed"
    return lines[0]


@pytest.mark.parametrize("name", sorted(JSONL_CASES))
def test_bad_jsonl_input(base, name):
    lines, kind, must, lineno = JSONL_CASES[name]
    if name == "unreadable-image" and IS_ROOT:
        pytest.skip("running as root: chmod 000 does not block reads")
    d, cb = base["dir"], base["cb"]
    f = d / f"case-{name}.jsonl"
    f.write_text("".join(line + "\n" for line in lines), encoding="utf-8", errors="surrogatepass")
    before = tree_hashes(cb)
    if kind == "edit":
        args = ["add-edit", "--from", str(f), "-c", str(cb), *base["model"]]
    elif kind == "ask":
        args = ["ask", "--from", str(f), "-c", str(cb), *base["model"]]
    else:
        args = ["evaluate", "--edits", str(base["good"]), "--probes", str(f), "-c", str(cb)]
        args += base["model"]
    line = _check_failure(runner.invoke(app, args), cb, before, must)
    if lineno is not None:
        assert f"{f}:{lineno}:" in line, line
    else:
        assert str(f) in line, line


def _flag_cases(d: Path) -> dict[str, tuple[list[str], str]]:
    ok = str(d / "images" / "ok.png")
    edit = ["add-edit", "--image", ok, "--question", "what shape?", "--answer", "circle"]
    return {
        "flags-missing-reason": (edit, "missing --reason"),
        "flags-box-malformed": (edit + ["-r", "Round.", "--box", "1,2,x,4"], "--box"),
        "flags-box-wrong-count": (edit + ["-r", "Round.", "--box", "1,2,3"], "box must be"),
        "flags-box-nan": (edit + ["-r", "Round.", "--box", "nan,0,4,4"], "box must be"),
        "flags-box-too-many": (
            edit + ["-r", "Round.", "--box", "none", "--box", "none"],
            "2 entries for 1",
        ),
        "flags-from-and-image": (
            ["add-edit", "--from", "x.jsonl", "--image", ok],
            "cannot be combined",
        ),
        "flags-from-missing-file": (
            ["add-edit", "--from", str(d / "nope.jsonl")],
            "does not exist",
        ),
        "flags-from-directory": (["add-edit", "--from", str(d / "images")], "not a regular file"),
        "flags-from-fifo": (["add-edit", "--from", str(d / "fifo.jsonl")], "not a regular file"),
        "flags-from-utf16": (["add-edit", "--from", str(d / "utf16.jsonl")], "not UTF-8"),
        "flags-from-binary": (["add-edit", "--from", str(d / "binary.jsonl")], "not UTF-8"),
        "flags-bad-format": (
            ["add-edit", "--from", str(d / "good.jsonl"), "--format", "xml"],
            "unknown --format",
        ),
        "flags-bad-patches": (edit + ["-r", "R.", "--patches", "some"], "--patches"),
        "ask-image-missing": (
            ["ask", "--image", str(d / "nope.png"), "-q", "q?"],
            "does not exist",
        ),
        "ask-image-dir": (["ask", "--image", str(d / "images"), "-q", "q?"], "not a regular"),
        "ask-image-fifo": (
            ["ask", "--image", str(d / "images" / "fifo.png"), "-q", "q?"],
            "not a regular file",
        ),
        "ask-image-bomb": (
            ["ask", "--image", str(d / "images" / "bomb.png"), "-q", "q?"],
            "too many pixels",
        ),
        "ask-question-nul": (["ask", "--image", ok, "-q", "wh\x01at?"], "U+0001"),
        "ask-question-huge": (["ask", "--image", ok, "-q", LONG], "too long"),
        "ask-no-question": (["ask", "--image", ok], "give --image and --question"),
    }


FLAG_NAMES = sorted(_flag_cases(Path("/x")))


@pytest.mark.parametrize("name", FLAG_NAMES)
def test_bad_flags(base, name):
    d, cb = base["dir"], base["cb"]
    (d / "utf16.jsonl").write_bytes(_rec().encode("utf-16"))
    (d / "binary.jsonl").write_bytes(bytes(range(128, 256)) * 4)
    args, must = _flag_cases(d)[name]
    before = tree_hashes(cb)
    _check_failure(runner.invoke(app, [*args, "-c", str(cb), *base["model"]]), cb, before, must)


def test_bad_codebooks(base, tmp_path):
    """Another format_version, a foreign directory, a file: clear errors, nothing touched."""
    d, cb = base["dir"], base["cb"]
    future = tmp_path / "future"
    shutil.copytree(cb, future)
    from reasonedit_cli.store import FORMAT_VERSION
    from reasonedit_cli.store.manifest import manifest_bytes

    m = json.loads((future / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1  # written by a newer reasonedit
    (future / "manifest.json").write_bytes(manifest_bytes(m))
    ok = str(d / "images" / "ok.png")
    targets = {
        future: f"format_version {FORMAT_VERSION + 1}",
        d / "not_codebook": "not a reasonedit codebook",
        d / "cb_file": "not a directory",
    }
    for target, must in targets.items():
        before = tree_hashes(target) if target.is_dir() else target.read_bytes()
        for cmd in (
            ["add-edit", "--from", str(base["good"])],
            ["ask", "--image", ok, "-q", "what shape?"],
            ["doctor"],
        ):
            res = runner.invoke(
                app, [*cmd, "-c", str(target), *(base["model"] * (cmd[0] != "doctor"))]
            )
            err = _error_lines(res.stderr)
            assert res.exit_code == 1, (target, cmd, res.output)
            assert len(err) == 1 and must in err[0], err
            assert "Traceback" not in res.output
        after = tree_hashes(target) if target.is_dir() else target.read_bytes()
        assert after == before


def test_unicode_policy(base, tmp_path):
    """RTL override and zero-width joiner are allowed (legitimate in bidi/complex scripts);
    control characters, lone surrogates and unassigned code points are refused."""
    from reasonedit_cli.edits import InputError, clean_text

    assert clean_text("abc \u202edef", "q", "w") == "abc \u202edef"
    assert clean_text("\u0915\u094d\u200d\u0937", "q", "w")
    for bad in ("a\x00b", "a\x1bb", "a\ud800b", "a\U000e0000b", "a\ue000b"):
        with pytest.raises(InputError):
            clean_text(bad, "q", "w")


def test_skip_invalid_adds_valid_and_reports_invalid(base, tmp_path):
    cb = tmp_path / "cb"
    shutil.copytree(base["cb"], cb)
    f = base["dir"] / "mixed.jsonl"
    f.write_text(
        "\n".join(
            [
                _rec(id="v1"),
                "{broken",
                _rec(id="v2", answer="round", image="images/tri.png"),
                _rec(id="x3", image="images/nope.png"),
            ]
        )
        + "\n"
    )
    res = runner.invoke(
        app,
        ["add-edit", "--from", str(f), "--skip-invalid", "-c", str(cb), *base["model"]]
        + ["--patches", "none", "--json"],
    )
    assert res.exit_code == 1, res.output
    report = json.loads(res.stdout)
    assert report["added"] == ["v1", "v2"]
    assert len(report["invalid"]) == 2
    assert f"{f}:2:" in report["invalid"][0] and f"{f}:4:" in report["invalid"][1]
    from reasonedit_cli.store import Codebook

    assert Codebook.open(cb).edit_ids() == {"g1", "g2", "v1", "v2"}


# ---------------------------------------------------------------------- lock


def test_second_writer_fails_clearly_and_reader_works(base, tmp_path):
    import socket

    from reasonedit_cli.store.lock import WriterLock

    cb = tmp_path / "cb"
    shutil.copytree(base["cb"], cb)
    ok = str(base["dir"] / "images" / "ok.png")
    with WriterLock(cb, 1.0):
        before = tree_hashes(cb)
        res = runner.invoke(
            app,
            ["add-edit", "--image", ok, "-q", "what is it?", "-a", "a circle", "-r", "Round."]
            + ["-c", str(cb), "--lock-timeout", "0.5", "--patches", "none", *base["model"]],
        )
        assert res.exit_code == 1
        err = _error_lines(res.stderr)
        assert len(err) == 1, err
        assert f"pid {os.getpid()}" in err[0] and socket.gethostname() in err[0], err[0]
        assert "--lock-timeout" in err[0]
        assert tree_hashes(cb) == before
        ask = runner.invoke(
            app,
            ["ask", "--image", ok, "-q", "what shape is in the image?", "-c", str(cb)]
            + [*base["model"], "--json"],
        )
        assert ask.exit_code == 0, ask.output
        assert json.loads(ask.stdout)["retrieved"][0]["edit_id"] == "g1"
    assert not (cb / "LOCK").exists()


# ---------------------------------------------------------------- damage fuzz


def test_damage_fuzz_subset(base, tmp_path, monkeypatch):
    """Truncations and bit flips of every kind of file: a clear error, a report by
    doctor or a recovery (derived files) -- never a traceback or a signal. The synthetic
    codebook has the wide-key engine's files too (issue 22: threshold lowered to 100)."""
    # the store's own index (a full-width hnsw graph, its parts and patches) is what a
    # codebook below the engine's threshold has; above it the engine's lists are the
    # store's and there is no such graph: one synthetic codebook of each
    monkeypatch.setenv("REASONEDIT_ENGINE_MIN_KEYS", str(10**9))
    store = build_synthetic_codebook(
        tmp_path / "store", n_edits=40, keys_per_edit=4, hnsw_min_keys=100, keep_deltas=True
    )
    monkeypatch.setenv("REASONEDIT_ENGINE_MIN_KEYS", "100")  # the workers inherit it
    syn = build_synthetic_codebook(
        tmp_path / "syn", n_edits=40, keys_per_edit=4, hnsw_min_keys=100, keep_deltas=True
    )
    cases = []
    for src, n, hmk in ((syn, 36, 100), (store, 30, 100), (base["cb"], 30, None)):
        for c in damage_cases(src, n, seed=8):
            c.update(id=len(cases), src=str(src), work=str(tmp_path / "work"), hnsw_min_keys=hmk)
            # doctor --repair on source damage (issue 23)
            c["repair_sources"] = src in (syn, store)
            c["insert"] = src == syn  # an insert after derived damage (issue 22)
            cases.append(c)
    results = run_fuzz(cases)
    summary = summarize(results)
    assert summary["cases"] >= 90
    inserted = [r for r in results if r["case"].get("insert") and r["kind"] == "engine"]
    assert len(inserted) >= 10, len(inserted)
    assert not summary["failures"], json.dumps(summary["failures"][:3], indent=1)[:3000]
    kinds = summary["by_kind"]
    assert {"manifest", "versions", "segments", "images", "index-npy", "hnsw", "engine"} <= set(
        kinds
    )
    fixed = "repaired by doctor --repair"
    assert set(kinds["manifest"]) <= {"clear error", "harmless", fixed}
    assert set(kinds["segments"]) <= {"clear error", fixed}
    # the synthetic codebook's manifest comes back from versions/; its segments do not
    # (its key values are not add-edit's, and its "model" cannot re-embed): clear errors
    assert fixed in kinds["manifest"], kinds
    assert set(kinds["hnsw"]) <= {"recovered", "harmless"}
    assert set(kinds["engine"]) <= {"recovered", "harmless"}, kinds["engine"]


BAD_VALUES = ["x", -1, None, {}]  # the slow suite adds 10**30, [], 1.5, True


def _paths(obj, pre=()):
    yield pre
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, pre + (k,))
    elif isinstance(obj, list) and obj:
        yield from _paths(obj[0], pre + (0,))


def test_crafted_manifests_fail_cleanly(tmp_path):
    crafted_manifest_cases(tmp_path, BAD_VALUES, 150)


def crafted_manifest_cases(tmp_path, bad_values, min_cases) -> int:
    """A manifest with a valid checksum but wrong types anywhere (someone else's codebook):
    CodebookError or a working reader, never another exception."""
    import numpy as np

    from reasonedit_cli.errors import CodebookError
    from reasonedit_cli.store import Codebook
    from reasonedit_cli.store.manifest import manifest_bytes

    src = build_synthetic_codebook(
        tmp_path / "src", n_edits=12, keys_per_edit=3, batches=3, keep_deltas=True
    )
    m0 = json.loads((src / "manifest.json").read_text())
    work = tmp_path / "work"
    n = 0
    for path in list(_paths(m0)):
        if not path or path[0] == "checksum":
            continue
        for bad in bad_values:
            m = copy.deepcopy(m0)
            o = m
            for k in path[:-1]:
                o = o[k]
            o[path[-1]] = bad
            try:
                data = manifest_bytes(m)
            except ValueError:
                continue
            if work.exists():
                shutil.rmtree(work)
            shutil.copytree(src, work)
            (work / "manifest.json").write_bytes(data)
            n += 1
            try:
                cb = Codebook.open(work)
                cb.search(np.zeros((1, cb.dim or 16), "float32"))
                cb.tau, cb.edits()
            except CodebookError:
                pass
            res = runner.invoke(app, ["doctor", "-c", str(work)])
            assert res.exception is None or isinstance(res.exception, SystemExit), (
                path,
                bad,
                res.exception,
            )
            assert res.exit_code in (0, 1)
    assert n >= min_cases
    return n


# ------------------------------------------------------------------ security


def _source_files():
    return sorted(PKG.rglob("*.py"))


def test_no_unsafe_deserialisation_or_eval_in_the_package():
    patterns = {
        "pickle": re.compile(r"\bimport\s+pickle\b|\bpickle\.|\bcloudpickle\b|\bjoblib\b"),
        "torch.load": re.compile(r"\btorch\.load\s*\("),
        "eval(": re.compile(r"(?<![\w.])eval\s*\("),
        "exec(": re.compile(r"(?<![\w.])exec\s*\("),
        "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
        "yaml.load": re.compile(r"\byaml\.load\s*\((?![^)]*SafeLoader)"),
    }
    hits = []
    for f in _source_files():
        for no, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for name, pat in patterns.items():
                if pat.search(code):
                    hits.append(f"{f.name}:{no}: {name}: {line.strip()}")
    assert not hits, hits


def test_every_np_load_refuses_pickles():
    calls = []
    for f in _source_files():
        text = f.read_text()
        for m in re.finditer(r"\bnp\.load\s*\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((f.name, text[m.start() : i]))
    assert calls, "expected np.load in the store (reasonedit_cli/store/index)"
    assert all("allow_pickle=False" in c for _, c in calls), calls


def test_models_load_as_safetensors_and_no_remote_code_by_default():
    from reasonedit_cli import cli, cli_support, editor, vlm

    for name in ("add_edit", "ask", "calibrate", "evaluate"):
        sig = inspect.signature(getattr(cli, name))
        assert sig.parameters["trust_remote_code"].default is False, name
    # the CLI's one Editor builder takes the flag from the parsed options only
    assert cli_support.ModelOptions().trust_remote_code is False
    assert "trust_remote_code" not in inspect.signature(cli_support.ModelOptions.editor).parameters
    assert inspect.signature(editor.Editor).parameters["trust_remote_code"].default is False
    assert inspect.signature(vlm.VLM).parameters["trust_remote_code"].default is False
    for f in ("vlm.py", "text.py"):
        text = (PKG / f).read_text()
        loads = re.findall(r"(\w+)\.from_pretrained\(([^)]*)\)", text, flags=re.S)
        # every load that is not a config, processor or tokenizer loads weights
        light = ("Config", "Processor", "Tokenizer")
        weights = [args for cls, args in loads if not cls.endswith(light)]
        assert weights and all("use_safetensors=True" in a for a in weights), (f, loads)
