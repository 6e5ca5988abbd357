"""Full-width key vectors as a memory-mapped derived file (issue 22).

Why: at a real VLM's width (4,480 = a 7-8B language layer's 4,096 + MiniLM's 384) a
million keys are 17.9 GB of float32. Decoding them from Parquet on every open cost
seconds per GB and held them all in memory. The Parquet segments stay the source of
truth; this file is a derived copy that a reader maps instead of decoding: opening costs
a stat and a page-table entry, and a search touches only the rows it re-ranks.

The file is a plain `.npy` (header: dtype, shape; then the rows, C order), float32 or
float16 (`MAPPED_DTYPES`; float16 halves the file and the page cache it needs, at a
relative rounding of 5e-4 per component: benchmarks/README.md says where recall allows
it). Its manifest entry (`write_vectors` returns it) is the sidecar: `rows`, `dim`,
`dtype`, `bytes`, `sha256` of the whole file, and `mtime_ns` after the rename.

Verification: the writer hashes while it writes; `doctor` (`full_check=True`) rehashes.
An ordinary open checks only what is cheap: the file is a regular file, its size is
the recorded size and its header declares the recorded dtype and shape (so every row a
search can address exists), and its mtime is the recorded one. A file whose mtime
changed (copied without preserving times, or written to) is rehashed in full before use.
What this cannot catch: bytes changed in place with the mtime restored. Such damage
changes distances, so `ask` may retrieve different facts or none; it cannot read outside
the mapping (the shape is checked against the size) nor crash the process (a search
treats non-finite distances as infinitely far).

A base file may be stored in another order than its rows (the IVF order of the index:
each list a contiguous range, so the reads of a list and its neighbours are sequential;
`write_permuted` writes it, `VectorParts(orders=...)` maps rows to positions).

Inserts never modify a mapped file: they write a small delta file of just their rows
(`VectorParts` serves base + deltas as one array by row), and compaction writes a new
base. Older readers keep the files they mapped; POSIX keeps an unlinked file's pages
alive while it is mapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import mmap
import os
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..files import replaced

#: dtypes a mapped vector file may hold (name in the manifest -> numpy dtype)
MAPPED_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
#: largest .npy header read (numpy writes 128 bytes or a multiple of 64 for ours)
_MAX_HEADER = 4096
_HASH_BLOCK = 1 << 24
_PERMUTE_CHUNK = 8192  # rows read at a time by write_permuted


#: whether `to_float32` may use an already imported torch (the benchmark compares both)
TORCH_CONVERSION = True


def to_float32(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x as float32 (the same values: float16 -> float32 is exact), written into `out`
    when given (a C-contiguous float32 array of x's shape), else a new array; float32
    input without `out` is returned as it is (callers pass fresh reads: the copy cost
    a third of an insert's re-rank, benchmarks/README.md).

    float16 rows are what a search re-ranks at 4,480 dims, and numpy converts them at
    0.2-0.8 G values/s (no F16C path): most of a search's CPU. torch's conversion (F16C /
    AVX-512) ran 12-30x faster (300 x 4,480: 0.18 ms vs 2.4 ms on the loaded 2-core
    machine). It is done in slices of _TORCH_SLICE values, which torch runs on the
    calling thread: one call on the whole block went to torch's thread pool and took
    14 ms there (threads contending with the load). torch takes 2-3 s to import, so it
    is used only when the process has already imported it (`ask` has: the model)."""
    if out is None and x.dtype == np.float32:
        return x
    torch = sys.modules.get("torch") if TORCH_CONVERSION else None
    if torch is None or x.dtype != np.float16 or x.size < 4096:
        if out is None:
            return x.astype(np.float32)
        np.copyto(out, x, casting="unsafe")
        return out
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    src = torch.from_numpy(np.ascontiguousarray(x).reshape(-1))
    dst = torch.from_numpy(out.reshape(-1))
    for s in range(0, x.size, _TORCH_SLICE):
        dst[s : s + _TORCH_SLICE].copy_(src[s : s + _TORCH_SLICE])
    return out


