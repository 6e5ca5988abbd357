"""Power loss, simulated (issue 23), in the spirit of CrashMonkey and ALICE.

1. `record`: a child process runs a workload of real store operations on a codebook
   (add-edit, remove-edit, calibrate, merge-keys, compaction, add-edit --merge; or a
   synthetic variant
   without a VLM) with the store's file-operation seam (`codebook.file_operations`)
   logging every write, fsync, rename, unlink, mkdir and directory fsync, and the bytes
   of every file written. After each operation returns it logs what is acknowledged
   (version, live edits, key ids, search results for fixed queries).
2. `crash_states`: for every prefix of that log (a crash after each operation) the disk
   is rebuilt from the durable snapshot taken before the workload under a persistence
   model: a file's data is durable only once it was fsynced, a name (create, rename,
   unlink, mkdir) only once its directory was fsynced. Un-fsynced data is kept, dropped
   (empty), truncated to half or zeroed; un-fsynced names are all kept, all lost, kept
   up to each prefix (a journal), kept for random subsets of directories, or any random
   subset of them (reordering). Identical disk states are tried once.
3. `check_state`: the codebook opens; its live content is exactly the acknowledged state
   before or after the operation in flight (after, once it returned); every edit is
   there once; search answers as that state did (the exact path and the default one,
   which goes through the wide-key engine's mapped files: ENGINE_MIN_KEYS below makes
   every commit write them, issue 22); `check()` is clean, or `doctor --repair` makes
   it clean without changing the content.

`python tests/crash_harness.py run WORKLOAD OUT [MAX_STATES]` runs all three and writes
the figures to OUT/figures.json (tests/test_reliability_slow.py and test_crash.py call it).
"""

from __future__ import annotations

import contextlib
import hashlib
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
#: the engine threshold while recording and checking: every commit writes engine files
ENGINE_MIN_KEYS = "1"
ENGINE_FILES = ("vectors-", "reduced-", "proj-", "rknn", "rlift-", "ivf-", "facts-")
sys.path.insert(0, str(HERE))

# ---------------------------------------------------------------- 1. recording


def _summary(cb: Any) -> dict:
    """What a reader of this version must see (the acknowledged state)."""
    import numpy as np

    keys = cb.keys_table()
    out = {
        "version": cb.version,
        "edits": sorted(cb.edit_ids()),
        "key_ids": hashlib.sha256(
            "\n".join(keys.column("key_id").to_pylist()).encode()
        ).hexdigest(),
        "n_keys": keys.num_rows,
        "hits": None,
        "auto": None,
    }
    if keys.num_rows:
        q = np.random.default_rng(7).normal(size=(3, cb.dim)).astype("float32")
        out["hits"] = [[r for r, _, _ in h] for h in cb.search(q, k=3, method="exact")]
        # the default path: the engine's mapped files when listed (issue 22)
        out["auto"] = [[r for r, _, _ in h] for h in cb.search(q, k=3)]
    return out


def _synthetic_workload(cb_path: Path, log: Any) -> None:
    """add, remove, recalibration (replace_all_keys), key merging, compaction; no VLM."""
    import numpy as np
    from helpers_reliability import png_bytes

    from reasonedit_cli.editor import Editor
    from reasonedit_cli.store import Codebook, EditRecord, KeyRecord, key_entries

    rng = np.random.default_rng(3)

    def add():
        with Codebook.open(cb_path).writer() as w:
            edits, keys = [], []
            for i in range(6, 10):
                sha = w.store_image(png_bytes(1000 + i), "png")
                edits.append(EditRecord(f"x{i}", sha, f"q{i}?", f"a{i}", ["r."], None, "synth"))
                v = rng.normal(size=8).astype("float32")
                for j in range(3):  # keys 1 and 2 almost coincide: merge-keys merges them
                    vec = v + (0.001 * j if j else 1.0) * rng.normal(size=8).astype("float32")
                    keys.append(
                        KeyRecord(f"x{i}", "sentence", f"f{i}.{j}", f"t{i}.{j}", sha, None,
                                  vec.astype("float32"), 0.5)
                    )  # fmt: skip
            w.add(edits, keys)

    def remove():
        with Codebook.open(cb_path).writer() as w:
            w.remove_edits(["s00001", "x7"])

    def recalibrate():  # what calibrate commits: every key re-embedded, new settings
        cb = Codebook.open(cb_path)
        with cb.writer() as w:
            rows = cb.keys_table().drop_columns(["vector"]).to_pylist()
            vecs = cb.vectors() * 1.5
            keys = [
                KeyRecord(r["edit_id"], r["kind"], r["value"], r["key_text"], r["image_sha256"],
                          tuple(r["box"]) if r["box"] else None, vecs[i], r["radius"],
                          key_entries(r)[1:])
                for i, r in enumerate(rows)
            ]  # fmt: skip
            w.set_config(layer="L2")
            w.replace_all_keys(keys)

    def compact():
        with Codebook.open(cb_path).writer() as w:
            w.compact()

    for name, fn in (
        ("add", add),
        ("remove", remove),
        ("calibrate", recalibrate),
        ("merge", lambda: Editor(cb_path).merge_keys()),
        ("compact", compact),
    ):
        log({"op": "begin", "step": name})
        fn()
        log({"op": "ack", "step": name, "state": _summary(Codebook.open(cb_path))})


