"""The wide-key engine (issue 22): mapped vectors, PCA projection, IVF, exact re-rank.

Small codebooks, real numpy / hnswlib / files: the mapped file round-trips and refuses
damage, the projection's graph vectors never overestimate a distance, IVF and the lifted
graph find what exact search finds, search returns the exact path's numbers, and an
insert replays from its delta files to the same state.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from reasonedit_cli import retrieval as R
from reasonedit_cli.store.index import ivf as I
from reasonedit_cli.store.index.mapped import (
    MappedError,
    VectorParts,
    check_file,
    open_parts,
    open_vectors,
    write_permuted,
    write_vectors,
)
from reasonedit_cli.store.index.projection import Projection
from reasonedit_cli.store.index.reduced import ReducedIndex

DIM = 96


def _mixture(n, seed=0, dim=DIM, clusters=None):
    rng = np.random.default_rng(seed)
    k = clusters or max(4, n // 100)
    cent = np.random.default_rng(99).normal(size=(k, dim)).astype(np.float32)
    spread = np.exp(np.random.default_rng(98).normal(-1, 0.35, size=k)).astype(np.float32)
    c = rng.integers(0, k, n)
    return (cent[c] + rng.normal(size=(n, dim)).astype(np.float32) * spread[c, None]).astype(
        np.float32
    )


def _write(tmp_path, v, name="v.npy", dtype="float32", chunk=700):
    (tmp_path / "index").mkdir(exist_ok=True)
    rel = f"index/{name}"
    chunks = [v[s : s + chunk] for s in range(0, len(v), chunk)]
    ent = write_vectors(tmp_path / rel, chunks, len(v), v.shape[1], dtype)
    return dict(ent, path=rel)


# -- mapped vectors ----------------------------------------------------------------------


def test_mapped_round_trip_and_cheap_checks(tmp_path):
    v = _mixture(2000)
    ent = _write(tmp_path, v)
    m = open_vectors(tmp_path / ent["path"], ent)
    assert m.array.shape == v.shape and np.array_equal(m.array, v) and not m.rehashed
    assert isinstance(m.array.base, memoryview | object)  # a view of the mapping, no copy
    assert check_file(tmp_path / ent["path"], ent) is None
    # float16: half the bytes, rounding below 1e-3 relative
    e16 = _write(tmp_path, v, "v16.npy", "float16")
    assert e16["bytes"] < ent["bytes"] * 0.51
    a16 = open_vectors(tmp_path / e16["path"], e16).array
    assert np.abs(a16.astype(np.float32) - v).max() < 2e-3 * np.abs(v).max()
    # parts: base + delta as one array by row
    e2 = _write(tmp_path, v[:300] + 1, "delta.npy")
    parts = open_parts(tmp_path, [ent, e2])
    rows = np.array([5, 2100, 1999, 2000, 5])
    assert np.array_equal(parts.take(rows), np.concatenate([v, v[:300] + 1])[rows])
    assert sum(len(b) for _, b in parts.chunks(333)) == 2300
    with pytest.raises(IndexError):
        parts.take(np.array([2300]))


def test_mapped_damage_is_refused(tmp_path):
    v = _mixture(500)
    ent = _write(tmp_path, v)
    path = tmp_path / ent["path"]
    data = bytearray(path.read_bytes())
    # same size, a changed byte, mtime restored: the cheap open cannot see it; doctor can
    data[len(data) // 2] ^= 0xFF
    st = os.stat(path)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert open_vectors(path, ent).array.shape == v.shape
    assert "checksum" in check_file(path, ent)
    # the mtime differs: the open rehashes and refuses
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(MappedError, match="checksum"):
        open_vectors(path, ent)
    # truncated, a wrong header, a symlink, a missing file
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(MappedError, match="bytes"):
        open_vectors(path, ent)
    with pytest.raises(MappedError):
        open_vectors(path, dict(ent, dim=DIM + 1))
    os.unlink(path)
    with pytest.raises(MappedError, match="missing"):
        open_vectors(path, ent)
    os.symlink(tmp_path / "elsewhere", path)
    with pytest.raises(MappedError):
        open_vectors(path, ent)


def test_mapped_write_is_atomic(tmp_path):
    v = _mixture(100)

    def bad_chunks():
        yield v[:50]
        raise OSError(28, "No space left on device")

    (tmp_path / "index").mkdir()
    with pytest.raises(OSError):
        write_vectors(tmp_path / "index/x.npy", bad_chunks(), 100, DIM)
    assert os.listdir(tmp_path / "index") == []  # no file, no temp file
    with pytest.raises(ValueError, match="announced"):
        write_vectors(tmp_path / "index/x.npy", [v[:50]], 100, DIM)
    with pytest.raises(ValueError, match="finite"):
        write_vectors(tmp_path / "index/x.npy", [v * 1e6], 100, DIM, "float16")
    assert os.listdir(tmp_path / "index") == []


# -- projection --------------------------------------------------------------------------


def test_projection_is_orthonormal_and_a_contraction():
    v = _mixture(3000, dim=200)
    p = Projection.fit(v, 32)
    assert p.rank == 32
    assert np.allclose(p.basis @ p.basis.T, np.eye(32), atol=1e-4)
    q = _mixture(50, seed=5, dim=200)
    g, gq = p.graph_vectors(v[:400]), p.graph_vectors(q)
    full = R.pairwise_l2(q, v[:400])
    red = R.pairwise_l2(gq, g)
    assert (red <= full * (1 + 1e-4) + 1e-3).all()  # never overestimates
    # the lift vectors approximate the full distance from above the reduced one
    lk, lq = Projection.lift_key_vectors(g), Projection.lift_query_vectors(gq)
    lifted = R.pairwise_l2(lq, lk)
    assert (lifted >= red - 1e-3).all()
    assert np.median(np.abs(lifted - full) / full) < 0.2
    # PCA captures the mixture's spread better than a random basis
    rnd = np.linalg.qr(np.random.default_rng(0).normal(size=(200, 32)))[0].T
    kept = np.linalg.norm(p.project(v)[0]) ** 2
    kept_rnd = np.linalg.norm((v - p.mean) @ rnd.T) ** 2
    assert kept > 1.5 * kept_rnd
    # storage round trip; a non-orthonormal array is refused
    assert np.array_equal(Projection.from_array(p.to_array()).basis, p.basis)
    bad = p.to_array()
    bad[1] *= 2
    with pytest.raises(ValueError, match="orthonormal"):
        Projection.from_array(bad)
    # narrow keys are their own projection
    assert Projection.fit(v[:, :16], 32).rank == 16


def test_ivf_finds_the_reduced_nearest():
    g = _mixture(5000, dim=24)
    cent, offsets, labels, order = I.IVFPart.build(g)
    part = I.IVFPart(cent, offsets, labels, g[order], 0, len(g))
    assert I.valid_ivf(offsets, labels, 0, len(g), len(cent))
    assert not I.valid_ivf(offsets, labels[::-1].copy() * 0, 0, len(g), len(cent))
    q = _mixture(100, seed=3, dim=24)
    lab, sq = part.knn_query(q, 10)
    truth = R.brute_force_knn(g, q, 10)[0]
    rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(lab, truth, strict=True)])
    assert rec > 0.95
    assert (np.diff(sq, axis=1) >= 0).all()


# -- the engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    v = _mixture(4000, dim=DIM)
    ent = _write(root, v, "vectors-000001.npy")
    eng = ReducedIndex.build(open_parts(root, [ent]), rank=24)
    entries = eng.save(root, "000001")
    return root, v, eng, entries


def _recall(got, truth) -> float:
    """Mean recall@k of search results against exact ones."""
    pairs = zip(got, truth, strict=True)
    return float(np.mean([len({a[0] for a in x} & {b[0] for b in y}) / len(y) for x, y in pairs]))


def _queries(v, seed=1):
    rng = np.random.default_rng(seed)
    near = v[rng.choice(len(v), 40, replace=False)] + rng.normal(scale=0.05, size=(40, DIM))
    return np.concatenate([near, _mixture(40, seed=seed + 10)]).astype(np.float32)


def test_engine_matches_exact_search(engine):
    root, v, eng, _ = engine
    # sigma from the IVF lists equals exact sigma (lists over neighbouring clusters)
    exact = R.sigma_from_knn(R.knn_lists(v, R.SIGMA_K)[1])
    assert np.median(np.abs(eng.sigma - exact) / exact) < 1e-5
    assert np.mean(np.abs(eng.sigma - exact) / exact < 1e-4) > 0.97
    q = _queries(v)
    got, truth = eng.search(q, 5), eng.exact_search(q, 5)
    rec = np.mean(
        [len({a[0] for a in x} & {b[0] for b in y}) / 5 for x, y in zip(got, truth, strict=True)]
    )
    assert rec >= 0.97
    # where both find the same keys they report the same numbers (one distance function)
    same = [
        x == y for x, y in zip(got, truth, strict=True) if {a[0] for a in x} == {b[0] for b in y}
    ]
    assert same and all(same)
    # the corrected distance is raw / sigma of the key, raw the exact L2
    row, raw, corr = got[0][0]
    assert raw == pytest.approx(float(np.linalg.norm(v[row].astype(np.float64) - q[0])), rel=1e-6)
    assert corr == pytest.approx(raw / eng.sigma[row])


def test_lifted_graph_finds_isolated_keys(tmp_path):
    # dense clusters plus isolated keys; queries far from both: the corrected winners are
    # isolated keys (large sigma) that raw-distance candidates miss
    rng = np.random.default_rng(0)
    cent = rng.normal(size=(30, DIM)) * 2
    dense = cent[rng.integers(0, 30, 3800)] + rng.normal(size=(3800, DIM)) * 0.3
    v = np.concatenate([dense, rng.normal(size=(200, DIM)) * 2.5]).astype(np.float32)
    v = v[rng.permutation(len(v))]
    eng = ReducedIndex.build(open_parts(tmp_path, [_write(tmp_path, v)]), rank=24)
    q = (rng.normal(size=(60, DIM)) * 2.5).astype(np.float32)
    truth = eng.exact_search(q, 5)

    def rec(res):
        return np.mean(
            [
                len({a[0] for a in x} & {b[0] for b in y}) / 5
                for x, y in zip(res, truth, strict=True)
            ]
        )

    without = rec(eng.search(q, 5, fetch=16, scan=0, use_lift=False, corrected=0))
    with_lift = rec(eng.search(q, 5, fetch=16, scan=0, lift_fetch=64, corrected=0))
    assert without < 0.4 and with_lift > 0.8
    # candidates by reduced distance / sigma find some of them in the probed lists too
    corrected = rec(eng.search(q, 5, fetch=16, scan=0, use_lift=False, corrected=64))
    assert corrected > without


def test_engine_files_reopen_and_refuse_damage(engine, tmp_path):
    root, v, eng, entries = engine
    again = ReducedIndex.open(root, entries)
    q = _queries(v, seed=2)
    assert again.search(q, 5) == eng.search(q, 5)
    assert again.knn_idx is None  # ask does not load the lists
    # a damaged small file is refused by checksum
    proj = root / entries["projection"]["path"]
    data = proj.read_bytes()
    proj.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    try:
        with pytest.raises(MappedError, match="checksum"):
            ReducedIndex.open(root, entries)
    finally:
        proj.write_bytes(data)
    # doctor rehashes the mapped files: in-place damage with the mtime put back is found
    vec = root / entries["vectors"][0]["path"]
    st, raw = os.stat(vec), vec.read_bytes()
    vec.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    os.utime(vec, ns=(st.st_atime_ns, st.st_mtime_ns))
    try:
        assert ReducedIndex.open(root, entries).n == len(v)  # ask: cheap checks pass
        assert "checksum" in ReducedIndex.verify(root, entries)[0]
    finally:
        vec.write_bytes(raw)
        os.utime(vec, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ReducedIndex.verify(root, entries) == []
    # inconsistent entries are refused, never trusted
    bad = json.loads(json.dumps(entries))
    bad["parts"][0]["stop"] = 10
    with pytest.raises(MappedError):
        ReducedIndex.open(root, bad)
    with pytest.raises(MappedError):
        ReducedIndex.open(root, {**entries, "keys": 3999})


def test_insert_replays_from_delta_files(tmp_path):
    v = _mixture(3000, dim=DIM)
    ent = _write(tmp_path, v, "vectors-000001.npy")
    eng = ReducedIndex.build(open_parts(tmp_path, [ent]), rank=24)
    entries = eng.save(tmp_path, "000001")
    before = {p.name for p in (tmp_path / "index").iterdir()}
    w = ReducedIndex.open(tmp_path, json.loads(json.dumps(entries)), lists=True)
    new = _mixture(200, seed=7, dim=DIM)
    e2 = w.append_files(tmp_path, "000002", new)
    after = {p.name for p in (tmp_path / "index").iterdir()}
    assert before < after and len(after - before) == 4  # vectors, reduced, sigma, lists deltas
    allv = np.concatenate([v, new])
    exact = R.sigma_from_knn(R.knn_lists(allv, R.SIGMA_K)[1])
    assert np.median(np.abs(w.sigma - exact) / exact) < 1e-5
    r = ReducedIndex.open(tmp_path, e2, lists=True)
    assert np.array_equal(r.sigma, w.sigma) and np.array_equal(r.knn_idx, w.knn_idx)
    q = np.concatenate([new[:20] + 0.01, _queries(v)[:20]]).astype(np.float32)
    got, truth = r.search(q, 5), r.exact_search(q, 5)
    assert any(h[0] >= 3000 for res in got for h in res)  # the new keys are found
    rec = np.mean(
        [len({a[0] for a in x} & {b[0] for b in y}) / 5 for x, y in zip(got, truth, strict=True)]
    )
    assert rec >= 0.97


def test_vectors_stored_in_ivf_order(tmp_path):
    """The base vector file is written in IVF order at build (sequential passes over the
    input, even with a buffer far smaller than the file): each list is a contiguous range
    of rows, rows map to positions through the IVF labels, and a reopened index returns
    the same numbers as the one that built it."""
    v = _mixture(4000, dim=DIM)
    src = _write(tmp_path, v, "input.npy")
    eng = ReducedIndex.build(
        open_parts(tmp_path, [src]), rank=24, root=tmp_path, tag="000001", dtype="float16"
    )
    entries = eng.save(tmp_path, "000001")
    ve = entries["vectors"]
    assert len(ve) == 1 and ve[0]["order"] == "ivf" and ve[0]["dtype"] == "float16"
    assert ve[0]["path"] == "index/vectors-000001.npy"
    part = eng.parts[0]
    stored = open_vectors(tmp_path / ve[0]["path"], ve[0]).array
    v16 = v.astype(np.float16)
    assert np.array_equal(stored, v16[part.labels])  # list j = rows offsets[j]..offsets[j+1]
    rows = np.random.default_rng(3).permutation(4000)[:500]
    assert np.array_equal(eng.vectors.take(rows), v16[rows].astype(np.float32))
    r = ReducedIndex.open(tmp_path, json.loads(json.dumps(entries)))
    q = _queries(v)
    assert r.search(q, 5) == eng.search(q, 5)
    got, truth = r.search(q, 5), r.exact_search(q, 5)
    assert _recall(got, truth) >= 0.95
    same = [
        x == y for x, y in zip(got, truth, strict=True) if {a[0] for a in x} == {b[0] for b in y}
    ]
    assert same and all(same)
    # a file in another order written in several passes is the same file
    order = part.labels
    small = write_permuted(tmp_path / "index/p.npy", open_parts(tmp_path, [src]), order,
                           "float16", buffer_bytes=DIM * 2 * 333)  # fmt: skip
    assert small["sha256"] == ve[0]["sha256"]
    # an order that the index parts cannot give is refused, never guessed
    bad = json.loads(json.dumps(entries))
    bad["parts"] = [{**bad["parts"][0], "kind": "flat"}]
    with pytest.raises(MappedError):
        ReducedIndex.open(tmp_path, bad)
    with pytest.raises(ValueError):
        write_permuted(tmp_path / "index/q.npy", eng.vectors, np.zeros(4000, np.int64))
    assert not (tmp_path / "index/q.npy").exists()


def test_mapped_rows_are_read_not_faulted(tmp_path):
    """MappedArray.read: runs of positions, repeats, any order given; a file truncated
    under a reader raises MappedError (touching the mapping there would be SIGBUS)."""
    v = _mixture(3000)
    ent = _write(tmp_path, v, dtype="float16")
    m = open_vectors(tmp_path / ent["path"], ent)
    pos = np.array([0, 1, 2, 7, 7, 100, 2999, 5])
    assert np.array_equal(m.read(pos), v.astype(np.float16)[pos])
    with pytest.raises(IndexError):
        m.read(np.array([3000]))
    os.truncate(tmp_path / ent["path"], ent["bytes"] // 2)
    with pytest.raises(MappedError):
        m.read(np.array([10, 2990]))


def test_vector_parts_need_a_part():
    with pytest.raises(ValueError):
        VectorParts([])


def test_damage_fuzz_never_crashes_a_search(engine, tmp_path):
    """Flip bytes in every engine file (the mtime put back, so that the cheap checks of
    the mapped files pass): open refuses with MappedError, or it opens and a search
    answers (possibly other keys), never another exception, never a crash."""
    import shutil

    root, v, _, entries = engine
    copy = tmp_path / "cb"
    shutil.copytree(root, copy)
    q = _queries(v, seed=9)[:4]
    rng = np.random.default_rng(0)
    opened = refused = 0
    for f in sorted((copy / "index").iterdir()):
        data = f.read_bytes()
        for _ in range(3):
            pos = int(rng.integers(0, len(data)))
            bad = bytearray(data)
            bad[pos] ^= int(rng.integers(1, 256))
            st = os.stat(f)
            f.write_bytes(bytes(bad))
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
            try:
                eng = ReducedIndex.open(copy, entries)
            except MappedError:
                refused += 1
            else:
                opened += 1
                res = eng.search(q, 5)
                assert all(len(r) == 5 for r in res)
            finally:
                f.write_bytes(data)
                os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert refused and opened  # small files refuse by checksum; mapped ones open


def test_facts_file_maps_the_hits_columns(tmp_path):
    import pyarrow as pa

    from reasonedit_cli.store.index.facts import open_facts, row_facts, write_facts

    n = 3000
    table = pa.table(
        {
            "key_id": [f"{i:064x}" for i in range(n)],
            "value": [f"fact {i}" for i in range(n)],
            "box": [None if i % 2 else [i, i, i + 5, i + 5] for i in range(n)],
            "vector": pa.array([[0.0, 1.0]] * n, pa.list_(pa.float32(), 2)),
        }
    )
    path = tmp_path / "facts.arrow"
    ent = write_facts(path, table)
    assert ent["rows"] == n and "vector" not in ent["columns"]
    got = open_facts(path, ent)
    assert row_facts(got, 1235) == {"key_id": f"{1235:064x}", "value": "fact 1235", "box": None}
    assert row_facts(got, 2)["box"] == [2, 2, 7, 7]
    # a changed mtime means a rehash; damage is then refused
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(MappedError, match="checksum"):
        open_facts(path, ent)
    with pytest.raises(MappedError):
        open_facts(path, dict(ent, bytes=ent["bytes"] + 1))
    path.unlink()
    with pytest.raises(MappedError, match="missing"):
        open_facts(path, ent)


def test_ivf_batch_queries_match_single_ones():
    g = _mixture(4000, dim=16)
    cent, offsets, labels, order = I.IVFPart.build(g)
    part = I.IVFPart(cent, offsets, labels, g[order], 0, len(g))
    q = _mixture(300, seed=4, dim=16)
    k = 60  # more than some probed lists hold: those queries take the one-at-a-time path
    lab, sq = part.knn_query(q, k, 2)
    one = [part.knn_query(q[i : i + 1], k, 2) for i in range(len(q))]
    assert np.allclose(sq, np.concatenate([o[1] for o in one]), rtol=1e-4, atol=1e-3)


def test_neighbour_lists_in_blocks(monkeypatch):
    """ivf_lists compares members and candidates in blocks (memory bounded whatever a
    list's size): tiny blocks give the same lists as one block, up to float32 rounding."""
    import reasonedit_cli.store.index.reduced as RD

    v = _mixture(3000, dim=DIM)
    eng = ReducedIndex.build(VectorParts([v]), rank=24, lift=False)
    part = eng.parts[0]
    idx, dist = RD.ivf_lists(part, eng.vectors)
    monkeypatch.setattr(RD, "LIST_BLOCK", 7)
    idx7, dist7 = RD.ivf_lists(part, eng.vectors)
    # float32 GEMMs of other shapes round differently (~1e-6): near-ties may swap
    assert np.allclose(dist, dist7, rtol=1e-5)
    same = np.mean([set(a) == set(b) for a, b in zip(idx, idx7, strict=True)])
    assert same > 0.99


def _with_duplicates(seed=0, dim=24, dupes=900, noise=0.0, tight=0):
    """2,000 keys over 40 clusters, `dupes` copies of one key (times `noise` jitter: k-means
    cannot split them, so their list is far above the mean) and `tight` keys in one
    tight cluster."""
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(40, dim)).astype(np.float32) * 3
    v = cent[rng.integers(0, 40, 2000)] + rng.normal(size=(2000, dim)).astype(np.float32) * 0.5
    same = cent[1] + 0.2 + rng.normal(size=(dupes, dim)).astype(np.float32) * noise
    huge = cent[0] + rng.normal(size=(tight, dim)).astype(np.float32) * 0.01
    out = np.concatenate([v, same, huge]).astype(np.float32)
    return out[rng.permutation(len(out))]


