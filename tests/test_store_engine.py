"""The wide-key engine in the store (issue 22, phase 2): a codebook from
`engine_min_keys` keys on lists the engine's mapped files, and a reader searches and
retrieves through them without decoding a segment, with the numbers of the exact path.

Real Parquet, real engine files, real hnswlib; the CLI test runs `ask` on the tiny
real-architecture LLaVA (conftest.tiny_llava).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from test_codebook import DIM, flip_byte, make_edits

from reasonedit_cli import retrieval as R
from reasonedit_cli.store import Codebook
from reasonedit_cli.store import engine as E
from reasonedit_cli.store import reader as RD
from reasonedit_cli.store.manifest import derived_paths

QUERIES = np.random.default_rng(9).normal(size=(40, DIM)).astype(np.float32)
BATCHES = [40, 5, 7, 3, 10]  # 120 keys, then 4 appends


def grow(path, engine_min_keys: int, batches=BATCHES) -> Codebook:
    cb = Codebook.open(path, create=True, hnsw_min_keys=10**6, engine_min_keys=engine_min_keys)
    start = 0
    for count in batches:
        with cb.writer() as w:
            w.add(*make_edits(start, count))
        start += count
    return cb


@pytest.fixture
def no_decoding(monkeypatch):
    """Any Parquet segment read fails the test: the ask path must not decode."""

    def refuse(*a, **k):
        raise AssertionError("a segment was decoded on the ask path")

    monkeypatch.setattr(RD, "read_segment", refuse)


def test_engine_files_search_and_retrieve_like_the_old_path(tmp_path, monkeypatch):
    """Appends extend the engine (a flat part, a facts delta), a removal rebuilds it; a
    fresh reader answers with the old path's exact numbers and decodes nothing."""
    eng_cb = grow(tmp_path / "engine", 50)
    old_cb = grow(tmp_path / "old", 10**9)  # the same content, no engine files
    for cb in (eng_cb, old_cb):
        with cb.writer() as w:
            w.add(*make_edits(200, 4))  # one more append
    sec = eng_cb.manifest["derived"]["engine"]
    assert "engine" not in old_cb.manifest["derived"]
    assert [p["kind"] for p in sec["index"]["parts"]][-1] == "flat" and len(sec["facts"]) >= 2
    assert E.engine_section(eng_cb.manifest) is sec
    assert derived_paths(eng_cb.manifest) >= {f["path"] for f in sec["facts"]}
    for p in derived_paths(eng_cb.manifest):
        assert (tmp_path / "engine" / p).is_file(), p

    def answers(path):
        cb = Codebook.open(path, hnsw_min_keys=10**6)
        return cb.search(QUERIES, 5), [R.retrieve(cb, q, k=5) for q in QUERIES], cb

    old_hits, old_ret, _ = answers(tmp_path / "old")
    exact = Codebook.open(tmp_path / "engine").search(QUERIES, 5, method="exact")
    with monkeypatch.context() as m:
        m.setattr(RD, "read_segment", lambda *a, **k: pytest.fail("segment decoded"))
        hits, ret, cb = answers(tmp_path / "engine")
        assert cb.engine() is not None and cb.n_keys == 207
    assert hits == exact == old_hits  # identical numbers, not just the same rows
    real = RD.read_segment
    with monkeypatch.context() as m:  # tau for another percentile: no keys segment either
        m.setattr(RD, "read_segment", lambda r, e, d: real(r, e, d) if e["kind"] == "edits"
                  else pytest.fail("keys decoded"))  # fmt: skip
        taus = Codebook.open(tmp_path / "engine").tau_for(40.0)
    assert taus == Codebook.open(tmp_path / "old", hnsw_min_keys=10**6).tau_for(40.0)
    assert ret == old_ret and sum(not r.rejected for r in ret) >= 5
    # a removal renumbers rows: the engine is rebuilt, still the same answers
    for cb in (eng_cb, old_cb):
        with cb.writer() as w:
            w.remove_edits(["e3", "e41"])
    assert eng_cb.manifest["derived"]["engine"]["index"]["parts"][0]["start"] == 0
    assert answers(tmp_path / "engine")[:2] == answers(tmp_path / "old")[:2]


