"""The store's writer over the wide-key engine (issue 22): the engine is the store's
source of sigma and the neighbour lists (one copy of the files), an insert decodes none
of the old keys, a rebuild streams the vectors, the per-key tau measurements
(store/taucache.py) give tau for any percentile with the lists' numbers, and an engine
of a handful of keys reopens.

Real Parquet, real engine files, real hnswlib.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_codebook import DIM, flip_byte, make_edits
from test_store_engine import grow as grow_in_batches

from reasonedit_cli import retrieval as R
from reasonedit_cli.store import Codebook
from reasonedit_cli.store import reader as RD
from reasonedit_cli.store.index import reduced as RX
from reasonedit_cli.store.index.mapped import VectorParts
from reasonedit_cli.store.index.reduced import ReducedIndex
from reasonedit_cli.store.manifest import derived_paths, manifest_bytes

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


# -- what the writer checks by size and mtime (issue 22: an insert into 1M keys) --------


def grow_lifted(path) -> Codebook:
    """150 keys at the first commit (an engine with a lifted graph: above 128 keys),
    then two appends."""
    return grow_in_batches(path, 50, batches=(50, 5, 7))


def _index(cb: Codebook) -> dict:
    return cb.manifest["derived"]["engine"]["index"]


def _change_in_place(path, row: int, value, dtype, *, restore_mtime: bool) -> None:
    """Overwrite one (row, 0) entry of a (rows, 30) .npy file in place: the same inode
    and size (a well-formed file); the mtime put back when asked (what a size-and-mtime
    check cannot see)."""
    st = os.stat(path)
    arr = np.load(path, mmap_mode="r")
    offset = arr.offset if hasattr(arr, "offset") else 128
    with open(path, "r+b") as f:
        f.seek(offset + (row * arr.shape[1]) * arr.itemsize)
        f.write(np.array([value], dtype=dtype).tobytes())
    del arr
    if restore_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _insert_one(cb: Codebook, start: int = 300) -> np.ndarray:
    edits, keys = make_edits(start, 1)
    with cb.writer() as w:
        w.add(edits, keys)
    return np.asarray(keys[0].vector, dtype=np.float32)


def _finds(path, v: np.ndarray, edit_id: str) -> bool:
    fresh = Codebook.open(path)
    hits = [fresh.search(v[None], 1, method=m)[0][0][0] for m in ("exact", "auto")]
    return all(fresh.key_facts([h])[0]["edit_id"] == edit_id for h in hits)


def test_insert_reads_the_lists_by_size_and_mtime(tmp_path, monkeypatch):
    """The list base files (the writer's largest read: 2 x 240 MB at a million keys) are
    read without hashing while their size and mtime are the recorded ones, and the
    lifted graph is verified but never loaded (the writer does not search)."""
    cb = grow_lifted(tmp_path / "cb")
    assert all("mtime_ns" in _index(cb)[f] for f in ("knn_idx", "knn_dist"))
    hashed: list[bool] = []
    real = RX.read_stamped

    def spy(*a, **k):
        hashed.append(real(*a, **k))
        return hashed[-1]

    def no_load(*a, **k):
        raise AssertionError("the writer loaded the lifted graph")

    monkeypatch.setattr(RX, "read_stamped", spy)
    monkeypatch.setattr(RX, "load_graph", no_load)
    v = _insert_one(cb)
    monkeypatch.undo()
    assert hashed == [False, False]
    assert (
        _index(cb)["lift_hnsw"]
        == json.loads((tmp_path / "cb" / "versions" / "v000003.json").read_text())["derived"][
            "engine"
        ]["index"]["lift_hnsw"]
    )  # kept as it was
    assert _finds(tmp_path / "cb", v, "e300") and cb.check(images=False).ok


@pytest.mark.parametrize("name", ["knn_idx", "knn_dist", "lift_hnsw", "facts"])
def test_insert_after_a_change_with_a_new_mtime_rebuilds(tmp_path, name):
    """A list file (or the lifted graph, or a facts file) changed in place, same size,
    new mtime: the writer rehashes it, finds the change and rebuilds the engine instead
    of appending to it; the codebook is then clean and answers with the new key."""
    cb = grow_lifted(tmp_path / "cb")
    before = _index(cb)
    if name == "facts":
        path = tmp_path / "cb" / cb.manifest["derived"]["engine"]["facts"][0]["path"]
        flip_byte(path, path.stat().st_size // 2)
    elif name == "lift_hnsw":
        flip_byte(tmp_path / "cb" / before[name]["path"], 100)
    else:
        dtype = np.int64 if name == "knn_idx" else np.float64
        _change_in_place(tmp_path / "cb" / before[name]["path"], 3, 7, dtype, restore_mtime=False)
    v = _insert_one(cb)
    after = _index(cb)
    assert after["knn_idx"]["path"] != before["knn_idx"]["path"]  # new base files
    assert len(after["parts"]) == 1 and not after["deltas"]["knn"]
    assert cb.check(images=False).ok and _finds(tmp_path / "cb", v, "e300")


def test_a_list_changed_with_its_mtime_put_back(tmp_path):
    """What a size-and-mtime check cannot see: a list entry changed in place, its mtime
    restored. The insert uses the changed value (the rows it touches may get another
    sigma; `ask` never reads the lists) and answers; `doctor` finds the file and
    `doctor --repair` rebuilds it. A value no writer writes (a neighbour out of range)
    is refused by the range check instead: the insert rebuilds."""
    cb = grow_lifted(tmp_path / "cb")
    base = _index(cb)["knn_dist"]
    _change_in_place(tmp_path / "cb" / base["path"], 3, 0.123, np.float64, restore_mtime=True)
    v = _insert_one(cb)
    assert _index(cb)["knn_dist"]["path"] == base["path"]  # appended: not seen
    assert _finds(tmp_path / "cb", v, "e300")
    report = Codebook.open(tmp_path / "cb").check(images=False)
    assert any(base["path"] in p for p in report.problems), report.problems
    cb = Codebook.open(tmp_path / "cb", engine_min_keys=50)
    assert cb.check(repair=True, images=False).repaired
    assert Codebook.open(tmp_path / "cb").check(images=False).ok
    # out of range, mtime put back: refused before use
    idx = _index(cb)["knn_idx"]
    _change_in_place(tmp_path / "cb" / idx["path"], 2, 10**9, np.int64, restore_mtime=True)
    v = _insert_one(cb, 310)
    assert _index(cb)["knn_idx"]["path"] != idx["path"]
    assert cb.check(images=False).ok and _finds(tmp_path / "cb", v, "e310")


def test_lists_without_a_recorded_mtime_are_hashed_then_stamped(tmp_path, monkeypatch):
    """Codebooks written before the stamp record no mtime for the list files: the first
    insert hashes them and records their mtime in the new manifest, so the next insert
    reads them by size and mtime."""
    cb = grow_lifted(tmp_path / "cb")
    m = json.loads((tmp_path / "cb" / "manifest.json").read_text())
    for name in ("knn_idx", "knn_dist"):
        del m["derived"]["engine"]["index"][name]["mtime_ns"]
    data = manifest_bytes(m)
    for rel in ("manifest.json", f"versions/v{m['version']:06d}.json"):
        (tmp_path / "cb" / rel).write_bytes(data)
    hashed: list[bool] = []
    real = RX.read_stamped

    def spy(*a, **k):
        hashed.append(real(*a, **k))
        return hashed[-1]

    monkeypatch.setattr(RX, "read_stamped", spy)
    cb = Codebook.open(tmp_path / "cb", engine_min_keys=50)
    _insert_one(cb)
    assert all("mtime_ns" in _index(cb)[f] for f in ("knn_idx", "knn_dist"))
    _insert_one(cb, 310)
    assert hashed == [True, True, False, False]
