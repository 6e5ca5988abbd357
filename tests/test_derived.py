"""The append-friendly derived index (issue 9): inserts write deltas (sigma and neighbour-list
patches, a small graph per commit) that replay exactly, compaction changes no result,
damaged delta files are rebuilt, and the approximate kNN path above KNN_EXACT_MAX_KEYS."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_codebook import DIM, flip_byte, make_edits

from reasonedit_cli import retrieval as R
from reasonedit_cli.errors import CodebookError
from reasonedit_cli.store import Codebook
from reasonedit_cli.store import manifest as M
from reasonedit_cli.store import writer as W
from reasonedit_cli.store.index import deltas as D
from reasonedit_cli.store.index import neighbours as NB

BATCHES = [40, 5, 7, 3, 10]  # edits per commit, 3 keys each: 120 keys, then 4 appends
HMK = 60  # hnsw from 60 keys on, so every append also gets a graph part
QUERIES = np.random.default_rng(9).normal(size=(40, DIM)).astype(np.float32)


def _thresholds(monkeypatch, value: float) -> None:
    for name in ("SIGMA_DELTA_MAX", "KNN_DELTA_MAX", "GRAPH_DELTA_MAX"):
        monkeypatch.setattr(D, name, value)
    monkeypatch.setattr(D, "GRAPH_MAX_PARTS", 1000 if value else 0)


@pytest.fixture
def keep_deltas(monkeypatch):
    """Compaction thresholds so high that every append stays a delta."""
    _thresholds(monkeypatch, 1e9)


def grow(path: Path, batches=BATCHES, hmk: int = HMK) -> Codebook:
    cb = Codebook.open(path, create=True, hnsw_min_keys=hmk)
    start = 0
    for count in batches:
        with cb.writer() as w:
            w.add(*make_edits(start, count))
        start += count
    return cb


def results(path: Path, hmk: int = HMK) -> dict:
    """What a fresh reader returns: both search paths, tau, sigma."""
    cb = Codebook.open(path, hnsw_min_keys=hmk)
    return {
        "exact": cb.search(QUERIES, 5, method="exact"),
        "hnsw": cb.search(QUERIES, 5, method="hnsw"),
        "tau": cb.tau,
        "sigma": cb.sigma(),
    }


def rows(hits) -> list[list[int]]:
    return [[r for r, _, _ in q] for q in hits]


def delta_counts(cb: Codebook) -> dict:
    return {k: len(v) for k, v in cb.manifest["derived"]["deltas"].items()}


def listed_files(cb: Codebook) -> set[str]:
    return M.derived_paths(cb.manifest)


# ---------------------------------------------------------------------------
# deltas replay exactly


def test_appends_write_deltas_that_replay_exactly(tmp_path, monkeypatch, keep_deltas):
    cb = grow(tmp_path / "delta")
    assert delta_counts(cb) == {"sigma": 4, "knn": 4, "hnsw": 4}
    base = cb.manifest["derived"]["files"]
    assert {e["rows"] for e in base.values()} == {120}  # bases from the first commit
    for e in cb.manifest["derived"]["deltas"]["hnsw"]:
        assert e["stop"] - e["start"] in (15, 21, 9, 30)
    # the writer's in-memory state is what a reader replays from the files
    d = Codebook.open(cb.path, hnsw_min_keys=HMK).index.lists(need_knn=True)
    mine = cb.index.lists(need_knn=True)  # handed over by the writer: no file read
    assert np.array_equal(d.knn_idx, mine.knn_idx)
    assert np.array_equal(d.knn_dist, mine.knn_dist)
    assert np.array_equal(d.sigma, mine.sigma)
    assert d.sigma_files is not None and d.knn_files is not None
    # ... and equals a codebook that rewrote every derived file on every commit
    _thresholds(monkeypatch, 0.0)
    full = grow(tmp_path / "full")
    assert delta_counts(full) == {"sigma": 0, "knn": 0, "hnsw": 0}
    a, b = results(cb.path), results(full.path)
    assert np.array_equal(a["sigma"], b["sigma"]) and a["tau"] == b["tau"]
    assert a["exact"] == b["exact"]
    assert rows(a["hnsw"]) == rows(a["exact"]) == rows(b["hnsw"])
    # sigma is the textbook definition, exactly as before the delta layout
    v = Codebook.open(cb.path).vectors()
    assert np.allclose(a["sigma"], R.hubness_sigma(v))


def test_only_the_batch_is_written(tmp_path, keep_deltas):
    """An append writes a segment and deltas of the batch's size, never the old files."""
    cb = grow(tmp_path / "cb", [200])
    index = tmp_path / "cb" / "index"
    before = {p.name: p.stat().st_mtime_ns for p in index.iterdir()}
    with cb.writer() as w:
        w.add(*make_edits(200, 2))  # 6 keys into 600
    after = {p.name: p.stat() for p in index.iterdir()}
    new = {n: st.st_size for n, st in after.items() if n not in before}
    assert all(after[n].st_mtime_ns == t for n, t in before.items())  # untouched
    kinds = sorted(n.split("-0")[0] for n in new)
    # from ENGINE_MIN_KEYS keys on the wide-key engine's deltas, whose sigma and list
    # patches are the store's own (no second copy, no full-width graph part), and the
    # per-key tau measurements (n x 3 floats: store/taucache.py)
    assert {"rknn-delta", "rsigma-delta", "vectors-delta", "facts-delta"} <= set(kinds)
    assert all("delta" in k or k == "tau-other" for k in kinds), kinds
    files = cb.manifest["derived"]["files"]
    assert files["knn_idx"]["path"] == cb.manifest["derived"]["engine"]["index"]["knn_idx"]["path"]
    base_bytes = sum(after[n].st_size for n in before)
    assert sum(new.values()) < 0.1 * base_bytes