def test_old_codebooks_open_as_before_and_get_the_files_on_write(tmp_path):
    """No engine section (written before it): search and facts take the decoded path;
    the next write adds the engine files."""
    cb = grow(tmp_path / "cb", 10**9)
    before = cb.search(QUERIES, 5)
    assert Codebook.open(tmp_path / "cb").engine() is None
    cb2 = Codebook.open(tmp_path / "cb", hnsw_min_keys=10**6, engine_min_keys=50)
    with cb2.writer() as w:
        w.compact()
    assert "engine" in cb2.manifest["derived"]
    assert same_hits(Codebook.open(tmp_path / "cb").search(QUERIES, 5), before)


def same_hits(got, want) -> bool:
    """The same rows in the same order with the same distances, to float64 rounding:
    compaction recomputes the neighbour lists (sigma) in other GEMM blocks, which on
    some CPUs changes the last bit (seen: 0.9002240595191506 against ...505)."""
    rows = [[h[0] for h in x] for x in got] == [[h[0] for h in y] for y in want]
    nums = np.array([h[1:] for x in got for h in x]), np.array([h[1:] for y in want for h in y])
    return rows and nums[0].shape == nums[1].shape and np.allclose(*nums, rtol=1e-12, atol=0)


def test_damaged_engine_file_falls_back_and_doctor_repairs(tmp_path, monkeypatch):
    """A damaged mapped file is never used: the reader answers from the decoded path,
    doctor reports it, --repair rebuilds it; a file whose mtime alone changed is
    rehashed by doctor and re-stamped."""
    monkeypatch.setenv("REASONEDIT_ENGINE_MIN_KEYS", "50")
    cb = grow(tmp_path / "cb", 50, batches=[30, 5])
    good = cb.search(QUERIES, 5, method="exact")
    sec = cb.manifest["derived"]["engine"]
    vec = tmp_path / "cb" / sec["index"]["vectors"][0]["path"]
    # touched only: doctor rehashes it, finds it intact and gives it its mtime back
    os.utime(vec, ns=(0, 12345))
    assert cb.check(images=False).ok
    assert os.stat(vec).st_mtime_ns == sec["index"]["vectors"][0]["mtime_ns"]
    flip_byte(vec, os.path.getsize(vec) - 3)
    fresh = Codebook.open(tmp_path / "cb")
    assert fresh.engine() is None and fresh.search(QUERIES, 5) == good
    rep = cb.check(images=False)
    assert not rep.ok and any("checksum" in p for p in rep.problems), rep.problems
    # an insert on top of a damaged engine rebuilds it instead of failing
    shutil.copytree(tmp_path / "cb", tmp_path / "cb2")
    cb2 = Codebook.open(tmp_path / "cb2", hnsw_min_keys=10**6, engine_min_keys=50)
    with cb2.writer() as w:
        w.add(*make_edits(500, 2))
    assert len(cb2.manifest["derived"]["engine"]["facts"]) == 1 and cb2.check(images=False).ok
    rep = cb.check(repair=True, images=False)
    assert rep.ok and Codebook.open(tmp_path / "cb").engine() is not None
    assert cb.check(images=False).ok and Codebook.open(tmp_path / "cb").search(QUERIES, 5) == good


