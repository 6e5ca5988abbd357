"""Hostile-codebook cases (issue 23), run in a worker subprocess so a hang is seen.

`python tests/helpers_hostile.py CASES.json` applies each case to a fresh copy of its
codebook (a FIFO, a character device, a directory or a symlink out of the codebook in
place of one of its files or folders; a Parquet segment with a huge or malformed footer
and a valid checksum), runs the reader operations and `check()` under an alarm, and
prints one JSON result per case. A case that blocks trips the alarm and is recorded as a
hang; the parent also applies an overall timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path


class Hang(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise Hang()


def plant(work: Path, case: dict) -> None:
    """Put the hostile thing at case["target"] (a path relative to the codebook)."""
    target = work / case["target"]
    outside = work.parent / f"outside-{case['id']}"
    kind = case["kind"]
    if not os.path.lexists(target):  # e.g. LOCK: nothing there to move aside
        outside.write_bytes(b"")
    elif target.is_dir() and not target.is_symlink():
        shutil.copytree(target, outside)
        shutil.rmtree(target)
    else:
        shutil.copy2(target, outside)
        target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dir":
        target.mkdir()
    elif kind == "chardev":
        try:
            os.mknod(target, 0o600 | 0o020000, os.makedev(1, 3))  # /dev/null
        except PermissionError:
            os.symlink("/dev/null", target)
    elif kind == "symlink":  # the same bytes, outside the codebook
        os.symlink(outside, target)
    else:
        raise ValueError(kind)


def craft_parquet(work: Path, case: dict) -> None:
    """Replace a keys segment by a crafted one and re-sign the manifest (a foreign
    codebook: checksums valid, content hostile)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = json.loads((work / "manifest.json").read_bytes())
    entry = next(s for s in m["segments"] if s["kind"] == "keys")
    f = work / entry["path"]
    data = f.read_bytes()
    kind = case["kind"]
    if kind == "footer-huge":  # declares 2 GB of metadata
        data = data[:-8] + (2**31 - 1).to_bytes(4, "little") + b"PAR1"
    elif kind == "footer-past-start":  # declares more metadata than the file holds
        data = data[:-8] + (len(data) + 100).to_bytes(4, "little") + b"PAR1"
    elif kind == "footer-garbage":  # a footer of random bytes of a plausible length
        n = int.from_bytes(data[-8:-4], "little")
        data = data[: -8 - n] + os.urandom(n) + data[-8:]
    elif kind == "metadata-huge":  # a real Parquet file with 24 MB of key-value metadata
        t = pq.read_table(f)
        meta = dict(t.schema.metadata or {})
        meta[b"junk"] = b"x" * (24 << 20)
        sink = pa.BufferOutputStream()
        pq.write_table(t.replace_schema_metadata(meta), sink)
        data = sink.getvalue().to_pybytes()
    elif kind == "no-magic":
        data = b"JUNK" + data[4:]
    else:
        raise ValueError(kind)
    f.write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    entry["bytes"] = len(data)
    raw = signed_manifest(m)
    (work / "manifest.json").write_bytes(raw)
    (work / "versions" / f"v{m['version']:06d}.json").write_bytes(raw)


def signed_manifest(m: dict) -> bytes:
    """Manifest bytes with a valid checksum, as docs/codebook-format.md defines it."""
    body = {k: v for k, v in m.items() if k != "checksum"}
    canon = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()
    full = dict(body, checksum="sha256:" + hashlib.sha256(canon).hexdigest())
    return (json.dumps(full, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def run_case(case: dict) -> dict:
    import numpy as np

    from reasonedit_cli.errors import CodebookError
    from reasonedit_cli.store import Codebook

    src, work = Path(case["src"]), Path(case["work"])
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src, work)
    if case["kind"] in ("fifo", "dir", "chardev", "symlink"):
        plant(work, case)
    else:
        craft_parquet(work, case)
    out: dict = {"case": case, "problems": []}
    q = np.random.default_rng(1).normal(size=(2, case["dim"])).astype("float32")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    signal.alarm(20)
    try:
        try:
            cb = Codebook.open(work, hnsw_min_keys=case["hnsw_min_keys"])
            hits = cb.search(q, k=5, method="exact")
            cb.search(q, k=5)
            _ = cb.tau, sorted(cb.edit_ids())
            out["reader"] = "ok"
            out["same"] = [[r for r, _, _ in h] for h in hits] == case["baseline"]
        except CodebookError as e:
            out["reader"] = "error"
            out["error"] = str(e)
            if "\n" in str(e):
                out["problems"].append("multi-line error")
        try:
            rep = Codebook.open(work, hnsw_min_keys=case["hnsw_min_keys"]).check()
            out["doctor"] = "ok" if rep.ok else "problems"
            out["doctor_lines"] = rep.problems[:3]
        except CodebookError as e:
            out["doctor"] = "error"
            out["doctor_lines"] = [str(e)]
        if case.get("writer"):  # a writer must not block either
            try:
                with Codebook.open(work).writer(lock_timeout=0.5) as w:
                    w.set_config(touched=1)
                out["writer"] = "ok"
            except CodebookError as e:
                out["writer"] = "error"
                out["writer_error"] = str(e)
        signal.alarm(0)
    except Hang:
        out["problems"].append("blocked (alarm after 20 s)")
    except Exception as e:  # noqa: BLE001 - the point is to classify everything
        signal.alarm(0)
        out["problems"].append(f"raised {type(e).__name__}: {e}")
    out["seconds"] = round(time.monotonic() - t0, 3)
    out["rss_growth_mb"] = round(
        (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1
    )
    return out


if __name__ == "__main__":
    signal.signal(signal.SIGALRM, _alarm)
    for c in json.loads(Path(sys.argv[1]).read_text()):
        print(json.dumps(run_case(c)), flush=True)
    # skip interpreter teardown: a native thread pool sometimes aborts there
    # ("terminate called without an active exception"), after every result is out
    os._exit(0)