@pytest.mark.parametrize("noise", [0.0, 1e-5])
def test_balanced_ivf_caps_list_sizes(noise):
    """No list above balance_cap where k-means alone leaves one far above it (duplicates
    and near-duplicates: cut along their first principal axis), the lists stay a valid
    partition, the build is deterministic, and the IVF still finds the reduced nearest."""
    g = _with_duplicates(noise=noise)
    n = len(g)
    cap = I.balance_cap(n, I.n_lists(n))
    raw = np.diff(I.IVFPart.build(g, balanced=False)[1])
    cent, offsets, labels, order = I.IVFPart.build(g)
    sizes = np.diff(offsets)
    assert raw.max() > 3 * cap  # the data is uneven: the test can fail
    assert sizes.max() <= cap and sizes.sum() == n
    assert (sizes.astype(np.int64) ** 2).sum() < 0.25 * (raw.astype(np.int64) ** 2).sum()
    assert I.valid_ivf(offsets, labels, 0, n, len(cent)) and np.isfinite(cent).all()
    again = I.IVFPart.build(g)
    assert np.array_equal(again[2], labels) and np.array_equal(again[0], cent)
    part = I.IVFPart(cent, offsets, labels, g[order], 0, n)
    q = np.concatenate([g[:50] + 0.01, _with_duplicates(seed=5, dupes=0)[:50]])
    lab, _ = part.knn_query(q, 10, 24)
    truth = R.brute_force_knn(g, q, 10)[0]
    # ties among the (near-)duplicates (equal to ~1e-3): compare distances, not labels
    d_got = np.sort(((g[lab] - q[:, None]) ** 2).sum(-1), axis=1)
    d_true = np.sort(((g[truth] - q[:, None]) ** 2).sum(-1), axis=1)
    assert np.mean(np.isclose(d_got, d_true, rtol=2e-3, atol=1e-6)) > 0.95