def _real_workload(cb_path: Path, log: Any, model: str) -> None:
    """add-edit, remove-edit, calibrate, merge-keys, compaction, add-edit --merge, through
    the Editor (the code the CLI commands run)."""
    from reasonedit_cli.editor import Editor
    from reasonedit_cli.store import Codebook

    def editor():
        return Editor(cb_path, model=model, device="cpu")

    def step(name, fn):
        log({"op": "begin", "step": name})
        fn()
        log({"op": "ack", "step": name, "state": _summary(Codebook.open(cb_path))})

    edits = _edit_objects(cb_path.parent, range(3, 5))
    step("add-edit", lambda: editor().add_edits(edits, patches="none"))

    def remove():
        cb = Codebook.open(cb_path)
        with cb.writer() as w:
            w.remove_edits(["c1"])

    step("remove-edit", remove)
    step(
        "calibrate",
        # force: the self-check may refuse the tiny model's choice; the harness needs the commit
        lambda: editor().calibrate(
            layers=["projector", "language.1"], max_pairs=12, bootstrap=1, force=True
        ),
    )
    step("merge-keys", lambda: editor().merge_keys())

    def compact():
        cb = Codebook.open(cb_path)
        with cb.writer() as w:
            w.compact()

    step("compaction", compact)
    more = _edit_objects(cb_path.parent, range(5, 7))
    step("add-edit --merge", lambda: editor().add_edits(more, patches="none", merge=True))

    def remove_more():
        cb = Codebook.open(cb_path)
        with cb.writer() as w:
            w.remove_edits(["c3"])

    step("remove-edit", remove_more)
    step("compaction", compact)


def _edit_objects(d: Path, ids: Any) -> list:
    from conftest import shape_image

    from reasonedit_cli.datasets import read_edits

    shapes = ["circle", "triangle", "rectangle"]
    colors = ["red", "blue", "green", "yellow", "purple"]
    lines = []
    for i in ids:
        img = d / f"img{i}.png"
        shape_image(img, shapes[i % 3], colors[i % 5])
        lines.append(
            json.dumps(
                {
                    "id": f"c{i}",
                    "image": str(img),
                    "question": f"what is in picture {i}?",
                    "answer": f"{colors[i % 5]} {shapes[i % 3]}",
                    "reasoning": [f"It is {colors[i % 5]}.", f"It is a {shapes[i % 3]}."],
                }
            )
        )
    f = d / f"edits-{min(ids)}.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return read_edits(str(f))[0]


def setup(work: Path, workload: str, model: str | None) -> Path:
    """The codebook before the workload (2-3 committed edits), durable on disk."""
    cb_path = work / "cb"
    if workload == "synthetic":
        from helpers_reliability import build_synthetic_codebook

        build_synthetic_codebook(cb_path, n_edits=6, keys_per_edit=3, dim=8, batches=2)
    else:
        from reasonedit_cli.editor import Editor

        Editor(cb_path, model=model, device="cpu", create=True).add_edits(
            _edit_objects(work, range(0, 3)), patches="none"
        )
    os.sync()
    return cb_path


def record(workload: str, out: Path, model: str | None) -> None:
    """Child process: set up, snapshot, run the workload with the seam logging."""
    from reasonedit_cli.store import Codebook, file_operations
    from reasonedit_cli.store import files as F

    cb_path = setup(out, workload, model)
    if os.environ.get("CRASH_HARNESS_MUTATION") == "no-dir-fsync":
        # a planted bug (renames never made durable): the harness must report it
        F.fsync_dir = lambda path: None
    snap = out / "snapshot"
    shutil.copytree(cb_path, snap, symlinks=True)
    blobs = out / "blobs"
    blobs.mkdir()
    entries: list[dict] = [{"op": "start", "state": _summary(Codebook.open(cb_path))}]

    def log(e):
        entries.append(e)

    def hook(op: str, path: Path, other: Path | None) -> None:
        rel = os.path.relpath(path, cb_path)
        e = {"op": op, "path": rel}
        if other is not None:
            e["other"] = os.path.relpath(other, cb_path)
        if op == "write":
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            (blobs / sha).write_bytes(data)
            e["blob"], e["size"] = sha, len(data)
        entries.append(e)

    with file_operations(hook):
        if workload == "synthetic":
            _synthetic_workload(cb_path, log)
        else:
            _real_workload(cb_path, log, model)
    (out / "log.json").write_text(json.dumps(entries))


