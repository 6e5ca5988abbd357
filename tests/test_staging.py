"""Staging folders of Ray jobs inside a codebook: never a problem for `doctor`, stale ones
removed by `doctor --repair` (and the next Ray job), live or foreign ones left alone.

No Ray needed: these are the codebook-side rules; tests/test_ray.py runs real jobs.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from reasonedit_cli.staging import StagingJob, write_staged_file
from reasonedit_cli.store import Codebook
from reasonedit_cli.store.staging import JOB_FILE, STAGING, leftovers, remove_stale


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_job(cb: Path, name: str, pid: int, host: str | None = None) -> Path:
    d = cb / STAGING / name
    d.mkdir(parents=True)
    info = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00"}
    (d / JOB_FILE).write_text(json.dumps(info))
    (d / "keys-000000.parquet").write_bytes(b"half written")
    return d


@pytest.fixture
def cb(tmp_path) -> Path:
    Codebook.open(tmp_path / "cb", create=True)
    return tmp_path / "cb"


def test_doctor_notes_staging_and_repair_removes_only_stale_folders(cb):
    import os

    stale = fake_job(cb, "dead", dead_pid())
    live = fake_job(cb, "live", os.getpid())
    foreign = fake_job(cb, "foreign", 1, host="another-host.invalid")
    rep = Codebook.open(cb).check()
    assert rep.ok, rep.problems  # never a problem: nothing reads staging/
    assert any("staging/dead" in n and "died" in n for n in rep.notes)
    assert any("staging/live" in n and "in progress" in n for n in rep.notes)
    rep = Codebook.open(cb).check(repair=True)
    assert rep.ok
    assert any("staging/dead" in r for r in rep.repaired)
    assert not stale.exists() and live.exists() and foreign.exists()


def test_a_new_job_clears_stale_folders_and_removes_its_own(cb):
    stale = fake_job(cb, "dead", dead_pid())
    with StagingJob(cb) as job:
        assert not stale.exists()
        assert job.dir.is_dir() and (job.dir / JOB_FILE).exists()
        write_staged_file(job.dir, "edits-000000.parquet", b"data")
        assert (job.dir / "edits-000000.parquet").read_bytes() == b"data"
        assert [j.stale for j in leftovers(cb)] == [False]
    assert not (cb / STAGING).exists()  # the codebook looks as before the job
    assert remove_stale(cb) == []


def test_a_straggling_worker_cannot_recreate_a_removed_folder(cb):
    with StagingJob(cb) as job:
        pass
    with pytest.raises(FileNotFoundError):
        write_staged_file(job.dir, "keys-000001.parquet", b"late")
    assert not (cb / STAGING).exists()


def test_a_codebook_with_staging_opens(cb):
    fake_job(cb, "dead", dead_pid())
    assert Codebook.open(cb).version == 0


def test_staged_segments_round_trip_in_the_committed_format(cb):
    """What workers stage is what a commit writes: the committer reads the records back
    exactly, verified like a committed segment, and a damaged file is refused."""
    import hashlib

    import numpy as np

    from reasonedit_cli.errors import CodebookError
    from reasonedit_cli.staging import read_staged_segment, staged_segment_bytes
    from reasonedit_cli.store import EditRecord, KeyRecord
    from reasonedit_cli.store.format import keys_to_table, table_bytes

    sha = hashlib.sha256(b"image").hexdigest()
    edits = [EditRecord("e1", sha, "q?", "a", ["because."], None, "src")]
    vec = np.arange(4, dtype=np.float32)
    keys = [
        KeyRecord("e1", "answer", "The answer is a.", "q?", sha, None, vec, radius=0.5),
        KeyRecord("e1", "patch", "because.", "because.", sha, (0, 0, 2, 2), vec + 1),
    ]
    data = staged_segment_bytes("keys", keys, dim=4)
    assert data == table_bytes(keys_to_table([(k.key_id, k) for k in keys], 4))
    with StagingJob(cb) as job:
        write_staged_file(job.dir, "keys.parquet", data)
        write_staged_file(job.dir, "edits.parquet", staged_segment_bytes("edits", edits))
        book = Codebook.open(cb)
        entries = {
            kind: {
                "kind": kind,
                "path": job.rel(f"{kind}.parquet"),
                "sha256": hashlib.sha256((job.dir / f"{kind}.parquet").read_bytes()).hexdigest(),
                "rows": len(recs),
            }
            for kind, recs in (("keys", keys), ("edits", edits))
        }
        got = read_staged_segment(book, entries["keys"], 4)
        assert [(k.key_id, k.radius, k.box, k.merged) for k in got] == [
            (k.key_id, k.radius, k.box, []) for k in keys
        ]
        assert all(np.array_equal(a.vector, b.vector) for a, b in zip(got, keys, strict=True))
        (back,) = read_staged_segment(book, entries["edits"], None)
        assert back == edits[0]  # no timestamp: the commit stamps staged edits
        with pytest.raises(CodebookError, match="damaged"):
            read_staged_segment(book, {**entries["keys"], "sha256": "0" * 64}, 4)
