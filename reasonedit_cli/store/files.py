"""File operations of the store: atomic writes, fsync, safe reads of hostile files, hooks.

Every write, fsync, rename, unlink and mkdir the store issues inside a codebook goes
through these helpers, which report it to optional hooks (`file_operations`): the
power-loss harness (tests/crash_harness.py) records that log and rebuilds the disk at
each crash point, and tests make an operation fail (ENOSPC) here. Every read of a file
of a codebook goes through `read_regular`/`open_regular`, which refuse symlinks, FIFOs,
devices and oversized files, so a hostile codebook cannot block, crash or redirect us.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# -- the file-operation seam (issue 23) ----------------------------------------------

#: hook(op, path, other): op is "write" (the temp file holds its full data, not yet
#: fsynced), "fsync", "fsync_dir", "rename" (path -> other), "unlink", "mkdir", "link".
FileHook = Callable[[str, Path, "Path | None"], None]
_file_hooks: list[FileHook] = []


@contextlib.contextmanager
def file_operations(hook: FileHook) -> Iterator[None]:
    """Call hook(op, path, other) for every file operation the store issues (tests)."""
    _file_hooks.append(hook)
    try:
        yield
    finally:
        _file_hooks.remove(hook)


def note(op: str, path: Path, other: Path | None = None) -> None:
    for hook in list(_file_hooks):
        hook(op, path, other)


def fsync_dir(path: Path) -> None:
    # Makes a rename durable; some platforms cannot open directories, which is fine.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
        note("fsync_dir", path)
    except OSError:
        pass
    finally:
        os.close(fd)


def mkdirs(path: Path) -> None:
    """mkdir -p whose new directories are durable: each parent is fsynced after."""
    if path.is_dir():
        return
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        note("mkdir", d)
        fsync_dir(d.parent)


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """A temp name next to `path` for the body to write by any means (bytes, numpy,
    pyarrow, hnswlib's save_index); then fsync, rename over `path`, fsync the directory.

    Readers see the old file or the whole new one. On any failure (ENOSPC, EROFS, ...) the
    temp file is removed and the error re-raised. Every file of the store is made durable
    here, so the crash harness's hook (`file_operations`) sees each step.
    """
    tmp = tmp_name(path)
    try:
        yield tmp
        note("write", tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        note("fsync", tmp)
        rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` as `path` atomically and durably (see `replaced`)."""
    mkdirs(path.parent)
    with replaced(path) as tmp, open(tmp, "xb") as f:
        f.write(data)


def rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    note("rename", src, dst)


def unlink(path: Path) -> None:
    """Remove one file the store made (never a directory)."""
    os.unlink(path)
    note("unlink", path)


# -- reading files of a codebook that may be hostile -----------------------------------

#: Largest manifest / versions copy / LOCK read (a million-key manifest is ~100 KB).
MAX_MANIFEST_BYTES = 64 << 20
#: Largest Parquet footer (file metadata) accepted before pyarrow parses it; ours are KBs.
MAX_PARQUET_FOOTER = 4 << 20


class NotRegularFileError(OSError):
    """A path of the codebook that is not read: a FIFO, device, directory or symlink
    where a plain file should be, or a file over its size limit."""


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, root: Path | None = None) -> int:
    """An fd for reading `path`, refused unless it is a regular file inside its codebook.

    lstat first (a symlink is refused, never followed out of the codebook), then open
    with O_NONBLOCK | O_NOFOLLOW (a FIFO swapped in meanwhile cannot block us) and fstat
    the opened file (S_ISREG). The directories between the codebook root and the file
    are checked too: `segments/` as a symlink to elsewhere is refused.
    """
    for parent in _inner_dirs(path, root):
        st = os.lstat(parent)
        if not stat.S_ISDIR(st.st_mode):
            raise NotRegularFileError(
                errno.EINVAL, f"{parent.name}/ is {_kind_of(st.st_mode)}, not a directory"
            )
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(errno.EINVAL, f"is {_kind_of(st.st_mode)}, not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(
                errno.EINVAL, f"is {_kind_of(st.st_mode)}, not a regular file"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _inner_dirs(path: Path, root: Path | None) -> list[Path]:
    """The directories between the codebook root and `path` (the root itself may be a
    symlink the user chose; nothing below it may)."""
    if root is None:
        return []
    try:
        rel = path.relative_to(root)
    except ValueError:
        return []
    return [root / q for q in list(rel.parents)[:-1]]


def read_regular(path: Path, root: Path | None = None, limit: int | None = None) -> bytes:
    """The bytes of a regular file of the codebook (see `open_regular`); at most `limit`."""
    fd = open_regular(path, root)
    with os.fdopen(fd, "rb") as f:
        if limit is not None and os.fstat(f.fileno()).st_size > limit:
            raise NotRegularFileError(errno.EFBIG, f"is larger than {limit} bytes")
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise NotRegularFileError(errno.EFBIG, f"is larger than {limit} bytes")
    return data


def read_codebook_file(path: Path, root: Path, limit: int | None = MAX_MANIFEST_BYTES) -> bytes:
    """Bytes of a file of the codebook at `root`, refused (OSError) unless it is a regular
    file reached without symlinks below the root; at most `limit` bytes. Never blocks."""
    return read_regular(path, root, limit)


def parquet_footer_ok(data: bytes) -> str | None:
    """Why `data` is not a Parquet file we parse (None: fine), read before pyarrow does.

    pyarrow allocates what the footer declares; a huge or malformed footer is refused
    here, in O(1), so a hostile file costs neither memory nor time.
    """
    if len(data) < 12 or data[:4] != b"PAR1" or data[-4:] != b"PAR1":
        return "no Parquet magic bytes"
    meta_len = int.from_bytes(data[-8:-4], "little")
    if meta_len <= 0 or meta_len > len(data) - 12:
        return f"its footer claims {meta_len} bytes of metadata in a {len(data)}-byte file"
    if meta_len > MAX_PARQUET_FOOTER:
        return f"its metadata is {meta_len} bytes (more than {MAX_PARQUET_FOOTER})"
    return None


def hash_file(f: Any, chunk: int = 1 << 24) -> tuple[str, int]:
    """sha256 hex and size of an open binary file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    while block := f.read(chunk):
        h.update(block)
        size += len(block)
    return h.hexdigest(), size


def tmp_files(path: Path) -> list[Path]:
    """Temp files of interrupted writers (`*.tmp-*`) anywhere the store writes."""
    out = list(path.glob("*.tmp-*"))
    for sub in ("segments", "index", "versions"):
        out += (path / sub).glob("*.tmp-*")
    out += (path / "images").glob("*/*.tmp-*")
    return out
