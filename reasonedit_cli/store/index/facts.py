"""The keys' facts without their vectors, as a memory-mapped Arrow file (issue 22).

Why: `retrieve` needs, for the few keys a query hits, their `value`, `kind`, `edit_id`,
`key_id`, `box`, `merged` (and `radius` for a one-key codebook). Reading them from the
Parquet segments decodes every live key, vectors included: 16 s at a million 512-wide
keys, minutes at 4,480. This derived file holds the live keys table minus `vector`, in
row order, in the Arrow IPC file format, which pyarrow maps without copying: opening it
costs a stat, a hash of nothing and a footer parse, and reading a hit's columns touches
a few pages, whatever the codebook's size.

Verified like the mapped vectors (`mapped.py`): size and mtime on open (a changed mtime
means a full rehash), full sha256 on write and in `doctor`; the schema and row count are
checked against the manifest entry before use. Damage in place with the mtime restored
can change the facts a hit returns (never code: Arrow IPC holds no pickles) and Arrow's
own bounds checks (`validate`) keep offsets inside the buffers.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from ..files import replaced
from .mapped import MappedError, hash_fd


def write_facts(path: Path, table: pa.Table) -> dict:
    """Write `table` (the live keys, no `vector` column) atomically as an Arrow IPC file.

    Returns the manifest entry without `path`: rows, bytes, sha256, mtime_ns, columns.
    """
    if "vector" in table.column_names:
        table = table.drop(["vector"])
    with replaced(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as w:
            w.write_table(table, max_chunksize=1 << 16)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            sha = hash_fd(fd)
        finally:
            os.close(fd)
    st = os.stat(path)
    return {
        "rows": table.num_rows,
        "bytes": st.st_size,
        "sha256": sha,
        "mtime_ns": st.st_mtime_ns,
        "columns": table.column_names,
    }


def open_facts(path: Path, entry: dict, *, full_check: bool = False) -> pa.Table:
    """The facts table, memory-mapped, after the cheap checks (full rehash with
    full_check or when the mtime changed). Raises MappedError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise MappedError(f"{path.name} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise MappedError(f"{path.name} is not a regular file")
    try:
        if st.st_size != int(entry["bytes"]):
            raise MappedError(
                f"{path.name} has {st.st_size} bytes, the manifest says {entry['bytes']}"
            )
        if full_check or st.st_mtime_ns != entry.get("mtime_ns"):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                if hash_fd(fd) != entry["sha256"]:
                    raise MappedError(f"{path.name} is damaged (checksum mismatch)")
            finally:
                os.close(fd)
        source = pa.memory_map(str(path), "r")
        table = ipc.open_file(source).read_all()
        if full_check:
            table.validate(full=True)
    except MappedError:
        raise
    except (pa.ArrowException, OSError, KeyError, TypeError, ValueError) as e:
        raise MappedError(f"{path.name} is not a readable facts file ({e})") from e
    if table.num_rows != int(entry["rows"]) or table.column_names != list(entry["columns"]):
        raise MappedError(f"{path.name} does not match its manifest entry")
    return table


def row_facts(table: pa.Table, row: int) -> dict:
    """One key's facts as Python values (what a hit needs), reading only that row."""
    return {name: table.column(name)[row].as_py() for name in table.column_names}


def facts_digest(table: pa.Table) -> str:
    """sha256 of a table's IPC bytes (tests: two writes of the same table agree)."""
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=1 << 16)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