def test_compaction_keeps_results_and_reopens_in_a_new_process(tmp_path, keep_deltas):
    cb = grow(tmp_path / "cb")
    before = results(cb.path)
    old_files = listed_files(cb)
    with cb.writer() as w:
        v = w.compact()
    assert cb.version == v and delta_counts(cb) == {"sigma": 0, "knn": 0, "hnsw": 0}
    assert {e["rows"] for e in cb.manifest["derived"]["files"].values()} == {195}
    after = results(cb.path)
    assert after["exact"] == before["exact"] and rows(after["hnsw"]) == rows(before["hnsw"])
    assert np.array_equal(after["sigma"], before["sigma"]) and after["tau"] == before["tau"]
    assert all((cb.path / p).exists() for p in old_files)  # the previous version's cache
    # a new process reads the compacted codebook to the same numbers
    code = (
        "import json, sys, numpy as np\n"
        "from reasonedit_cli.store import Codebook\n"
        "cb = Codebook.open(sys.argv[1], hnsw_min_keys=int(sys.argv[2]))\n"
        "q = np.asarray(json.loads(sys.stdin.read()), dtype=np.float32)\n"
        "print(json.dumps([cb.search(q, 5), cb.search(q, 5, method='exact'), cb.tau]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(cb.path), str(HMK)],
        input=json.dumps(QUERIES.tolist()),
        capture_output=True,
        text=True,
        check=True,
    )
    auto, exact, tau = json.loads(proc.stdout)
    assert [[tuple(h) for h in q] for q in exact] == before["exact"]
    assert rows(auto) == rows(before["hnsw"]) and tau == before["tau"]
    # one more commit: files only the pre-compaction version listed are collected
    with cb.writer() as w:
        w.add(*make_edits(500, 1))
    on_disk = {f"index/{p.name}" for p in (cb.path / "index").iterdir()}
    assert not (old_files - listed_files(cb)) & on_disk


def test_inserts_compact_on_their_own(tmp_path, monkeypatch):
    """Default thresholds: deltas while small against the base, folded in once they are
    not, so what readers load and a search visits stays bounded. (The store's own
    index: with the engine, from ENGINE_MIN_KEYS keys, its lists are the store's and
    it keeps no graph parts.)"""
    monkeypatch.setenv("REASONEDIT_ENGINE_MIN_KEYS", str(10**9))
    cb = grow(tmp_path / "cb", [300])  # 900 keys
    seen = []
    for i in range(12):
        with cb.writer() as w:
            w.add(*make_edits(300 + i, 1))  # 3 keys per commit
        seen.append(delta_counts(cb)["hnsw"])
    assert max(seen) == D.GRAPH_MAX_PARTS and 0 in seen[D.GRAPH_MAX_PARTS :]
    fresh = Codebook.open(cb.path, hnsw_min_keys=HMK)
    assert rows(fresh.search(QUERIES, 5)) == rows(fresh.search(QUERIES, 5, method="exact"))
    assert np.allclose(fresh.sigma(), R.hubness_sigma(fresh.vectors()))