# ------------------------------------------------------------- 2. crash states


def _parent(p: str) -> str:
    return os.path.dirname(p) or "."


def _replay(log: list[dict], upto: int) -> tuple[dict, dict, list, dict]:
    """Durable names, volatile names, pending name ops, inode data after log[:upto]."""
    inodes: dict[int, dict] = {}
    vol: dict[str, int | str] = {}  # path -> inode id, or "dir"
    dur: dict[str, int | str] = {}
    pending: list[tuple] = []
    n = 0
    for e in log[:upto]:
        op = e["op"]
        if op == "write":
            n += 1
            inodes[n] = {"blob": e["blob"], "size": e["size"], "synced": False}
            vol[e["path"]] = n
            pending.append(("set", e["path"], n))
        elif op == "fsync" and isinstance(vol.get(e["path"]), int):
            inodes[vol[e["path"]]]["synced"] = True
        elif op == "rename" and e["path"] in vol:
            ino = vol.pop(e["path"])
            vol[e["other"]] = ino
            pending.append(("rename", e["path"], e["other"], ino))
        elif op == "link" and e["path"] in vol:
            vol[e["other"]] = vol[e["path"]]
            pending.append(("set", e["other"], vol[e["path"]]))
        elif op == "unlink":
            vol.pop(e["path"], None)
            pending.append(("del", e["path"]))
        elif op == "mkdir":
            vol[e["path"]] = "dir"
            pending.append(("set", e["path"], "dir"))
        elif op == "fsync_dir":
            d = e["path"]
            keep = []
            for p in pending:
                if _parent(p[1]) == d or (p[0] == "rename" and _parent(p[2]) == d):
                    _apply(dur, p)
                else:
                    keep.append(p)
            pending = keep
    return dur, vol, pending, inodes


def _apply(ns: dict, p: tuple) -> None:
    if p[0] == "set":
        ns[p[1]] = p[2]
    elif p[0] == "del":
        ns[p[1]] = None  # a tombstone over the snapshot
    elif p[0] == "rename":
        ns[p[1]] = None
        ns[p[2]] = p[3]


def crash_states(log: list[dict], seed: int = 0):
    """Yield (point, variant, names, inodes, data_mode) for every crash point."""
    rng = random.Random(seed)
    fs_ops = [i for i, e in enumerate(log) if e["op"] not in ("begin", "ack", "start")]
    points = sorted({0, *[i + 1 for i in fs_ops]})
    for upto in points:
        dur, _vol, pending, inodes = _replay(log, upto)
        variants = {"durable": []}
        if pending:
            variants["all"] = list(pending)
            # names persisted in order up to any point (a journal), and per directory
            for j in range(1, len(pending)):
                variants[f"prefix-{j}"] = pending[:j]
            dirs = sorted({_parent(p[1]) for p in pending})
            for t in range(3 if len(dirs) > 1 else 0):
                pick = {d for d in dirs if rng.random() < 0.5}
                variants[f"dirs-{t}"] = [p for p in pending if _parent(p[1]) in pick]
            # any subset, as a file system that reorders name operations may persist
            for t in range(6 if len(pending) > 2 else 0):
                variants[f"subset-{t}"] = [p for p in pending if rng.random() < 0.5]
        for vname, applied in variants.items():
            names = dict(dur)
            for p in applied:
                _apply(names, p)
            unsynced = any(isinstance(v, int) and not inodes[v]["synced"] for v in names.values())
            for mode in ("full", "empty", "half", "zero") if unsynced else ("full",):
                yield upto, vname, names, inodes, mode


