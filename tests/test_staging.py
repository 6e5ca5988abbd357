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