def test_ask_from_the_cli_decodes_no_segment(tmp_path, tiny_llava, monkeypatch):
    """`ask` on a codebook with engine files (the threshold lowered to its few keys)
    returns what it returns on the same codebook without them, without decoding."""
    from conftest import shape_image
    from typer.testing import CliRunner

    from reasonedit_cli.cli import app

    runner = CliRunner()
    img = tmp_path / "ok.png"
    shape_image(img, "circle", "red")
    model = ["--model", str(tiny_llava), "--device", "cpu"]
    add = ["add-edit", "--image", str(img), "-q", "what shape is in the image?", "-a", "circle"]
    add += ["-r", "The shape has no corners. A shape with no corners is a circle."]
    monkeypatch.setenv("REASONEDIT_ENGINE_MIN_KEYS", "1")
    res = runner.invoke(app, [*add, "-c", str(tmp_path / "cb"), *model, "--patches", "none"])
    assert res.exit_code == 0, res.output
    assert "engine" in json.loads((tmp_path / "cb" / "manifest.json").read_text())["derived"]
    shutil.copytree(tmp_path / "cb", tmp_path / "plain")
    m = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    m["derived"].pop("engine")  # the same codebook as written before the engine
    from reasonedit_cli.store.manifest import manifest_bytes

    (tmp_path / "plain" / "manifest.json").write_bytes(manifest_bytes(m))
    ask = ["ask", "--image", str(img), "-q", "what shape is in the image?", *model, "--json"]
    plain = runner.invoke(app, [*ask, "-c", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    monkeypatch.setattr(RD, "read_segment", lambda *a, **k: pytest.fail("segment decoded"))
    mapped = runner.invoke(app, [*ask, "-c", str(tmp_path / "cb")])
    assert mapped.exit_code == 0, mapped.output
    a, b = json.loads(mapped.stdout), json.loads(plain.stdout)
    assert a == b and a["retrieved"], (a, b)


def test_synthetic_codebook_in_the_real_format(tmp_path, monkeypatch):
    """scripts/make_synthetic_codebook.py's builder: a real codebook's keys first, then
    synthetic ones; it opens through the engine, doctor finds it clean, its search has
    the exact path's numbers and the real keys are still found."""
    from test_engine_writer import lists_tau  # (it imports this module)

    from reasonedit_cli.store.synthetic import build_synthetic_codebook

    monkeypatch.setenv("REASONEDIT_ENGINE_MIN_KEYS", "300")
    real = grow(tmp_path / "real", 10**9, batches=[20])
    out = build_synthetic_codebook(tmp_path / "syn", 600, config_from=tmp_path / "real")
    assert out["engine"] and out["keys"] == 600 and out["real_keys"] == 60
    cb = Codebook.open(tmp_path / "syn")
    assert cb.engine() is not None and cb.n_keys == 600 and cb.config == real.config
    assert cb.check(images=False).ok
    q = real.vectors()[:10] + 0.01
    assert cb.search(q, 5) == cb.search(q, 5, method="exact")
    assert [h[0][0] for h in cb.search(q, 1)] == list(range(10))
    assert R.retrieve(cb, q[0]).tau == cb.tau == cb.manifest["derived"]["tau"]
    # the layout a writer leaves: the engine's sigma and lists listed as the store's own
    # (no second copy), and the per-key tau measurements, so the first insert is like
    # any later one; tau from them equals tau from the lists, before and after an insert
    d = cb.manifest["derived"]
    eng = d["engine"]["index"]
    assert [d["files"][k]["path"] for k in ("sigma", "knn_idx", "knn_dist")] == [
        eng[k]["path"] for k in ("sigma", "knn_idx", "knn_dist")
    ]
    assert "tau_other" in d["files"] and cb.tau_cache() is not None
    assert not list((tmp_path / "syn" / "index").glob("knn_idx-*"))
    assert cb.tau == pytest.approx(lists_tau(cb, cb.percentile))
    with cb.writer() as w:
        w.add(*make_edits(9000, 3))
    after = Codebook.open(tmp_path / "syn")
    assert after.n_keys == 600 + 9 and after.check(images=False).ok
    assert after.tau == pytest.approx(lists_tau(after, after.percentile))
    with pytest.raises(Exception, match="exists"):
        build_synthetic_codebook(tmp_path / "syn", 600, 16)
    # from MIN_IVF_KEYS on the engine stores its vectors in IVF order, and the
    # row-order input the segments were cut from is not left behind
    from reasonedit_cli.store.index.reduced import MIN_IVF_KEYS

    big = build_synthetic_codebook(tmp_path / "big", MIN_IVF_KEYS + 100, 16)
    cb = Codebook.open(tmp_path / "big")
    (vec,) = cb.manifest["derived"]["engine"]["index"]["vectors"]
    assert big["engine"] and vec["order"] == "ivf"
    assert sorted(p.name for p in (tmp_path / "big" / "index").glob("*input*")) == []
    assert cb.check(images=False).ok
    q = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    assert cb.search(q, 5) == cb.search(q, 5, method="exact")


def test_load_for_serving_maps_the_engine_and_decodes_no_keys(tmp_path, monkeypatch):
    """`Codebook.load` (what `serve` calls before it answers) opens the engine instead
    of decoding the keys; queries then answer with the exact path's numbers."""
    grow(tmp_path / "cb", 50, batches=[30, 5])
    exact = Codebook.open(tmp_path / "cb").search(QUERIES, 5, method="exact")
    real = RD.read_segment

    def edits_only(root, entry, dim):
        assert entry["kind"] == "edits", "a keys segment was decoded"
        return real(root, entry, dim)

    monkeypatch.setattr(RD, "read_segment", edits_only)
    cb = Codebook.open(tmp_path / "cb").load()
    assert cb.engine() is not None and cb.search(QUERIES, 5) == exact
    assert R.retrieve(cb, QUERIES[0]).tau == cb.tau
