"""The store's writer over the wide-key engine (issue 22): the engine is the store's
source of sigma and the neighbour lists (one copy of the files), an insert decodes none
of the old keys, a rebuild streams the vectors, the per-key tau measurements
(store/taucache.py) give tau for any percentile with the lists' numbers, and an engine
of a handful of keys reopens.

Real Parquet, real engine files, real hnswlib.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_codebook import DIM, flip_byte, make_edits
from test_store_engine import grow as grow_in_batches

from reasonedit_cli import retrieval as R
from reasonedit_cli.store import Codebook
from reasonedit_cli.store import reader as RD
from reasonedit_cli.store.index.mapped import VectorParts
from reasonedit_cli.store.index.reduced import ReducedIndex
from reasonedit_cli.store.manifest import derived_paths

QUERIES = np.random.default_rng(5).normal(size=(12, DIM)).astype(np.float32)


def grow(path, engine_min_keys: int) -> Codebook:
    """A codebook of 52 keys in three commits (test_store_engine.grow)."""
    return grow_in_batches(path, engine_min_keys, batches=(40, 5, 7))


def lists_tau(cb: Codebook, p: float) -> float | None:
    """tau by the codebook's rule from its neighbour lists (the path without the cache)."""
    d = cb.index.lists(need_knn=True)
    t = cb.keys_table()
    edits = np.unique(t.column("edit_id").to_numpy(zero_copy_only=False), return_inverse=True)[1]
    rule = cb.tau_rule
    if rule == "nearest":
        return R.nearest_threshold(d.dist, d.sigma, p, len(cb.edit_ids()))
    if rule == "edits":
        return R.other_edit_threshold(d.idx, d.dist, d.sigma, edits, p, len(cb.edit_ids()))
    img = t.column("image_sha256").to_numpy(zero_copy_only=False)
    images = np.unique(img, return_inverse=True)[1]
    return R.other_image_threshold(d.idx, d.dist, d.sigma, images, edits, p)


@pytest.mark.parametrize("n", [2, 3, 20])
def test_engine_of_a_few_keys_reopens(tmp_path, n):
    """A lifted graph of one key (2-20 keys) had radius 0 and failed its own open."""
    v = np.random.default_rng(n).normal(size=(n, 24)).astype(np.float32)
    eng = ReducedIndex.build(VectorParts([v]))
    entries = eng.save(tmp_path, "000001")
    back = ReducedIndex.open(tmp_path, entries, lists=True)
    assert back.lift is not None and back.search(v[:2], 2) == eng.search(v[:2], 2)
    # and through the store, every commit an engine (the crash harness's threshold)
    cb = Codebook.open(tmp_path / "cb", create=True, engine_min_keys=1)
    with cb.writer() as w:
        w.add(*make_edits(0, 1))  # 3 keys
    fresh = Codebook.open(tmp_path / "cb")
    assert fresh.engine() is not None and fresh.n_keys == 3
    assert fresh.search(QUERIES, 2) == fresh.search(QUERIES, 2, method="exact")


def test_insert_reads_no_old_key_and_shares_the_lists(tmp_path, monkeypatch):
    """An insert into an engine codebook decodes no keys segment; the store lists the
    engine's sigma and list files as its own, keeps no full-width graph, and answers
    (search, tau) with the numbers of a codebook that never had an engine."""
    grow(tmp_path / "e", 50)
    old_cb = grow(tmp_path / "o", 10**9)
    real = RD.read_segment
    with monkeypatch.context() as m:
        m.setattr(RD, "read_segment", lambda r, e, d: real(r, e, d) if e["kind"] == "edits"
                  else pytest.fail("an insert decoded a keys segment"))  # fmt: skip
        cb = Codebook.open(tmp_path / "e", hnsw_min_keys=10**6, engine_min_keys=50)
        with cb.writer() as w:
            w.add(*make_edits(100, 4))
        with cb.writer() as w:
            w.add(*make_edits(110, 2))
    for start, count in ((100, 4), (110, 2)):
        with old_cb.writer() as w:
            w.add(*make_edits(start, count))
    d = cb.manifest["derived"]
    idx = d["engine"]["index"]
    assert d["files"]["knn_idx"]["path"] == idx["knn_idx"]["path"]
    assert d["files"]["sigma"]["path"] == idx["sigma"]["path"]
    assert [e["path"] for e in d["deltas"]["knn"]] == [e["path"] for e in idx["deltas"]["knn"]]
    assert "hnsw" not in d["files"] and not d["deltas"]["hnsw"]
    e = Codebook.open(tmp_path / "e")
    o = Codebook.open(tmp_path / "o")
    assert e.n_keys == o.n_keys == 3 * 58
    assert np.array_equal(e.sigma(), o.sigma())
    assert e.search(QUERIES, 5) == e.search(QUERIES, 5, method="exact") == o.search(QUERIES, 5)
    assert e.tau == o.tau and e.tau_for(40.0) == o.tau_for(40.0)
    assert e.check(images=False).ok


