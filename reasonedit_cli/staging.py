"""Staging folders of distributed add-edit jobs: `<codebook>/staging/<job>/`.

A Ray job's workers write Parquet key and edit files there; the one committing process
verifies them and commits their rows as a new version, then removes the folder. No
reader ever looks into `staging/` (only the manifest says what the codebook holds), so a
job that crashes or is cancelled leaves the codebook at its previous version whatever it
left behind.

Workers write their records with `staged_segment_bytes`, in exactly the format of
committed segments; the committer reads them back with `read_staged_segment`, verified
like a committed segment (the store's own reader, store/reader.py).

Each folder holds `JOB.json` ({pid, host, started}) of the driving process; finding and
removing the folders of dead jobs is the codebook's side (store/staging.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CodebookError
from .store.format import (
    EditRecord,
    KeyRecord,
    edit_records,
    edits_to_table,
    key_records,
    keys_to_table,
    now_iso,
    table_bytes,
    vectors_of,
)
from .store.reader import Codebook, read_segment
from .store.staging import JOB_FILE, STAGING, remove_stale


class StagingJob:
    """One job's staging folder: created on entry, removed on exit whatever happened."""

    def __init__(self, codebook: Path) -> None:
        self.codebook = Path(codebook)
        self.id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir = self.codebook / STAGING / self.id

    def rel(self, name: str) -> str:
        """Path of a file of this job relative to the codebook (as manifest entries are)."""
        return f"{STAGING}/{self.id}/{name}"

    def __enter__(self) -> StagingJob:
        remove_stale(self.codebook)
        self.dir.mkdir(parents=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso("seconds")}
        (self.dir / JOB_FILE).write_text(json.dumps(info) + "\n")
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.codebook / STAGING).rmdir()  # only when no other job is staging


def write_staged_file(directory: str | Path, name: str, data: bytes) -> None:
    """Write `data` as `directory/name` atomically (temp file, fsync, rename).

    Never creates `directory`: when the driver has given up and removed its staging
    folder, a straggling worker fails here instead of leaving an orphan folder behind.
    """
    d = Path(directory)
    tmp = d / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / name)


# ---------------------------------------------------------------------------
# staged segments: computed elsewhere (Ray workers), committed by one writer


def staged_segment_bytes(kind: str, records: Sequence[Any], dim: int | None = None) -> bytes:
    """Parquet bytes of edit or key records in exactly the schema of committed segments.

    Workers of a distributed add-edit write these into `staging/`; the committer reads
    them back with `read_staged_segment`, so both ends share the segment format.
    """
    if kind == "edits":
        return table_bytes(edits_to_table(list(records), dt.datetime.now(dt.timezone.utc)))
    if kind != "keys" or dim is None:
        raise CodebookError(f"staged segment: kind must be keys (with dim) or edits, got {kind!r}")
    return table_bytes(keys_to_table([(k.key_id, k) for k in records], dim))


def read_staged_segment(
    codebook: Codebook, entry: dict, dim: int | None
) -> list[KeyRecord] | list[EditRecord]:
    """Records of a staged segment, verified like a committed one (checksum, schema, rows).

    `entry` is a manifest-style entry {kind, path (relative to the codebook), sha256,
    rows}; `dim` the key width the workers reported (the codebook may have none yet).
    Edit records come back without a timestamp: the commit stamps them, as for local adds.
    """
    table = read_segment(codebook.path, entry, dim)
    if entry["kind"] == "edits":
        return edit_records(table, stamped=False)
    return key_records(table.to_pylist(), vectors_of(table, int(dim or 0)))