def test_config_change_and_removal(tmp_path, keep_deltas):
    """A config change keeps the delta files as they are; a removal renumbers rows and
    writes new bases."""
    cb = grow(tmp_path / "cb")
    deltas = cb.manifest["derived"]["deltas"]
    with cb.writer() as w:
        w.set_config(percentile=60)
    assert cb.manifest["derived"]["deltas"] == deltas
    assert cb.tau == pytest.approx(Codebook.open(cb.path).tau_for(60))
    with cb.writer() as w:
        w.remove_edits(["e3", "e41", "e60"])
    assert delta_counts(cb) == {"sigma": 0, "knn": 0, "hnsw": 0}
    fresh = Codebook.open(cb.path, hnsw_min_keys=HMK)
    assert np.allclose(fresh.sigma(), R.hubness_sigma(fresh.vectors()))
    assert rows(fresh.search(QUERIES, 5)) == rows(fresh.search(QUERIES, 5, method="exact"))


# ---------------------------------------------------------------------------
# damage and crashes


@pytest.mark.parametrize("part", ["sigma", "knn", "hnsw"])
@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_damaged_delta_file_is_rebuilt_never_trusted(tmp_path, keep_deltas, part, damage):
    src = grow(tmp_path / "src")
    good = results(src.path)
    work = tmp_path / "work"
    shutil.copytree(src.path, work)
    rel = src.manifest["derived"]["deltas"][part][1]["path"]
    if damage == "flip":
        flip_byte(work / rel, (work / rel).stat().st_size - 9)
    else:
        (work / rel).unlink()
    got = results(work)  # recomputed in memory from Parquet
    assert rows(got["exact"]) == rows(good["exact"]) and rows(got["hnsw"]) == rows(good["hnsw"])
    assert np.allclose(got["sigma"], good["sigma"]) and got["tau"] == pytest.approx(good["tau"])
    rep = Codebook.open(work, hnsw_min_keys=HMK).check(images=False)
    assert not rep.ok and any(rel in p for p in rep.problems), rep.problems
    # a writer after the damage writes a new base for that part instead of appending
    cb = Codebook.open(work, hnsw_min_keys=HMK)
    with cb.writer() as w:
        w.add(*make_edits(900, 2))
    assert delta_counts(cb)[part] == 0
    assert Codebook.open(work, hnsw_min_keys=HMK).check(images=False).ok
    # doctor --repair on another copy: rebuilds and folds every delta in
    shutil.rmtree(work)
    shutil.copytree(src.path, work)
    (work / rel).write_bytes(b"")
    rep = Codebook.open(work, hnsw_min_keys=HMK).check(repair=True, images=False)
    assert rep.ok and rep.repaired and any("compacted" in n for n in rep.notes)
    fixed = Codebook.open(work, hnsw_min_keys=HMK)
    assert delta_counts(fixed) == {"sigma": 0, "knn": 0, "hnsw": 0}
    assert fixed.check(images=False).ok
    assert rows(results(work)["exact"]) == rows(good["exact"])


def test_crafted_delta_entries_are_not_trusted(tmp_path, keep_deltas):
    """Entries with a valid checksum but impossible numbers: recomputed, or a clear error
    for paths outside the codebook; never an exception from numpy or hnswlib."""
    src = grow(tmp_path / "src")
    good = results(src.path)
    m0 = json.loads((src.path / "manifest.json").read_text())
    cases = [
        ("sigma", 0, "keys", 10**12),
        ("sigma", 1, "rows", -1),
        ("knn", 0, "entries", 10**15),
        ("knn", 2, "keys", "x"),
        ("hnsw", 0, "start", 3),
        ("hnsw", 1, "stop", 10**9),
        ("hnsw", 0, "sha256", "0" * 64),
    ]
    for part, i, field, bad in cases:
        work = tmp_path / "work"
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(src.path, work)
        m = json.loads(json.dumps(m0))
        m["derived"]["deltas"][part][i][field] = bad
        (work / "manifest.json").write_bytes(M.manifest_bytes(m))
        got = results(work)
        assert rows(got["exact"]) == rows(good["exact"]), (part, field)
        assert not Codebook.open(work, hnsw_min_keys=HMK).check(images=False).ok
    m = json.loads(json.dumps(m0))
    m["derived"]["deltas"]["knn"][0]["path"] = "../../etc/passwd"
    (work / "manifest.json").write_bytes(M.manifest_bytes(m))
    with pytest.raises(CodebookError, match="malformed"):
        Codebook.open(work)