@pytest.mark.parametrize("rule", ["images", "edits", "nearest"])
def test_tau_cache_gives_the_lists_numbers(tmp_path, rule):
    """tau for any percentile from the cache equals the rule over the lists; a damaged
    cache is not used (the lists answer, the same number) and doctor reports it."""
    cb = Codebook.open(tmp_path / "cb", create=True, engine_min_keys=30)
    with cb.writer() as w:
        w.set_config(tau_rule=rule)
        w.add(*make_edits(0, 20))
    with cb.writer() as w:
        w.add(*make_edits(20, 6, keys_per_edit=4))
    entry = cb.manifest["derived"]["files"]["tau_other"]
    fresh = Codebook.open(tmp_path / "cb")
    assert fresh.tau_cache() is not None
    for p in (5.0, 25.0, 60.0):
        assert fresh.tau_for(p) == lists_tau(Codebook.open(tmp_path / "cb"), p)
    assert fresh.tau == cb.manifest["derived"]["tau"]
    flip_byte(tmp_path / "cb" / entry["path"], 200)
    broken = Codebook.open(tmp_path / "cb", engine_min_keys=30)
    assert broken.tau_cache() is None
    assert broken.tau_for(25.0) == fresh.tau_for(25.0)
    report = broken.check(images=False)
    assert any(entry["path"] in p for p in report.problems)
    repaired = broken.check(repair=True, images=False)
    assert repaired.repaired and Codebook.open(tmp_path / "cb").tau_cache() is not None


def test_rebuild_streams_the_vectors(tmp_path, monkeypatch):
    """A change that rebuilds the engine (a removal) never builds one array of every
    key: the vectors stream through a mapped input file; the answers stay exact."""
    cb = grow(tmp_path / "cb", 50)

    def refuse(self):
        raise AssertionError("the rebuild built every key's vector at once")

    monkeypatch.setattr(RD.Codebook, "vectors", refuse)
    with cb.writer() as w:
        w.remove_edits(["e3", "e7"])
    monkeypatch.undo()
    fresh = Codebook.open(tmp_path / "cb")
    assert fresh.engine() is not None and fresh.n_keys == 3 * 50
    assert fresh.search(QUERIES, 5) == fresh.search(QUERIES, 5, method="exact")
    previous = json.loads((tmp_path / "cb" / "versions" / "v000003.json").read_text())
    listed = derived_paths(fresh.manifest) | derived_paths(previous)
    left = {f"index/{p.name}" for p in (tmp_path / "cb" / "index").glob("vectors-input-*")}
    assert left <= listed  # an input file no version keeps is gone


def test_damaged_engine_sigma_recovers_the_engine_numbers(tmp_path, monkeypatch):
    """Above the IVF threshold the engine's lists are approximate, so sigma recomputed
    from the vectors would differ from the stored one: a damaged sigma file is recomputed
    from the stored lists instead, and search gives the undamaged numbers (the full damage
    fuzz found the silent change)."""
    from helpers_reliability import build_synthetic_codebook

    from reasonedit_cli.store.index.reduced import MIN_IVF_KEYS

    monkeypatch.delenv("REASONEDIT_ENGINE_MIN_KEYS", raising=False)
    n_edits = MIN_IVF_KEYS // 9 + 20
    path = build_synthetic_codebook(tmp_path / "cb", n_edits=n_edits, keys_per_edit=9, dim=16)
    cb = Codebook.open(path)
    q = np.random.default_rng(3).normal(size=(6, 16)).astype(np.float32)
    before = cb.search(q, k=5, method="exact")
    sigma_entry = cb.manifest["derived"]["files"]["sigma"]
    assert sigma_entry["path"].startswith("index/rsigma"), sigma_entry  # the engine's file
    lists = Codebook.open(path).index.lists(need_knn=True)
    exact = R.sigma_raw_from_knn(R.knn_lists(cb.vectors(), R.SIGMA_K)[1])
    assert not np.allclose(lists.sigma, exact), "the engine's lists should be approximate"
    flip_byte(path / sigma_entry["path"], 200)
    after = Codebook.open(path).search(q, k=5, method="exact")
    assert after == before
