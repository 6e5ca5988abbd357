"""The lifted graph of large-sigma keys (issue 9): corrected distance as a plain L2 search.

A raw-distance graph cannot find an isolated key (large sigma) that wins by its sigma
from far away; the lifted graph can. These tests check the lift is exact as a ranking,
that the codebook persists and verifies it, that search finds such keys through it, and
that a damaged or missing lift degrades to the sigma scan, never to an error.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from test_codebook import flip_byte

from reasonedit_cli import retrieval as R
from reasonedit_cli.store import Codebook, EditRecord, KeyRecord
from reasonedit_cli.store import manifest as M
from reasonedit_cli.store.index import deltas as DL
from reasonedit_cli.store.index import derived as DI
from reasonedit_cli.store.index import lift as D

DIM = 24
HMK = 100


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lift_ranks_exactly_by_corrected_distance(seed):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(300, DIM)) * rng.uniform(0.2, 3, size=(300, 1)) + 4.0
    sigma = np.exp(rng.normal(0, 0.8, size=300))
    params = D.lift_params(keys, sigma)
    queries = rng.normal(size=(20, DIM)) * 3 + 4.0
    corrected = R.pairwise_l2(queries, keys) / sigma[None, :]
    # in float64 the lifted L2 ranks exactly as the corrected distance
    lk = D.lift_keys(keys, sigma, params, dtype=np.float64)
    lq = D.lift_queries(queries, params, dtype=np.float64)
    lifted = R.pairwise_l2(lq, lk)
    for i in range(len(queries)):
        assert np.argsort(lifted[i])[:20].tolist() == np.argsort(corrected[i])[:20].tolist()
    # every lifted key has the same norm, the query unit norm: L2 is an inner product
    assert np.allclose(np.linalg.norm(lk, axis=1), params[3], rtol=1e-9)
    assert np.allclose(np.linalg.norm(lq, axis=1), 1.0, rtol=1e-9)
    # stored in float32 (what hnswlib holds) only near-ties can swap
    lifted32 = R.pairwise_l2(D.lift_queries(queries, params), D.lift_keys(keys, sigma, params))
    for i in range(len(queries)):
        top = np.argsort(lifted32[i])[:10]
        assert corrected[i][top].max() <= np.sort(corrected[i])[9] * 1.01


def test_lift_members_are_the_largest_sigmas():
    sigma = np.array([1.0, 5.0, 2.0, 5.0, 0.5, 9.0, 3.0, 1.0, 1.0, 1.0])
    rows = D.lift_members(sigma, 0.3)
    assert rows.tolist() == [1, 3, 5]  # ascending rows; ties: the lower row
    assert D.valid_lift(rows, D.lift_params(np.ones((3, 4)), sigma[rows]), 10, 4)
    assert not D.valid_lift(rows[::-1], np.ones(D.LIFT_PARAMS + 8), 10, 4)
    assert not D.valid_lift(rows, np.ones(D.LIFT_PARAMS + 8), 5, 4)
    assert not D.valid_lift(rows, -np.ones(D.LIFT_PARAMS + 8), 10, 4)


@pytest.fixture(autouse=True)
def _store_index(monkeypatch):
    """The store's own lifted graph (store/index/lift.py over the full-width graph): what
    a codebook below the engine's threshold persists. Above it the engine's lifted graph
    answers and the store keeps none (tests/test_engine_writer.py), so the threshold is
    raised out of these codebooks' reach."""
    monkeypatch.setenv("REASONEDIT_ENGINE_MIN_KEYS", str(10**9))


def _hub_records(n_dense: int = 600, n_isolated: int = 30, seed: int = 0):
    """A dense cloud (small sigma) and isolated keys far apart (large sigma)."""
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(n_dense, DIM)) * 0.3
    isolated = rng.normal(size=(n_isolated, DIM)) * 6.0
    vecs = np.concatenate([dense, isolated]).astype(np.float32)
    sha = hashlib.sha256(b"img").hexdigest()
    edits = [EditRecord(f"e{i}", sha, "q", "a", [], None, "t") for i in range(len(vecs))]
    keys = [
        KeyRecord(f"e{i}", "sentence", f"v{i}", f"t{i}", sha, None, v) for i, v in enumerate(vecs)
    ]
    return edits, keys, vecs


def _build(path, seed=0) -> Codebook:
    edits, keys, _ = _hub_records(seed=seed)
    cb = Codebook.open(path, create=True, hnsw_min_keys=HMK)
    with cb.writer() as w:
        w.add(edits, keys)
    return cb


def _far_queries(cb: Codebook, n: int = 30) -> np.ndarray:
    """Queries next to the dense cloud, where isolated keys win by sigma from afar."""
    rng = np.random.default_rng(5)
    return (rng.normal(size=(n, DIM)) * 0.6).astype(np.float32)


def _recall(got, want) -> float:
    hits = [len({r for r, _, _ in a} & {r for r, _, _ in b}) / len(b) for a, b in zip(got, want)]
    return float(np.mean(hits))


