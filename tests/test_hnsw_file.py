"""hnswlib graph files are checked by structure, then loaded in place (issue 22).

hnswlib trusts its input, so the engine hashed every graph into a private copy before
loading it (0.63-0.73 s of a million-key open). `hnswfile.check_hnsw` checks instead
what hnswlib dereferences. Here: a valid graph passes and is loaded in place (no copy,
no hash), a changed mtime or `doctor` still hashes, and a fuzz of bytes changed in place
with the mtime put back (in subprocesses, so that a SIGSEGV is seen, not fatal) never
crashes an open + search: it is refused with MappedError or answers with valid rows.
The same fuzz without the check (hnswlib loading the damaged file) does crash.

Real hnswlib, small graphs of the lifted graph's dims (rank 256 + 5, M 48).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from reasonedit_cli.store.index import lift as LF
from reasonedit_cli.store.index import reduced as RX
from reasonedit_cli.store.index.hnswfile import HEADER, check_hnsw
from reasonedit_cli.store.index.mapped import MappedError
from reasonedit_cli.store.index.projection import DEFAULT_RANK

DIM = DEFAULT_RANK + 5  # the lifted graph's width (`ReducedIndex.build_lift`)
FETCH = 32  # the lifted graph's candidates per query (reduced.LIFT_FETCH)
REPO = Path(__file__).resolve().parents[1]


def _graph(root: Path, n: int, dim: int = DIM, m: int = LF.LIFT_M, seed: int = 0) -> dict:
    """A saved graph (what `ReducedIndex.save` writes for the lifted graph) and its entry."""
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    index = RX.build_graph(v, M=m)
    (root / "index").mkdir(parents=True, exist_ok=True)
    return RX.save_graph(index, root, "index/rlift-000001.bin")


def _check(root: Path, entry: dict, dim: int = DIM, count: int | None = None) -> int:
    fd = os.open(root / entry["path"], os.O_RDONLY)
    try:
        return check_hnsw(fd, entry["path"], dim=dim, count=count or entry["count"])
    finally:
        os.close(fd)


def _poke(path: Path, changes: list[tuple[int, int]]) -> None:
    """XOR bytes in place and put the mtime back (what size + mtime cannot see)."""
    st = os.stat(path)
    fd = os.open(path, os.O_RDWR)
    try:
        for pos, x in changes:
            b = os.pread(fd, 1, pos)
            os.pwrite(fd, bytes([b[0] ^ x]), pos)
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _put(path: Path, pos: int, fmt: str, value) -> None:
    """Write a struct value at pos in place, the mtime put back."""
    old = path.read_bytes()[pos : pos + struct.calcsize(fmt)]
    new = struct.pack(fmt, value)
    _poke(path, [(pos + i, a ^ b) for i, (a, b) in enumerate(zip(old, new, strict=True)) if a ^ b])


def test_valid_graph_loads_in_place_without_a_copy(tmp_path, monkeypatch):
    entry = _graph(tmp_path, 1500)
    assert _check(tmp_path, entry) == LF.LIFT_M
    q = np.random.default_rng(1).normal(size=(8, DIM)).astype(np.float32)
    fresh = RX.load_graph(tmp_path, entry, DIM, 1500)  # the reference answers
    fresh.set_ef(64)
    want = fresh.knn_query(q, k=FETCH)

    def no_copy(*a, **k):
        raise AssertionError("a private copy was made")

    monkeypatch.setattr(RX.tempfile, "mkstemp", no_copy)
    monkeypatch.setattr(RX.hashlib, "sha256", no_copy)
    index = RX.load_graph(tmp_path, entry, DIM, 1500)
    index.set_ef(64)
    got = index.knn_query(q, k=FETCH)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    monkeypatch.undo()
    # the writer's check of the lifted graph it keeps: no hash either
    assert RX.verify_graph_file(tmp_path, dict(entry), DIM, 1500) is False


def test_small_and_empty_graphs_pass(tmp_path):
    for n in (0, 1, 2, 40):
        root = tmp_path / str(n)
        entry = _graph(root, n, dim=7, m=4)
        assert _check(root, entry, dim=7, count=n) == 4
        assert RX.load_graph(root, entry, 7, n).get_current_count() == n


def test_a_new_mtime_or_doctor_hashes(tmp_path):
    """Bytes changed in place that the structure allows (a vector component): an open
    with the recorded mtime loads them (only the graph's answers can change); with a
    new mtime, with no recorded mtime, or with full_check (`doctor`) the sha256 is
    checked and the file refused. The writer's check (`verify_graph_file`) the same."""
    entry = _graph(tmp_path, 600)
    path = tmp_path / entry["path"]
    first_vector = HEADER.size + (2 * LF.LIFT_M * 4 + 4)  # element 0's first float
    _poke(path, [(first_vector + 1, 0x40)])
    assert RX.load_graph(tmp_path, entry, DIM, 600).get_current_count() == 600
    assert RX.verify_graph_file(tmp_path, dict(entry), DIM, 600) is False
    with pytest.raises(MappedError, match="checksum"):
        RX.load_graph(tmp_path, entry, DIM, 600, full_check=True)
    with pytest.raises(MappedError, match="checksum"):
        RX.load_graph(tmp_path, {k: v for k, v in entry.items() if k != "mtime_ns"}, DIM, 600)
    os.utime(path)  # a new mtime
    with pytest.raises(MappedError, match="checksum"):
        RX.load_graph(tmp_path, entry, DIM, 600)
    with pytest.raises(MappedError, match="checksum"):
        RX.verify_graph_file(tmp_path, dict(entry), DIM, 600)
    # undone, the new mtime hashes, matches, and the writer records it
    _poke(path, [(first_vector + 1, 0x40)])
    st = os.stat(path)
    e = dict(entry)
    assert RX.verify_graph_file(tmp_path, e, DIM, 600) is True
    assert e["mtime_ns"] == st.st_mtime_ns != entry["mtime_ns"]
    assert RX.load_graph(tmp_path, entry, DIM, 600).get_current_count() == 600  # hashed


def test_structural_damage_is_refused(tmp_path):
    """Each field hnswlib dereferences, changed to a value it would follow out of bounds
    (the mtime put back): refused with MappedError naming the file, before hnswlib."""
    n, m = 800, LF.LIFT_M
    entry = _graph(tmp_path, n, m=m)
    path = tmp_path / entry["path"]
    data = path.read_bytes()
    links0 = 2 * m * 4 + 4
    per = links0 + DIM * 4 + 8
    end0 = HEADER.size + n * per
    fields = HEADER.unpack(data[: HEADER.size])
    maxlevel, entry_point = fields[6], fields[7]
    tail = np.frombuffer(data[end0:], dtype="<u4")
    upper = int(np.flatnonzero(tail)[0])  # the first element above level 0: its size word
    cases = {
        "count": (16, "<Q", n + 1),
        "record size": (24, "<Q", per + 4),
        "label offset": (32, "<Q", per),
        "data offset": (40, "<Q", 0),
        "max level": (48, "<i", maxlevel + 1),
        "entry point": (52, "<I", n),
        "maxM0": (64, "<Q", 4 * m),
        "max elements": (8, "<Q", n - 1),
        "level-0 count": (HEADER.size + 5 * per, "<I", 2 * m + 1),
        "deleted mark": (HEADER.size + 5 * per + 2, "<B", 1),
        "level-0 id": (HEADER.size + 5 * per + 4, "<I", n + 7),
        "label": (HEADER.size + 5 * per + links0 + DIM * 4, "<Q", n),
        "link-list size": (end0 + 4 * upper, "<I", int(tail[upper]) + 4),
        "upper count": (end0 + 4 * upper + 4, "<I", m + 1),
        "upper id": (end0 + 4 * upper + 8, "<I", n),
    }
    level0_id_live = struct.unpack_from("<I", data, HEADER.size + 5 * per)[0] > 0
    assert level0_id_live and int(tail[upper + 1]) > 0  # the ids changed are in use
    for what, (pos, fmt, value) in cases.items():
        _put(path, pos, fmt, value)
        try:
            with pytest.raises(MappedError, match="rlift-000001.bin"):
                RX.load_graph(tmp_path, entry, DIM, n)
        finally:
            path.write_bytes(data)
            os.utime(path, ns=(entry["mtime_ns"], entry["mtime_ns"]))
        assert RX.load_graph(tmp_path, entry, DIM, n).get_current_count() == n, what
    # an upper-level link to a key that has no list at that level
    levels = _levels(data, n, m)
    low = int(np.flatnonzero(levels == 0)[0])
    _put(path, end0 + 4 * upper + 4, "<I", 1)
    _put(path, end0 + 4 * upper + 8, "<I", low)
    with pytest.raises(MappedError, match="without that level"):
        RX.load_graph(tmp_path, entry, DIM, n)
    path.write_bytes(data)
    # the entry point not at the top level
    assert levels[entry_point] == maxlevel
    _put(path, 52, "<I", int(np.flatnonzero(levels < maxlevel)[0]))
    with pytest.raises(MappedError, match="max level"):
        RX.load_graph(tmp_path, entry, DIM, n)
    path.write_bytes(data)
    # a label twice
    at = HEADER.size + links0 + DIM * 4
    _put(path, at + 5 * per, "<Q", struct.unpack_from("<Q", data, at + 6 * per)[0])
    with pytest.raises(MappedError, match="one per key"):
        RX.load_graph(tmp_path, entry, DIM, n)
    path.write_bytes(data)
    # and the labels the caller asked for (an hnsw part over rows a..b)
    with pytest.raises(MappedError, match="labels"):
        RX.load_graph(tmp_path, entry, DIM, n, first_label=5)


def _levels(data: bytes, n: int, m: int) -> np.ndarray:
    per = (2 * m * 4 + 4) + DIM * 4 + 8
    tail = np.frombuffer(data[HEADER.size + n * per :], dtype="<u4")
    levels, pos = np.zeros(n, dtype=np.int64), 0
    for i in range(n):
        size = int(tail[pos])
        levels[i] = size // (m * 4 + 4)
        pos += 1 + size // 4
    return levels


def test_a_search_the_graph_cannot_answer_falls_back(tmp_path, monkeypatch):
    """Damage that passes the check but leaves the lifted graph unable to answer (fewer
    than its candidates reachable) raises MappedError in the engine's search; the store
    then answers from the decoded path, as for damage found on open."""
    from test_codebook import make_edits

    from reasonedit_cli.store import Codebook

    cb = Codebook.open(tmp_path / "cb", create=True, engine_min_keys=1)
    with cb.writer() as w:
        w.add(*make_edits(0, 50))  # 150 keys: a lifted graph from 129
    fresh = Codebook.open(tmp_path / "cb")
    assert fresh.engine() is not None and fresh.engine().index.lift is not None
    q = np.random.default_rng(3).normal(size=(4, fresh.dim)).astype(np.float32)
    want = fresh.search(q, 3, method="exact")

    def cannot(*a, **k):
        raise MappedError("lifted graph: Cannot return the results in a contiguous 2D array")

    monkeypatch.setattr(RX, "lift_candidates", cannot)
    assert fresh.search(q, 3) == want and fresh.engine() is None


# -- the fuzz: open + search in subprocesses ---------------------------------------------


def _cases(data: bytes, n: int, m: int, tries: int, seed: int) -> list[dict]:
    """tries damage cases of 1-4 XORed bytes, weighted to the structure: the header,
    level-0 link counts and lists, labels, the upper-level records, anywhere."""
    rng = np.random.default_rng(seed)
    links0 = 2 * m * 4 + 4
    per = links0 + DIM * 4 + 8
    end0 = HEADER.size + n * per
    out = []
    for t in range(tries):
        changes = []
        for _ in range(int(rng.integers(1, 5))):
            where = rng.choice(6, p=[0.1, 0.1, 0.3, 0.1, 0.2, 0.2])
            rec = HEADER.size + int(rng.integers(n)) * per
            pos = [
                int(rng.integers(HEADER.size)),
                rec + int(rng.integers(4)),
                rec + int(rng.integers(links0)),
                rec + links0 + DIM * 4 + int(rng.integers(8)),
                end0 + int(rng.integers(len(data) - end0)),
                int(rng.integers(len(data))),
            ][where]
            changes.append([pos, int(rng.integers(1, 256))])
        out.append({"id": t, "changes": changes})
    return out


def _worker(mode: str, root: Path) -> None:
    """Run damage cases from stdin on root's graph: damage in place (mtime put back),
    open + search, undo; one JSON line before and after each case."""
    import resource

    import hnswlib

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a damaged size: no swap
    spec = json.loads((root / "spec.json").read_text())
    entry, n = spec["entry"], spec["entry"]["count"]
    path = root / entry["path"]
    q = np.load(root / "queries.npy")
    rows = np.arange(n, dtype=np.int64) * 3 + 1  # the lifted graph's label -> row map
    for line in sys.stdin:
        case = json.loads(line)
        print(json.dumps({"start": case["id"]}), flush=True)
        changes = [tuple(c) for c in case["changes"]]
        _poke(path, changes)
        try:
            if mode == "checked":
                index = RX.load_graph(root, entry, DIM, n)
                got = RX.lift_candidates(LF.Lift(index, rows, np.zeros(0)), q, FETCH)
            else:  # what loading in place without the check did
                index = hnswlib.Index(space="l2", dim=DIM)
                index.load_index(str(path), max_elements=n)
                index.set_ef(64)
                lab = index.knn_query(q, k=FETCH)[0].astype(np.int64)
                got = rows[lab] if lab.min() >= 0 and lab.max() < n else lab
            outcome = "ok" if got.shape == (len(q), FETCH) and np.isin(got, rows).all() else "bad"
        except MappedError:
            outcome = "refused"
        except RuntimeError as e:  # hnswlib's own refusals (raw mode)
            outcome = "refused" if mode == "raw" else f"error RuntimeError {e}"
        except Exception as e:  # noqa: BLE001 - reported, and fails the test
            outcome = f"error {type(e).__name__} {e}"
        _poke(path, list(reversed(changes)))  # XOR again: undone
        print(json.dumps({"done": case["id"], "outcome": outcome}), flush=True)


def _fuzz(root: Path, mode: str, cases: list[dict], timeout: float = 120) -> dict[int, str]:
    """Run cases in worker subprocesses; one killed by a signal marks its case a crash
    (the file is restored and a new worker takes the remaining cases)."""
    spec = json.loads((root / "spec.json").read_text())
    path = root / spec["entry"]["path"]
    good = path.read_bytes()
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    results: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while pending := [c for c in cases if c["id"] not in results]:
        path.write_bytes(good)
        os.utime(path, ns=(spec["entry"]["mtime_ns"], spec["entry"]["mtime_ns"]))
        proc = subprocess.run(
            [sys.executable, __file__, mode, str(root)],
            input="".join(json.dumps(c) + "\n" for c in pending),
            capture_output=True, text=True, env=env,
            timeout=max(1.0, deadline - time.monotonic()),
        )  # fmt: skip
        in_flight = None
        for line in proc.stdout.splitlines():
            msg = json.loads(line)
            if "start" in msg:
                in_flight = msg["start"]
            else:
                results[msg["done"]] = msg["outcome"]
                in_flight = None
        if proc.returncode != 0:
            if in_flight is None:
                raise RuntimeError(f"fuzz worker failed outside a case: {proc.stderr[-2000:]}")
            results[in_flight] = f"crash rc={proc.returncode}"
    path.write_bytes(good)
    return results


def _fuzz_root(tmp_path: Path, n: int = 3000) -> tuple[Path, bytes]:
    root = tmp_path / "g"
    entry = _graph(root, n)
    q = np.random.default_rng(2).normal(size=(6, DIM)).astype(np.float32)
    np.save(root / "queries.npy", q)
    (root / "spec.json").write_text(json.dumps({"entry": entry}))
    return root, (root / entry["path"]).read_bytes()


def _summary(results: dict[int, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results.values():
        key = r.split(" ")[0]
        out[key] = out.get(key, 0) + 1
    return out


def test_damage_fuzz_never_crashes_open_and_search(tmp_path):
    """200 cases of 1-4 bytes changed in place, the mtime put back, on a 3,000-key graph
    of the lifted graph's dims (4 MB): every open + search is refused with MappedError
    or returns rows of the graph; no worker dies."""
    root, data = _fuzz_root(tmp_path)
    results = _fuzz(root, "checked", _cases(data, 3000, LF.LIFT_M, 200, seed=0))
    summary = _summary(results)
    print("checked:", summary)
    assert set(summary) <= {"ok", "refused"}, [r for r in results.values() if r[:2] not in "okre"]
    assert summary.get("refused", 0) >= 40 and summary.get("ok", 0) >= 20  # both happen


@pytest.mark.slow
def test_damage_fuzz_crashes_hnswlib_without_the_check(tmp_path):
    """The same cases loaded by hnswlib directly (what loading in place without the
    check did): some kill the process, so the fuzz above can fail."""
    root, data = _fuzz_root(tmp_path)
    results = _fuzz(root, "raw", _cases(data, 3000, LF.LIFT_M, 200, seed=0), timeout=600)
    summary = _summary(results)
    print("raw:", summary)
    assert summary.get("crash", 0) > 0


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