def test_balanced_engine_search_matches_exact(tmp_path, monkeypatch):
    """With a tight cap (1.5x the mean: many lists split) the engine's sigma stays exact
    for nearly every key and search returns exact search's rows and numbers."""
    monkeypatch.setattr(I, "BALANCE_CAP", 1.5)
    v = _mixture(4000, dim=DIM)
    eng = ReducedIndex.build(open_parts(tmp_path, [_write(tmp_path, v)]), rank=24)
    cap = I.balance_cap(len(v), I.n_lists(len(v)))
    raw = np.diff(I.IVFPart.build(eng.graph_rows(np.arange(len(v))), balanced=False)[1])
    sizes = np.diff(eng.parts[0].offsets)
    assert raw.max() > cap >= sizes.max() and len(sizes) > len(raw)
    exact = R.sigma_from_knn(R.knn_lists(v, R.SIGMA_K)[1])
    assert np.mean(np.abs(eng.sigma - exact) / exact < 1e-4) > 0.97
    q = _queries(v)
    got, truth = eng.search(q, 5), eng.exact_search(q, 5)
    assert _recall(got, truth) >= 0.97
    same = [
        x == y for x, y in zip(got, truth, strict=True) if {a[0] for a in x} == {b[0] for b in y}
    ]
    assert len(same) >= 0.9 * len(q) and all(same)