def test_crash_before_the_manifest_leaves_the_old_version(tmp_path, keep_deltas, monkeypatch):
    cb = grow(tmp_path / "cb")
    good = results(cb.path)
    version = cb.version

    def no_space(manifest: dict) -> bytes:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(W, "manifest_bytes", no_space)  # the writer's commit
        with pytest.raises(CodebookError, match="commit of version"):
            with cb.writer() as w:
                w.add(*make_edits(700, 4))
    orphans = {f"index/{p.name}" for p in (cb.path / "index").iterdir()} - listed_files(cb)
    assert not orphans  # the failed commit removed the delta files it wrote (issue 23)
    fresh = Codebook.open(cb.path, hnsw_min_keys=HMK)
    assert fresh.version == version and fresh.check(images=False).ok
    assert results(cb.path)["exact"] == good["exact"]
    cb = Codebook.open(cb.path, hnsw_min_keys=HMK)
    with cb.writer() as w:  # the next writer reuses the version number and collects them
        w.add(*make_edits(700, 4))
    on_disk = {f"index/{p.name}" for p in (cb.path / "index").iterdir()}
    assert on_disk <= listed_files(cb) | M.derived_paths(
        json.loads((cb.path / "versions" / f"v{version:06d}.json").read_text())
    )
    assert Codebook.open(cb.path, hnsw_min_keys=HMK).check(images=False).ok


# ---------------------------------------------------------------------------
# neighbour lists from the graph (above KNN_EXACT_MAX_KEYS)


@pytest.mark.parametrize("deltas", [False, True])
def test_ann_knn_path_agrees_with_exact(tmp_path, monkeypatch, deltas):
    """Above KNN_EXACT_MAX_KEYS the lists come from the hnsw parts (build, then appends
    merged through reverse neighbours): close to exact lists, exact where it matters."""
    monkeypatch.setattr(NB, "KNN_EXACT_MAX_KEYS", 150)
    if deltas:
        _thresholds(monkeypatch, 1e9)
    calls = []
    real = NB.append_knn_ann
    monkeypatch.setattr(NB, "append_knn_ann", lambda *a, **k: calls.append(1) or real(*a, **k))
    cb = grow(tmp_path / "cb", [100, 10, 15, 20, 5])  # 300 keys, then 4 appends: 450
    assert len(calls) == 4  # every append took the approximate path
    if deltas:
        assert delta_counts(cb) == {"sigma": 4, "knn": 4, "hnsw": 4}
    fresh = Codebook.open(cb.path, hnsw_min_keys=HMK)
    d = fresh.index.lists(need_knn=True)
    assert np.array_equal(d.knn_dist, cb.index.lists(need_knn=True).knn_dist)  # replayed exactly
    v = fresh.vectors()
    ex_idx, ex_dist = R.knn_lists(v, R.SIGMA_K)
    recall = np.mean([len(set(a) & set(b)) / R.SIGMA_K for a, b in zip(d.knn_idx, ex_idx)])
    assert recall >= 0.95
    exact_sigma = R.sigma_from_knn(ex_dist)
    rel = np.abs(d.sigma - exact_sigma) / exact_sigma
    assert np.median(rel) < 1e-5 and np.percentile(rel, 90) < 0.02 and rel.max() < 0.2
    # search still agrees with exact corrected search over the stored sigma
    approx, exact = fresh.search(QUERIES, 5), fresh.search(QUERIES, 5, method="exact")
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows(approx), rows(exact))])
    assert overlap >= 0.95
    # and the patches reproduce what a full rewrite would have stored
    with cb.writer() as w:
        w.compact()
    again = Codebook.open(cb.path, hnsw_min_keys=HMK).index.lists(need_knn=True)
    assert np.array_equal(again.knn_idx, d.knn_idx) and np.array_equal(again.sigma, d.sigma)


def test_knn_patch_round_trip():
    """derived.knn_patch / apply_knn_patch: exact for exact and ANN-shaped appends."""
    rng = np.random.default_rng(4)
    v = rng.normal(size=(90, 6)).astype(np.float32)
    for n_old in (1, 20, 31, 60, 89):
        oi, od = R.knn_lists(v[:n_old])
        ni, nd = NB.update_knn_lists(v[:n_old], oi, od, v[n_old:])
        app = D.knn_append_from_full(oi, od, ni, nd)
        patch = D.knn_patch(app, len(oi), oi[app.rows], od[app.rows])
        assert patch is not None
        idx = np.full((90, R.SIGMA_K), -1, np.int64)
        dist = np.full((90, R.SIGMA_K), np.inf)
        idx[:n_old], dist[:n_old] = oi, od
        D.apply_knn_patch(idx, dist, n_old, patch, 90)
        assert np.array_equal(idx, ni) and np.array_equal(dist, nd)
        bad = patch.copy()
        bad["idx"][0] = 500
        with pytest.raises(ValueError):
            D.apply_knn_patch(idx.copy(), dist.copy(), n_old, bad, 90)
