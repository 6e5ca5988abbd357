"""The store's insert at scale (issue 22): `CodebookWriter.add` (what `add-edit` commits)
into a big codebook, wall time and peak RSS, each run a fresh process on a hard-linked
scratch copy (a codebook's files are never modified in place, so the copy is safe).

    python benchmarks/bench_store_insert.py --dir CB --keys 3,5001 --runs 3 \
        [--baseline-code DIR] [--timeout 600] [--json-out FILE]

CB is a codebook, e.g. `scripts/make_synthetic_codebook.py --n 100000 --config-from
WIDE --dir CB` (docs/codebook-format.md#wide-keys-in-the-store). A batch of --keys keys
is 1/3 as many edits of three keys each (an answer key, a sentence, a patch: the shape of
a real edit), random vectors of the codebook's width; 3 keys is one edit. With
--baseline-code the same runs use the code at DIR as well (e.g. a `git archive` of the
commit before), interleaved with this tree's, so that load drift hits both alike. A run
past --timeout is stopped and reported with the peak RSS it had reached. Prints JSON:
per code and batch, median wall, the runs, peak RSS, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import hashlib, json, sys, time
t0 = time.perf_counter()
import numpy as np
from reasonedit_cli.store import Codebook
from reasonedit_cli.store.format import EditRecord, KeyRecord
path, n_keys, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cb = Codebook.open(path)
dim = cb.dim
rng = np.random.default_rng(seed)
edits, keys = [], []
for i in range(max(1, n_keys // 3)):
    sha = hashlib.sha256(f"bench image {seed} {i}".encode()).hexdigest()
    eid = f"bench-{seed}-{i}"
    edits.append(EditRecord(eid, sha, f"q {i}?", f"a {i}", [f"fact {i}.0", f"fact {i}.1"],
                            [None, [1, 2, 3, 4]], "bench"))
    for j, (kind, box) in enumerate((("answer", None), ("sentence", None),
                                     ("patch", (1, 2, 3, 4)))):
        v = rng.normal(size=dim).astype(np.float32)
        keys.append(KeyRecord(eid, kind, f"fact {i}.{j}", f"q {i}?", sha, box, v, 0.5))
t1 = time.perf_counter()
with cb.writer() as w:
    res = w.add(edits, keys)
t2 = time.perf_counter()
hwm = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print(json.dumps({"keys_added": res.added_keys, "keys_after": cb.n_keys,
                  "add_s": t2 - t1, "process_s": t2 - t0, "peak_rss_mb": int(hwm) / 1024}))
"""


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_one(code: Path, cb: Path, keys: int, seed: int, timeout: float) -> dict:
    scratch = Path(f"{cb}.insert-scratch")
    if scratch.exists():
        shutil.rmtree(scratch)
    subprocess.run(["cp", "-al", str(cb), str(scratch)], check=True)
    env = dict(os.environ, PYTHONPATH=str(code))
    cmd = [sys.executable, "-c", _CHILD, str(scratch), str(keys), str(seed)]
    # cwd: `python -c` puts it first on sys.path, before PYTHONPATH
    p = subprocess.Popen(
        cmd, env=env, cwd=str(code), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    t0, peak = time.perf_counter(), 0
    while p.poll() is None:
        peak = max(peak, _status_kb(p.pid, "VmHWM"))
        if time.perf_counter() - t0 > timeout:
            p.kill()
            p.wait()
            shutil.rmtree(scratch, ignore_errors=True)
            return {"timed_out_s": timeout, "peak_rss_mb_at_stop": peak / 1024}
        time.sleep(0.2)
    out, err = p.communicate()
    shutil.rmtree(scratch, ignore_errors=True)
    if p.returncode != 0:
        return {"error": err.strip().splitlines()[-1:] or ["?"]}
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="the codebook to insert into (not modified)")
    ap.add_argument("--keys", default="3,5001", help="keys per batch (3 per edit)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline-code", default=None, help="a tree of the code to compare")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    codes = {"this": ROOT}
    if args.baseline_code:
        codes["baseline"] = Path(args.baseline_code).resolve()
    sizes = [int(x) for x in args.keys.split(",")]
    res: dict[str, dict[int, list[dict]]] = {c: {s: [] for s in sizes} for c in codes}
    for r in range(args.runs):
        for s in sizes:
            for name, code in codes.items():
                got = run_one(code, Path(args.dir), s, 1000 + r, args.timeout)
                got["load_avg"] = [round(x, 2) for x in os.getloadavg()]
                res[name][s].append(got)
                print(json.dumps({"code": name, "keys": s, **got}), flush=True)
    summary: dict = {"dir": str(args.dir), "runs": args.runs, "results": {}}
    for name, by in res.items():
        for s, runs in by.items():
            ok = [x for x in runs if "add_s" in x]
            summary["results"][f"{name}/{s}"] = {
                "add_s_median": statistics.median(x["add_s"] for x in ok) if ok else None,
                "process_s_median": statistics.median(x["process_s"] for x in ok) if ok else None,
                "peak_rss_mb": max(
                    (x.get("peak_rss_mb") or x.get("peak_rss_mb_at_stop", 0)) for x in runs
                ),  # fmt: skip
                "timed_out": sum("timed_out_s" in x for x in runs),
                "runs": runs,
            }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