def test_float16_conversion_is_exact_with_torch():
    """to_float32 (torch's conversion when torch is loaded, numpy's otherwise) gives the
    same bits as numpy's for every float16 value but NaNs (subnormals and infinities
    too; a signalling NaN's payload is quietened, still NaN), so a search returns the
    same numbers whether or not the process imported torch."""
    pytest.importorskip("torch")
    from reasonedit_cli.store.index.mapped import to_float32

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    x = np.tile(every, 2).reshape(-1, 4096)
    got = to_float32(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    want = x.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan) and nan.sum() == 2 * 2046
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert to_float32(x[:, ::2]).flags.c_contiguous  # a strided view converts too
    assert np.array_equal(to_float32(x[:, ::2]), x[:, ::2].astype(np.float32), equal_nan=True)


def test_insert_writes_lists_in_place_when_opened_with_room(tmp_path):
    """A writer that opens the lists with room for the rows it appends (`spare_rows`:
    what store/engine.py does) updates them in place, with the same lists, sigma and
    patch files as the copying path; without room, or with too little, it copies."""
    v = _mixture(3000, dim=DIM)
    ent = _write(tmp_path, v, "vectors-000001.npy")
    entries = ReducedIndex.build(open_parts(tmp_path, [ent]), rank=24).save(tmp_path, "000001")
    new = _mixture(200, seed=7, dim=DIM)
    out = {}
    for spare in (0, 200, 50):
        root = tmp_path / f"s{spare}"
        shutil.copytree(tmp_path / "index", root / "index")
        w = ReducedIndex.open(root, json.loads(json.dumps(entries)), lists=True, spare_rows=spare)
        room = w.list_room
        assert (room is not None) == (spare > 0) and len(w.knn_idx) == 3000
        e2 = w.append_files(root, "000002", new)
        assert len(w.knn_idx) == 3200
        assert (room is not None and w.knn_idx.base is room[0]) == (spare == 200)
        r = ReducedIndex.open(root, e2, lists=True)  # the patch files replay to the same
        assert np.array_equal(r.knn_idx, w.knn_idx) and np.array_equal(r.knn_dist, w.knn_dist)
        out[spare] = (w.knn_idx, w.knn_dist, w.sigma)
    for spare in (200, 50):
        assert all(np.array_equal(a, b) for a, b in zip(out[0], out[spare], strict=True))


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_bounded_rerank_returns_what_a_full_rerank_does(tmp_path, ann, monkeypatch):
    # candidates re-ranked lowest bound first, a block at a time, must give the very
    # hits (rows, raw, corrected) of re-ranking every candidate, from fewer row reads;
    # with a flat delta part (an insert) and the lifted graph among the candidates
    v = _mixture(3000, dim=DIM)
    eng = ReducedIndex.build(open_parts(tmp_path, [_write(tmp_path, v)]), rank=24, ann=ann)
    entries = eng.save(tmp_path, "000001")
    w = ReducedIndex.open(tmp_path, json.loads(json.dumps(entries)), lists=True)
    new = _mixture(150, seed=7, dim=DIM)
    r = ReducedIndex.open(tmp_path, w.append_files(tmp_path, "000002", new))
    assert r.lift is not None and len(r.parts) == 2
    q = np.concatenate([new[:20] + 0.01, _queries(v)]).astype(np.float32)
    read: list[int] = []
    blocks = type(r.vectors).stored_blocks

    def counted(self, rows, size):
        read.append(len(rows))
        return blocks(self, rows, size)

    monkeypatch.setattr(type(r.vectors), "stored_blocks", counted)
    full = r.search(q, 5, block=0, scan=0)
    n_full, read[:] = sum(read), []
    for block in (8, 32):
        assert r.search(q, 5, block=block, scan=0) == full
    assert sum(read) < 0.6 * 2 * n_full  # both block sizes together
    assert r.search(q, 5, block=8) == r.search(q, 5, block=0)  # with the sigma scan
