"""Readers under writes (issue 23): reader processes loop over open + search + retrieve
while a writer process makes N commits (adds, removes, key merges, compactions).

Each read opens the codebook (one manifest read), takes a snapshot summary (version,
live edits, key ids) and answers a random query as `ask` retrieves (retrieval.retrieve);
it checks on the spot that every retrieved fact is a value of a live key of an edit live
in that same snapshot. Afterwards every read's summary is compared with what the writer
logged for that version: a read must see exactly one complete committed version.

`python tests/readers_harness.py run OUT [COMMITS] [READERS]` writes OUT/figures.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DIM = 16


def summary(cb) -> dict:
    keys = cb.keys_table()
    return {
        "version": cb.version,
        "edits": hashlib.sha256(",".join(sorted(cb.edit_ids())).encode()).hexdigest()[:16],
        "keys": hashlib.sha256("\n".join(keys.column("key_id").to_pylist()).encode()).hexdigest()[
            :16
        ],
        "n_keys": keys.num_rows,
    }


def writer(cb_path: Path, commits: int, log_path: Path) -> None:
    """N commits: mostly adds, every 7th a removal, every 11th a merge, two compactions."""
    import numpy as np
    from helpers_reliability import png_bytes

    from reasonedit_cli.editor import Editor
    from reasonedit_cli.store import Codebook, EditRecord, KeyRecord

    rng = np.random.default_rng(5)
    live: list[str] = []
    out = open(log_path, "w")
    done = 0
    i = 0
    kinds: dict[str, int] = {}
    cb = Codebook.open(cb_path)  # one snapshot object: each commit hands it its tables
    while done < commits:
        i += 1
        cb.refresh()
        before = cb.version
        if i % 7 == 0 and len(live) > 3:
            kind = "remove"
            with cb.writer(lock_timeout=60) as w:
                w.remove_edits([live.pop(int(rng.integers(len(live))))])
        elif i % 11 == 0:
            kind = "merge"
            Editor(cb_path, lock_timeout=60).merge_keys()
        elif done in (commits // 2, commits - 1):
            kind = "compact"
            with cb.writer(lock_timeout=60) as w:
                w.compact()
        else:
            kind = "add"
            with cb.writer(lock_timeout=60) as w:
                eid = f"w{i:04d}"
                sha = w.store_image(png_bytes(10_000 + i), "png")
                base = rng.normal(size=DIM)
                vecs = [base, base + 0.002 * rng.normal(size=DIM)]  # the 2nd merges into the 1st
                keys = [
                    KeyRecord(eid, "answer", f"fact {eid}.{j}", f"t{eid}.{j}", sha, None,
                              vecs[j].astype("float32"), radius=0.3)
                    for j in range(2)
                ]  # fmt: skip
                w.add([EditRecord(eid, sha, f"q{eid}?", "a", ["r."], None, "w")], keys)
                live.append(eid)
        cb.refresh()  # a no-op after its own commits; reloads after merge-keys
        after = cb
        if after.version == before:
            continue  # nothing to merge: no commit
        done += 1
        kinds[kind] = kinds.get(kind, 0) + 1
        out.write(json.dumps({"kind": kind, **summary(after)}) + "\n")
        out.flush()
    out.write(json.dumps({"done": True, "kinds": kinds}) + "\n")
    out.close()


def reader(cb_path: Path, stop: Path, out_path: Path, seed: int) -> None:
    import numpy as np

    from reasonedit_cli.retrieval import retrieve
    from reasonedit_cli.store import Codebook, key_entries

    rng = np.random.default_rng(seed)
    out = open(out_path, "w")
    n = 0
    while not stop.exists():
        t0 = time.monotonic()
        rec: dict = {}
        try:
            cb = Codebook.open(cb_path)
            rec = summary(cb)
            live = cb.edit_ids()
            rows = cb.keys_table().drop_columns(["vector"]).to_pylist()
            values = {v for r in rows for v, e in key_entries(r) if e in live}
            owners = {e for r in rows for _, e in key_entries(r)}
            bad = []
            if not owners <= live:
                bad.append(f"keys of edits not live: {sorted(owners - live)[:3]}")
            if rows:
                q = rng.normal(size=DIM).astype("float32")
                cb.search(q[None, :], k=5)
                r = retrieve(cb, q, k=5)
                if not set(r.facts) <= values:
                    bad.append("retrieved a fact that is not a live value")
            rec["bad"] = bad
        except Exception as e:  # noqa: BLE001 - any error is a finding
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["s"] = round(time.monotonic() - t0, 4)
        out.write(json.dumps(rec) + "\n")
        n += 1
        time.sleep(0.02)  # a reader in a loop, not a CPU hog on a shared machine
        if n % 20 == 0:
            out.flush()
    out.close()


def run(out: Path, commits: int = 200, readers: int = 4) -> dict:
    from helpers_reliability import build_synthetic_codebook

    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    cb = out / "cb"
    if cb.exists():
        import shutil

        shutil.rmtree(cb)
    build_synthetic_codebook(cb, n_edits=20, keys_per_edit=2, dim=DIM, batches=1)
    from reasonedit_cli.store import Codebook

    initial = summary(Codebook.open(cb))
    stop = out / "STOP"
    stop.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    me = str(Path(__file__).resolve())
    procs = [
        subprocess.Popen(
            [sys.executable, me, "reader", str(cb), str(stop), str(out / f"r{i}.jsonl"), str(i)],
            env=env,
        )
        for i in range(readers)
    ]
    time.sleep(2.0)  # readers running before the first commit
    w = subprocess.run(
        [sys.executable, me, "writer", str(cb), str(commits), str(out / "writes.jsonl")],
        env=env,
        capture_output=True,
        text=True,
    )
    time.sleep(1.0)
    stop.write_text("")
    for p in procs:
        p.wait(timeout=120)
    if w.returncode != 0:
        raise RuntimeError(f"writer failed: {w.stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / "writes.jsonl").read_text().splitlines()]
    tail = lines.pop()
    by_version = {x["version"]: x for x in lines}
    by_version[initial["version"]] = initial
    figures = {
        "commits": len(lines),
        "commit_kinds": tail["kinds"],
        "readers": readers,
        "reads": 0,
        "errors": [],
        "inconsistent": [],
        "versions_seen": set(),
        "max_read_s": 0.0,
        "reader_exit_codes": [p.returncode for p in procs],
    }
    for i in range(readers):
        for x in (out / f"r{i}.jsonl").read_text().splitlines():
            r = json.loads(x)
            figures["reads"] += 1
            figures["max_read_s"] = max(figures["max_read_s"], r["s"])
            if "error" in r:
                figures["errors"].append(r["error"])
                continue
            figures["versions_seen"].add(r["version"])
            want = by_version.get(r["version"])
            if r["bad"] or (
                want is not None and any(want[k] != r[k] for k in ("edits", "keys", "n_keys"))
            ):
                figures["inconsistent"].append(r)
    figures["versions_seen"] = len(figures["versions_seen"])
    figures["seconds"] = round(time.monotonic() - t0, 1)
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "writer":
        writer(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    elif cmd == "reader":
        reader(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
        # every result is written: skip interpreter teardown, where a native thread pool
        # sometimes aborts ("terminate called without an active exception")
        os._exit(0)
    elif cmd == "run":
        c = int(sys.argv[3]) if len(sys.argv) > 3 else 200
        r = int(sys.argv[4]) if len(sys.argv) > 4 else 4
        f = run(Path(sys.argv[2]), c, r)
        print(
            json.dumps({k: (v[:5] if isinstance(v, list) else v) for k, v in f.items()}, indent=2)
        )
    else:
        sys.exit("usage: readers_harness.py run OUT [COMMITS] [READERS]")
