"""Full-width codebook benchmark (before issue 22): build, search, insert, open at 10k-1M keys.

Synthetic keys of the real width (512 = bundled demo VLM hidden 128 + MiniLM 384) drawn
from a Gaussian mixture with clusters of varying spread, so that hubness is realistic.
Every codebook is a real one on disk, built and queried through `reasonedit_cli.store`.

Subcommands (each prints medians and ratios measured in the same run):

    python benchmarks/bench_retrieval_fullwidth.py build  --n 100000 --dir /tmp/cb100k
    python benchmarks/bench_retrieval_fullwidth.py search --dir /tmp/cb100k [--fetch 100:128]
    python benchmarks/bench_retrieval_fullwidth.py tau    --dir /tmp/cb100k
    python benchmarks/bench_retrieval_fullwidth.py sigma  --dir /tmp/cb100k --sample 20000
    python benchmarks/bench_retrieval_fullwidth.py insert --dir /tmp/cb100k --edits 200,1000
    python benchmarks/bench_retrieval_fullwidth.py open   --dir /tmp/cb100k
    python benchmarks/bench_retrieval_fullwidth.py all    --sizes 10000,100000 --workdir /tmp/bench

`search` compares the codebook's ANN path (hnswlib + the lifted graph of large-sigma keys
+ exact re-rank by corrected distance; `--fetch F:EF:SCAN[:LIFT]` sweeps SEARCH_FETCH,
SEARCH_EF and SEARCH_SIGMA_SCAN, 0 = no sigma bound, and LIFT 0 turns the lifted graph off)
with the reference approach (the published ReasonEdit code brute-forces its codebook:
here numpy float32 distances to every key, divided by sigma); recall@5 is measured
against exact corrected-distance search. `insert` appends batches of edits x 5 keys to
hard-linked scratch copies of the codebook (every codebook file is immutable, so a
hard-link copy is a safe scratch codebook): cold (a fresh process opens the codebook and
adds one batch) and warm (a second batch in the same process), with the derived index
appended as deltas, against the full rewrite of every derived file per commit (the
previous behaviour, reproduced by compaction thresholds of 0) in the same run. `open`
opens the codebook in a fresh process as `ask` does and reports wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM = 512  # bundled demo VLM hidden size 128 + MiniLM 384
KEYS_PER_EDIT = 5
SHA = "b" * 64


def mixture(n: int, seed: int, dim: int = DIM, chunk: int = 100_000) -> np.ndarray:
    """n keys from a Gaussian mixture: n/100 clusters, log-normal spreads (hubs appear)."""
    rng = np.random.default_rng(1234)  # the same mixture for every seed
    n_clusters = max(10, n // 100)
    centers = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    spread = np.exp(rng.normal(-1.0, 0.35, size=n_clusters)).astype(np.float32)
    weights = rng.dirichlet(np.full(n_clusters, 2.0))
    out = np.empty((n, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        c = rng.choice(n_clusters, size=stop - start, p=weights)
        noise = rng.standard_normal(size=(stop - start, dim), dtype=np.float32)
        out[start:stop] = centers[c] + noise * spread[c, None]
    return out


def records(vecs: np.ndarray, first_edit: int, tag: str = "k"):
    from reasonedit_cli.store import EditRecord, KeyRecord

    n_edits = len(vecs) // KEYS_PER_EDIT
    edits = [
        EditRecord(f"{tag}{first_edit + i}", SHA, "q", "a", [], None, "bench")
        for i in range(n_edits)
    ]
    keys = [
        KeyRecord(
            f"{tag}{first_edit + i // KEYS_PER_EDIT}",
            "sentence",
            f"v{i}",
            f"t{i}",
            SHA,
            None,
            vecs[i],
        )
        for i in range(n_edits * KEYS_PER_EDIT)
    ]
    return edits, keys


def cmd_build(args: argparse.Namespace) -> dict:
    from reasonedit_cli.store import Codebook

    d = Path(args.dir)
    if d.exists():
        shutil.rmtree(d)
    t0 = time.perf_counter()
    vecs = mixture(args.n, seed=0)
    edits, keys = records(vecs, 0)
    t1 = time.perf_counter()
    cb = Codebook.open(d, create=True)
    with cb.writer(lock_timeout=60) as w:
        w.add(edits, keys)
    t2 = time.perf_counter()
    files = cb.manifest["derived"]["files"]
    sizes = {k: v["bytes"] for k, v in files.items()}
    seg_bytes = sum(s["bytes"] for s in cb.manifest["segments"])
    out = {
        "keys": cb.n_keys,
        "generate_s": t1 - t0,
        "build_commit_s": t2 - t1,
        "segment_bytes": seg_bytes,
        "derived_bytes": sizes,
        "tau": cb.tau,
    }
    print(json.dumps(out, indent=2), flush=True)
    return out


def _queries(cb, n_q: int, seed: int = 7) -> np.ndarray:
    """Half near-duplicates of stored keys (paraphrased edits), half fresh mixture draws."""
    rng = np.random.default_rng(seed)
    v = cb.vectors()
    near = v[rng.choice(len(v), n_q // 2, replace=False)]
    near = near + rng.normal(scale=0.05, size=near.shape).astype(np.float32)
    fresh = mixture(n_q - n_q // 2, seed=seed + 1000)
    return np.concatenate([near, fresh]).astype(np.float32)


def _exact_topk(v, v_sq, sigma, q, k: int, shortlist: int = 64):
    """Ground truth: corrected distances to every key (float32 GEMM), exact float64 re-rank."""
    from reasonedit_cli import retrieval as R

    sq = v_sq[None, :] - 2.0 * (q @ v.T) + np.einsum("ij,ij->i", q, q)[:, None]
    np.maximum(sq, 0, out=sq)
    corr = np.sqrt(sq) / sigma[None, :].astype(np.float32)
    cand = np.argpartition(corr, shortlist, axis=1)[:, :shortlist]
    out = []
    for i in range(len(q)):
        rows = cand[i]
        c = R.direct_l2(q[i], v[rows]) / sigma[rows]
        out.append(rows[np.lexsort((rows, c))[:k]].tolist())
    return out


def _reference_query(v, v_sq, sigma32, q1, k: int):
    """The reference approach for one query: brute force over all keys, numpy float32."""
    sq = v_sq - 2.0 * (v @ q1) + float(q1 @ q1)
    np.maximum(sq, 0, out=sq)
    corr = np.sqrt(sq) / sigma32
    top = np.argpartition(corr, k)[:k]
    return top[np.argsort(corr[top])]


def cmd_search(args: argparse.Namespace) -> dict:
    from reasonedit_cli import store as C
    from reasonedit_cli.store.index import derived as DI

    cb = C.Codebook.open(args.dir)
    t0 = time.perf_counter()
    n = cb.n_keys
    v, sigma = cb.vectors(), cb.sigma()
    cb.index.graphs()
    t_load = time.perf_counter() - t0
    q = _queries(cb, args.queries)
    v_sq = np.einsum("ij,ij->i", v, v)
    truth = []
    for s in range(0, len(q), 50):
        truth += _exact_topk(v, v_sq, sigma, q[s : s + 50], 5)
    sigma32 = sigma.astype(np.float32)
    n_ref = min(len(q), args.ref_queries)
    ref_t, ref_c = [], []
    for i in range(n_ref):
        t, c = time.perf_counter(), time.process_time()
        _reference_query(v, v_sq, sigma32, q[i], 5)
        ref_t.append(time.perf_counter() - t)
        ref_c.append(time.process_time() - c)
    ref_ms = statistics.median(ref_t) * 1e3
    res = {
        "keys": n,
        "load_s": t_load,
        "queries": len(q),
        "reference_bruteforce_ms": ref_ms,
        "reference_bruteforce_cpu_ms (all threads)": statistics.median(ref_c) * 1e3,
    }
    rows = []
    saved = DI.SEARCH_FETCH, DI.SEARCH_EF, DI.SEARCH_SIGMA_SCAN
    full = cb.index
    lift = full.lift()
    specs = []
    for spec in args.fetch.split(","):
        parts = [int(x) for x in spec.split(":")]
        scan = parts[2] if len(parts) > 2 else saved[2]
        specs.append((parts[0], parts[1], scan, parts[3] if len(parts) > 3 else 1))
    # Rounds over all settings (not all rounds of one, then the next): load drift on a
    # shared machine then hits every setting alike; medians over every query of every round.
    times = {sp: [] for sp in specs}
    cpu = {sp: [] for sp in specs}
    got: dict = {}
    try:
        for _ in range(args.rounds):
            for sp in specs:
                fetch, ef, scan, use_lift = sp
                DI.SEARCH_FETCH, DI.SEARCH_EF, DI.SEARCH_SIGMA_SCAN = fetch, ef, scan
                cb.use_index(full.copy(lift=bool(use_lift)))  # fresh sigma-scan cache
                cb.search(q[:5], 5)  # warm
                hits = []
                for i in range(len(q)):
                    t, c = time.perf_counter(), time.thread_time()
                    r = cb.search(q[i], 5)[0]
                    times[sp].append(time.perf_counter() - t)
                    cpu[sp].append(time.thread_time() - c)
                    hits.append([x[0] for x in r])
                got.setdefault(sp, hits)
    finally:
        DI.SEARCH_FETCH, DI.SEARCH_EF, DI.SEARCH_SIGMA_SCAN = saved
        cb.use_index(full)
    half = len(q) // 2
    for sp in specs:
        fetch, ef, scan, use_lift = sp
        per_q = [len(set(a) & set(b)) / 5 for a, b in zip(got[sp], truth, strict=True)]
        ms = statistics.median(times[sp]) * 1e3
        rows.append(
            {
                "fetch": fetch,
                "ef": max(ef, 10, fetch),
                "sigma_scan": scan,
                "lift": lift is not None and bool(use_lift),
                "ann_ms_median": ms,
                "ann_ms_p95": float(np.percentile(times[sp], 95)) * 1e3,
                "ann_cpu_ms_median": statistics.median(cpu[sp]) * 1e3,
                "recall@5": float(np.mean(per_q)),
                "recall@5_near_duplicates": float(np.mean(per_q[:half])),
                "recall@5_fresh_queries": float(np.mean(per_q[half:])),
                "speedup_vs_reference": ref_ms / ms,
            }
        )
    res["rounds"] = args.rounds
    res["ann"] = rows
    print(json.dumps(res, indent=2), flush=True)
    return res


def cmd_tau(args: argparse.Namespace) -> dict:
    """What `retrieve` uses: the default search's hits under tau vs exact search's."""
    from reasonedit_cli import retrieval as R
    from reasonedit_cli import store as C

    cb = C.Codebook.open(args.dir)
    v, sigma, tau = cb.vectors(), cb.sigma(), cb.tau
    q = _queries(cb, args.queries)
    half = len(q) // 2
    v_sq = np.einsum("ij,ij->i", v, v)
    agree, rec = [], []
    for s in range(0, len(q), 50):
        qq = q[s : s + 50]
        sq = v_sq[None] - 2 * qq @ v.T + np.einsum("ij,ij->i", qq, qq)[:, None]
        corr = np.sqrt(np.maximum(sq, 0)) / sigma[None].astype(np.float32)
        cand = np.argpartition(corr, 64, axis=1)[:, :64]
        for i in range(len(qq)):
            rows = cand[i]
            c = R.direct_l2(qq[i], v[rows]) / sigma[rows]
            truth = {int(rows[j]) for j in np.lexsort((rows, c))[:5] if c[j] <= tau}
            got = {r for r, _, cc in cb.search(qq[i], 5)[0] if cc <= tau}
            agree.append(bool(truth) == bool(got))
            if truth:
                rec.append(len(truth & got) / len(truth))
    a = np.array(agree)
    out = {
        "keys": len(v),
        "tau": tau,
        "queries": len(q),
        "accept_reject_agreement": float(a.mean()),
        "agreement_near_duplicates": float(a[:half].mean()),
        "agreement_fresh": float(a[half:].mean()),
        "queries_with_hits_under_tau": len(rec),
        "recall_of_hits_under_tau": float(np.mean(rec)) if rec else None,
    }
    print(json.dumps(out, indent=2), flush=True)
    return out


def cmd_sigma(args: argparse.Namespace) -> dict:
    """sigma from the stored (approximate above KNN_EXACT_MAX_KEYS) lists vs exact, on a sample."""
    from reasonedit_cli import retrieval as R
    from reasonedit_cli import store as C
    from reasonedit_cli.store.index import neighbours as NB

    cb = C.Codebook.open(args.dir)
    v = cb.vectors()
    d = cb.index.lists(need_knn=True)
    rng = np.random.default_rng(3)
    rows = np.sort(rng.choice(len(v), min(args.sample, len(v)), replace=False))
    t = time.perf_counter()
    v_sq = np.einsum("ij,ij->i", v, v)
    exact = np.empty((len(rows), R.SIGMA_K))
    step = max(1, 20_000_000 // len(v))
    for s in range(0, len(rows), step):
        r = rows[s : s + step]
        sq = v_sq[None, :] - 2.0 * (v[r] @ v.T) + v_sq[r, None]
        sq[np.arange(len(r)), r] = np.inf
        part = np.argpartition(sq, R.SIGMA_K + 8, axis=1)[:, : R.SIGMA_K + 8]
        for j, row in enumerate(r):  # exact float64 distances for the shortlist
            dd = np.sort(R.direct_l2(v[row], v[part[j]]))[: R.SIGMA_K]
            exact[s + j] = dd
    t_exact = time.perf_counter() - t
    s_exact = R.sigma_from_knn(exact)
    s_got = d.sigma[rows]
    rel = np.abs(s_got - s_exact) / s_exact
    lists_recall = float(
        np.mean(
            [
                len(set(d.knn_dist[row][: R.SIGMA_K].round(4)) & set(exact[j].round(4))) / R.SIGMA_K
                for j, row in enumerate(rows)
            ]
        )
    )
    out = {
        "keys": len(v),
        "sample": len(rows),
        "approximate_lists": len(v) > NB.KNN_EXACT_MAX_KEYS,
        "sigma_rel_err_median": float(np.median(rel)),
        "sigma_rel_err_p99": float(np.percentile(rel, 99)),
        "sigma_rel_err_max": float(rel.max()),
        "sigma_exact_rows_fraction": float(np.mean(rel < 1e-6)),
        "knn30_recall": lists_recall,
        "exact_sample_s": t_exact,
    }
    print(json.dumps(out, indent=2), flush=True)
    return out


def _scratch_copy(src: Path, dst: Path) -> None:
    """A hard-linked copy: codebook files are never modified in place, only replaced."""
    if dst.exists():
        shutil.rmtree(dst)
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)


def _new_bytes(root: Path, before: set[tuple[int, int]]) -> int:
    """Bytes of the files under root that are not among `before` (device, inode)."""
    total = 0
    for p in root.rglob("*"):
        st = p.stat()
        if p.is_file() and (st.st_dev, st.st_ino) not in before:
            total += st.st_size
    return total


def _inodes(root: Path) -> set[tuple[int, int]]:
    return {(p.stat().st_dev, p.stat().st_ino) for p in root.rglob("*") if p.is_file()}


def cmd_insert_child(args: argparse.Namespace) -> dict:
    """One run in a fresh process: cold add (open + add), then a warm add, then compact."""
    from reasonedit_cli import store as C
    from reasonedit_cli.store.index import deltas as D

    if args.mode == "full":  # every commit rewrites every derived file (the old behaviour)
        D.SIGMA_DELTA_MAX = D.KNN_DELTA_MAX = D.GRAPH_DELTA_MAX = 0.0
    root = Path(args.dir)
    out: dict = {"mode": args.mode, "edits": args.edits}
    for step in ("cold", "warm"):
        before = _inodes(root)
        vecs = mixture(args.edits * KEYS_PER_EDIT, seed=args.seed + (step == "warm"))
        t0 = time.perf_counter()
        if step == "cold":
            cb = C.Codebook.open(root)
            n0 = cb.manifest["derived"]["keys"]
        edits, keys = records(vecs, 10_000_000 + args.seed * 10_000, tag=f"{step}{args.seed}-")
        with cb.writer(lock_timeout=60) as w:
            w.add(edits, keys)
        out[f"{step}_s"] = time.perf_counter() - t0
        out[f"{step}_written_MB"] = _new_bytes(root, before) / 1e6
        out[f"{step}_keys_before"] = cb.manifest["derived"]["keys"] - len(keys)
    d = cb.manifest["derived"]
    out["keys_before"], out["keys_per_batch"] = n0, len(keys)
    out["delta_files"] = {k: len(v) for k, v in d.get("deltas", {}).items()}
    if args.compact:
        before = _inodes(root)
        t0 = time.perf_counter()
        with cb.writer(lock_timeout=60) as w:
            w.compact()
        out["compact_s"] = time.perf_counter() - t0
        out["compact_written_MB"] = _new_bytes(root, before) / 1e6
    out["peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps(out), flush=True)
    return out


def cmd_insert(args: argparse.Namespace) -> dict:
    """Insert batches of `--edits` edits x 5 keys into scratch copies: delta vs full rewrite."""
    src = Path(args.dir)
    scratch = Path(args.scratch or f"{src}.scratch")
    sizes = [int(x) for x in str(args.edits).split(",")]
    modes = ["delta", "full"] if args.baseline else ["delta"]
    runs: dict[str, list[dict]] = {}
    for r in range(args.runs):  # interleaved, so load drift hits every variant alike
        for mode in modes:
            for e in sizes:
                _scratch_copy(src, scratch)
                cmd = [sys.executable, __file__, "insert-child", "--dir", str(scratch)]
                cmd += ["--edits", str(e), "--mode", mode, "--seed", str(r + 1)]
                cmd += ["--compact"] if (r == 0 and mode == "delta" and e == sizes[-1]) else []
                p = subprocess.run(cmd, check=True, capture_output=True, text=True)
                res = json.loads(p.stdout.strip().splitlines()[-1])
                print(json.dumps(res), flush=True)
                runs.setdefault(f"{mode}/{e}", []).append(res)
    shutil.rmtree(scratch, ignore_errors=True)
    med = {}
    for key, rs in runs.items():
        med[key] = {
            f: statistics.median(x[f] for x in rs)
            for f in ("cold_s", "warm_s", "cold_written_MB", "warm_written_MB", "peak_rss_GB")
        }
        med[key]["keys_per_batch"] = rs[0]["keys_per_batch"]
        med[key]["delta_files"] = rs[0]["delta_files"]
        comp = [x for x in rs if "compact_s" in x]
        if comp:
            med[key]["compact_s"] = comp[0]["compact_s"]
            med[key]["compact_written_MB"] = comp[0]["compact_written_MB"]
    out = {"keys": runs[next(iter(runs))][0]["keys_before"], "runs": args.runs, "median": med}
    big = sizes[-1]
    if args.baseline:
        out["full_rewrite / delta (warm)"] = (
            med[f"full/{big}"]["warm_s"] / med[f"delta/{big}"]["warm_s"]
        )
        out["full_rewrite / delta (cold)"] = (
            med[f"full/{big}"]["cold_s"] / med[f"delta/{big}"]["cold_s"]
        )
    if len(sizes) > 1:
        out[f"delta warm {big} / {sizes[0]} edits"] = (
            med[f"delta/{big}"]["warm_s"] / med[f"delta/{sizes[0]}"]["warm_s"]
        )
    print(json.dumps(out, indent=2), flush=True)
    return out


_OPEN_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from reasonedit_cli.store import Codebook
from reasonedit_cli.retrieval import retrieve
import numpy as np
t1 = time.perf_counter()
cb = Codebook.open(sys.argv[1])
r = retrieve(cb, np.full(cb.dim, 0.1, np.float32))
t2 = time.perf_counter()
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
print(json.dumps({"import_s": t1 - t0, "open_and_first_query_s": t2 - t1, "rss_after_bytes": rss,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def cmd_open(args: argparse.Namespace) -> dict:
    cb_dir = Path(args.dir)
    runs = []
    for _ in range(args.runs):
        p = subprocess.run(
            [sys.executable, "-c", _OPEN_CHILD, str(cb_dir)],
            check=True,
            capture_output=True,
            text=True,
        )
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    m = json.loads((cb_dir / "manifest.json").read_text())
    seg = sum(s["bytes"] for s in m["segments"] if s["kind"] == "keys")
    d = m["derived"]
    hnsw = d["files"].get("hnsw", {}).get("bytes", 0)
    hnsw += sum(e["bytes"] for e in d.get("deltas", {}).get("hnsw", []))
    n, dim = m["derived"]["keys"], m["config"]["dim"]
    raw = n * dim * 4
    peak = statistics.median(r["peak_rss_bytes"] for r in runs)
    out = {
        "keys": n,
        "open_and_first_query_s_median": statistics.median(
            r["open_and_first_query_s"] for r in runs
        ),
        "import_s_median": statistics.median(r["import_s"] for r in runs),
        "peak_rss_GB": peak / 1e9,
        "rss_after_open_GB": statistics.median(r["rss_after_bytes"] for r in runs) / 1e9,
        "raw_vectors_GB": raw / 1e9,
        "hnsw_file_GB": hnsw / 1e9,
        "key_segments_GB": seg / 1e9,
        "peak_rss / (raw vectors + hnsw file)": peak / (raw + hnsw),
        "runs": args.runs,
    }
    print(json.dumps(out, indent=2), flush=True)
    return out


def cmd_all(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report = {}
    for n in [int(x) for x in args.sizes.split(",")]:
        d = work / f"cb{n}"
        ns = argparse.Namespace(
            n=n,
            dir=str(d),
            queries=args.queries,
            ref_queries=args.ref_queries,
            fetch=args.fetch,
            sample=args.sample,
            edits=args.edits,
            runs=args.runs,
            scratch=None,
            baseline=args.baseline,
        )
        report[n] = {"build": cmd_build(ns), "search": cmd_search(ns), "sigma": cmd_sigma(ns)}
        report[n]["open"] = cmd_open(ns)
        report[n]["insert"] = cmd_insert(ns)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("build", "search", "tau", "sigma", "insert", "insert-child", "open", "all"):
        p = sub.add_parser(name)
        p.add_argument("--dir", default=None)
        p.add_argument("--n", type=int, default=10_000)
        p.add_argument("--queries", type=int, default=400)
        p.add_argument("--ref-queries", type=int, default=30)
        p.add_argument("--fetch", default="200:256:0:0,100:128:2048:0,64:64:2048:0,64:64")
        p.add_argument("--rounds", type=int, default=3, help="search: rounds over all settings")
        p.add_argument("--sample", type=int, default=20_000)
        p.add_argument("--edits", default="1000", help="edits per batch (comma list: several)")
        p.add_argument("--runs", type=int, default=3)
        p.add_argument("--sizes", default="10000,100000")
        p.add_argument("--workdir", default="/tmp/reasonedit-bench")
        p.add_argument("--json-out", default=None)
        p.add_argument("--scratch", default=None, help="insert: scratch copy (default DIR.scratch)")
        p.add_argument(
            "--baseline",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="insert: also measure the full rewrite per commit (the previous behaviour)",
        )
        p.add_argument("--mode", default="delta", choices=("delta", "full"))
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--compact", action="store_true")
    args = ap.parse_args()
    if args.cmd == "insert-child":
        args.edits = int(args.edits)
    {
        "build": cmd_build,
        "search": cmd_search,
        "tau": cmd_tau,
        "sigma": cmd_sigma,
        "insert": cmd_insert,
        "insert-child": cmd_insert_child,
        "open": cmd_open,
        "all": cmd_all,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
