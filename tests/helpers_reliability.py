"""Shared code for the reliability tests (issue 8), and a subprocess fuzz worker.

`python tests/helpers_reliability.py fuzz-worker` reads damage cases (JSON, one per line)
on stdin, applies each to a fresh copy of a codebook, runs the reader operations and
prints one JSON outcome per case. It runs in its own process so that a crash (a signal,
e.g. SIGSEGV from a damaged hnswlib file) is seen by the parent instead of killing pytest;
the parent then records the case in flight as a crash and starts a new worker.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------- utilities


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, plus the mode of every entry (byte-for-byte state)."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file() and not p.is_symlink():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = f"dir {oct(p.stat().st_mode)}"
    return out


def png_bytes(seed: int, size: int = 16) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (rng.randrange(256), rng.randrange(256), 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_synthetic_codebook(
    path: Path,
    *,
    n_edits: int,
    keys_per_edit: int,
    dim: int = 16,
    batches: int = 3,
    hnsw_min_keys: int | None = None,
    seed: int = 0,
    keep_deltas: bool = False,
) -> Path:
    """A codebook written through Codebook/CodebookWriter with random vectors (no VLM).

    keep_deltas: batches after the first append derived-index deltas (sigma and list
    patches, graph parts) instead of compacting, so damage cases cover those files too.
    """
    import numpy as np

    from reasonedit_cli.store import HNSW_MIN_KEYS, Codebook, EditRecord, KeyRecord
    from reasonedit_cli.store.index import deltas as derived

    if keep_deltas:
        names = ("SIGMA_DELTA_MAX", "KNN_DELTA_MAX", "GRAPH_DELTA_MAX", "GRAPH_MAX_PARTS")
        saved = {k: getattr(derived, k) for k in names}
        for k in names:
            setattr(derived, k, 10**9)
        try:
            return build_synthetic_codebook(
                path,
                n_edits=n_edits,
                keys_per_edit=keys_per_edit,
                dim=dim,
                batches=batches,
                hnsw_min_keys=hnsw_min_keys,
                seed=seed,
            )
        finally:
            for k, v in saved.items():
                setattr(derived, k, v)
    rng = np.random.default_rng(seed)
    cb = Codebook.open(path, create=True, hnsw_min_keys=hnsw_min_keys or HNSW_MIN_KEYS)
    per_batch = -(-n_edits // batches)
    for b in range(batches):
        edits, keys = [], []
        with cb.writer() as w:
            for i in range(b * per_batch, min(n_edits, (b + 1) * per_batch)):
                sha = w.store_image(png_bytes(i), "png")
                eid = f"s{i:05d}"
                edits.append(EditRecord(eid, sha, f"q{i}?", f"a{i}", [f"r{i}."], None, "synth"))
                for j in range(keys_per_edit):
                    keys.append(
                        KeyRecord(
                            eid,
                            "answer" if j == 0 else "sentence",
                            f"fact {i}.{j}",
                            f"text {i}.{j}",
                            sha,
                            None if j % 3 else (0, 0, 8, 8),
                            rng.normal(size=dim).astype("float32"),
                            radius=0.5,
                        )
                    )
            w.set_config(model="synthetic")
            w.add(edits, keys)
    return path


def damage_cases(root: Path, n: int, seed: int, *, per_file_min: int = 2) -> list[dict]:
    """n damage cases over every file of the codebook: truncations and single bit flips.

    Every file gets at least `per_file_min` cases; the rest are spread by file kind so that
    each kind (manifest, versions, segments, images, index npy, hnsw) gets a fair share.
    """
    rng = random.Random(seed)
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    by_kind: dict[str, list[Path]] = {}
    for p in files:
        by_kind.setdefault(file_kind(p.relative_to(root)), []).append(p)
    order = []
    for p in files:  # images are many and alike: they get their share by kind only
        if file_kind(p.relative_to(root)) != "images":
            order += [p] * per_file_min
    kinds = sorted(by_kind)
    while len(order) < n:
        kind = kinds[len(order) % len(kinds)]
        order.append(rng.choice(by_kind[kind]))
    cases = []
    for i, p in enumerate(order[: max(n, len(order))]):
        size = p.stat().st_size
        rel = str(p.relative_to(root))
        if i % 3 == 0:  # truncation: empty, 1 byte, half, all but the last byte, random
            choice = rng.choice(["zero", "one", "half", "minus1", "random"])
            length = {
                "zero": 0,
                "one": min(1, size),
                "half": size // 2,
                "minus1": max(0, size - 1),
                "random": rng.randrange(0, max(1, size)),
            }[choice]
            cases.append({"file": rel, "op": "truncate", "arg": length})
        else:
            offset = rng.randrange(0, max(1, size))
            cases.append({"file": rel, "op": "flip", "arg": [offset, rng.randrange(8)]})
    return cases


#: name prefixes of the wide-key engine's files (store/engine.py) under index/
ENGINE_FILES = ("vectors-", "reduced-", "proj-", "rsigma-", "rknn", "rlift-", "ivf-", "facts-")


def file_kind(rel: Path) -> str:
    rel = Path(rel)
    if rel.name == "manifest.json":
        return "manifest"
    top = rel.parts[0]
    if top == "index":
        if rel.name.startswith(ENGINE_FILES):
            return "engine"  # the wide-key engine's mapped files (issue 22)
        return "hnsw" if rel.suffix == ".bin" else "index-npy"
    return {"versions": "versions", "segments": "segments", "images": "images"}.get(top, "other")


def apply_damage(root: Path, case: dict) -> None:
    f = root / case["file"]
    data = bytearray(f.read_bytes())
    if case["op"] == "truncate":
        data = data[: case["arg"]]
    elif data:
        offset, bit = case["arg"]
        data[offset] ^= 1 << bit
    f.write_bytes(bytes(data))


# --------------------------------------------------------------- fuzz worker


def _clean_output(text: str) -> bool:
    return "Traceback" not in text


def _baseline(src: Path, hnsw_min_keys: int, queries) -> dict:
    from reasonedit_cli.store import Codebook

    cb = Codebook.open(src, hnsw_min_keys=hnsw_min_keys)
    return {
        "exact": cb.search(queries, k=5, method="exact"),
        "auto": cb.search(queries, k=5),
        "tau": cb.tau,
        "edits": sorted(cb.edit_ids()),
    }


def _same_hits(a, b, tol=1e-6) -> bool:
    if len(a) != len(b):
        return False
    for qa, qb in zip(a, b):
        if [r for r, _, _ in qa] != [r for r, _, _ in qb]:
            return False
        if any(abs(x[2] - y[2]) > tol * max(1.0, abs(y[2])) for x, y in zip(qa, qb)):
            return False
    return True


def run_case(case: dict, baselines: dict, runner, app) -> dict:
    """Damage a fresh copy, then: reader ops, `doctor`, (derived) `doctor --repair`, `ask`."""
    import numpy as np

    from reasonedit_cli.errors import CodebookError
    from reasonedit_cli.store import Codebook

    src, work = Path(case["src"]), Path(case["work"])
    hmk = int(case.get("hnsw_min_keys") or 2000)
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src, work)
    apply_damage(work, case)
    kind = file_kind(Path(case["file"]))
    out: dict[str, Any] = {"case": case, "kind": kind, "problems": []}
    base = baselines[str(src)]
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(4, base["dim"])).astype("float32")
    # 1. reader: open + search (exact and auto) + tau + edits
    reader = "ok"
    try:
        cb = Codebook.open(work, hnsw_min_keys=hmk)
        exact = cb.search(queries, k=5, method="exact")
        auto = cb.search(queries, k=5)
        tau, edits = cb.tau, sorted(cb.edit_ids())
        if not _same_hits(exact, base["exact"]) or edits != base["edits"]:
            out["problems"].append("reader returned different results without an error")
        if (tau is None) != (base["tau"] is None) or (
            tau is not None and abs(tau - base["tau"]) > 1e-6 * max(1, abs(base["tau"]))
        ):
            out["problems"].append(f"tau changed silently {tau} != {base['tau']}")
        overlap = np.mean(
            [len({r for r, _, _ in a} & {r for r, _, _ in b}) / 5 for a, b in zip(auto, exact)]
        )
        if overlap < 0.8:
            out["problems"].append(f"auto search overlap {overlap}")
    except CodebookError as e:
        reader = "error"
        if "\n" in str(e) or not str(e):
            out["problems"].append(f"multi-line or empty error: {e!r}")
        out["reader_error"] = str(e)
    except Exception as e:  # noqa: BLE001 - the point is to classify everything
        reader = "exception"
        out["problems"].append(f"reader raised {type(e).__name__}: {e}")
    out["reader"] = reader
    # 2. doctor through the CLI (in this process: a segfault kills the worker, seen above)
    res = runner.invoke(app, ["doctor", "-c", str(work)])
    out["doctor"] = res.exit_code
    text = res.output + (res.stderr if res.stderr_bytes is not None else "")
    if not _clean_output(text) or (res.exception and not isinstance(res.exception, SystemExit)):
        out["problems"].append(f"doctor traceback/exception: {res.exception!r} {text[-300:]}")
    if res.exit_code not in (0, 1):
        out["problems"].append(f"doctor exit {res.exit_code}")
    if res.exit_code == 1 and reader == "error":
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        if lines and len(lines) != 1:
            out["problems"].append(f"doctor error is not one line: {lines}")
    if reader == "ok" and res.exit_code == 1 and kind in ("manifest", "segments"):
        out["problems"].append("doctor failed although the reader trusted the files")
    if reader == "error" and res.exit_code == 0:
        out["problems"].append("doctor said OK but the reader failed")
    # 3. derived damage: repair must make doctor clean again
    if reader == "ok" and res.exit_code == 1 and kind in ("index-npy", "hnsw", "engine"):
        rep = runner.invoke(app, ["doctor", "-c", str(work), "--repair"])
        again = runner.invoke(app, ["doctor", "-c", str(work)])
        out["repair"] = [rep.exit_code, again.exit_code]
        if rep.exit_code != 0 or again.exit_code != 0 or not _clean_output(rep.output):
            out["problems"].append(f"repair failed: {rep.output[-300:]}")
    # 3b. source damage (issue 23): `doctor --repair` rebuilds from what survives, giving
    # the undamaged results, or fails with one line (e.g. keys of a synthetic codebook
    # cannot be re-embedded: its "model" does not exist)
    if reader == "error" and kind in ("manifest", "segments") and case.get("repair_sources"):
        rep = runner.invoke(app, ["doctor", "-c", str(work), "--repair"])
        text = rep.output + (rep.stderr if rep.stderr_bytes is not None else "")
        out["source_repair"] = rep.exit_code
        if not _clean_output(text) or rep.exit_code not in (0, 1):
            out["problems"].append(f"doctor --repair: exit {rep.exit_code} {text[-300:]}")
        elif rep.exit_code == 1:
            errs = [x for x in rep.stderr.splitlines() if x.startswith("Error")]
            if len(errs) > 1:
                out["problems"].append(f"doctor --repair error is not one line: {errs}")
        else:
            try:
                cb = Codebook.open(work, hnsw_min_keys=hmk)
                same = _same_hits(cb.search(queries, k=5, method="exact"), base["exact"])
                tau = cb.tau
                if not same or sorted(cb.edit_ids()) != base["edits"]:
                    out["problems"].append("doctor --repair gave different search results")
                elif (tau is None) != (base["tau"] is None) or (
                    tau is not None and abs(tau - base["tau"]) > 1e-6 * max(1, abs(base["tau"]))
                ):
                    out["problems"].append(f"doctor --repair changed tau {tau} != {base['tau']}")
            except CodebookError as e:
                out["problems"].append(f"doctor --repair exit 0 but the reader fails: {e}")
    # 4. some cases: ask through the CLI with the real (tiny) VLM
    if case.get("ask"):
        a = runner.invoke(
            app,
            ["ask", "-c", str(work), "--image", case["ask"]["image"], "--question", "what shape?"]
            + case["ask"]["model_args"]
            + ["--json"],
        )
        out["ask"] = a.exit_code
        err_lines = [x for x in a.stderr.splitlines() if x.startswith("Error")]
        if not _clean_output(a.output + a.stderr) or (
            a.exception and not isinstance(a.exception, SystemExit)
        ):
            out["problems"].append(f"ask traceback: {a.exception!r}")
        elif a.exit_code not in (0, 1) or (a.exit_code == 1 and len(err_lines) != 1):
            out["problems"].append(f"ask exit {a.exit_code}: {a.stderr[-300:]}")
        elif reader == "error" and a.exit_code == 0 and out.get("source_repair") != 0:
            # ask reads the manifest and the keys segments only (both verified); damage
            # to an edits segment does not change its answers and is reported by doctor.
            # (After a successful `doctor --repair` above, ask rightly succeeds.)
            if not Path(case["file"]).name.startswith("edits-"):
                out["problems"].append("ask succeeded on a codebook the reader refused")
            else:
                out["ask_unaffected"] = True
    # 5. derived damage, then an insert (issue 22: the writer checks the engine's large
    # files by size and mtime, not by hash): it must not keep what it can see is damaged
    if case.get("insert") and kind in ("index-npy", "hnsw", "engine"):
        out["problems"] += insert_after_damage(case, hmk)
    # classify
    if reader == "error" and out.get("source_repair") == 0:
        out["outcome"] = "repaired by doctor --repair"
    elif reader == "error":
        out["outcome"] = "clear error"
    elif res.exit_code == 0:
        out["outcome"] = "harmless"
    elif kind in ("index-npy", "hnsw", "engine"):
        out["outcome"] = "recovered"
    else:
        out["outcome"] = "detected by doctor"
    return out


def insert_after_damage(case: dict, hnsw_min_keys: int) -> list[str]:
    """Damage a fresh copy, insert one edit through the writer, then: the insert
    succeeded or failed with one line; after it `check` finds nothing (the damage
    changed the file's mtime, as every case here does, so the writer rehashed it and
    rebuilt what it could not trust) and both searches find the new key first.
    Returns the problems."""
    import numpy as np

    from reasonedit_cli.errors import CodebookError
    from reasonedit_cli.store import Codebook
    from reasonedit_cli.store.format import EditRecord, KeyRecord

    work = Path(case["work"] + "-insert")
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(case["src"], work)
    apply_damage(work, case)
    try:
        cb = Codebook.open(work, hnsw_min_keys=hnsw_min_keys)
        v = np.random.default_rng(3).normal(size=cb.dim).astype(np.float32) * 10
        with cb.writer() as w:
            sha = w.store_image(png_bytes(999), "png")
            edit = EditRecord("fuzz-insert", sha, "q?", "a", ["A fact."], [None], "fuzz")
            w.add([edit], [KeyRecord("fuzz-insert", "answer", "a", "q?", sha, None, v, 0.5)])
    except CodebookError as e:
        return [f"multi-line insert error: {e!r}"] if "\n" in str(e) or not str(e) else []
    except Exception as e:  # noqa: BLE001 - the point is to classify everything
        return [f"insert raised {type(e).__name__}: {e}"]
    problems = []
    fresh = Codebook.open(work, hnsw_min_keys=hnsw_min_keys)
    report = fresh.check()
    if report.problems:
        problems.append(f"the insert kept damage: {report.problems[:2]}")
    for method in ("exact", "auto"):
        hits = fresh.search(v[None], k=1, method=method)[0]
        if not hits or fresh.key_facts([hits[0][0]])[0]["edit_id"] != "fuzz-insert":
            problems.append(f"{method} search after the insert misses the new key")
    return problems


def fuzz_worker() -> None:
    import numpy as np
    from typer.testing import CliRunner

    from reasonedit_cli.cli import app

    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart already
        runner = CliRunner()
    baselines: dict[str, dict] = {}
    for line in sys.stdin:
        case = json.loads(line)
        src = case["src"]
        if src not in baselines:
            from reasonedit_cli.store import Codebook

            dim = Codebook.open(src).dim
            q = np.random.default_rng(1).normal(size=(4, dim)).astype("float32")
            baselines[src] = _baseline(Path(src), int(case.get("hnsw_min_keys") or 2000), q)
            baselines[src]["dim"] = dim
        print(json.dumps({"start": case["id"]}), flush=True)
        result = run_case(case, baselines, runner, app)
        print(json.dumps({"done": case["id"], "result": result}), flush=True)


def run_fuzz(cases: list[dict], env: dict | None = None, timeout: float = 3600) -> list[dict]:
    """Run cases in worker subprocesses; a worker killed by a signal marks its case a crash."""
    results: dict[int, dict] = {}
    pending = list(cases)
    deadline = time.monotonic() + timeout
    while pending:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "fuzz-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        stdout, stderr = proc.communicate(
            "".join(json.dumps(c) + "\n" for c in pending),
            timeout=max(1, deadline - time.monotonic()),
        )
        in_flight = None
        for line in stdout.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "start" in msg:
                in_flight = msg["start"]
            elif "done" in msg:
                results[msg["done"]] = msg["result"]
                in_flight = None
        if proc.returncode != 0:
            if in_flight is None:
                raise RuntimeError(f"fuzz worker failed outside a case: {stderr[-2000:]}")
            case = next(c for c in pending if c["id"] == in_flight)
            results[in_flight] = {
                "case": case,
                "kind": file_kind(Path(case["file"])),
                "outcome": f"CRASH rc={proc.returncode}",
                "problems": [f"worker died with rc {proc.returncode}: {stderr[-500:]}"],
            }
        pending = [c for c in pending if c["id"] not in results]
    return [results[c["id"]] for c in cases]


def summarize(results: list[dict]) -> dict:
    out: dict[str, Any] = {"cases": len(results), "outcomes": {}, "by_kind": {}}
    for r in results:
        out["outcomes"][r["outcome"]] = out["outcomes"].get(r["outcome"], 0) + 1
        k = out["by_kind"].setdefault(r["kind"], {})
        k[r["outcome"]] = k.get(r["outcome"], 0) + 1
    out["failures"] = [r for r in results if r["problems"]]
    return out


def edit_line(eid: str, image: str) -> str:
    return json.dumps(
        {
            "id": eid,
            "image": image,
            "question": f"what is shown in picture {eid}?",
            "answer": f"answer {eid}",
            "reasoning": f"Picture {eid} shows a shape. The shape is {eid}.",
        }
    )


def add_loop(codebook: str, model: str, image: str, prefix: str, n: int) -> None:
    """n separate `add-edit` calls (one edit each) through the CLI code, in this process."""
    from reasonedit_cli.cli import app

    work = Path(codebook).parent / f"in-{prefix}.jsonl"
    ok, failed = [], []
    for i in range(n):
        eid = f"{prefix}{i:03d}"
        work.write_text(edit_line(eid, image) + "\n")
        args = ["add-edit", "--from", str(work), "-c", codebook, "--model", model]
        args += ["--device", "cpu", "--patches", "none", "--lock-timeout", "300", "--json"]
        try:
            app(args, standalone_mode=False)
            code = 0
        except SystemExit as e:
            code = e.code
        (ok if code in (0, None) else failed).append(eid)
    print(json.dumps({"ok": ok, "failed": failed}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if sys.argv[1:] == ["fuzz-worker"]:
        fuzz_worker()
    elif sys.argv[1:2] == ["add-loop"]:
        add_loop(*sys.argv[2:6], int(sys.argv[6]))
    else:
        sys.exit(f"usage: {sys.argv[0]} fuzz-worker | add-loop CB MODEL IMAGE PREFIX N")