def materialize(snapshot: Path, blobs: Path, names: dict, inodes: dict, mode: str, dst: Path):
    """The disk after the crash: the snapshot with the surviving names and data."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(snapshot, dst, symlinks=True)
    dirs = [p for p, v in names.items() if v == "dir"]
    for p in sorted(dirs, key=len):
        if (dst / _parent(p)).is_dir():
            (dst / p).mkdir(exist_ok=True)
    for p, v in sorted(names.items(), key=lambda kv: (kv[1] is not None, kv[0])):
        target = dst / p
        if v is None:
            if target.is_file():
                target.unlink()
            continue
        if v == "dir" or not target.parent.is_dir():
            continue  # a file in a directory whose own name did not survive is lost
        ino = inodes[v]
        data = (blobs / ino["blob"]).read_bytes()
        if not ino["synced"]:
            data = {"full": data, "empty": b"", "half": data[: len(data) // 2]}.get(
                mode, b"\0" * len(data)
            )
        target.write_bytes(data)
    past = time.time() - 60  # the power went out a minute ago
    for f in dst.rglob("*"):
        os.utime(f, (past, past), follow_symlinks=False)


# ------------------------------------------------------------------ 3. checks


def check_state(cb_path: Path, allowed: list[dict], model_ok: bool) -> tuple[list[str], dict]:
    """Problems of one crash state (empty = fine) and what was found."""
    from reasonedit_cli.errors import CodebookError
    from reasonedit_cli.repair import repair_codebook
    from reasonedit_cli.store import Codebook

    problems: list[str] = []
    info: dict = {}
    try:
        cb = Codebook.open(cb_path)
        got = _summary(cb)
        ids = cb.edits_table().column("edit_id").to_pylist()
    except CodebookError as e:
        return [f"does not open: {e}"], info
    except Exception as e:  # noqa: BLE001
        return [f"open raised {type(e).__name__}: {e}"], info
    if len(ids) != len(set(ids)):
        problems.append("an edit is there twice")
    match = [a for a in allowed if _same(got, a)]
    if not match:
        want = [(a["version"], a["edits"], a["n_keys"]) for a in allowed]
        problems.append(
            f"half-committed or lost: version {got['version']} edits {got['edits']} "
            f"keys {got['n_keys']}; allowed {want}"
        )
    info["version"] = got["version"]
    rep = cb.check()
    info["doctor"] = 0 if rep.ok else 1
    if not rep.ok:
        try:
            fixed = repair_codebook(cb_path, lock_timeout=2.0)
        except CodebookError as e:
            problems.append(f"doctor --repair failed: {e} (problems {rep.problems[:2]})")
            return problems, info
        info["repaired"] = True
        if not fixed.ok:
            problems.append(f"doctor --repair left {fixed.problems[:2]}")
        after = _summary(Codebook.open(cb_path))
        if match and not _same(after, match[0], version=False):
            problems.append("doctor --repair changed the content")
    return problems, info


@contextlib.contextmanager
def _engine_threshold():
    """REASONEDIT_ENGINE_MIN_KEYS=ENGINE_MIN_KEYS for the duration (restored after:
    check_state runs in the caller's process)."""
    old = os.environ.get("REASONEDIT_ENGINE_MIN_KEYS")
    os.environ["REASONEDIT_ENGINE_MIN_KEYS"] = ENGINE_MIN_KEYS
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("REASONEDIT_ENGINE_MIN_KEYS", None)
        else:
            os.environ["REASONEDIT_ENGINE_MIN_KEYS"] = old


def _same(a: dict, b: dict, version: bool = True) -> bool:
    keys = ("edits", "key_ids", "n_keys", "hits", "auto") + (("version",) if version else ())
    return all(a[k] == b[k] for k in keys)


def run(workload: str, out: Path, max_states: int | None, model: str | None) -> dict:
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    rec = out / "rec"
    if rec.exists():
        shutil.rmtree(rec)
    rec.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    env["REASONEDIT_ENGINE_MIN_KEYS"] = ENGINE_MIN_KEYS
    args = [sys.executable, str(Path(__file__).resolve()), "record", workload, str(rec)]
    res = subprocess.run(args + ([model] if model else []), capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"recording failed: {res.stderr[-3000:]}")
    t_rec = time.monotonic() - t0
    log = json.loads((rec / "log.json").read_text())
    # acknowledged states: before step s = after step s-1
    acks = [e["state"] for e in log if e["op"] in ("start", "ack")]
    # versions an operation commits before the one it returns with (add-edit --merge:
    # the add, then the merge): complete versions, allowed while it is in flight
    inter = [_intermediates(rec / "cb", a["version"], b["version"]) for a, b in zip(acks, acks[1:])]
    step_of, ack_at, s = [], [], 0
    for i, e in enumerate(log):
        if e["op"] == "ack":
            s += 1
            ack_at.append(i)
        step_of.append(s)
    states = list(crash_states(log))
    rng = random.Random(1)
    if max_states and len(states) > max_states:
        states = rng.sample(states, max_states)
    else:  # shuffled: a run cut short has sampled every operation alike
        rng.shuffle(states)
    seen: set[str] = set()
    figures: dict[str, Any] = {
        "workload": workload,
        "operations": [e["step"] for e in log if e["op"] == "begin"],
        "fs_ops": sum(e["op"] not in ("begin", "ack", "start") for e in log),
        # writes of the wide-key engine's files (issue 22): mapped vectors, reduced
        # index, facts, lifted graph
        "engine_writes": sum(
            e["op"] == "write" and os.path.basename(e["path"]).startswith(ENGINE_FILES) for e in log
        ),
        "by_op": {},
        "crash_points": len({t[0] for t in states}),
        "states": 0,
        "duplicates": 0,
        "violations": [],
        "doctor_0": 0,
        "repaired": 0,
        "by_version": {},
    }
    for e in log:
        if e["op"] not in ("begin", "ack", "start"):
            figures["by_op"][e["op"]] = figures["by_op"].get(e["op"], 0) + 1
    work = out / "state"
    keys_seen: set[tuple] = set()
    for n_done, (upto, vname, names, inodes, mode) in enumerate(states):
        if n_done % 25 == 0:
            bad = len(figures["violations"])
            msg = f"{n_done}/{len(states)} candidates, {figures['states']} checked, {bad} bad"
            print(msg, file=sys.stderr, flush=True)
            figures["seconds"] = round(time.monotonic() - t0, 1)
            partial = dict(figures, partial=f"{n_done}/{len(states)} candidates")
            (out / "figures.json").write_text(json.dumps(partial, indent=2, default=str) + "\n")
        key = _names_key(names, inodes, mode)
        if key in keys_seen:  # the same disk as one already built: skip without building
            figures["duplicates"] += 1
            continue
        keys_seen.add(key)
        materialize(rec / "snapshot", rec / "blobs", names, inodes, mode, work)
        digest = _tree_digest(work)
        if digest in seen:
            figures["duplicates"] += 1
            continue
        seen.add(digest)
        # the crash hit step s (0-based) after log[:upto]; done once its ack is in the prefix
        s = step_of[upto - 1] if upto else 0
        in_flight = s < len(ack_at) and upto <= ack_at[s]
        allowed = [acks[s]]
        if in_flight and s + 1 < len(acks):
            allowed = [acks[s], *inter[s], acks[s + 1]]
        with _engine_threshold():  # doctor --repair rebuilds the engine files too
            problems, info = check_state(work, allowed, model is not None)
        figures["states"] += 1
        figures["doctor_0"] += info.get("doctor") == 0
        figures["repaired"] += bool(info.get("repaired"))
        v = str(info.get("version"))
        figures["by_version"][v] = figures["by_version"].get(v, 0) + 1
        if problems:
            figures["violations"].append(
                {
                    "point": upto,
                    "op": log[upto - 1] if upto else None,
                    "names": vname,
                    "data": mode,
                    "problems": problems,
                }  # fmt: skip
            )
    figures["record_s"] = round(t_rec, 1)
    figures["seconds"] = round(time.monotonic() - t0, 1)
    (out / "figures.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return figures


def _intermediates(cb_path: Path, first: int, last: int) -> list[dict]:
    """Summaries of versions first+1 .. last-1, read from the final codebook's versions/
    copies (segments are never deleted, so every kept version can be read)."""
    from reasonedit_cli.store import Codebook

    out = []
    for v in range(first + 1, last):
        m = json.loads((cb_path / "versions" / f"v{v:06d}.json").read_text())
        out.append(_summary(Codebook(cb_path, m)))
    return out


def _names_key(names: dict, inodes: dict, mode: str) -> tuple:
    """What `materialize` would build from these names, as a hashable key."""
    out = []
    for p, v in sorted(names.items()):
        if isinstance(v, int):
            ino = inodes[v]
            out.append((p, ino["blob"], "full" if ino["synced"] else mode))
        else:
            out.append((p, v))
    return tuple(out)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cmd = sys.argv[1]
    if cmd == "record":
        record(sys.argv[2], Path(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
    elif cmd == "run":
        wl, out = sys.argv[2], Path(sys.argv[3])
        mx = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "all" else None
        model = sys.argv[5] if len(sys.argv) > 5 else None
        f = run(wl, out, mx, model)
        print(json.dumps({k: v for k, v in f.items() if k != "violations"}, indent=2))
        print(f"violations: {len(f['violations'])}")
        for v in f["violations"][:20]:
            print(json.dumps(v, default=str)[:600])
    else:
        sys.exit("usage: crash_harness.py run synthetic|real OUT [MAX_STATES|all] [MODEL]")
