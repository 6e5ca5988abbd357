"""Hostile or broken codebooks (issue 23): special files and symlinks where files should
be, Parquet footers crafted to exhaust memory, read-only codebooks, a full disk.

Each case ends in a clear one-line `CodebookError` (or, for derived files, a recompute
with identical results), never a hang, never a file read from outside the codebook.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_reliability import build_synthetic_codebook, tree_hashes

from reasonedit_cli import store as C
from reasonedit_cli.errors import CodebookError, CodebookLockedError
from reasonedit_cli.store import Codebook, EditRecord, KeyRecord

HERE = Path(__file__).resolve().parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HMK = 100


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """120 synthetic keys in 2 commits, hnsw persisted (hnsw_min_keys=100)."""
    root = tmp_path_factory.mktemp("hostile")
    src = build_synthetic_codebook(
        root / "src", n_edits=40, keys_per_edit=3, batches=2, hnsw_min_keys=HMK
    )
    cb = Codebook.open(src, hnsw_min_keys=HMK)
    q = np.random.default_rng(1).normal(size=(2, cb.dim)).astype("float32")
    base = [[r for r, _, _ in h] for h in cb.search(q, k=5, method="exact")]
    return {"root": root, "src": src, "dim": cb.dim, "baseline": base, "manifest": cb.manifest}


def _run_worker(cases: list[dict], tmp: Path, timeout: float = 600) -> list[dict]:
    f = tmp / "cases.json"
    f.write_text(json.dumps(cases))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, str(HERE / "helpers_hostile.py"), str(f)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]


def _targets(m: dict) -> dict[str, str]:
    """target path -> what it is, for every kind of file and folder of the codebook."""
    segs = m["segments"]
    files = m["derived"]["files"]
    image = next(p for p in (Path(m["_root"]) / "images").rglob("*.png"))
    return {
        "manifest.json": "manifest",
        f"versions/v{m['version']:06d}.json": "versions",
        next(s["path"] for s in segs if s["kind"] == "keys"): "segment",
        next(s["path"] for s in segs if s["kind"] == "edits"): "segment",
        files["sigma"]["path"]: "derived",
        files["hnsw"]["path"]: "derived",
        str(image.relative_to(m["_root"])): "image",
        "LOCK": "lock",
        "segments": "segment",
        "index": "derived",
        "versions": "versions",
        str(image.parent.relative_to(m["_root"])): "image",
    }


def test_special_files_and_symlinks_are_refused_without_blocking(synth, tmp_path):
    m = dict(synth["manifest"], _root=str(synth["src"]))
    cases = []
    for target, what in _targets(m).items():
        is_dir = (synth["src"] / target).is_dir()
        for kind in ("fifo", "chardev", "symlink") + (() if is_dir else ("dir",)):
            cases.append(
                {
                    "id": len(cases),
                    "src": str(synth["src"]),
                    "work": str(tmp_path / f"w{len(cases)}"),
                    "target": target,
                    "what": what,
                    "kind": kind,
                    "dim": synth["dim"],
                    "hnsw_min_keys": HMK,
                    "baseline": synth["baseline"],
                    "writer": what == "lock",
                }
            )
    results = _run_worker(cases, tmp_path)
    assert len(results) == len(cases) >= 40
    bad = []
    for r in results:
        c, why = r["case"], list(r["problems"])
        if r["seconds"] > 15:
            why.append(f"took {r['seconds']} s")
        if c["what"] in ("manifest", "segment") and r.get("reader") != "error":
            why.append("reader trusted a source file that is not a regular file")
        if c["what"] in ("derived", "image", "versions", "lock") and not (
            r.get("reader") == "ok" and r.get("same")
        ):
            why.append(f"reader should answer as before: {r.get('error')}")
        if c["what"] != "lock" and r.get("doctor") == "ok":
            why.append("doctor did not report it")
        if c["what"] == "lock" and r.get("writer") != "error":
            why.append("a writer went past a LOCK that is not a regular file")
        if why:
            bad.append((c["target"], c["kind"], why, r.get("error"), r.get("doctor_lines")))
    assert not bad, bad
    errors = [r["error"] for r in results if r.get("error")]
    assert any("is a FIFO, not a regular file" in e for e in errors)
    assert any("is a symlink, not a regular file" in e for e in errors)
    assert any("segments/ is a symlink" in e for e in errors)


@pytest.mark.parametrize(
    "kind", ["footer-huge", "footer-past-start", "footer-garbage", "metadata-huge", "no-magic"]
)
def test_parquet_with_huge_or_malformed_metadata_is_refused_quickly(synth, tmp_path, kind):
    case = {
        "id": kind,
        "src": str(synth["src"]),
        "work": str(tmp_path / "w"),
        "kind": kind,
        "dim": synth["dim"],
        "hnsw_min_keys": HMK,
        "baseline": synth["baseline"],
    }
    (r,) = _run_worker([case], tmp_path, timeout=300)
    assert not r["problems"], r
    assert r["reader"] == "error" and r["doctor"] == "problems", r
    assert "not readable Parquet" in r["error"] or "declares" in r["error"], r["error"]
    assert r["seconds"] < 10, r
    # the 24 MB file itself is read once (its sha256); nothing near the 2 GB it declares
    assert r["rss_growth_mb"] < 400, r


# ------------------------------------------------------------------ read-only


def _ro_bind(src: Path, dst: Path) -> bool:
    """Mount src read-only at dst (root with mount rights), else False."""
    dst.mkdir()
    ok = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True)
    if ok.returncode != 0:
        return False
    ro = subprocess.run(
        ["mount", "-o", "remount,ro,bind", str(dst)], capture_output=True
    ).returncode
    if ro != 0:
        subprocess.run(["umount", str(dst)], capture_output=True)
        return False
    return True


@pytest.fixture
def read_only(synth, tmp_path):
    """A read-only view of a copy of the synthetic codebook: a read-only bind mount
    (root), else chmod -w (non-root); skipped when neither stops writes."""
    src = tmp_path / "src"
    shutil.copytree(synth["src"], src)
    ro = tmp_path / "ro"
    if _ro_bind(src, ro):
        yield ro
        subprocess.run(["umount", str(ro)], capture_output=True)
        return
    if IS_ROOT:
        pytest.skip("root without mount rights: chmod does not stop writes")
    for p in [src, *src.rglob("*")]:
        if p.is_dir():
            p.chmod(0o555)
    yield src
    for p in [src, *src.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)


def test_read_only_codebook_reads_and_refuses_writes_in_one_line(synth, read_only):
    from typer.testing import CliRunner

    from reasonedit_cli.cli import app

    before = tree_hashes(read_only)
    cb = Codebook.open(read_only, hnsw_min_keys=HMK)
    q = np.random.default_rng(1).normal(size=(2, synth["dim"])).astype("float32")
    assert [[r for r, _, _ in h] for h in cb.search(q, k=5, method="exact")] == synth["baseline"]
    assert cb.check(images=True).ok
    runner = CliRunner()
    for args in (["remove-edit", "s00001"], ["restore", "1"]):
        res = runner.invoke(app, [*args, "-c", str(read_only)])
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.exit_code == 1, (args, res.output)
        assert len(lines) == 1 and lines[0].startswith("Error:"), lines
        assert "Read-only file system" in lines[0] or "Permission denied" in lines[0], lines
    assert tree_hashes(read_only) == before


# ------------------------------------------------------------------ disk full


def _records(n: int, dim: int, start: int, sha: str):
    rng = np.random.default_rng(start)
    edits = [
        EditRecord(f"n{start + i}", sha, f"q{i}?", f"a{i}", ["r."], None, "x") for i in range(n)
    ]
    keys = [
        KeyRecord(e.edit_id, "answer", f"v{e.edit_id}", f"t{e.edit_id}", sha, None,
                  rng.normal(size=dim).astype("float32"), radius=0.5)
        for e in edits
    ]  # fmt: skip
    return edits, keys


def _state(cb_path: Path) -> dict:
    """Every file but LOCK-free temp state: what must be unchanged after a failed commit."""
    return {k: v for k, v in tree_hashes(cb_path).items() if not k.startswith("index/")}


def _assert_failed_cleanly(cb_path: Path, before: dict, err: Exception, version: int) -> None:
    assert "\n" not in str(err) and str(err), err
    cb = Codebook.open(cb_path, hnsw_min_keys=HMK)
    assert cb.version == version
    assert not list(cb_path.rglob("*.tmp-*")), list(cb_path.rglob("*.tmp-*"))
    assert not (cb_path / "LOCK").exists()
    now = _state(cb_path)
    assert now == before, set(now.items()) ^ set(before.items())
    assert cb.check().ok


def test_enospc_at_every_write_and_fsync_of_a_commit(synth, tmp_path):
    """The file-helper seam fails the k-th write or fsync of an add with ENOSPC, for
    every k: the previous version stays, temp files are gone, the error is one line."""
    work = tmp_path / "cb"
    shutil.copytree(synth["src"], work)
    cb = Codebook.open(work, hnsw_min_keys=HMK)
    sha = next(iter(cb.edits())).image_sha256
    k, failures = 0, 0
    while True:
        before, version = _state(work), cb.version
        count = {"n": 0}

        def fail(op, path, other, k=k, count=count):
            if op in ("write", "fsync"):
                if count["n"] == k:
                    raise OSError(errno.ENOSPC, "No space left on device")
                count["n"] += 1

        edits, keys = _records(3, synth["dim"], 1000 + k, sha)
        cb = Codebook.open(work, hnsw_min_keys=HMK)
        try:
            with C.file_operations(fail), cb.writer() as w:
                w.add(edits, keys)
        except CodebookError as e:
            assert "No space left on device" in str(e), e
            _assert_failed_cleanly(work, before, e, version)
            failures += 1
            k += 1
            continue
        break  # k is past the last operation: the add went through
    assert failures >= 8, failures
    assert Codebook.open(work).version == version + 1


def _tmpfs(d: Path, size: str) -> bool:
    d.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True
        ).returncode
        == 0
    )


def test_disk_full_on_a_real_small_tmpfs(synth, tmp_path):
    """A 2 MiB tmpfs filled to within a few KB: adds fail with ENOSPC at various points
    (segment, derived files, versions copy, manifest) and leave the previous version."""
    mnt = tmp_path / "mnt"
    if not _tmpfs(mnt, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        work = mnt / "cb"
        shutil.copytree(synth["src"], work)
        sha = Codebook.open(work).edits()[0].image_sha256
        filler = mnt / "filler"
        seen = set()
        for free_kb in (0, 4, 8, 16, 32, 64, 128):
            filler.unlink(missing_ok=True)
            st = os.statvfs(mnt)
            room = st.f_bavail * st.f_frsize - free_kb * 1024
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, room))
            before = _state(work)
            cb = Codebook.open(work, hnsw_min_keys=HMK)
            version = cb.version
            edits, keys = _records(40, synth["dim"], 5000 + free_kb, sha)
            try:
                with cb.writer() as w:
                    w.add(edits, keys)
            except CodebookError as e:
                assert "No space left on device" in str(e), e
                _assert_failed_cleanly(work, before, e, version)
                seen.add(str(e).split(": ")[1][:20])
        filler.unlink()
        assert seen, "no add ran out of space"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_lock_taken_before_the_last_boot_is_stale(tmp_path):
    """After a power loss the pid in LOCK may belong to another live process: a lock
    taken before this machine booted is broken like one of a dead process."""
    import socket

    try:
        btime = next(int(x.split()[1]) for x in open("/proc/stat", "rb") if x.startswith(b"btime "))
    except (OSError, StopIteration):
        pytest.skip("no boot time here (/proc/stat)")
    assert btime > 946684800
    src = build_synthetic_codebook(tmp_path / "cb", n_edits=2, keys_per_edit=1, batches=1)
    lock = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": "2000-01-01T00:00:00+00:00",
    }
    (src / "LOCK").write_text(json.dumps(lock))
    with Codebook.open(src).writer(lock_timeout=0.5) as w:  # our own pid: alive
        w.set_config(after_reboot=True)
    assert Codebook.open(src).config["after_reboot"] is True
    lock["started"] = "2999-01-01T00:00:00+00:00"  # after boot and alive: held
    (src / "LOCK").write_text(json.dumps(lock))
    with pytest.raises(CodebookLockedError):
        with Codebook.open(src).writer(lock_timeout=0.3):
            pass