def test_lift_is_persisted_and_finds_what_raw_candidates_miss(tmp_path, monkeypatch):
    cb = _build(tmp_path / "cb")
    files = cb.manifest["derived"]["files"]
    assert {"lift_hnsw", "lift_rows", "lift_params"} <= set(files)
    assert files["lift_rows"]["count"] == int(np.ceil(D.LIFT_FRACTION * cb.n_keys))
    fresh = Codebook.open(tmp_path / "cb", hnsw_min_keys=HMK)
    lift = fresh.index.lift()
    assert lift is not None
    # the lift holds the largest sigmas: the isolated keys
    assert set(range(600, 630)) <= set(lift.rows.tolist())
    monkeypatch.setattr(DI, "SEARCH_SIGMA_SCAN", 0)  # no scan: candidates decide
    monkeypatch.setattr(DI, "SEARCH_FETCH", 20)
    q = _far_queries(fresh)
    exact = fresh.search(q, 5, method="exact")
    assert any(r >= 600 for res in exact for r, _, _ in res)  # isolated keys do win
    with_lift = fresh.search(q, 5, method="hnsw")
    assert _recall(with_lift, exact) >= 0.95
    fresh.use_index(fresh.index.without_lift())  # the same search without the lift
    assert _recall(fresh.search(q, 5, method="hnsw"), exact) < 0.9


def test_appends_keep_the_lift_and_compaction_rebuilds_it(tmp_path, monkeypatch):
    for name in ("SIGMA_DELTA_MAX", "KNN_DELTA_MAX", "GRAPH_DELTA_MAX"):
        monkeypatch.setattr(DL, name, 1e9)
    cb = _build(tmp_path / "cb")
    before = dict(cb.manifest["derived"]["files"])
    edits, keys, _ = _hub_records(n_dense=20, n_isolated=0, seed=3)
    for e in edits:
        e.edit_id = "new-" + e.edit_id
    keys = [KeyRecord("new-" + k.edit_id, *list(vars(k).values())[1:]) for k in keys]
    with cb.writer() as w:
        w.add(edits, keys)
    files = cb.manifest["derived"]["files"]
    assert files["lift_hnsw"] == before["lift_hnsw"]  # an append writes no new lift
    q = _far_queries(cb)
    fresh = Codebook.open(tmp_path / "cb", hnsw_min_keys=HMK)
    assert fresh.search(q, 5, method="hnsw") == cb.search(q, 5, method="hnsw")
    with cb.writer() as w:
        w.compact()
    files = cb.manifest["derived"]["files"]
    assert files["lift_hnsw"]["path"] != before["lift_hnsw"]["path"]
    assert files["lift_rows"]["rows"] == cb.n_keys


def test_damaged_or_missing_lift_falls_back_and_doctor_repairs(tmp_path):
    cb = _build(tmp_path / "cb")
    q = _far_queries(cb)
    good = cb.search(q, 5, method="hnsw")
    files = cb.manifest["derived"]["files"]
    for part in ("lift_hnsw", "lift_rows", "lift_params"):
        path = tmp_path / "cb" / files[part]["path"]
        saved = path.read_bytes()
        flip_byte(path, len(saved) - 3)
        damaged = Codebook.open(tmp_path / "cb", hnsw_min_keys=HMK)
        assert damaged.index.lift() is None
        got = damaged.search(q, 5, method="hnsw")  # the sigma scan still runs
        assert _recall(got, good) >= 0.8
        rep = damaged.check(images=False)
        assert not rep.ok and any(files[part]["path"] in p for p in rep.problems), rep.problems
        path.write_bytes(saved)
    path.unlink()
    rep = Codebook.open(tmp_path / "cb", hnsw_min_keys=HMK).check(repair=True, images=False)
    assert rep.repaired
    fixed = Codebook.open(tmp_path / "cb", hnsw_min_keys=HMK)
    assert fixed.index.lift() is not None and fixed.check(images=False).ok
    assert fixed.search(q, 5, method="hnsw") == good


def test_codebook_without_lift_entries_reads_and_repair_builds_it(tmp_path):
    """Codebooks written before the lift: searched with the sigma scan; --repair adds it."""
    cb = _build(tmp_path / "cb")
    q = _far_queries(cb)
    good = cb.search(q, 5, method="hnsw")
    m = json.loads((tmp_path / "cb" / M.MANIFEST).read_bytes())
    for part in ("lift_hnsw", "lift_rows", "lift_params"):
        del m["derived"]["files"][part]
    data = M.manifest_bytes(m)  # as an older writer wrote it (valid checksum)
    (tmp_path / "cb" / M.MANIFEST).write_bytes(data)
    (tmp_path / "cb" / "versions" / f"v{m['version']:06d}.json").write_bytes(data)
    old = Codebook.open(tmp_path / "cb", hnsw_min_keys=HMK)
    assert old.index.lift() is None
    assert _recall(old.search(q, 5, method="hnsw"), good) >= 0.8  # the sigma scan
    rep = old.check(images=False)
    assert rep.ok and any("lifted graph" in note for note in rep.notes)
    rep = old.check(repair=True, images=False)
    assert any("lifted graph" in r for r in rep.repaired)
    fixed = Codebook.open(tmp_path / "cb", hnsw_min_keys=HMK)
    assert fixed.index.lift() is not None and fixed.version == m["version"] + 1
    assert fixed.search(q, 5, method="hnsw") == good
    assert fixed.check(images=False).ok and not fixed.check(images=False).notes
