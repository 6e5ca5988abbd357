"""Retrieval at scale and real-VLM width (issue 22): build, open, search, insert.

Synthetic keys from a Gaussian mixture (n/100 clusters, log-normal spreads, Dirichlet
weights: realistic hubness) at widths 512 (bundled demo VLM 128 + MiniLM 384), 1,408
(LLaVA-1.5-7B projector input 1,024 + 384) and 4,480 (a 7-8B language layer 4,096 + 384),
indexed by the reduced-projection engine (`reasonedit_cli/store/index/`: memory-mapped
full vectors in IVF order, an IVF index (or hnswlib, `--ann hnsw`) over a PCA projection +
residual norm, lifted graph of large-sigma keys, exact re-rank by corrected distance).
Every subcommand prints JSON.

    python benchmarks/bench_retrieval.py build  --n 1000000 --dim 4480 --dir DIR
    python benchmarks/bench_retrieval.py open   --dir DIR --runs 5 --json
    python benchmarks/bench_retrieval.py search --dir DIR [--fetch 64,128,256] [--queries 400]
    python benchmarks/bench_retrieval.py insert --dir DIR --keys 1000,5000 [--runs 2]
    python benchmarks/bench_retrieval.py all    --sizes 10000,100000 --dims 512,1408,4480 \
        --workdir DIR --json-out results.json

- build streams the keys in chunks into the mapped vector file, then fits, projects and
  builds the graph, neighbour lists, sigma and lifted graph; it reports its peak RSS.
- open runs `--runs` fresh processes, each importing the engine, opening DIR (mapped
  vectors, reduced index, sigma, lifted graph, and the facts file: the keys table
  without vectors, memory-mapped Arrow) and answering one query with its hits' facts
  (what `ask` pays for retrieval); prints {"median_s", "peak_rss_mb"}.
- search: median / p95 latency of one query at a time and recall@5 against exact search
  (corrected distance over every key, streamed), for each `--fetch`, in rounds over the
  settings (load drift hits all alike), and the reference brute force (what the
  published ReasonEdit code does: numpy float32 distances to every key divided by sigma)
  in the same run.
- insert adds `--keys` keys to hard-linked scratch copies (files are never modified in
  place, so a hard-link copy is a safe scratch copy), each run a fresh process: open with
  the neighbour lists, then the insert (delta vector file, graph part, list and sigma
  patches), timed apart.

The machine this runs on is shared: every result records the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ENGINE = "engine.json"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _rss_anon_mb() -> float:
    """Anonymous (not file-backed) resident memory now: mapped file pages are page cache
    the kernel can drop, anonymous ones are what the process really holds."""
    try:
        return int(Path("/proc/self/status").read_text().split("RssAnon:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return 0.0


def _peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM; ru_maxrss would count the pages of the
    parent it was forked from)."""
    try:
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Mixture:
    """The keys' distribution: the same clusters for every seed (seed picks the draws)."""

    def __init__(self, n: int, dim: int):
        rng = np.random.default_rng(1234)
        self.k = max(10, n // 100)
        self.dim = dim
        self.centers = rng.normal(size=(self.k, dim)).astype(np.float32)
        self.spread = np.exp(rng.normal(-1.0, 0.35, size=self.k)).astype(np.float32)
        self.weights = rng.dirichlet(np.full(self.k, 2.0))

    def chunks(self, count: int, seed: int, chunk: int = 20_000):
        rng = np.random.default_rng(seed)
        for start in range(0, count, chunk):
            m = min(chunk, count - start)
            c = rng.choice(self.k, size=m, p=self.weights)
            noise = rng.standard_normal(size=(m, self.dim), dtype=np.float32)
            noise *= self.spread[c, None]
            noise += self.centers[c]
            yield noise

    def draw(self, count: int, seed: int) -> np.ndarray:
        return np.concatenate(list(self.chunks(count, seed)))


def _bytes(entry) -> int:
    """Bytes of the files an entry (or list / dict of entries) names."""
    if isinstance(entry, list):
        return sum(_bytes(x) for x in entry)
    if isinstance(entry, dict):
        own = entry.get("bytes", 0) if "path" in entry else 0
        return own + sum(_bytes(v) for v in entry.values() if isinstance(v, dict | list))
    return 0


def _engine_json(d: Path) -> dict:
    """{"entries", "facts", "build"} of a directory `build` made, or of a codebook (its
    manifest's `derived.engine`: open / search / insert then measure the engine files of
    e.g. a `scripts/make_synthetic_codebook.py` codebook; insert works on a hard-linked
    scratch copy, the codebook is never written)."""
    if (d / ENGINE).exists() or not (d / "manifest.json").exists():
        return json.loads((d / ENGINE).read_text())
    man = json.loads((d / "manifest.json").read_text())
    eng = (man.get("derived") or {}).get("engine")
    if not eng:
        raise SystemExit(f"{d}: a codebook without engine files")
    idx = eng["index"]
    build = {"keys": int(idx["keys"]), "dim": int(idx["dim"]), "codebook": True,
             "dtype": idx["vectors"][0].get("dtype", "float32")}  # fmt: skip
    return {"entries": idx, "facts": eng["facts"][0], "build": build}


def _perturbed(eng, count: int, seed: int, scale: float) -> np.ndarray:
    """Stored keys plus Gaussian noise of `scale` x the keys' per-dimension spread: the
    queries and new keys for a codebook (whose distribution the bench's Mixture is not);
    at the bench Mixture's scale 0.05 is its near-duplicates, 0.5 a fresh draw from a
    key's cluster (spreads 0.2-0.7)."""
    rng = np.random.default_rng(seed)
    spread = eng.vectors.take(np.sort(rng.choice(eng.n, min(eng.n, 2000), replace=False))).std(0)
    rows = rng.choice(eng.n, count, replace=count > eng.n)
    out = eng.vectors.take(np.sort(rows))
    out += rng.standard_normal(out.shape, dtype=np.float32) * (scale * spread)
    return out


def _open(d: Path, lists: bool = False):
    from reasonedit_cli.store.index.reduced import ReducedIndex

    return ReducedIndex.open(d, _engine_json(d)["entries"], lists=lists)


# -- build -------------------------------------------------------------------------------


def _facts_table(n: int):
    """The synthetic keys' facts (the keys table minus `vector`), 5 keys per edit."""
    import pyarrow as pa

    rows = np.arange(n)
    return pa.table(
        {
            "key_id": pa.array(np.char.zfill(rows.astype(str), 64).tolist()),
            "edit_id": pa.array([f"k{i // 5}" for i in range(n)]),
            "kind": pa.array(["sentence"] * n),
            "value": pa.array([f"fact {i}" for i in range(n)]),
            "merged": pa.array([[]] * n, pa.list_(pa.struct([("value", pa.string()),
                                                             ("edit_id", pa.string())]))),
            "key_text": pa.array([f"t{i}" for i in range(n)]),
            "box": pa.array([None] * n, pa.list_(pa.int32())),
            "image_sha256": pa.array(["b" * 64] * n),
            "radius": pa.array(np.full(n, 1.0, np.float32)),
        }
    )  # fmt: skip


def cmd_facts(args: argparse.Namespace) -> dict:
    """Write the facts file of DIR (build does this; for directories built before)."""
    from reasonedit_cli.store.index.facts import write_facts

    d = Path(args.dir)
    meta = _engine_json(d)
    t0 = time.perf_counter()
    rel = "index/facts-000001.arrow"
    meta["facts"] = dict(write_facts(d / rel, _facts_table(meta["build"]["keys"])), path=rel)
    (d / ENGINE).write_text(json.dumps(meta, indent=2))
    out = {"facts_s": time.perf_counter() - t0, "facts_bytes": meta["facts"]["bytes"]}
    print(json.dumps(out), flush=True)
    return out


def _list_stats(eng) -> dict:
    """IVF list sizes: count, mean, max, and sum of squares (what the neighbour lists
    cost: each list against its nearest lists at full width)."""
    from reasonedit_cli.store.index.ivf import IVFPart

    part = eng.parts[0]
    if not isinstance(part, IVFPart):
        return {}
    s = np.diff(part.offsets).astype(np.int64)
    return {"ivf_lists": int(len(s)), "ivf_list_mean": float(s.mean()),
            "ivf_list_max": int(s.max()), "ivf_list_sum_sq": int((s**2).sum())}  # fmt: skip


def cmd_build(args: argparse.Namespace) -> dict:
    from reasonedit_cli.store.index.mapped import open_parts, write_vectors
    from reasonedit_cli.store.index.reduced import ReducedIndex

    d = Path(args.dir)
    reuse = args.reuse and (d / "vectors.json").exists()
    if reuse:  # keep the input keys (and their entry) of an earlier build of DIR
        keep = {"vectors.json", json.loads((d / "vectors.json").read_text())["path"]}
        for p in sorted(d.rglob("*"), reverse=True):
            rel_p = str(p.relative_to(d))
            if p.is_file() and rel_p not in keep:
                p.unlink()
    elif d.exists():
        shutil.rmtree(d)
    (d / "index").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    mix = Mixture(args.n, args.dim)
    # the keys in row order (what a store derives from its Parquet segments); the index
    # writes its own copy in IVF order and this one is deleted unless --keep-input
    rel = "input/vectors.npy"
    (d / "input").mkdir(exist_ok=True)
    if reuse:
        ent = json.loads((d / "vectors.json").read_text())
    else:
        ent = write_vectors(d / rel, mix.chunks(args.n, seed=0), args.n, args.dim, args.dtype)
        ent["path"] = rel
        (d / "vectors.json").write_text(json.dumps(ent))  # for `build --reuse`
    phases["generate_and_write_vectors_s"] = time.perf_counter() - t0
    last = [time.perf_counter()]
    anon = [0.0]

    def log(what, *_):
        anon[0] = max(anon[0], _rss_anon_mb())
        now = time.perf_counter()
        phases[f"{what}_s"] = now - last[0]
        last[0] = now
        print(
            f"[build] {what} {now - t0:.1f}s peak rss {_peak_rss_mb():.0f} MB, anon now "
            f"{_rss_anon_mb():.0f} MB",
            flush=True,
        )

    vectors = open_parts(d, [ent])
    eng = ReducedIndex.build(
        vectors, rank=args.rank, ann=args.ann, lists=args.lists, log=log,
        root=d, tag="000001", dtype=args.dtype, balanced=not args.unbalanced,
    )  # fmt: skip
    t1 = time.perf_counter()
    entries = eng.save(d, "000001", dtype=args.dtype)
    phases["save_s"] = time.perf_counter() - t1
    if not (args.keep_input or args.reuse) and entries["vectors"][0]["path"] != rel:
        (d / rel).unlink()
        (d / "vectors.json").unlink()
    total = time.perf_counter() - t0
    sizes = {k: _bytes(v) for k, v in entries.items() if _bytes(v)}
    out = {
        "keys": args.n,
        "dim": args.dim,
        "dtype": args.dtype,
        "rank": eng.projection.rank,
        "ann": args.ann,
        "lists": args.lists,
        "balanced": not args.unbalanced,
        **_list_stats(eng),
        "build_s": total,
        "phases": phases,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_anon_mb_sampled": anon[0],
        "file_bytes": sizes,
        "sigma_median": float(np.median(eng.sigma)),
        "load_avg": _load(),
    }
    (d / ENGINE).write_text(json.dumps({"entries": entries, "build": out}, indent=2))
    out.update(cmd_facts(args))
    print(json.dumps(out, indent=2), flush=True)
    return out


# -- open --------------------------------------------------------------------------------

_OPEN_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import numpy as np
from reasonedit_cli.store.index.reduced import ReducedIndex
from reasonedit_cli.store.index.facts import open_facts, row_facts
from pathlib import Path
t1 = time.perf_counter()
d = Path(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from bench_retrieval import _engine_json  # engine.json, or a codebook's manifest
meta = _engine_json(d)
eng = ReducedIndex.open(d, meta["entries"])
facts = open_facts(d / meta["facts"]["path"], meta["facts"]) if "facts" in meta else None
t2 = time.perf_counter()
r = eng.search(np.full(eng.dim, 0.1, np.float32), 5)
hits = [row_facts(facts, row) for row, _, _ in r[0]] if facts is not None else []
t3 = time.perf_counter()
hwm = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print(json.dumps({"import_s": t1 - t0, "open_s": t2 - t1, "first_search_s": t3 - t2,
                  "open_and_search_s": t3 - t1, "hits": len(hits), "peak_rss_mb": int(hwm) / 1024}))
"""


def cmd_open(args: argparse.Namespace) -> dict:
    runs = []
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for _ in range(args.runs):
        p = subprocess.run(
            [sys.executable, "-c", _OPEN_CHILD, str(args.dir), str(Path(__file__).parent)],
            check=True, capture_output=True, text=True, env=env,
        )  # fmt: skip
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out = {
        "median_s": med["open_and_search_s"],
        "peak_rss_mb": med["peak_rss_mb"],
        "open_s": med["open_s"],
        "first_search_s": med["first_search_s"],
        "import_s": med["import_s"],
        "runs": args.runs,
        "load_avg": _load(),
    }
    if args.json:
        print(json.dumps({"median_s": out["median_s"], "peak_rss_mb": out["peak_rss_mb"]}))
    else:
        print(json.dumps(out, indent=2), flush=True)
    return out


# -- search ------------------------------------------------------------------------------


def _queries(eng, n_q: int, build: dict, seed: int = 7) -> np.ndarray:
    """Half near-duplicates of stored keys (a paraphrased edit), half fresh draws."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(eng.n, n_q // 2, replace=False))
    if build.get("codebook"):
        near = _perturbed(eng, n_q // 2, seed, 0.05)
        fresh = _perturbed(eng, n_q - n_q // 2, seed + 1000, 0.5)
        return np.concatenate([near, fresh]).astype(np.float32)
    near = eng.vectors.take(rows)
    near += rng.normal(scale=0.05, size=near.shape).astype(np.float32)
    fresh = Mixture(build["keys"], build["dim"]).draw(n_q - n_q // 2, seed=seed + 1000)
    return np.concatenate([near, fresh]).astype(np.float32)


def _truth(eng, q: np.ndarray, k: int = 5, shortlist: int = 64, vectors=None) -> list[list[int]]:
    """Exact top-k by corrected distance: every key, streamed (float32 GEMM shortlist,
    then the engine's exact distance on the shortlist)."""
    from reasonedit_cli.store.index.reduced import sq_distances

    vectors = vectors or eng.vectors  # another copy of the keys (float32 for a float16 index)
    q_sq = np.einsum("ij,ij->i", q, q)
    best_c = np.full((len(q), 0), np.inf, np.float32)
    best_r = np.zeros((len(q), 0), np.int64)
    for rows, block in vectors.row_chunks(16_384):  # file order (sequential reads)
        b_sq = np.einsum("ij,ij->i", block, block)
        sq = b_sq[None, :] - 2.0 * (q @ block.T) + q_sq[:, None]
        np.maximum(sq, 0, out=sq)
        corr = np.sqrt(sq) / eng.sigma[rows][None, :].astype(np.float32)
        cc = np.concatenate([best_c, corr], axis=1)
        rr = np.concatenate([best_r, np.broadcast_to(rows, corr.shape)], 1)
        m = min(shortlist, cc.shape[1])
        part = np.argpartition(cc, m - 1, axis=1)[:, :m]
        best_c, best_r = np.take_along_axis(cc, part, 1), np.take_along_axis(rr, part, 1)
    out = []
    for i in range(len(q)):
        rows = best_r[i]
        c = np.sqrt(sq_distances(q[i], vectors.take(rows))) / eng.sigma[rows]
        out.append(rows[np.lexsort((rows, c))[:k]].tolist())
    return out


def _reference(v: np.ndarray, v_sq: np.ndarray, sigma32: np.ndarray, q1: np.ndarray, k: int = 5):
    """The reference approach for one query: numpy float32 distances to every key (one
    GEMV over the mapped vectors, squared norms precomputed) divided by sigma."""
    if isinstance(v, np.ndarray):
        dots = v @ q1
    else:  # a MappedArray: in 65,536-row blocks, each read ahead (the mapping is "random")
        dots = np.empty(v.rows, np.float32)
        for s in range(0, v.rows, 65_536):
            v.advise(s, s + 65_536, "willneed")
            dots[s : s + 65_536] = v.array[s : s + 65_536] @ q1
    sq = v_sq - 2.0 * dots + float(q1 @ q1)
    np.maximum(sq, 0, out=sq)
    corr = np.sqrt(sq) / sigma32
    top = np.argpartition(corr, k)[:k]
    return top[np.argsort(corr[top])]


def cmd_search(args: argparse.Namespace) -> dict:
    from reasonedit_cli.store.index.ivf import NPROBE
    from reasonedit_cli.store.index.reduced import (
        CORRECTED_FETCH,
        LIFT_FETCH,
        RERANK_BLOCK,
        SIGMA_SCAN,
    )

    d = Path(args.dir)
    build = _engine_json(d)["build"]
    t0 = time.perf_counter()
    eng = _open(d)
    t_open = time.perf_counter() - t0
    q = _queries(eng, args.queries, build)
    t0 = time.perf_counter()
    other = None
    if args.truth_vectors:  # exact search (and the reference) over float32 copies of the keys
        from reasonedit_cli.store.index.mapped import open_parts

        td = Path(args.truth_vectors)
        other = open_parts(td, [json.loads((td / "vectors.json").read_text())])
    cache = d / f"truth-{args.queries}.json"  # exact results of these queries (sweeps)
    if cache.exists() and json.loads(cache.read_text())["keys"] == eng.n:
        truth = json.loads(cache.read_text())["truth"]
    else:
        truth = _truth(eng, q, vectors=other)
        if not build.get("codebook"):  # nothing is written into a codebook
            cache.write_text(json.dumps({"keys": eng.n, "truth": truth}))
    t_truth = time.perf_counter() - t0
    eng.vectors.release()
    n_ref = args.ref_queries or max(3, min(30, int(3e9 // (eng.n * eng.dim))))
    # the reference scans the mapped array itself in file order (one base part, a fresh
    # build), with squared norms and sigma in that order
    ref_vectors = other or eng.vectors
    v = ref_vectors.mapped[0] if ref_vectors.mapped[0] is not None else ref_vectors.parts[0]
    chunks = [(r, np.einsum("ij,ij->i", b, b)) for r, b in ref_vectors.row_chunks()]
    v_sq = np.concatenate([c[1] for c in chunks])
    sigma32 = eng.sigma[np.concatenate([c[0] for c in chunks])].astype(np.float32)
    # threaded BLAS stalls on a loaded machine, one thread is slower on a quiet one: the
    # reference is the faster of the two (the conservative baseline for a speedup)
    from threadpoolctl import threadpool_limits

    ref_runs: dict[str, list[float]] = {"threaded": [], "one_thread": []}
    for i in range(n_ref):
        for mode, times in ref_runs.items():
            with threadpool_limits(1) if mode == "one_thread" else contextlib.nullcontext():
                t = time.perf_counter()
                _reference(v, v_sq, sigma32, q[i])
                times.append(time.perf_counter() - t)
    ref_vectors.release()
    ref_by_mode = {m: statistics.median(t) * 1e3 for m, t in ref_runs.items()}
    ref_ms = min(ref_by_mode.values())
    from reasonedit_cli.store.index import mapped as MP

    convs = {"numpy": [False], "torch": [True], "both": [False, True]}[args.convert]
    if True in convs:  # float16 rows converted by torch, as in `ask` (the model loads it)
        import torch  # noqa: F401

    # fetch:nprobe:lift_fetch:scan:corrected:block (lift_fetch 0 = no lifted graph), conversion
    specs = []
    for s in args.fetch.split(","):
        parts = [int(x) for x in s.split(":")]
        parts += [NPROBE, LIFT_FETCH][len(parts) - 1 :]
        parts += [SIGMA_SCAN][len(parts) - 3 :]
        parts += [CORRECTED_FETCH][len(parts) - 4 :]
        parts += [RERANK_BLOCK][len(parts) - 5 :]
        specs += [(*parts[:6], c) for c in convs]
    times: dict = {sp: [] for sp in specs}
    cpu: dict = {sp: [] for sp in specs}  # this process's CPU time: what load cannot inflate
    by_round: dict = {sp: [] for sp in specs}  # round 1 meets a colder page cache
    got: dict = {}
    for _ in range(args.rounds):
        for sp in specs:
            n_before = len(times[sp])
            kw = {"fetch": sp[0], "nprobe": sp[1], "lift_fetch": sp[2], "use_lift": sp[2] > 0}
            kw["scan"], kw["corrected"], kw["block"] = sp[3], sp[4], sp[5]
            MP.TORCH_CONVERSION = sp[6]
            eng.search(q[:3], 5, **kw)  # warm
            hits = []
            for i in range(len(q)):
                c, t = time.process_time(), time.perf_counter()
                r = eng.search(q[i], 5, **kw)[0]
                times[sp].append(time.perf_counter() - t)
                cpu[sp].append(time.process_time() - c)
                hits.append([x[0] for x in r])
            got.setdefault(sp, hits)
            by_round[sp].append(statistics.median(times[sp][n_before:]) * 1e3)
    half = len(q) // 2
    rows = []
    for sp in specs:
        per_q = [len(set(a) & set(b)) / 5 for a, b in zip(got[sp], truth, strict=True)]
        ms = statistics.median(times[sp]) * 1e3
        rows.append(
            {
                "fetch": sp[0],
                "nprobe": sp[1],
                "lift_fetch": sp[2] if eng.lift is not None else 0,
                "sigma_scan": sp[3],
                "corrected_fetch": sp[4],
                "rerank_block": sp[5],
                "conversion": "torch" if sp[6] else "numpy",
                "ms_median": ms,
                "ms_p95": float(np.percentile(times[sp], 95)) * 1e3,
                "ms_median_by_round": by_round[sp],
                "cpu_ms_median": statistics.median(cpu[sp]) * 1e3,
                "recall@5": float(np.mean(per_q)),
                "recall@5_near_duplicates": float(np.mean(per_q[:half])),
                "recall@5_fresh": float(np.mean(per_q[half:])),
                "speedup_vs_reference": ref_ms / ms,
            }
        )
    out = {
        "keys": eng.n,
        "dim": eng.dim,
        "dtype": build.get("dtype"),
        "open_s": t_open,
        "queries": len(q),
        "rounds": args.rounds,
        "exact_truth_s": t_truth,
        "reference_bruteforce_ms": ref_ms,
        "reference_bruteforce_ms_by_blas": ref_by_mode,
        "reference_queries": n_ref,
        "ann": rows,
        "peak_rss_mb": _peak_rss_mb(),
        "load_avg": _load(),
    }
    print(json.dumps(out, indent=2), flush=True)
    return out


# -- sigma against exact -----------------------------------------------------------------


def cmd_sigma(args: argparse.Namespace) -> dict:
    """The engine's sigma (from its IVF neighbour lists) against exact sigma (each
    sampled key's 30 nearest over every key, streamed) for `--queries` sampled keys."""
    from reasonedit_cli import retrieval as R
    from reasonedit_cli.store.index.reduced import sq_distances

    d = Path(args.dir)
    eng = _open(d)
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(eng.n, min(eng.n, args.queries), replace=False))
    q = eng.vectors.take(rows)
    t0 = time.perf_counter()
    k, short = R.SIGMA_K, 96
    q_sq = np.einsum("ij,ij->i", q, q)
    best_d = np.full((len(q), 0), np.inf, np.float32)
    best_r = np.zeros((len(q), 0), np.int64)
    for r, block in eng.vectors.row_chunks(16_384):
        sq = np.einsum("ij,ij->i", block, block)[None, :] - 2.0 * (q @ block.T) + q_sq[:, None]
        sq[rows[:, None] == r[None, :]] = np.inf  # not itself
        cd = np.concatenate([best_d, sq], axis=1)
        cr = np.concatenate([best_r, np.broadcast_to(r, sq.shape)], 1)
        m = min(short, cd.shape[1])
        part = np.argpartition(cd, m - 1, axis=1)[:, :m]
        best_d, best_r = np.take_along_axis(cd, part, 1), np.take_along_axis(cr, part, 1)
    exact = np.empty((len(q), k))
    for i in range(len(q)):  # the engine's distance on the shortlist
        exact[i] = np.sort(np.sqrt(sq_distances(q[i], eng.vectors.take(best_r[i]))))[:k]
    ex = R.sigma_raw_from_knn(exact)
    rel = (eng.sigma_raw[rows] - ex) / ex
    out = {
        "keys": eng.n,
        "dim": eng.dim,
        "sampled": len(rows),
        "sigma_rel_error_median": float(np.median(np.abs(rel))),
        "sigma_rel_error_p95": float(np.percentile(np.abs(rel), 95)),
        "sigma_rel_error_max": float(np.abs(rel).max()),
        "share_within_1e-4": float(np.mean(np.abs(rel) < 1e-4)),
        "share_within_1pct": float(np.mean(np.abs(rel) < 1e-2)),
        "sigma_too_large_share": float(np.mean(rel > 1e-4)),
        "exact_s": time.perf_counter() - t0,
        "load_avg": _load(),
    }
    print(json.dumps(out, indent=2), flush=True)
    return out


# -- insert ------------------------------------------------------------------------------


def cmd_insert_child(args: argparse.Namespace) -> dict:
    d = Path(args.dir)
    build = _engine_json(d)["build"]
    t0 = time.perf_counter()
    eng = _open(d, lists=True)
    t_open = time.perf_counter() - t0
    if build.get("codebook"):
        new = _perturbed(eng, int(args.keys), 100 + args.seed, 0.5)
    else:
        new = Mixture(build["keys"], build["dim"]).draw(int(args.keys), seed=100 + args.seed)
    c0, t0 = time.process_time(), time.perf_counter()
    entries = eng.append_files(d, f"{args.seed:06d}", new, dtype=build.get("dtype", "float32"))
    t_ins, c_ins = time.perf_counter() - t0, time.process_time() - c0
    meta = _engine_json(d)
    (d / ENGINE).write_text(json.dumps({"entries": entries, "facts": meta.get("facts"),
                                        "build": build}))  # fmt: skip
    out = {
        "keys_before": build["keys"],
        "keys_added": int(args.keys),
        "open_with_lists_s": t_open,
        "insert_s": t_ins,
        "insert_cpu_s": c_ins,
        "peak_rss_mb": _peak_rss_mb(),
    }
    print(json.dumps(out), flush=True)
    return out


def cmd_insert(args: argparse.Namespace) -> dict:
    src = Path(args.dir)
    scratch = Path(f"{src}.scratch")
    sizes = [int(x) for x in str(args.keys).split(",")]
    res: dict[int, list[dict]] = {s: [] for s in sizes}
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for r in range(args.runs):
        for s in sizes:
            if scratch.exists():
                shutil.rmtree(scratch)
            subprocess.run(["cp", "-al", str(src), str(scratch)], check=True)
            if (src / ENGINE).exists():  # rewritten by the child: not a shared inode
                (scratch / ENGINE).unlink()
                shutil.copy(src / ENGINE, scratch / ENGINE)
            cmd = [sys.executable, __file__, "insert-child", "--dir", str(scratch)]
            cmd += ["--keys", str(s), "--seed", str(r + 1)]
            p = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            res[s].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(json.dumps(res[s][-1]), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    out = {
        "keys": res[sizes[0]][0]["keys_before"],
        "runs": args.runs,
        "insert_s_median": {s: statistics.median(x["insert_s"] for x in v) for s, v in res.items()},
        "open_with_lists_s_median": {
            s: statistics.median(x["open_with_lists_s"] for x in v) for s, v in res.items()
        },
        "peak_rss_mb": {s: max(x["peak_rss_mb"] for x in v) for s, v in res.items()},
        "load_avg": _load(),
    }
    print(json.dumps(out, indent=2), flush=True)
    return out


def cmd_all(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    out = Path(args.json_out) if args.json_out else None
    for dim in [int(x) for x in args.dims.split(",")]:
        for n in [int(x) for x in args.sizes.split(",")]:
            d = work / f"e{n}x{dim}"
            ns = argparse.Namespace(**{**vars(args), "n": n, "dim": dim, "dir": str(d)})
            r = report[f"{n}x{dim}"] = {"build": cmd_build(ns)}
            r["open"] = cmd_open(argparse.Namespace(dir=str(d), runs=args.runs, json=False))
            r["search"] = cmd_search(ns)
            if args.keys:
                r["insert"] = cmd_insert(ns)
            if out:
                out.write_text(json.dumps(report, indent=2))
            if not args.keep:
                shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("build", "facts", "open", "search", "sigma", "insert", "insert-child", "all"):
        p = sub.add_parser(name)
        p.add_argument("--dir", default=None)
        p.add_argument("--n", type=int, default=10_000)
        p.add_argument("--dim", type=int, default=512)
        p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
        p.add_argument("--rank", type=int, default=256)
        p.add_argument("--runs", type=int, default=3)
        p.add_argument("--json", action="store_true", help="open: print only median_s, peak_rss_mb")
        p.add_argument("--queries", type=int, default=400)
        p.add_argument("--ref-queries", type=int, default=0, help="0: by size")
        p.add_argument(
            "--fetch",
            default="64,128,256,128:24,128:12:64,128:12:0",
            help="search settings FETCH[:NPROBE[:LIFT_FETCH[:SCAN[:CORRECTED[:BLOCK]]]]]; "
            "LIFT_FETCH 0: no lift; CORRECTED: extra candidates by reduced distance / sigma; "
            "BLOCK: candidates re-ranked at a time, lowest bound first (0: all at once)",
        )
        p.add_argument("--rounds", type=int, default=2)
        p.add_argument("--keys", default="1000,5000", help="insert: keys per batch")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--sizes", default="10000,100000")
        p.add_argument("--dims", default="512,1408,4480")
        p.add_argument("--workdir", default="/tmp/reasonedit-bench22")
        p.add_argument("--json-out", default=None)
        p.add_argument("--keep", action="store_true", help="all: keep the built directories")
        p.add_argument("--reuse", action="store_true", help="build: keep DIR's input keys")
        p.add_argument("--keep-input", action="store_true", help="build: keep the input keys")
        p.add_argument("--lists", default="full", choices=("full", "reduced"), help="build: sigma")
        p.add_argument("--truth-vectors", default=None, help="search: DIR of float32 keys")
        p.add_argument(
            "--unbalanced", action="store_true", help="build: k-means lists as they come"
        )
        p.add_argument(
            "--convert", default="both", choices=("numpy", "torch", "both"),
            help="search: float16 rows to float32 by numpy, torch, or both (each setting twice)",
        )  # fmt: skip
        p.add_argument("--ann", default="ivf", choices=("ivf", "hnsw"), help="build: candidates")
    args = ap.parse_args()
    {
        "build": cmd_build,
        "facts": cmd_facts,
        "open": cmd_open,
        "search": cmd_search,
        "sigma": cmd_sigma,
        "insert": cmd_insert,
        "insert-child": cmd_insert_child,
        "all": cmd_all,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
