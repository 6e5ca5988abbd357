"""The writer lock: one writer at a time per codebook; readers never take it.

`LOCK` is created with O_CREAT|O_EXCL and holds {pid, host, started}. A lock left by a
dead process on this host (or taken before this machine booted) is broken; locks from
other hosts are never broken automatically, since their pid means nothing here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import time
import uuid
from pathlib import Path

from ..errors import CodebookError, CodebookLockedError
from .files import MAX_MANIFEST_BYTES, note, read_regular, unlink
from .format import LOCK, canonical, now_iso


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has that pid (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, owned by someone else
        return True
    return True


def before_boot(started: str) -> bool:
    """True when an ISO timestamp is older than this machine's boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat", "rb") as f:
            btime = next(int(x.split()[1]) for x in f if x.startswith(b"btime "))
        return dt.datetime.fromisoformat(started).timestamp() < btime
    except (OSError, StopIteration, ValueError, IndexError, TypeError):
        return False


def lock_owner(lock: Path) -> str:
    """Who holds a LOCK file, in words (for messages and `doctor`)."""
    try:
        info = json.loads(read_regular(lock, lock.parent, MAX_MANIFEST_BYTES))
        return f"pid {info['pid']} on host {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown writer"


class WriterLock:
    """Exclusive writer lock: `LOCK` created with O_CREAT|O_EXCL holding {pid, host, started}.

    Waits up to `timeout` seconds. A lock left by a dead process on this host is broken;
    locks from other hosts are never broken automatically (the pid means nothing here).
    """

    def __init__(self, path: Path, timeout: float):
        self.dir = path
        self.file = path / LOCK
        self.timeout = timeout
        self.content: bytes = b""

    def __enter__(self) -> WriterLock:
        deadline = time.monotonic() + self.timeout
        self.content = canonical(
            {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso()}
        )
        delay = 0.02
        while True:
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._break_if_stale():
                    continue
                if time.monotonic() >= deadline:
                    raise CodebookLockedError(
                        f"codebook {self.dir} is locked by {lock_owner(self.file)}; "
                        f"retry later or raise --lock-timeout"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
                continue
            except OSError as e:
                raise CodebookError(
                    f"codebook {self.dir}: cannot create {LOCK}: {e.strerror or e}"
                ) from e
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self.content)
                    f.flush()
                    note("write", self.file)
                    os.fsync(f.fileno())
                    note("fsync", self.file)
            except OSError as e:  # disk full: leave no empty LOCK behind
                with contextlib.suppress(OSError):
                    unlink(self.file)
                raise CodebookError(
                    f"codebook {self.dir}: cannot create {LOCK}: {e.strerror or e}"
                ) from e
            return self

    def _break_if_stale(self) -> bool:
        try:
            raw = read_regular(self.file, self.dir, MAX_MANIFEST_BYTES)
            age = time.time() - self.file.lstat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: retry at once
        except OSError:
            return False
        try:
            info = json.loads(raw)
            here = info["host"] == socket.gethostname()
            # taken before this machine booted (power loss): its pid may now be another
            # live process, so the pid test alone would keep the lock forever
            stale = here and (not pid_alive(int(info["pid"])) or before_boot(info["started"]))
        except (ValueError, KeyError, TypeError):
            stale = age > 10.0  # unreadable: a writer died while creating it, or is now
        if not stale:
            return False
        # Move it aside, then check we moved the lock we judged (not a fresh one).
        aside = self.dir / f"{LOCK}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.file, aside)
            note("rename", self.file, aside)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            if read_regular(aside, self.dir, MAX_MANIFEST_BYTES) != raw:
                with contextlib.suppress(OSError):
                    os.link(aside, self.file)  # put the fresh lock back
                    note("link", aside, self.file)
        finally:
            with contextlib.suppress(OSError):
                unlink(aside)
        return True

    def __exit__(self, *exc: object) -> None:
        try:
            if read_regular(self.file, self.dir, MAX_MANIFEST_BYTES) == self.content:
                unlink(self.file)
        except OSError:
            pass
