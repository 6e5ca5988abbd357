"""The codebook directory: commits, versions, derived cache, damage, lock."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import socket
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from reasonedit_cli import retrieval as R
from reasonedit_cli.errors import CodebookError, CodebookLockedError
from reasonedit_cli.store import (
    FORMAT_VERSION,
    Codebook,
    CodebookWriter,
    EditRecord,
    KeyRecord,
    key_id_for,
)

DIM = 16


def make_edits(start: int, count: int, dim: int = DIM, seed: int = 0, keys_per_edit: int = 3):
    rng = np.random.default_rng(seed + start)
    edits, keys = [], []
    for i in range(start, start + count):
        sha = hashlib.sha256(f"image {i}".encode()).hexdigest()
        reasoning = [f"Fact {i}.{j}." for j in range(keys_per_edit - 1)]
        edits.append(
            EditRecord(
                f"e{i}",
                sha,
                f"q{i}?",
                f"a{i}",
                reasoning,
                [None] + [[1, 2, 3, 4]] * (keys_per_edit - 2),
                "test",
            )
        )
        keys.append(
            KeyRecord(
                f"e{i}",
                "answer",
                f"The answer to 'q{i}?' is a{i}.",
                f"q{i}?",
                sha,
                None,
                rng.normal(size=dim).astype(np.float32),
                0.5,
            )
        )
        for j, s in enumerate(reasoning):
            kind, box = ("patch", (1, 2, 3, 4)) if j else ("sentence", None)
            keys.append(
                KeyRecord(f"e{i}", kind, s, s, sha, box, rng.normal(size=dim).astype(np.float32))
            )
    return edits, keys


def new_codebook(tmp_path, n: int = 10, **kw) -> Codebook:
    cb = Codebook.open(tmp_path / "cb", create=True, **kw)
    if n:
        with cb.writer() as w:
            w.add(*make_edits(0, n))
    return cb


def flip_byte(path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x55
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------
# round trip and versions


def test_create_empty_and_reopen(tmp_path):
    cb = Codebook.open(tmp_path / "cb", create=True)
    assert cb.version == 0 and cb.n_keys == 0 and cb.tau is None and cb.edit_ids() == set()
    assert cb.search(np.zeros((2, DIM), np.float32)) == [[], []]
    m = json.loads((tmp_path / "cb" / "manifest.json").read_text())
    assert m["format"] == "reasonedit-codebook" and m["format_version"] == FORMAT_VERSION
    assert Codebook.open(tmp_path / "cb").version == 0


def test_round_trip(tmp_path):
    edits, keys = make_edits(0, 5)
    cb = Codebook.open(tmp_path / "cb", create=True)
    with cb.writer() as w:
        sha = w.store_image(b"\x89PNG fake", ".PNG")
        assert w.store_image(b"\x89PNG fake", "png") == sha  # idempotent
        res = w.add(edits, keys)
        w.set_config(layer=3, w=1.5)
    assert res.version == 1 and res.added_keys == 15 and len(res.added_edits) == 5
    cb2 = Codebook.open(tmp_path / "cb")
    assert cb2.version == 2  # the config change committed when the writer closed
    assert cb2.config == {"dim": DIM, "layer": 3, "w": 1.5}
    got = {e.edit_id: e for e in cb2.edits()}
    assert got["e1"].question == "q1?" and got["e1"].reasoning == edits[1].reasoning
    assert got["e1"].boxes == [None, [1, 2, 3, 4]] and got["e1"].added is not None
    t = cb2.keys_table()
    assert t.num_rows == 15
    assert np.array_equal(cb2.vectors(), np.stack([k.vector for k in keys]))
    assert t.column("key_id").to_pylist() == [k.key_id for k in keys]
    assert t.column("box").to_pylist()[2] == [1, 2, 3, 4]
    assert t.column("radius").to_pylist()[0] == 0.5 and t.column("radius").to_pylist()[1] is None
    assert cb2.read_image_bytes(sha) == b"\x89PNG fake"
    assert cb2.image_path(sha).name == f"{sha}.png"
    # the Parquet files carry their schema version
    seg = next(s for s in cb2.manifest["segments"] if s["kind"] == "keys")
    meta = pq.read_schema(tmp_path / "cb" / seg["path"]).metadata
    assert meta[b"reasonedit.schema_version"] == b"2"


def test_key_ids_are_stable():
    a = key_id_for("e", "patch", "v", "t", (1, 2, 3, 4), "0" * 64)
    assert a == key_id_for("e", "patch", "v", "t", [1, 2, 3, 4], "0" * 64)
    assert a != key_id_for("e", "patch", "v", "t", (1, 2, 3, 5), "0" * 64)


def test_add_is_idempotent(tmp_path):
    cb = new_codebook(tmp_path, 4)
    v = cb.version
    with cb.writer() as w:
        res = w.add(*make_edits(0, 4))
    assert res.added_edits == [] and len(res.skipped_edits) == 4 and res.skipped_keys == 12
    assert cb.version == v and cb.n_keys == 12
    with cb.writer() as w:  # partly new: only the new ones are stored
        res = w.add(*make_edits(2, 4))
    assert res.added_edits == ["e4", "e5"] and cb.n_keys == 18 and cb.version == v + 1


def test_versions_increase_and_are_kept(tmp_path):
    cb = new_codebook(tmp_path, 0)
    seen = [cb.version]
    for i in range(3):
        with cb.writer() as w:
            seen.append(w.add(*make_edits(i * 2, 2)).version)
    assert seen == [0, 1, 2, 3]
    kept = sorted(p.name for p in (tmp_path / "cb" / "versions").iterdir())
    assert kept == [f"v{i:06d}.json" for i in range(4)]
    assert Codebook.open(tmp_path / "cb").version == 3


def test_remove_and_restore(tmp_path):
    cb = new_codebook(tmp_path, 6)
    v_before = cb.version
    with cb.writer() as w:
        w.remove_edits(["e2", "e4", "nope"])
    cb2 = Codebook.open(tmp_path / "cb")
    assert cb2.edit_ids() == {"e0", "e1", "e3", "e5"} and cb2.n_keys == 12
    assert "e2" not in set(cb2.keys_table().column("edit_id").to_pylist())
    assert np.allclose(cb2.sigma(), R.hubness_sigma(cb2.vectors()))
    with cb2.writer() as w:
        v = w.restore(v_before)
    assert v == v_before + 2
    cb3 = Codebook.open(tmp_path / "cb")
    assert cb3.edit_ids() == {f"e{i}" for i in range(6)} and cb3.n_keys == 18
    with pytest.raises(CodebookError, match="version 99"):
        with cb3.writer() as w:
            w.restore(99)


def test_readding_a_removed_edit(tmp_path):
    cb = new_codebook(tmp_path, 3)
    with cb.writer() as w:
        w.remove_edits(["e1"])
        edits, keys = make_edits(1, 1, seed=5)  # same id, new vectors
        res = w.add(edits, keys)
    assert res.added_edits == ["e1"]
    assert cb.n_keys == 9 and cb.edit_ids() == {"e0", "e1", "e2"}
    rows = [i for i, e in enumerate(cb.keys_table().column("edit_id").to_pylist()) if e == "e1"]
    assert np.array_equal(cb.vectors()[rows], np.stack([k.vector for k in keys]))


def test_dimension_is_fixed(tmp_path):
    cb = new_codebook(tmp_path, 2)
    with pytest.raises(CodebookError, match="16-d"):
        with cb.writer() as w:
            w.add(*make_edits(10, 1, dim=8))
    with pytest.raises(CodebookError, match="dimension"):
        cb.search(np.zeros(8, np.float32))


def test_replace_all_keys_changes_dim(tmp_path):
    cb = new_codebook(tmp_path, 4)
    old_segments = {s["path"] for s in cb.manifest["segments"]}
    _, keys = make_edits(0, 4, dim=8, seed=9)
    with cb.writer() as w:
        w.set_config(layer=7)
        w.replace_all_keys(keys)
    cb2 = Codebook.open(tmp_path / "cb")
    assert cb2.config["dim"] == 8 and cb2.config["layer"] == 7
    assert cb2.vectors().shape == (12, 8) and len(cb2.edit_ids()) == 4
    assert all((tmp_path / "cb" / p).exists() for p in old_segments)  # kept for old versions
    assert np.allclose(cb2.sigma(), R.hubness_sigma(cb2.vectors()))


# ---------------------------------------------------------------------------
# derived data: sigma, tau, index


def test_sigma_incremental_equals_scratch(tmp_path):
    cb = new_codebook(tmp_path, 0)
    for start, count in [(0, 3), (3, 5), (8, 20), (28, 1)]:
        with cb.writer() as w:
            w.add(*make_edits(start, count))
        fresh = Codebook.open(tmp_path / "cb")
        assert np.allclose(fresh.sigma(), R.hubness_sigma(fresh.vectors()))
        assert fresh.index.lists().knn_idx is None  # loaded from the derived file
    with cb.writer() as w:
        w.remove_edits([f"e{i}" for i in range(0, 29, 3)])
    fresh = Codebook.open(tmp_path / "cb")
    assert np.allclose(fresh.sigma(), R.hubness_sigma(fresh.vectors()))


def test_tau_definition_and_percentile_config(tmp_path):
    cb = new_codebook(tmp_path, 20)
    v = cb.vectors()
    sigma = R.hubness_sigma(v)
    _, knn_dist = R.knn_lists(v, R.SIGMA_K)
    # default rule: percentile of each key's corrected distance to its nearest key
    nn = knn_dist[:, 0] / sigma
    assert cb.tau_rule == "nearest"
    assert cb.tau == pytest.approx(np.percentile(nn, 25))
    with cb.writer() as w:
        w.set_config(percentile=60)
    cb2 = Codebook.open(tmp_path / "cb")
    assert cb2.manifest["derived"]["percentile"] == 60
    assert cb2.tau == pytest.approx(np.percentile(nn, 60))
    # docs/method.md#retrieval read literally: all key-key pairs
    with cb2.writer() as w:
        w.set_config(tau_rule="all")
    cb3 = Codebook.open(tmp_path / "cb")
    assert cb3.manifest["derived"]["tau_rule"] == "all"
    assert cb3.tau == pytest.approx(R.rejection_threshold(v, sigma, 60, 20))


def test_hnsw_equals_brute_force_small(tmp_path):
    cb = new_codebook(tmp_path, 40)  # 120 keys
    q = np.random.default_rng(9).normal(size=(30, DIM)).astype(np.float32)
    exact = cb.search(q, k=5, method="exact")
    approx = cb.search(q, k=5, method="hnsw")
    assert [[r for r, _, _ in x] for x in exact] == [[r for r, _, _ in x] for x in approx]
    for x, y in zip(exact, approx, strict=True):
        assert np.allclose([c for _, _, c in x], [c for _, _, c in y])
    # reference: brute-force corrected ranking computed independently
    raw = R.pairwise_l2(q, cb.vectors())
    ref = np.argsort(raw / R.hubness_sigma(cb.vectors())[None, :], axis=1)[:, :5]
    assert [[r for r, _, _ in x] for x in exact] == ref.tolist()


def test_hnsw_index_is_persisted_and_verified(tmp_path):
    cb = new_codebook(tmp_path, 20, hnsw_min_keys=30)  # 60 keys: index persisted
    files = cb.manifest["derived"]["files"]
    assert "hnsw" in files and (tmp_path / "cb" / files["hnsw"]["path"]).exists()
    with cb.writer() as w:  # incremental add into the index
        w.add(*make_edits(20, 5))
    fresh = Codebook.open(tmp_path / "cb", hnsw_min_keys=30)
    assert fresh.index.load_graphs(rebuild=False)[0] is not None
    q = fresh.vectors()[::7] + 0.01
    assert fresh.search(q, 5, method="hnsw") == fresh.search(q, 5, method="exact")
    hnsw_file = tmp_path / "cb" / fresh.manifest["derived"]["files"]["hnsw"]["path"]
    flip_byte(hnsw_file, 100)
    damaged = Codebook.open(tmp_path / "cb", hnsw_min_keys=30)
    assert damaged.index.load_graphs(rebuild=False)[0] is None  # refused before hnswlib sees it
    assert damaged.search(q, 5) == fresh.search(q, 5, method="exact")  # rebuilt in memory
    hnsw_file.write_bytes(hnsw_file.read_bytes()[:50])  # truncated
    assert Codebook.open(tmp_path / "cb", hnsw_min_keys=30).search(q, 5)[0][0][0] == 0
    rep = damaged.check()
    assert not rep.ok and any("hnsw" in p for p in rep.problems)


def test_hnsw_recall_20k(tmp_path):
    rng = np.random.default_rng(0)
    n, dim = 20000, 24
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    sha = "a" * 64
    edits = [EditRecord(f"e{i}", sha, "q", "a", [], None, "t") for i in range(n // 4)]
    keys = [
        KeyRecord(f"e{i // 4}", "sentence", f"v{i}", f"t{i}", sha, None, vecs[i]) for i in range(n)
    ]
    cb = Codebook.open(tmp_path / "big", create=True)
    with cb.writer() as w:
        w.add(edits, keys)
    # from ENGINE_MIN_KEYS keys the wide-key engine answers (store/engine.py)
    assert "engine" in cb.manifest["derived"]
    assert cb.manifest["derived"]["tau_pairs"] == R.SAMPLE_PAIRS
    q = (
        vecs[rng.choice(n, 200, replace=False)]
        + rng.normal(size=(200, dim)).astype(np.float32) * 0.3
    )
    fresh = Codebook.open(tmp_path / "big")
    approx = fresh.search(q, 5)
    exact = fresh.search(q, 5, method="exact")
    recall = np.mean(
        [
            len({r for r, _, _ in a} & {r for r, _, _ in e}) / 5
            for a, e in zip(approx, exact, strict=True)
        ]
    )
    assert recall >= 0.95


# ---------------------------------------------------------------------------
# damage and foreign directories


def test_damaged_manifest(tmp_path):
    cb = new_codebook(tmp_path, 3)
    m = tmp_path / "cb" / "manifest.json"
    good = m.read_bytes()
    flip_byte(m, good.index(b'"version"') + 12)  # still JSON-ish: the checksum catches it
    with pytest.raises(CodebookError, match="manifest.json"):
        Codebook.open(cb.path)
    m.write_bytes(good[: len(good) // 2])
    with pytest.raises(CodebookError, match="manifest.json is damaged"):
        Codebook.open(cb.path)
    m.write_bytes(b"")
    with pytest.raises(CodebookError, match="manifest.json"):
        Codebook.open(cb.path)


def test_damaged_segment_is_reported(tmp_path):
    cb = new_codebook(tmp_path, 3)
    seg = next(s for s in cb.manifest["segments"] if s["kind"] == "keys")
    flip_byte(tmp_path / "cb" / seg["path"])
    cb2 = Codebook.open(tmp_path / "cb")
    with pytest.raises(CodebookError, match=f"{seg['path']} is damaged"):
        cb2.keys_table()
    rep = cb2.check(repair=True)
    assert not rep.ok and rep.repaired == []
    (tmp_path / "cb" / seg["path"]).unlink()
    with pytest.raises(CodebookError, match="is missing"):
        Codebook.open(tmp_path / "cb").search(np.zeros(DIM, np.float32))


def test_damaged_sigma_is_rebuilt_and_repaired(tmp_path):
    cb = new_codebook(tmp_path, 10)
    expected = cb.sigma().copy()
    files = cb.manifest["derived"]["files"]
    sig = tmp_path / "cb" / files["sigma"]["path"]
    flip_byte(sig, len(sig.read_bytes()) - 3)
    cb2 = Codebook.open(tmp_path / "cb")
    assert np.allclose(cb2.sigma(), expected)
    (tmp_path / "cb" / files["knn_idx"]["path"]).write_bytes(b"\x93NUMPY garbage")
    rep = Codebook.open(tmp_path / "cb").check()
    assert not rep.ok and len(rep.problems) >= 2
    rep = Codebook.open(tmp_path / "cb").check(repair=True)
    assert rep.repaired and not rep.problems or all("image" in p for p in rep.problems)
    rep = Codebook.open(tmp_path / "cb").check(images=False)
    assert rep.ok, rep.problems
    # a writer after damage persists good derived files again
    sig = (
        tmp_path
        / "cb"
        / Codebook.open(tmp_path / "cb").manifest["derived"]["files"]["sigma"]["path"]
    )
    sig.unlink()
    cb3 = Codebook.open(tmp_path / "cb")
    with cb3.writer() as w:
        w.add(*make_edits(10, 1))
    assert Codebook.open(tmp_path / "cb").check(images=False).ok


def test_damaged_image_is_detected(tmp_path):
    cb = new_codebook(tmp_path, 0)
    with cb.writer() as w:
        sha = w.store_image(b"image bytes", "jpg")
    p = cb.image_path(sha)
    p.write_bytes(b"other bytes")
    with pytest.raises(CodebookError, match="damaged"):
        cb.read_image_bytes(sha)
    with cb.writer() as w:  # storing it again heals it
        w.store_image(b"image bytes", "jpg")
    assert cb.read_image_bytes(sha) == b"image bytes"


def test_foreign_and_future_directories(tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "todo.txt").write_text("x")
    with pytest.raises(CodebookError, match="not a reasonedit codebook"):
        Codebook.open(d, create=True)
    with pytest.raises(CodebookError, match="no codebook"):
        Codebook.open(tmp_path / "missing")
    cb = new_codebook(tmp_path, 1)
    m = json.loads((cb.path / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (cb.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CodebookError, match="upgrade reasonedit"):
        Codebook.open(cb.path)
    (tmp_path / "other.json").mkdir()
    (tmp_path / "other.json" / "manifest.json").write_text('{"format": "lance"}')
    with pytest.raises(CodebookError, match="not a reasonedit codebook"):
        Codebook.open(tmp_path / "other.json")


def test_manifest_paths_must_stay_inside(tmp_path):
    cb = new_codebook(tmp_path, 1)
    from reasonedit_cli.store.manifest import manifest_bytes

    m = dict(cb.manifest)
    m["segments"] = [dict(m["segments"][0], path="../../etc/passwd")]
    (cb.path / "manifest.json").write_bytes(manifest_bytes(m))
    with pytest.raises(CodebookError, match="malformed"):
        Codebook.open(cb.path)


def test_leftovers_of_crashed_writer_are_cleaned(tmp_path):
    cb = new_codebook(tmp_path, 2)
    root = tmp_path / "cb"
    junk = [
        root / "manifest.json.tmp-999-abc",
        root / "segments" / "keys-000009-x.parquet.tmp-1",
        root / "index" / "sigma-000009.npy.tmp-2",
    ]
    for j in junk:
        j.write_bytes(b"partial")
    time.sleep(0.01)
    orphan = root / "segments" / "keys-000003-deadbeef.parquet"  # newer, unreferenced
    orphan.write_bytes(b"PAR1")
    future = root / "versions" / "v000099.json"
    future.write_text("{}")
    assert Codebook.open(root).check().notes  # reported as a note
    with cb.writer() as w:
        w.add(*make_edits(2, 1))
    assert not any(j.exists() for j in junk) and not orphan.exists() and not future.exists()
    assert Codebook.open(root).check(images=False).ok


# ---------------------------------------------------------------------------
# the lock


def _hold_lock(path, ready, release):
    cb = Codebook.open(path)
    with cb.writer():
        ready.set()
        release.wait(20)


def _ctx():
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def test_second_writer_times_out_and_readers_do_not_block(tmp_path):
    cb = new_codebook(tmp_path, 3)
    ctx = _ctx()
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(cb.path, ready, release))
    proc.start()
    try:
        assert ready.wait(20)
        t0 = time.monotonic()
        with pytest.raises(CodebookLockedError, match=f"pid {proc.pid}.*--lock-timeout"):
            with cb.writer(lock_timeout=0.3):
                pass
        assert 0.25 < time.monotonic() - t0 < 3
        reader = Codebook.open(cb.path)  # reading while locked works
        assert reader.n_keys == 9 and reader.search(reader.vectors()[:1], 1)[0][0][0] == 0
    finally:
        release.set()
        proc.join(20)
    with cb.writer(lock_timeout=1) as w:  # released
        assert isinstance(w, CodebookWriter)
    assert not (cb.path / "LOCK").exists()


def test_stale_lock_is_broken(tmp_path):
    cb = new_codebook(tmp_path, 1)
    proc = _ctx().Process(target=os.getpid)
    proc.start()
    proc.join()
    info = {"pid": proc.pid, "host": socket.gethostname(), "started": "2020-01-01"}
    (cb.path / "LOCK").write_text(json.dumps(info))
    with cb.writer(lock_timeout=0.5) as w:
        w.add(*make_edits(1, 1))
    assert cb.version == 2 and not (cb.path / "LOCK").exists()
    # a lock from another host is never broken automatically
    (cb.path / "LOCK").write_text(json.dumps(dict(info, host="elsewhere")))
    with pytest.raises(CodebookLockedError, match="elsewhere"):
        with cb.writer(lock_timeout=0.2):
            pass
