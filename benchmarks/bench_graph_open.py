"""Opening an hnswlib graph file (issue 22): the structural check and a load in place
against the hash into a private copy that every open did before.

    python benchmarks/bench_graph_open.py [--keys 50000] [--dim 261] [--m 48] \
        [--runs 5] [--dir DIR] [--json-out FILE]

Builds (or reuses, in DIR) a graph like the lifted graph of a million-key engine: 5% of
the keys (50,000), rank 256 + 5 dims, M 48, 72 MB. Then, in this one process and
interleaved so that load drift hits all alike, per run:

- check: `hnswfile.check_hnsw` alone (what the writer's `verify_graph_file` reads);
- sha256: the file's hash alone (what `verify_graph_file` did on every insert before);
- in place: `reduced.load_graph` as `ask` opens now (size, mtime, check, load in place);
- hashed: `load_graph(full_check=True)` (`doctor`, or a changed mtime: the check, then
  sha256 into a private copy, which is loaded);
- before: what `load_graph` did on every open before this change for a file up to
  256 MB (sha256 into a private copy in the temp folder, load the copy, no check);
- search: one lifted-graph query (32 candidates at ef 64) on the graph just loaded.

Prints JSON: per step the median and the runs (seconds), the file size, the load
average. The file is in the page cache (it was just written or read), as for `ask`
opening a codebook used a moment ago.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hnswlib  # noqa: E402

from reasonedit_cli.store.index import reduced as RX  # noqa: E402
from reasonedit_cli.store.index.hnswfile import check_hnsw  # noqa: E402
from reasonedit_cli.store.index.mapped import hash_fd  # noqa: E402


def before(root: Path, entry: dict, dim: int, count: int):
    """The open before #22: hash into a private copy, load the copy."""
    index = hnswlib.Index(space="l2", dim=dim)
    fd, tmp = tempfile.mkstemp(prefix="reasonedit-graph-")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, open(root / entry["path"], "rb") as src:
            while block := src.read(1 << 24):
                h.update(block)
                out.write(block)
        if h.hexdigest() != entry["sha256"]:
            raise RuntimeError("checksum")
        index.load_index(tmp, max_elements=max(count, 1))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=261)
    ap.add_argument("--m", type=int, default=48)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the graph is built or reused")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-graph-"))
    spec = root / "entry.json"
    if spec.exists():
        entry = json.loads(spec.read_text())
    else:
        v = np.random.default_rng(0).normal(size=(args.keys, args.dim)).astype(np.float32)
        t = time.perf_counter()
        index = RX.build_graph(v, M=args.m)
        print(f"built in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        (root / "index").mkdir(parents=True, exist_ok=True)
        entry = RX.save_graph(index, root, "index/rlift-bench.bin")
        spec.write_text(json.dumps(entry))
    n, dim = entry["count"], args.dim
    q = np.random.default_rng(1).normal(size=(1, dim)).astype(np.float32)
    times: dict[str, list[float]] = {}

    def check() -> None:
        fd = os.open(root / entry["path"], os.O_RDONLY)
        try:
            check_hnsw(fd, entry["path"], dim=dim, count=n)
        finally:
            os.close(fd)

    def sha256() -> None:
        fd = os.open(root / entry["path"], os.O_RDONLY)
        try:
            assert hash_fd(fd) == entry["sha256"]
        finally:
            os.close(fd)

    steps = {
        "check": check,
        "sha256": sha256,
        "in place": lambda: RX.load_graph(root, entry, dim, n),
        "hashed": lambda: RX.load_graph(root, entry, dim, n, full_check=True),
        "before": lambda: before(root, entry, dim, n),
    }
    check()  # warm: the file in the page cache, numpy's first calls
    for _ in range(args.runs):
        for name, step in steps.items():
            t = time.perf_counter()
            got = step()
            times.setdefault(name, []).append(time.perf_counter() - t)
            if name == "in place":
                assert got is not None
                got.set_ef(64)
                t = time.perf_counter()
                got.knn_query(q, k=32)
                times.setdefault("search", []).append(time.perf_counter() - t)
    out = {
        "bytes": entry["bytes"],
        "keys": n,
        "dim": dim,
        "runs": args.runs,
        "loadavg": os.getloadavg(),
        "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "runs_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
