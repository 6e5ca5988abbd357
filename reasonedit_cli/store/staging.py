"""The staging folders of a codebook (`<codebook>/staging/<job>/`): finding and removing them.

Distributed add-edit jobs (the Ray engine, reasonedit_cli/distributed.py and staging.py)
stage their workers' Parquet files there; no reader ever looks inside (only the manifest
says what the codebook holds). Each folder holds `JOB.json` ({pid, host, started}) of the
driving process. A folder whose driver died on this host is *stale*: the next Ray job on
the codebook and `doctor --repair` remove it. Folders of other hosts are never removed
automatically, for the same reason as the writer lock: their pid means nothing here.
This module is the codebook's side (`doctor`, clean-up); creating and filling a folder is
the Ray side's (reasonedit_cli/staging.py).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .lock import pid_alive

STAGING = "staging"
JOB_FILE = "JOB.json"
#: A folder without a readable JOB.json older than this is a crash during creation.
UNREADABLE_STALE_S = 60.0


@dataclass
class Leftover:
    """A staging folder found in a codebook, and whether its job is known to be dead."""

    path: Path
    owner: str
    stale: bool


def leftovers(codebook: Path) -> list[Leftover]:
    """Every staging folder of the codebook, oldest name first."""
    root = Path(codebook) / STAGING
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        owner, stale = _owner(d)
        out.append(Leftover(d, owner, stale))
    return out


def remove_stale(codebook: Path) -> list[str]:
    """Remove the staging folders of dead jobs on this host; returns their relative paths."""
    removed = []
    for job in leftovers(codebook):
        if job.stale:
            shutil.rmtree(job.path, ignore_errors=True)
            if not job.path.exists():
                removed.append(f"{STAGING}/{job.path.name}")
    with contextlib.suppress(OSError):
        (Path(codebook) / STAGING).rmdir()
    return removed


def check_staging(codebook: Path, report: Any, *, repair: bool) -> None:
    """`doctor`'s view: staging folders are notes, never problems; repair removes stale ones."""
    jobs = leftovers(codebook)
    if repair:
        report.repaired.extend(
            f"removed {rel} (staging folder of a dead Ray job)" for rel in remove_stale(codebook)
        )
        jobs = [j for j in jobs if j.path.exists()]
    for job in jobs:
        rel = f"{STAGING}/{job.path.name}"
        if job.stale:
            report.notes.append(
                f"{rel}: left by a Ray job that died ({job.owner}); never read, "
                "removed by `doctor --repair` or the next Ray job"
            )
        else:
            report.notes.append(
                f"{rel}: a Ray add-edit in progress or on another host ({job.owner})"
            )


def _owner(d: Path) -> tuple[str, bool]:
    """Who staged in `d`, and whether that process is known to be dead."""
    try:
        info = json.loads((d / JOB_FILE).read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            age = time.time() - d.stat().st_mtime
        except OSError:
            return "an unknown job", False
        return "an unknown job", age > UNREADABLE_STALE_S
    owner = f"pid {pid} on host {host} since {info.get('started', '?')}"
    return owner, host == socket.gethostname() and not pid_alive(pid)