_TORCH_SLICE = 32_768  # torch's grain size: a copy of at most this many values is serial


class MappedError(ValueError):
    """A mapped file that may not be used: missing, not a regular file, the wrong size,
    header or checksum. The caller treats the derived file as damaged."""


def _all_finite(c: np.ndarray) -> bool:
    """np.isfinite(c).all(), on the exponent bits for float16 (numpy's float16 isfinite
    converts every element to float32 first: seconds a GB)."""
    flat = c.reshape(-1)
    step = 1 << 24  # in slices: a 2 GB block would otherwise take 3 GB of temporaries
    for a in range(0, len(flat), step):
        part = flat[a : a + step]
        if c.dtype == np.float16:
            exp = np.uint16(0x7C00)
            if np.any(np.bitwise_and(part.view(np.uint16), exp) == exp):
                return False
        elif not np.isfinite(part).all():
            return False
    return True


def npy_header(rows: int, dim: int, dtype: str) -> bytes:
    """The `.npy` header (format 1.0) of a C-order (rows, dim) array of `dtype`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {"descr": MAPPED_DTYPES[dtype].str, "fortran_order": False, "shape": (rows, dim)},
    )
    return buf.getvalue()


def write_vectors(
    path: Path,
    chunks: Iterable[np.ndarray],
    rows: int,
    dim: int,
    dtype: str = "float32",
) -> dict:
    """Write `rows` vectors, given as consecutive (m, dim) chunks, to `path` atomically.

    Streams: memory use is one chunk, whatever `rows` is (a million 4,480-wide keys are
    written in 18 GB of file from 100 MB of chunks). Temp name, fsync, rename, fsync of
    the directory, like every file of the store; the temp file is removed on failure.
    Returns the manifest entry (without `path`, which the caller sets).
    """
    if dtype not in MAPPED_DTYPES:
        raise ValueError(f"mapped dtype must be one of {sorted(MAPPED_DTYPES)}")
    dt = MAPPED_DTYPES[dtype]
    h = hashlib.sha256()
    written = 0
    with replaced(path) as tmp, open(tmp, "xb") as f:
        head = npy_header(rows, dim, dtype)
        f.write(head)
        h.update(head)
        for chunk in chunks:
            with np.errstate(over="ignore"):  # checked just below
                c = np.ascontiguousarray(chunk, dtype=dt)
            if c.ndim != 2 or c.shape[1] != dim:
                raise ValueError(f"chunk of shape {c.shape}, expected (m, {dim})")
            if not _all_finite(c):
                raise ValueError("vectors must be finite (float16 overflows above 65504)")
            written += len(c)
            if written > rows:
                raise ValueError(f"more than the {rows} rows announced")
            b = c.reshape(-1).view(np.uint8).data
            f.write(b)
            h.update(b)
        if written != rows:
            raise ValueError(f"{written} rows written, {rows} announced")
    st = os.stat(path)
    return {
        "rows": rows,
        "dim": dim,
        "dtype": dtype,
        "bytes": st.st_size,
        "sha256": h.hexdigest(),
        "mtime_ns": st.st_mtime_ns,
    }


def open_regular(path: Path, label: str | None = None) -> int:
    """A read-only fd of `path` when it is a regular file (no symlink, FIFO or device:
    hostile codebooks); MappedError names it `label` (default: the file's name)."""
    name = label or path.name
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise MappedError(f"{name} is not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MappedError(f"{name} is not a regular file")
    return fd


def parse_npy_header(head: bytes, name: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of a version-1.0 `.npy` header at the
    start of `head`; MappedError when there is none (a damaged or foreign file)."""
    f = io.BytesIO(head)
    try:
        if np.lib.format.read_magic(f) != (1, 0):
            raise ValueError("npy version")
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    except (ValueError, EOFError, SyntaxError) as e:
        raise MappedError(f"{name} has no valid .npy header") from e
    return tuple(shape), bool(fortran), dtype, f.tell()


def hash_fd(fd: int) -> str:
    """sha256 of a whole open file, read in blocks (never the file at once)."""
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while block := os.read(fd, _HASH_BLOCK):
        h.update(block)
    return h.hexdigest()


class MappedArray:
    """A verified, read-only mapping of one vector file: `.array` is (rows, dim)."""

    def __init__(
        self,
        mm: mmap.mmap,
        array: np.ndarray,
        entry: dict,
        rehashed: bool,
        fd: int | None = None,
        offset: int = 0,
    ):
        self._mm = mm
        self.array = array
        self.entry = entry
        #: True when the mtime differed and the file was rehashed in full to be used:
        #: `doctor --repair` records the new mtime so that later opens are cheap again
        self.rehashed = rehashed
        self._fd = fd  # for `read`: the same file as the mapping
        self._offset = offset

    def __del__(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def read(self, positions: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows at `positions` (sorted ascending for speed; repeats allowed) as a new
        array of the file's dtype (or into `out`: C-contiguous, that dtype and shape),
        read by `preadv`: one system call per run of consecutive positions.

        Why not index the mapping: each 4 KB page a mapping touches first is a page
        fault, and with MADV_RANDOM (no fault-around) a 9 KB row is 2-3 of them, while
        a read copies from the page cache (docs/codebook-format.md has the numbers). It
        also keeps the page cache out of this process's RSS, and a file truncated under
        it gives an error instead of SIGBUS.
        """
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        rows, dim = self.array.shape
        if out is None:
            out = np.empty((len(pos), dim), dtype=self.array.dtype)
        elif (out.shape != (len(pos), dim) or out.dtype != self.array.dtype
                or not out.flags.c_contiguous):  # fmt: skip
            raise ValueError("read: `out` must be a C-contiguous block of the file's rows")
        if not len(pos):
            return out
        if pos.min() < 0 or pos.max() >= rows:
            raise IndexError("vector rows out of range")
        if self._fd is None:
            out[:] = self.array[pos]
            return out
        rb = dim * self.array.dtype.itemsize
        buf = out.reshape(-1).view(np.uint8).data  # writable: preadv fills `out`
        # runs of consecutive positions: (first index, end index, file offset), as lists
        first = np.flatnonzero(np.diff(pos, prepend=-2) != 1)
        ends = np.append(first[1:], len(pos))
        fd, preadv, base = int(self._fd), os.preadv, self._offset
        for a, b, p in zip(first.tolist(), ends.tolist(), pos[first].tolist(), strict=True):
            at, want = a * rb, b * rb
            got = preadv(fd, [buf[at:want]], base + p * rb)
            if got != want - at:  # a short read (rare: a signal) or the end of the file
                self._read_rest(fd, buf, at + max(got, 0), want, base + p * rb + max(got, 0), got)
        return out

    def _read_rest(
        self, fd: int, buf: memoryview, at: int, want: int, where: int, got: int
    ) -> None:
        """The rest of a short `read`; a read at the end of the file is an error."""
        while got > 0 and at < want:
            got = os.preadv(fd, [buf[at:want]], where)
            at, where = at + max(got, 0), where + max(got, 0)
        if at < want:
            raise MappedError(f"{self.entry.get('path', 'vector file')} is truncated")

    @property
    def rows(self) -> int:
        return int(self.array.shape[0])

    def advise(self, start: int, stop: int, how: str) -> None:
        """madvise rows start..stop-1: "random" (a search touches a few rows: read only
        those pages, no read-around, which at 4,480 dims read ~300 KB per row fetched)
        or "willneed" (a scan is about to read them: read ahead)."""
        flag = {"random": "MADV_RANDOM", "willneed": "MADV_WILLNEED"}[how]
        row = int(self.array.strides[0]) if self.array.ndim == 2 else 0
        base = int(self.entry["bytes"]) - self.rows * row  # the .npy header
        lo = (base + start * row) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(int(self.entry["bytes"]), base + stop * row)
        with contextlib.suppress(AttributeError, OSError, ValueError):
            if hi > lo:
                self._mm.madvise(getattr(mmap, flag), lo, hi - lo)

    def release(self) -> None:
        """Drop this process's resident pages of the file (the page cache keeps them).

        A scan over every row (building neighbour lists, compaction) would otherwise
        count the whole file in the process's RSS.
        """
        with contextlib.suppress(AttributeError, OSError, ValueError):
            self._mm.madvise(mmap.MADV_DONTNEED)


def open_vectors(path: Path, entry: dict, *, full_check: bool = False) -> MappedArray:
    """Map a vector file after checking it against its manifest entry.

    Cheap by default (see the module docstring): regular file, size, header, mtime. With
    full_check, or when the mtime differs, the whole file is rehashed first. Raises
    MappedError for anything that does not match.
    """
    try:
        dtype = MAPPED_DTYPES[entry["dtype"]]
        rows, dim, size = int(entry["rows"]), int(entry["dim"]), int(entry["bytes"])
        if rows < 0 or dim <= 0 or size <= 0:
            raise ValueError("sizes")
    except (KeyError, TypeError, ValueError) as e:
        raise MappedError(f"{path.name}: bad manifest entry") from e
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise MappedError(f"{path.name} is missing") from None
    except OSError as e:
        raise MappedError(f"{path.name}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if st.st_size != size:
            raise MappedError(f"{path.name} has {st.st_size} bytes, the manifest says {size}")
        head = os.pread(fd, min(_MAX_HEADER, size), 0)
        shape, fortran, got, offset = parse_npy_header(head, path.name)
        if fortran or got != dtype or shape != (rows, dim):
            raise MappedError(f"{path.name} holds {got} {shape}, the manifest says {rows}x{dim}")
        if offset + rows * dim * dtype.itemsize != size:
            raise MappedError(f"{path.name}: header and size disagree")
        rehashed = st.st_mtime_ns != entry.get("mtime_ns")
        if (full_check or rehashed) and hash_fd(fd) != entry.get("sha256"):
            raise MappedError(f"{path.name} is damaged (checksum mismatch)")
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        keep = os.dup(fd)  # for MappedArray.read (closed with it)
    except OSError as e:
        raise MappedError(f"{path.name}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    arr = np.frombuffer(mm, dtype=dtype, count=rows * dim, offset=offset).reshape(rows, dim)
    out = MappedArray(mm, arr, entry, rehashed, keep, offset)
    out.advise(0, rows, "random")
    return out


class VectorParts:
    """Base + delta vector files as one (n, dim) array by row, float32 out.

    `take(rows)` gathers any rows (in the order given), `row_chunks(size)` streams all
    rows in file order. Parts are consecutive: part i holds rows starts[i] ..
    starts[i] + len(part) - 1. A part may be stored in another order than its rows
    (`orders[i]`: position -> local row, the IVF order of a base file, see
    `write_permuted`): `take` maps rows to positions, so a caller never sees the order.
    """

    def __init__(
        self,
        parts: list[np.ndarray],
        mapped: Sequence[MappedArray | None] | None = None,
        orders: list[np.ndarray | None] | None = None,
    ):
        if not parts:
            raise ValueError("VectorParts needs at least one part")
        dims = {int(p.shape[1]) for p in parts}
        if len(dims) != 1:
            raise ValueError("vector parts of different widths")
        self.parts = parts
        # one entry per part: the mapped file it is read from, or None (an array in
        # memory, read by indexing it)
        self.mapped: list[MappedArray | None] = list(mapped or [])
        if len(self.mapped) > len(parts):
            raise ValueError("more mapped files than vector parts")
        self.mapped += [None] * (len(parts) - len(self.mapped))
        self.dim = dims.pop()
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.n = int(self.starts[-1])
        self.orders: list[np.ndarray | None] = list(orders or [])
        self.orders += [None] * (len(parts) - len(self.orders))
        # local row -> position in the file, for the parts stored in another order
        self.positions: list[np.ndarray | None] = []
        for p, o in zip(parts, self.orders, strict=True):
            if o is None:
                self.positions.append(None)
                continue
            o = np.asarray(o, dtype=np.int64)
            if o.shape != (len(p),) or (len(o) and np.bincount(o, minlength=len(p)).max() != 1):
                raise ValueError("a part's order is not a permutation of its rows")
            pos = np.empty(len(o), dtype=np.int64)
            pos[o] = np.arange(len(o))
            self.positions.append(pos)

    def __len__(self) -> int:
        return self.n

    def with_part(self, array: np.ndarray, mapped: MappedArray | None = None) -> VectorParts:
        """These parts plus one more (an insert's delta, stored in row order): read from
        `mapped` when given, else from `array` in memory (the rows an insert has just
        written and still holds: its re-rank gathers them many times, and a read of a
        row from memory is one copy where preadv is a system call and a copy)."""
        return VectorParts([*self.parts, array], [*self.mapped, mapped], [*self.orders, None])

    @property
    def files(self) -> list[MappedArray]:
        """The mapped files of the parts that have one."""
        return [m for m in self.mapped if m is not None]

    def _local(self, i: int, local: np.ndarray) -> np.ndarray:
        pos = self.positions[i]
        return local if pos is None else pos[local]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), dim) copies of the given rows (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError("vector rows out of range")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if len(self.parts) == 1:
            at = self._local(0, rows)
            order = np.argsort(at, kind="stable")  # front to back, runs read at once
            out[order] = to_float32(self._rows(0, at[order]))  # convert, then scatter
            return out
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for i in np.unique(which):
            sel = np.flatnonzero(which == i)
            at = self._local(int(i), rows[sel] - self.starts[i])
            order = np.argsort(at, kind="stable")
            out[sel[order]] = to_float32(self._rows(int(i), at[order]))
        return out

    def take_stored(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the rows reordered as they are stored: by part, then position in it; their
        float32 vectors): `take` without putting them back in the order given. Each
        row is read (or converted) straight into its place, so a caller that ranks
        them all saves the scatter copy (an insert's re-rank gathers ~45 rows of
        18 KB per new key: three copies of them were a third of its time)."""
        rows, at, bounds = self._stored_order(rows)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for i in range(len(self.parts)):
            a, b = int(bounds[i]), int(bounds[i + 1])
            if b > a:
                self._rows_into(i, at[a:b], out[a:b])
        return rows, out

    def stored_blocks(
        self, rows: np.ndarray, size: int = 32
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`take_stored` `size` rows at a time: (rows, their float32 vectors), the
        vectors in one buffer reused for every block (valid until the next one; the
        caller may overwrite it: `sq_distances(overwrite=True)` needs no temporary).
        Small blocks stay in the CPU's cache: 224 float16 rows of 4,480 dims read,
        converted and compared took 1.76 ms as one block and 1.08 ms in blocks of 32 in
        a micro-benchmark (benchmarks/README.md, "Search at 1M x 4,480, session 31")."""
        rows, at, bounds = self._stored_order(rows)
        m = min(size, len(rows))
        buf = np.empty((m, self.dim), dtype=np.float32)
        # float16 files are read into a buffer of their own, then converted into `buf`
        half = np.empty((m, self.dim), np.float16) if self.has_float16 else None
        for i in range(len(self.parts)):
            for a in range(int(bounds[i]), int(bounds[i + 1]), size):
                b = min(a + size, int(bounds[i + 1]))
                self._rows_into(i, at[a:b], buf[: b - a], half)
                yield rows[a:b], buf[: b - a]

    def _stored_order(self, rows: np.ndarray):
        """(rows sorted as stored, their positions in their parts, part bounds)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError("vector rows out of range")
        which = np.searchsorted(self.starts, rows, side="right") - 1
        at = np.empty(len(rows), dtype=np.int64)
        for i in np.unique(which):
            sel = which == i
            at[sel] = self._local(int(i), rows[sel] - self.starts[i])
        order = np.lexsort((at, which))
        which, at = which[order], at[order]
        bounds = np.searchsorted(which, np.arange(len(self.parts) + 1))
        return rows[order], at, bounds

    @property
    def has_float16(self) -> bool:
        """Whether any part is stored in float16."""
        return any(p.dtype == np.float16 for p in self.parts)

    def _rows(self, i: int, positions: np.ndarray) -> np.ndarray:
        """Part i's rows at sorted positions, in its stored dtype (mapped: `read`)."""
        m = self.mapped[i]
        return m.read(positions) if m is not None else self.parts[i][positions]

    def _rows_into(
        self, i: int, positions: np.ndarray, out: np.ndarray, scratch: np.ndarray | None = None
    ) -> None:
        """Part i's rows at sorted positions as float32 into `out` (C-contiguous): a
        float32 file is read straight into it, float16 through one buffer (`scratch`
        when given: at least as many rows, the file's dtype)."""
        m = self.mapped[i]
        src = m.array if m is not None else self.parts[i]
        if src.dtype == np.float32 and m is not None:
            m.read(positions, out=out)
        elif src.dtype == np.float32:
            np.take(src, positions, axis=0, out=out, mode="clip")  # "raise" buffers `out`
        elif m is not None and scratch is not None and scratch.dtype == src.dtype:
            to_float32(m.read(positions, out=scratch[: len(positions)]), out=out)
        else:
            to_float32(self._rows(i, positions), out=out)

    def file_order(self, rows: np.ndarray) -> np.ndarray:
        """A sort key of rows by where they are stored (part, then position in it)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out = rows.copy()
        for i in np.unique(which):
            if self.positions[i] is not None:
                sel = which == i
                out[sel] = self.positions[i][rows[sel] - self.starts[i]] + self.starts[i]
        return out

    def prefetch(self, rows: np.ndarray, gap: int = 64) -> None:
        """Read ahead (MADV_WILLNEED) the file ranges that hold `rows`: runs of positions
        at most `gap` apart become one range. For callers about to read whole IVF lists
        (contiguous in an IVF-ordered file): one sequential read each instead of a page
        fault per row."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not len(rows) or not self.files:
            return
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for i in np.unique(which):
            m = self.mapped[int(i)]
            if m is None:
                continue
            at = np.sort(self._local(int(i), rows[which == i] - self.starts[i]))
            cut = np.flatnonzero(np.diff(at) > gap) + 1
            for a, b in zip(np.r_[0, cut], np.r_[cut, len(at)], strict=True):
                m.advise(int(at[a]), int(at[b - 1]) + 1, "willneed")

    def row_chunks(self, size: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, float32 block) over every row in file order (sequential reads whatever
        the parts' order), `size` rows at a time; resident pages of mapped parts are
        dropped after each block."""
        for i, p in enumerate(self.parts):
            m = self.mapped[i]
            o = self.orders[i]
            for s in range(0, len(p), size):
                e = min(len(p), s + size)
                if m is not None:
                    m.advise(s, min(len(p), s + 2 * size), "willneed")
                local = np.arange(s, e) if o is None else np.asarray(o[s:e], dtype=np.int64)
                yield local + self.starts[i], to_float32(self._rows(i, np.arange(s, e)))
                if m is not None:
                    m.release()

    def chunks(self, size: int = 20_000) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block) over every row in row order, `size` rows at a time
        (parts in another order are gathered: prefer `row_chunks` for a full scan)."""
        for i, p in enumerate(self.parts):
            m = self.mapped[i]
            ordered = self.orders[i] is None
            for s in range(0, len(p), size):
                if m is not None and ordered:
                    m.advise(s, min(len(p), s + 2 * size), "willneed")
                if ordered:
                    block = to_float32(self._rows(i, np.arange(s, min(len(p), s + size))))
                else:
                    block = self.take(np.arange(s, min(len(p), s + size)) + self.starts[i])
                yield int(self.starts[i] + s), block
                if m is not None:
                    m.release()

    def release(self) -> None:
        for m in self.files:
            m.release()


def write_permuted(
    path: Path,
    source: VectorParts,
    order: np.ndarray,
    dtype: str = "float32",
    *,
    buffer_bytes: int = 2 << 30,
) -> dict:
    """Write source's rows in the order `order` (position -> row) to `path` atomically
    (`write_vectors`), reading `source` only sequentially.

    Why: rows read at random from a mapped file that does not fit the page cache cost a
    disk read each (~2 ms measured at 1M x 4,480), while a sequential pass runs at disk
    speed. The output is built `buffer_bytes` at a time: each pass streams the whole
    source and keeps the rows whose positions fall in the buffer's range (a 9 GB file
    with a 2 GB buffer: 5 sequential passes, no random read).
    """
    order = np.asarray(order, dtype=np.int64)
    n = len(source)
    if order.shape != (n,) or (n and np.bincount(order, minlength=n).max() != 1):
        raise ValueError("order must be a permutation of the source's rows")
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    row_bytes = source.dim * MAPPED_DTYPES[dtype].itemsize
    per = max(1, min(n, buffer_bytes // max(1, row_bytes)))

    def blocks() -> Iterator[np.ndarray]:
        for a in range(0, n, per):
            b = min(n, a + per)
            buf = np.empty((b - a, source.dim), dtype=MAPPED_DTYPES[dtype])
            for i, part in enumerate(source.parts):
                m = source.mapped[i]
                o = source.orders[i]
                for s in range(0, len(part), _PERMUTE_CHUNK):
                    e = min(len(part), s + _PERMUTE_CHUNK)
                    local = np.arange(s, e) if o is None else np.asarray(o[s:e], np.int64)
                    at = pos[local + source.starts[i]]
                    sel = np.flatnonzero((at >= a) & (at < b))
                    if m is not None:
                        m.advise(s, min(len(part), e + _PERMUTE_CHUNK), "willneed")
                    with np.errstate(over="ignore"):  # write_vectors refuses non-finite
                        buf[at[sel] - a] = source._rows(i, np.arange(s, e))[sel]
                    if m is not None and (s // _PERMUTE_CHUNK) % 16 == 15:
                        m.release()
            source.release()
            yield buf

    return write_vectors(path, blocks(), n, source.dim, dtype)


def open_parts(
    root: Path,
    entries: list[dict],
    *,
    full_check: bool = False,
    orders: list[np.ndarray | None] | None = None,
) -> VectorParts:
    """Map every vector file of `entries` (base first, then deltas) as one VectorParts;
    `orders` gives the position -> row map of parts not stored in row order."""
    mapped = [open_vectors(root / e["path"], e, full_check=full_check) for e in entries]
    try:
        return VectorParts([m.array for m in mapped], mapped, orders)
    except ValueError as e:
        raise MappedError(f"vector files: {e}") from e


def file_stamp(path: Path) -> dict[str, Any]:
    """{bytes, mtime_ns} of a file: what a cheap open compares."""
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_file(path: Path, entry: dict) -> str | None:
    """Full verification for `doctor`: None when the file matches its entry, else why."""
    try:
        open_vectors(path, entry, full_check=True)
    except MappedError as e:
        return str(e)
    return None


__all__ = [
    "MAPPED_DTYPES",
    "MappedArray",
    "MappedError",
    "VectorParts",
    "check_file",
    "file_stamp",
    "hash_fd",
    "npy_header",
    "open_parts",
    "open_vectors",
    "write_permuted",
    "write_vectors",
]
