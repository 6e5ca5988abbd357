"""The codebook directory: Parquet segments, a manifest commit point, a derived index.

Layout and protocol are documented byte for byte in docs/codebook-format.md. In short:

- Parquet segments (keys, edits) are the source of truth and never rewritten.
- `manifest.json` is the single commit point; writers publish a version by atomically
  replacing it, readers trust only what it lists and verify every checksum first.
- Everything in `index/` (hnswlib graph, neighbour lists, sigma) is a cache rebuildable
  from Parquet; it is verified before loading because a damaged hnswlib file can crash
  the process instead of raising.
- One writer at a time (`LOCK`); readers never take the lock.
- No pickle: numpy files load with allow_pickle=False, and nothing here imports torch.

The CLI imports this module lazily, so pyarrow and hnswlib are imported at module level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import hashlib
import io
import json
import os
import re
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import derived as D
from . import retrieval as R
from .errors import CodebookError, CodebookLockedError

FORMAT = "reasonedit-codebook"
# bump when old readers could misread new codebooks; 2: keys hold several values (`merged`)
FORMAT_VERSION = 2
SCHEMA_VERSION = "2"  # Parquet segment schema version written, stored in file metadata
READ_SCHEMA_VERSIONS = ("1", "2")  # 1: keys segments without `merged` (read as none merged)
MANIFEST = "manifest.json"
LOCK = "LOCK"
HNSW_SPACE = "l2"
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_SEED = 100
HNSW_MIN_KEYS = 2000  # below this, exact numpy search is as fast and simpler
SEARCH_FETCH = 64  # hnsw candidates (raw distance) re-ranked by corrected distance
SEARCH_EF = 64  # hnsw ef for search (>= fetch); recall/latency in benchmarks/README.md
SEARCH_SIGMA_SCAN = 2048  # at most this many large-sigma keys checked per query (bound)
SEARCH_SIGMA_SCAN_LIFTED = 512  # the same when the lifted graph covers the largest sigmas
TAU_SEED = 0
KINDS = ("answer", "sentence", "patch")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_EXT_RE = re.compile(r"[a-z0-9]{1,8}")
_KNOWN_NAMES = {MANIFEST, LOCK, "segments", "images", "index", "versions", "staging", "damaged"}
_REPAIR_HINT = "`reasonedit doctor --repair` rebuilds it from the rest of the codebook"
_MANIFEST_HINT = "`reasonedit doctor --repair` restores it from versions/"
DAMAGED = "damaged"  # where repair moves a damaged manifest.json (it never deletes one)


# ---------------------------------------------------------------------------
# records


#: One value a key holds and the edit it came from: (value, edit_id).
Entry = tuple[str, str]


@dataclass
class KeyRecord:
    """One key: an (image, text) embedding and the facts it retrieves.

    `edit_id`/`value` are the key's first entry (the edit whose image and text the vector
    embeds); `merged` lists the (value, edit_id) entries it gained by key merging (DESIGN
    1.6), so removing one of those edits drops just its value.
    """

    edit_id: str
    kind: str  # "answer" | "sentence" | "patch"
    value: str  # the fact prepended at inference
    key_text: str  # the text half of the key
    image_sha256: str
    box: tuple[int, int, int, int] | None  # crop in original image pixels; None = whole
    vector: np.ndarray
    radius: float | None = None
    merged: list[Entry] = field(default_factory=list)

    @property
    def entries(self) -> list[Entry]:
        """Every (value, edit_id) the key holds, its own first."""
        return [(self.value, self.edit_id), *self.merged]

    @property
    def key_id(self) -> str:
        """Stable id: re-adding the same edit yields the same key ids."""
        return key_id_for(
            self.edit_id, self.kind, self.value, self.key_text, self.box, self.image_sha256
        )


@dataclass
class EditRecord:
    """One user edit as stored (the image itself lives in images/, by hash)."""

    edit_id: str
    image_sha256: str
    question: str
    answer: str
    reasoning: list[str]
    boxes: list[list[int] | None] | None
    source: str
    added: dt.datetime | None = None  # set by the writer


@dataclass
class AddResult:
    """What one `CodebookWriter.add` call stored."""

    version: int
    added_edits: list[str] = field(default_factory=list)
    skipped_edits: list[str] = field(default_factory=list)  # already present
    added_keys: int = 0
    skipped_keys: int = 0


@dataclass
class CheckReport:
    """Result of `Codebook.check`: one line per problem, and what repair rebuilt."""

    path: Path
    version: int
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def key_id_for(
    edit_id: str,
    kind: str,
    value: str,
    key_text: str,
    box: Sequence[int] | None,
    image_sha256: str,
) -> str:
    """sha256 hex of the canonical JSON array [edit_id, kind, value, key_text, box, image]."""
    payload = [
        edit_id,
        kind,
        value,
        key_text,
        list(map(int, box)) if box is not None else None,
        image_sha256,
    ]
    return hashlib.sha256(_canonical(payload)).hexdigest()


# ---------------------------------------------------------------------------
# Parquet schemas


#: A key's merged entries: list<struct<value, edit_id>> (empty for an unmerged key).
ENTRY_TYPE = pa.struct(
    [
        pa.field("value", pa.string(), nullable=False),
        pa.field("edit_id", pa.string(), nullable=False),
    ]
)
MERGED_TYPE = pa.list_(pa.field("item", ENTRY_TYPE, nullable=False))


def keys_schema(dim: int, version: str = SCHEMA_VERSION) -> pa.Schema:
    """Schema of keys segments; the vector width is fixed per codebook (config["dim"]).

    version "1" (format_version 1) has no `merged` column: each key held one value.
    """
    fields = [
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("edit_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("value", pa.string(), nullable=False),
        pa.field("merged", MERGED_TYPE, nullable=False),
        pa.field("key_text", pa.string(), nullable=False),
        pa.field("box", pa.list_(pa.int32())),
        pa.field("image_sha256", pa.string(), nullable=False),
        pa.field("radius", pa.float32()),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
    ]
    if version == "1":
        fields = [f for f in fields if f.name != "merged"]
    return pa.schema(
        fields,
        metadata={
            b"reasonedit.segment": b"keys",
            b"reasonedit.schema_version": version.encode(),
            b"reasonedit.dim": str(dim).encode(),
        },
    )


EDITS_SCHEMA = pa.schema(
    [
        pa.field("edit_id", pa.string(), nullable=False),
        pa.field("image_sha256", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("reasoning", pa.list_(pa.string())),
        pa.field("boxes", pa.list_(pa.list_(pa.int32()))),
        pa.field("source", pa.string()),
        pa.field("added", pa.timestamp("us", tz="UTC")),
    ],
    metadata={
        b"reasonedit.segment": b"edits",
        b"reasonedit.schema_version": SCHEMA_VERSION.encode(),
    },
)

_KEY_COLUMNS = [f.name for f in keys_schema(1)]


# ---------------------------------------------------------------------------
# small file helpers


def _canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


# -- the file-operation seam (issue 23) ----------------------------------------------
#
# Every write, fsync, rename, unlink and mkdir the store issues inside a codebook goes
# through the helpers below, which report it to an optional hook. The power-loss harness
# (tests/crash_harness.py) records that log and rebuilds the disk at each crash point;
# tests can also make an operation fail (ENOSPC) at this seam.

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


def _note(op: str, path: Path, other: Path | None = None) -> None:
    for hook in list(_file_hooks):
        hook(op, path, other)


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable; some platforms cannot open directories, which is fine.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
        _note("fsync_dir", path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mkdirs(path: Path) -> None:
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
        _note("mkdir", d)
        _fsync_dir(d.parent)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp name, fsync, rename: readers see the old file or the whole new one.

    On any failure (ENOSPC, EROFS, ...) the temp file is removed and the error re-raised.
    """
    _mkdirs(path.parent)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            _note("write", tmp)
            os.fsync(f.fileno())
            _note("fsync", tmp)
        _rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    _note("rename", src, dst)


def _unlink(path: Path) -> None:
    """Remove one file the store made (never a directory)."""
    os.unlink(path)
    _note("unlink", path)


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


def _open_regular(path: Path, root: Path | None = None) -> int:
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


def _read_regular(path: Path, root: Path | None = None, limit: int | None = None) -> bytes:
    """The bytes of a regular file of the codebook (see `_open_regular`); at most `limit`."""
    fd = _open_regular(path, root)
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
    return _read_regular(path, root, limit)


def _parquet_footer_ok(data: bytes) -> str | None:
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


def _manifest_bytes(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    full = dict(body, checksum="sha256:" + _sha256(_canonical(body)))
    return (
        json.dumps(full, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    ).encode("utf-8")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True
    return True


def _before_boot(started: str) -> bool:
    """True when an ISO timestamp is older than this machine's boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat", "rb") as f:
            btime = next(int(x.split()[1]) for x in f if x.startswith(b"btime "))
        return dt.datetime.fromisoformat(started).timestamp() < btime
    except (OSError, StopIteration, ValueError, IndexError, TypeError):
        return False


def _compute() -> Any:
    """pyarrow.compute, imported only when tombstones filter rows (it is slow to import)."""
    import pyarrow.compute as pc

    return pc


def _hash_file(f: Any, chunk: int = 1 << 24) -> tuple[str, int]:
    """sha256 hex and size of an open binary file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    while block := f.read(chunk):
        h.update(block)
        size += len(block)
    return h.hexdigest(), size


def _table_bytes(table: pa.Table) -> bytes:
    # zstd everywhere except the key vectors: float embeddings barely compress (+8% size
    # uncompressed) and decompressing them was two thirds of the time to open a codebook
    # (Parquet wants leaf column paths: a nested column's name alone is silently ignored)
    comp = {path: "zstd" for f in table.schema if f.name != "vector" for path in _leaf_paths(f)}
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=comp, row_group_size=max(1, table.num_rows))
    return sink.getvalue().to_pybytes()


def _leaf_paths(f: pa.Field, prefix: str = "") -> list[str]:
    """Parquet leaf column paths of an Arrow field (lists as `.list.element`)."""
    name = prefix + f.name
    if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type):
        return _leaf_paths(pa.field("element", f.type.value_type), name + ".list.")
    if pa.types.is_struct(f.type):
        children = [f.type.field(i) for i in range(f.type.num_fields)]
        return [p for c in children for p in _leaf_paths(c, name + ".")]
    return [name]


def _vectors_of(table: pa.Table, dim: int) -> np.ndarray:
    col = table.column("vector")
    if table.num_rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    arr = pa.concat_arrays(col.chunks) if col.num_chunks != 1 else col.chunk(0)
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(
        -1, dim
    )


# ---------------------------------------------------------------------------
# derived data held in memory


@dataclass
class _Derived:
    """sigma and (for writers) the neighbour lists, and which files reproduce them."""

    sigma_raw: np.ndarray  # (n,) float64, before the global floor (R.floor_sigma)
    knn_idx: np.ndarray | None = None  # (n, SIGMA_K) int64, -1 padded
    knn_dist: np.ndarray | None = None  # (n, SIGMA_K) float64, inf padded
    # {"base": manifest entry, "deltas": [entries]} that reproduce sigma_raw / the lists;
    # None = computed in memory (the next commit writes a new base)
    sigma_files: dict | None = None
    knn_files: dict | None = None
    sigma: np.ndarray = field(init=False)  # (n,) float64, what search divides by

    def __post_init__(self) -> None:
        self.sigma = R.floor_sigma(self.sigma_raw)

    @classmethod
    def from_lists(cls, idx: np.ndarray, dist: np.ndarray, **files: Any) -> _Derived:
        return cls(R.sigma_raw_from_knn(dist), idx, dist, **files)

    @classmethod
    def compute(cls, vectors: np.ndarray, index: Any = None) -> _Derived:
        """From scratch: exact lists up to KNN_EXACT_MAX_KEYS keys, else from the index
        (an hnswlib index or a list of graph parts)."""
        if len(vectors) > R.KNN_EXACT_MAX_KEYS:
            if index is None:
                index = _build_hnsw(vectors)
            if isinstance(index, list):
                index = [g.index for g in index]
            idx, dist = R.knn_lists_ann(index, vectors, R.SIGMA_K)
        else:
            idx, dist = R.knn_lists(vectors, R.SIGMA_K)
        return cls.from_lists(idx, dist)


# ---------------------------------------------------------------------------
# the reader


class Codebook:
    """A read-only snapshot of one committed codebook version.

    Cheap to open (reads the manifest only); segments, sigma and the index load lazily
    and are verified against the manifest's checksums. Call `refresh()` to move to the
    newest version. Writes go through `writer()`.
    """

    def __init__(self, path: Path, manifest: dict, *, hnsw_min_keys: int = HNSW_MIN_KEYS):
        self.path = path
        self.hnsw_min_keys = hnsw_min_keys
        self._hnsw_lock = threading.Lock()  # hnswlib: no concurrent add and query
        self._set_manifest(manifest)

    # -- opening ----------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike, *, create: bool = False, hnsw_min_keys: int = HNSW_MIN_KEYS
    ) -> Codebook:
        """Open the codebook at path; create=True makes an empty one if missing or empty."""
        p = Path(path).expanduser().absolute()
        if os.path.lexists(p / MANIFEST):
            return cls(p, _read_manifest(p), hnsw_min_keys=hnsw_min_keys)
        kept = _version_files(p)
        if kept:  # never create a new v0 over a codebook that lost its manifest
            raise CodebookError(
                f"codebook {p}: {MANIFEST} is missing but versions/ holds {len(kept)} "
                f"versions; {_MANIFEST_HINT}"
            )
        if p.exists() and not p.is_dir():
            raise CodebookError(f"codebook {p}: not a directory")
        foreign = (
            sorted(x.name for x in p.iterdir() if not _is_own_name(x.name)) if p.exists() else []
        )
        if foreign:
            raise CodebookError(
                f"{p} is not a reasonedit codebook (no {MANIFEST}; it contains "
                f"{', '.join(foreign[:3])}{'...' if len(foreign) > 3 else ''})"
            )
        if not create:
            raise CodebookError(f"no codebook at {p} (no {MANIFEST}); add an edit to create one")
        try:
            _mkdirs(p)
        except OSError as e:
            raise CodebookError(f"cannot create codebook {p}: {e.strerror or e}") from e
        with _Lock(p, 10.0):
            if not (p / MANIFEST).exists():  # another creator may have won the race
                now = _now()
                manifest = {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "version": 0,
                    "created": now,
                    "updated": now,
                    "config": {},
                    "segments": [],
                    "removed_edits": [],
                    "derived": None,
                }
                for sub in ("segments", "images", "index", "versions"):
                    _mkdirs(p / sub)
                data = _manifest_bytes(manifest)
                _atomic_write(p / "versions" / "v000000.json", data)
                _atomic_write(p / MANIFEST, data)
        return cls(p, _read_manifest(p), hnsw_min_keys=hnsw_min_keys)

    def refresh(self) -> bool:
        """Reload the manifest; True when a newer version was committed since."""
        m = _read_manifest(self.path)
        if m["version"] == self.version and m.get("checksum") == self.manifest.get("checksum"):
            return False
        self._set_manifest(m)
        return True

    def _set_manifest(self, manifest: dict) -> None:
        self.manifest = manifest
        self._keys: pa.Table | None = None  # live keys with vectors
        self._edits: pa.Table | None = None
        self._vectors: np.ndarray | None = None
        self._derived: _Derived | None = None
        self._hnsw: list[D.Graph] | None = None  # base graph + small graphs of recent adds
        self._pair_sample: np.ndarray | None = None
        self._ref_sigma: np.ndarray | None = None  # tau_rule "reference": lower median
        self._sigma_desc: tuple[np.ndarray, ...] | None = None
        self._lift: D.Lift | None = None  # lifted graph of large-sigma keys (derived.py)
        self._lift_loaded = False

    # -- manifest views ---------------------------------------------------

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def config(self) -> dict:
        """The embedding layer's settings (models, layer, w, dim, percentile ...)."""
        return self.manifest["config"]

    @property
    def dim(self) -> int | None:
        d = self.config.get("dim")
        return int(d) if d is not None else None

    @property
    def n_keys(self) -> int:
        return self.keys_table().num_rows

    @property
    def percentile(self) -> float:
        return float(self.config.get("percentile", R.DEFAULT_PERCENTILE))

    @property
    def tau(self) -> float | None:
        """Rejection threshold in corrected-distance units; None with fewer than 2 keys."""
        d = self.manifest.get("derived")
        if d is not None and "tau" in d and d.get("keys") == self.n_keys:
            return None if d["tau"] is None else float(d["tau"])
        return self.tau_for(self.percentile)

    @property
    def tau_rule(self) -> str:
        """How tau is measured (config `tau_rule`): "images" (new codebooks), "edits"
        (codebooks made before #19), "nearest", "all" pairs or "reference"; see
        retrieval.TAU_RULES."""
        # codebooks made before the rule was configurable measured tau by "nearest"
        rule = self.config.get("tau_rule", "nearest")
        return rule if rule in R.TAU_RULES else "nearest"

    def tau_for(self, p: float) -> float | None:
        """tau for another percentile p (sweeps), by the codebook's `tau_rule`."""
        if self.tau_rule == "reference":
            if self.n_keys < 2:
                return None
            return R.reference_threshold(
                self.vectors(), self.reference_sigma(), len(self.edit_ids()), p
            )
        if self.tau_rule in ("nearest", "edits", "images"):
            if self.n_keys < 2:
                return None
            d = self._get_derived(need_knn=True)
            if self.tau_rule == "nearest":
                return R.nearest_threshold(d.knn_dist, d.sigma, p, len(self.edit_ids()))
            edit_of = self.keys_table().column("edit_id").to_numpy(zero_copy_only=False)
            _, codes = np.unique(edit_of, return_inverse=True)
            if self.tau_rule == "images":
                image_of = self.keys_table().column("image_sha256").to_numpy(zero_copy_only=False)
                _, image_codes = np.unique(image_of, return_inverse=True)
                return R.other_image_threshold(
                    d.knn_idx, d.knn_dist, d.sigma, image_codes, codes, p
                )
            return R.other_edit_threshold(
                d.knn_idx, d.knn_dist, d.sigma, codes, p, len(self.edit_ids())
            )
        if self._pair_sample is None:
            self._pair_sample = R.corrected_pair_sample(self.vectors(), self.sigma(), seed=TAU_SEED)
        return R.rejection_threshold(None, None, p, len(self.edit_ids()), sample=self._pair_sample)

    # -- Parquet ----------------------------------------------------------

    def _read_segment(self, entry: dict) -> pa.Table:
        """Read one segment listed in the manifest, verifying checksum and schema."""
        rel = entry["path"]
        f = self.path / rel
        try:
            data = _read_regular(f, self.path)
        except FileNotFoundError:
            raise CodebookError(
                f"codebook {self.path}: {rel} is missing; {_REPAIR_HINT}, or "
                f"`reasonedit restore` an older version"
            ) from None
        except OSError as e:
            raise CodebookError(
                f"codebook {self.path}: cannot read {rel}: {e.strerror or e}"
            ) from e
        if _sha256(data) != entry["sha256"]:
            raise CodebookError(
                f"codebook {self.path}: {rel} is damaged (checksum mismatch); "
                f"{_REPAIR_HINT}, or `reasonedit restore` an older version"
            )
        bad = _parquet_footer_ok(data)
        if bad:
            raise CodebookError(f"codebook {self.path}: {rel} is not readable Parquet ({bad})")
        try:
            # ParquetFile.read, not read_table: the latter imports pyarrow.dataset and
            # pyarrow.compute (~0.2 s of start-up for every `ask`). Thrift limits bound
            # what a crafted footer may make pyarrow allocate.
            pf = pq.ParquetFile(
                pa.BufferReader(data),
                thrift_string_size_limit=MAX_PARQUET_FOOTER,
                thrift_container_size_limit=1 << 20,
            )
            declared = pf.metadata.num_rows
            if declared != entry.get("rows", declared) or pf.metadata.num_columns > 64:
                raise CodebookError(
                    f"codebook {self.path}: {rel} declares {declared} rows and "
                    f"{pf.metadata.num_columns} columns, manifest says {entry.get('rows')}"
                )
            table = pf.read()
        except (pa.ArrowException, OSError, ValueError) as e:
            why = " ".join(str(e).split())[:300]  # pyarrow messages span lines
            raise CodebookError(
                f"codebook {self.path}: {rel} is not readable Parquet ({why})"
            ) from e
        meta = table.schema.metadata or {}
        kind = entry["kind"]
        if meta.get(b"reasonedit.segment") != kind.encode():
            raise CodebookError(f"codebook {self.path}: {rel} is not a {kind} segment")
        sv = meta.get(b"reasonedit.schema_version", b"?").decode(errors="replace")
        if sv not in READ_SCHEMA_VERSIONS:
            raise CodebookError(
                f"codebook {self.path}: {rel} has schema version {sv}, "
                f"this reasonedit reads {', '.join(READ_SCHEMA_VERSIONS)}; upgrade reasonedit"
            )
        expected = keys_schema(self.dim or 0, sv) if kind == "keys" else EDITS_SCHEMA
        got = table.schema.remove_metadata()
        if kind == "keys" and self.dim is None:
            raise CodebookError(f"codebook {self.path}: config has no dim but {rel} holds keys")
        if not got.equals(expected.remove_metadata()):
            raise CodebookError(
                f"codebook {self.path}: {rel} has an unexpected schema "
                f"(vector width or columns differ from config)"
            )
        if table.num_rows != entry.get("rows", table.num_rows):
            raise CodebookError(
                f"codebook {self.path}: {rel} has {table.num_rows} rows, "
                f"manifest says {entry['rows']}"
            )
        if kind == "keys" and sv == "1":
            table = _with_empty_merged(table)  # written before keys held several values
        return table

    def _live_table(self, kind: str) -> pa.Table:
        tomb = {t["edit_id"]: int(t["version"]) for t in self.manifest["removed_edits"]}
        parts = []
        for entry in self.manifest["segments"]:
            if entry["kind"] != kind:
                continue
            t = self._read_segment(entry)
            hidden = [e for e, v in tomb.items() if int(entry["version"]) <= v]
            if hidden and t.num_rows:
                if kind == "keys":
                    t = _drop_entries(t, hidden)[0]  # a merged key loses just their values
                else:
                    pc = _compute()
                    t = t.filter(
                        pc.invert(
                            pc.is_in(t.column("edit_id"), value_set=pa.array(hidden, pa.string()))
                        )
                    )
            parts.append(t.replace_schema_metadata(None))
        schema = keys_schema(self.dim or 1) if kind == "keys" else EDITS_SCHEMA
        if not parts:
            return schema.remove_metadata().empty_table()
        table = pa.concat_tables(parts).combine_chunks()
        # Parquet decoding leaves ~the segment size of freed buffers in Arrow's pool:
        # hand them back (2 GB of resident memory for `ask` at a million keys)
        pa.default_memory_pool().release_unused()
        return table

    def keys_table(self) -> pa.Table:
        """Live keys (removed edits hidden) in index order, including the vector column.

        A merged key whose own edit was removed but that still holds another edit's value
        stays live; its first remaining entry moves into `edit_id`/`value`.
        """
        if self._keys is None:
            self._keys = self._live_table("keys")
        return self._keys

    def edits_table(self) -> pa.Table:
        if self._edits is None:
            self._edits = self._live_table("edits")
        return self._edits

    def vectors(self) -> np.ndarray:
        """float32 (n, dim) key vectors in keys_table() order (row i = index label i)."""
        if self._vectors is None:
            self._vectors = _vectors_of(self.keys_table(), self.dim or 0)
        return self._vectors

    def edit_ids(self) -> set[str]:
        return set(self.edits_table().column("edit_id").to_pylist())

    def edit_versions(self) -> dict[str, int]:
        """Per live edit, the version that added it (the version of its edits segment)."""
        tomb = {t["edit_id"]: int(t["version"]) for t in self.manifest["removed_edits"]}
        live = self.edit_ids()
        out: dict[str, int] = {}
        for entry in self.manifest["segments"]:
            if entry["kind"] != "edits":
                continue
            v = int(entry["version"])
            for eid in self._read_segment(entry).column("edit_id").to_pylist():
                if eid in live and v > tomb.get(eid, -1):
                    out[eid] = v
        return out

    def n_images(self) -> int:
        """Distinct images the live keys are on (the groups of `tau_rule: images`)."""
        return len(set(self.keys_table().column("image_sha256").to_pylist()))

    def edits(self, ids: Iterable[str] | None = None) -> list[EditRecord]:
        """Live edits in insertion order (only those in `ids` when given)."""
        out = []
        table = self.edits_table()
        if ids is not None:
            wanted = pa.array(sorted(set(ids)), pa.string())
            table = table.filter(_compute().is_in(table.column("edit_id"), value_set=wanted))
        for r in table.to_pylist():
            out.append(
                EditRecord(
                    edit_id=r["edit_id"],
                    image_sha256=r["image_sha256"],
                    question=r["question"],
                    answer=r["answer"],
                    reasoning=list(r["reasoning"] or []),
                    boxes=r["boxes"],
                    source=r["source"] or "",
                    added=r["added"],
                )
            )
        return out

    # -- what survives damage (doctor --repair, reasonedit_cli/repair.py) ---

    def segment_problems(self) -> list[tuple[dict, str]]:
        """(manifest entry, one-line error) of every listed segment that fails to read."""
        out = []
        for entry in self.manifest["segments"]:
            try:
                self._read_segment(entry)
            except CodebookError as e:
                out.append((entry, str(e)))
        return out

    def surviving_table(self, kind: str, skip: Iterable[str]) -> pa.Table:
        """The live view of `kind` built from every listed segment except the `skip`
        paths (damaged ones): what the rest of the codebook still holds."""
        bad = set(skip)
        view = Codebook(
            self.path,
            {
                **self.manifest,
                "segments": [s for s in self.manifest["segments"] if s["path"] not in bad],
            },
            hnsw_min_keys=self.hnsw_min_keys,
        )
        return view._live_table(kind)

    def kept_key_tables(self, skip: Iterable[str]) -> list[tuple[int, pa.Table]]:
        """(version, table) of every keys segment some intact versions/ copy lists, the
        `skip` paths left out, each verified against that copy: older key layouts (patch
        boxes, kinds) that repair can re-embed. Newest first."""
        bad, seen, out = set(skip), set(), []
        for f in reversed(_version_files(self.path)):
            try:
                m = _validate_manifest(
                    _read_regular(f, self.path, MAX_MANIFEST_BYTES), self.path, str(f)
                )
            except (CodebookError, OSError):
                continue
            dim = (m.get("config") or {}).get("dim")
            view = Codebook(self.path, m, hnsw_min_keys=self.hnsw_min_keys)
            for entry in m["segments"]:
                if entry["kind"] != "keys" or entry["path"] in bad or entry["path"] in seen:
                    continue
                seen.add(entry["path"])
                if not dim:
                    continue
                try:
                    out.append((int(entry["version"]), view._read_segment(entry)))
                except CodebookError:
                    continue
        return sorted(out, key=lambda t: -t[0])

    # -- images -----------------------------------------------------------

    def image_path(self, sha: str) -> Path:
        """Path of a stored image (content-addressed: images/<sha[:2]>/<sha>.<ext>)."""
        if not _SHA_RE.fullmatch(sha or ""):
            raise CodebookError(f"codebook {self.path}: invalid image hash {sha!r}")
        d = self.path / "images" / sha[:2]
        found = (
            sorted(p for p in d.glob(sha + ".*") if ".tmp-" not in p.name)
            if d.is_dir() and not d.is_symlink()
            else []
        )
        if not found:
            raise CodebookError(f"codebook {self.path}: image images/{sha[:2]}/{sha}.* is missing")
        return found[0]

    def read_image_bytes(self, sha: str) -> bytes:
        """The stored image bytes, verified against their hash name."""
        p = self.image_path(sha)
        try:
            data = _read_regular(p, self.path)
        except OSError as e:
            raise CodebookError(
                f"codebook {self.path}: cannot read {p.relative_to(self.path)}: {e.strerror or e}"
            ) from e
        if _sha256(data) != sha:
            raise CodebookError(
                f"codebook {self.path}: {p.relative_to(self.path)} is damaged (checksum mismatch)"
            )
        return data

    # -- derived data -----------------------------------------------------
    #
    # index/ holds, per part, a base file plus deltas appended by later inserts (see
    # derived.py and docs/codebook-format.md). Every loader verifies checksums, dtypes,
    # shapes and ranges and returns None on any doubt: the caller then recomputes in
    # memory (derived data is a cache; a damaged file is rebuilt, never trusted).

    def _load_npy(
        self, entry: dict | None, shape: tuple[int, ...], dtype: Any
    ) -> np.ndarray | None:
        """A derived .npy file if it exists, matches its checksum, dtype and shape; else None."""
        if not entry:
            return None
        try:
            data = _read_regular(self.path / entry["path"], self.path)
            if _sha256(data) != entry["sha256"]:
                return None
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, KeyError, EOFError, TypeError):
            return None
        if arr.dtype != dtype or arr.shape != shape:
            return None
        return arr

    def _derived_entries(self) -> dict:
        d = self.manifest.get("derived") or {}
        return d if d.get("keys") == self.n_keys else {}

    def _deltas(self, part: str) -> list[dict]:
        """The delta entries of one part ("sigma", "knn", "hnsw"), oldest first."""
        return list((self._derived_entries().get("deltas") or {}).get(part) or [])

    def _load_sigma_files(self) -> tuple[np.ndarray | None, dict | None, str | None]:
        """(sigma before the floor, the entries it came from, None) replayed from the base
        file and its patches, or (None, None, the first file that failed)."""
        n = self.n_keys
        base = (self._derived_entries().get("files") or {}).get("sigma")
        deltas = self._deltas("sigma")
        at = base
        try:
            rows = _entry_rows(base, n)
            base = dict(base, rows=rows)  # files from before the delta layout lack rows
            raw = self._load_npy(base, (rows,), np.dtype(np.float64))
            if raw is None or not (np.isfinite(raw).all() and (raw >= 0).all()):
                return None, None, _entry_path(at, "sigma")
            for at in deltas:
                keys = _int_in(at["keys"], len(raw), n)
                patch = self._load_npy(at, (_int_in(at["rows"], 0, keys),), D.SIGMA_PATCH_DTYPE)
                if patch is None:
                    return None, None, _entry_path(at, "sigma delta")
                raw = D.apply_sigma_patch(raw, patch, keys)
            if len(raw) != n:
                raise ValueError("sigma files do not cover every key")
        except _ENTRY_ERRORS:
            return None, None, _entry_path(at, "sigma")
        return raw, {"base": base, "deltas": deltas}, None

    def _load_knn_files(
        self,
    ) -> tuple[np.ndarray | None, np.ndarray | None, dict | None, str | None]:
        """(idx, dist, entries, None) replayed from the base lists and their patches, or
        (None, None, None, the first file that failed)."""
        n, k = self.n_keys, R.SIGMA_K
        files = self._derived_entries().get("files") or {}
        bi, bd = files.get("knn_idx"), files.get("knn_dist")
        deltas = self._deltas("knn")
        at = bi
        try:
            rows = _entry_rows(bi, n)
            if _entry_rows(bd, n) != rows:
                raise ValueError("knn base files disagree")
            bi, bd = dict(bi, rows=rows), dict(bd, rows=rows)
            idx = self._load_npy(bi, (rows, k), np.dtype(np.int64))
            if idx is None:
                return None, None, None, _entry_path(bi, "knn_idx")
            at = bd
            dist = self._load_npy(bd, (rows, k), np.dtype(np.float64))
            if dist is None:
                return None, None, None, _entry_path(bd, "knn_dist")
            if rows and (idx.min() < -1 or idx.max() >= rows):
                raise ValueError("knn base rows out of range")
            if deltas:
                full_idx = np.full((n, k), -1, dtype=np.int64)
                full_dist = np.full((n, k), np.inf)
                full_idx[:rows], full_dist[:rows] = idx, dist
                idx, dist, cur = full_idx, full_dist, rows
                for at in deltas:
                    keys = _int_in(at["keys"], cur, n)
                    shape = (_int_in(at["entries"], 0, keys * k),)
                    patch = self._load_npy(at, shape, D.KNN_PATCH_DTYPE)
                    if patch is None:
                        return None, None, None, _entry_path(at, "knn delta")
                    D.apply_knn_patch(idx, dist, cur, patch, keys)
                    cur = keys
                rows = cur
            if rows != n:
                raise ValueError("knn files do not cover every key")
        except _ENTRY_ERRORS:
            return None, None, None, _entry_path(at, "knn")
        return idx, dist, {"base": {"knn_idx": bi, "knn_dist": bd}, "deltas": deltas}, None

    def _get_derived(self, need_knn: bool = False) -> _Derived:
        """sigma (and for writers the neighbour lists): from index/ if valid, else rebuilt."""
        n = self.n_keys
        if self._derived is not None and (self._derived.knn_idx is not None or not need_knn):
            return self._derived
        raw, sigma_files, _ = self._load_sigma_files()
        if need_knn:
            idx, dist, knn_files, _ = self._load_knn_files()
            if idx is not None:
                if raw is None:  # sigma files damaged: recompute it from the lists
                    self._derived = _Derived.from_lists(idx, dist, knn_files=knn_files)
                else:
                    self._derived = _Derived(raw, idx, dist, sigma_files, knn_files)
                return self._derived
        elif raw is not None:
            self._derived = _Derived(raw, sigma_files=sigma_files)
            return self._derived
        big = n > R.KNN_EXACT_MAX_KEYS
        self._derived = _Derived.compute(self.vectors(), self._hnsw_index() if big else None)
        return self._derived

    def sigma(self) -> np.ndarray:
        """Per-key hubness scale sigma_k (float64), in keys_table() order: what search
        divides raw distances by.

        With `tau_rule: reference` it is the reference's `reference_sigma + 1e-6` (1 for a
        key without neighbours), computed from the stored neighbour lists; otherwise the
        numpy median with the duplicate floor (the derived sigma files).
        """
        if self.tau_rule == "reference":
            if self._ref_sigma is None:
                raw = self.reference_sigma()
                self._ref_sigma = np.where(np.isnan(raw), 1.0, raw + R.REFERENCE_EPS)
            return self._ref_sigma
        return self._get_derived().sigma

    def reference_sigma(self) -> np.ndarray:
        """The reference's sigma (retrieval.reference_sigma_from_knn: lower median of the
        30 nearest distances, NaN without neighbours), in keys_table() order."""
        return R.reference_sigma_from_knn(self._get_derived(need_knn=True).knn_dist)

    def _load_graph(self, entry: dict, start: int, stop: int) -> Any:
        """One hnswlib graph part from index/ after verifying its checksum, else None.

        A small part's labels must be its rows (cheap to check); the base graph's, labelled
        from 0 by construction, are not listed (a million-item list at a million keys)."""
        return self._load_hnsw_file(entry, self.dim or 0, stop - start, start or None)

    def _load_hnsw_file(
        self, entry: dict, dim: int, count: int, first_label: int | None = None
    ) -> Any:
        """An hnswlib file of `count` items from index/, checksum verified first, else None.

        With first_label, its labels must also run first_label .. first_label + count - 1."""
        if not dim:
            return None
        # Load from a private copy of the verified bytes: the codebook file could change
        # between the check and the load, and hnswlib trusts what it reads. The copy is
        # hashed while it is written, in chunks (the file is GBs at a million keys).
        fd, tmp = tempfile.mkstemp(prefix="reasonedit-hnsw-")
        try:
            h = hashlib.sha256()
            src_fd = _open_regular(self.path / entry["path"], self.path)
            with os.fdopen(fd, "wb") as out, os.fdopen(src_fd, "rb") as src:
                while block := src.read(1 << 24):
                    h.update(block)
                    out.write(block)
            if h.hexdigest() != entry["sha256"]:
                return None
            index = hnswlib.Index(space=HNSW_SPACE, dim=dim)
            index.load_index(tmp, max_elements=max(count, 1))
        except (RuntimeError, OSError, ValueError, KeyError, TypeError):
            return None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if index.get_current_count() != count:
            return None
        if first_label is not None:
            ids = np.asarray(index.get_ids_list(), dtype=np.int64)
            if ids.min() != first_label or ids.max() != first_label + count - 1:
                return None
        return index

    def _load_lift(self) -> tuple[D.Lift | None, str | None]:
        """The persisted lifted graph, verified: (lift, None); (None, None) when the
        manifest lists none (codebooks below hnsw_min_keys, or written before it); (None,
        the file that failed) when damaged."""
        files = self._derived_entries().get("files") or {}
        eh, er, ep = files.get("lift_hnsw"), files.get("lift_rows"), files.get("lift_params")
        if not (eh or er or ep):
            return None, None
        dim, n = self.dim or 0, self.n_keys
        at = er
        try:
            m = _int_in(er["count"], 1, n)
            rows = self._load_npy(er, (m,), np.dtype(np.int64))
            if rows is None:
                return None, _entry_path(er, "lift_rows")
            at = ep
            params = self._load_npy(ep, (D.LIFT_PARAMS + 2 * dim,), np.dtype(np.float64))
            if params is None or not D.valid_lift(rows, params, n, dim):
                return None, _entry_path(ep, "lift_params")
            at = eh
            index = self._load_hnsw_file(eh, dim + 3, m, first_label=0)
            if index is None:
                return None, _entry_path(eh, "lift_hnsw")
        except _ENTRY_ERRORS:
            return None, _entry_path(at, "lift")
        entries = {"lift_hnsw": eh, "lift_rows": er, "lift_params": ep}
        return D.Lift(index, rows, params, entries), None

    def _lift_index(self) -> D.Lift | None:
        """The lifted graph for search, or None (then search scans large sigmas only)."""
        if not self._lift_loaded:
            self._lift, _ = self._load_lift()
            self._lift_loaded = True
        return self._lift

    def _load_graphs(self, rebuild: bool) -> tuple[list[D.Graph] | None, list[str]]:
        """The persisted graph parts (base + small graphs of recent adds), verified.

        Returns (parts, paths that failed); parts is None when no graph is persisted or
        the layout is inconsistent. With rebuild=True a part that fails verification is
        rebuilt in memory from its rows' vectors (and marked as not on disk).
        """
        n = self.n_keys
        base = (self._derived_entries().get("files") or {}).get("hnsw")
        if not base:
            return None, []
        deltas = self._deltas("hnsw")
        try:
            base = dict(base, rows=_entry_rows(base, n))
            spans = [(base, 0, base["rows"])]
            spans += [(e, _int_in(e["start"], 0, n), _int_in(e["stop"], 0, n)) for e in deltas]
            if not D.graphs_cover([D.Graph(None, a, b) for _, a, b in spans], n):
                raise ValueError("graph parts do not cover every key")
        except _ENTRY_ERRORS:
            return None, [_entry_path(base, "hnsw")]
        parts, bad = [], []
        for entry, a, b in spans:
            index = self._load_graph(entry, a, b)
            if index is None:
                bad.append(_entry_path(entry, "hnsw"))
                if not rebuild:
                    continue
                index, entry = _build_hnsw(self.vectors()[a:b], start=a), None
            parts.append(D.Graph(index, a, b, entry))
        return (None if bad and not rebuild else parts), bad

    def _load_hnsw(self) -> list[D.Graph] | None:
        """Every persisted graph part, verified; None if one fails or none is persisted."""
        parts, bad = self._load_graphs(rebuild=False)
        return None if bad else parts

    def _hnsw_index(self) -> list[D.Graph]:
        """The graph parts for search: persisted ones, anything missing rebuilt in memory."""
        if self._hnsw is None:
            parts, _ = self._load_graphs(rebuild=True)
            if parts is None:
                parts = [D.Graph(_build_hnsw(self.vectors()), 0, self.n_keys)]
            self._hnsw = parts
        return self._hnsw

    # -- search -----------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int = 5, *, method: str = "auto"
    ) -> list[list[tuple[int, float, float]]]:
        """k nearest keys per query by hubness-corrected distance.

        Returns per query a list of (row, raw L2 distance, corrected distance), best
        first. method: "exact" (numpy brute force), "hnsw", or "auto" (hnsw from
        `hnsw_min_keys` keys on). The hnsw path over-fetches candidates by raw distance,
        adds those of the lifted graph (the large-sigma keys, searched by corrected
        distance: derived.py), and re-ranks them exactly, since the correction can
        reorder neighbours.
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        n = self.n_keys
        if n == 0 or k <= 0:
            return [[] for _ in range(len(q))]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise CodebookError(
                f"codebook {self.path}: query has dimension {q.shape[-1]}, "
                f"keys have {self.dim} (was the codebook recalibrated?)"
            )
        if method not in ("auto", "exact", "hnsw"):
            raise ValueError(f"unknown search method {method!r}")
        sigma = self.sigma()
        v = self.vectors()
        k = min(k, n)
        use_hnsw = method == "hnsw" or (method == "auto" and n >= self.hnsw_min_keys)
        bound, lift = None, None
        if use_hnsw:
            # Candidates by raw distance; the correction reorders neighbours, which the
            # sigma bound below completes.
            # With several graph parts (base + recent adds) each returns its own fetch
            # nearest and the bound is the smallest last distance (derived.py).
            fetch = min(n, max(SEARCH_FETCH, 2 * k))
            graphs = self._hnsw_index()
            with self._hnsw_lock:
                cand, bound = D.search_candidates(graphs, q, fetch, max(SEARCH_EF, 2 * k))
            if cand.size and (cand.min() < 0 or cand.max() >= n):
                raise CodebookError(f"codebook {self.path}: hnsw index labels out of range")
            if bound is not None:
                bound = bound * (1.0 - 1e-5)
            lift = self._lift_index()
            if lift is not None:
                # isolated keys that win by sigma, far down the raw order (derived.py)
                f = min(len(lift.rows), max(D.LIFT_FETCH, k))
                with self._hnsw_lock:
                    lift.index.set_ef(max(D.LIFT_EF, f))
                    lab, _ = lift.index.knn_query(D.lift_queries(q, lift.params), k=f)
                cand = np.concatenate([cand, lift.rows[lab.astype(np.int64)]], axis=1)
        else:
            # Exact: corrected distances to every key, shortlisted for the exact re-rank.
            fetch = min(n, 4 * k + 16)
            v_sq = np.einsum("ij,ij->i", v.astype(np.float64), v.astype(np.float64))
            cand = np.empty((len(q), fetch), dtype=np.int64)
            step = max(1, 4_000_000 // n)
            for start in range(0, len(q), step):
                corr = R.pairwise_sq_l2(q[start : start + step], v, v_sq)
                np.sqrt(corr, out=corr)
                corr /= sigma[None, :]
                cand[start : start + step] = (
                    np.argpartition(corr, fetch - 1, axis=1)[:, :fetch]
                    if fetch < n
                    else np.arange(n)
                )
        out = []
        for i in range(len(q)):
            # Both paths end in the same exact re-rank, so they return identical numbers.
            rows = cand[i] if lift is None else np.unique(cand[i])  # lift repeats some
            raw = R.direct_l2(q[i], v[rows])
            corr = raw / sigma[rows]
            if bound is not None:
                # A key outside the raw top-`fetch` is at raw distance >= bound[i], so its
                # corrected distance is >= bound[i] / sigma_key: only keys with a large
                # sigma (isolated keys) can still beat the current k-th; check the largest
                # SEARCH_SIGMA_SCAN of them (all of them in practice, see the benchmarks).
                kth = float(np.partition(corr, k - 1)[k - 1])
                extra = self._large_sigma_rows(q[i], bound[i] / kth if kth > 0 else np.inf, kth)
                extra = extra[~np.isin(extra, rows)]
                if len(extra):
                    xraw = R.direct_l2(q[i], v[extra])
                    rows = np.concatenate([rows, extra])
                    raw = np.concatenate([raw, xraw])
                    corr = np.concatenate([corr, xraw / sigma[extra]])
            order = np.lexsort((rows, corr))[:k]
            out.append([(int(rows[j]), float(raw[j]), float(corr[j])) for j in order])
        return out

    def _large_sigma_rows(self, q: np.ndarray, limit: float, kth: float) -> np.ndarray:
        """Rows with sigma > `limit` whose corrected distance to q may be <= kth.

        Screens at most SEARCH_SIGMA_SCAN keys, the largest sigmas first, in float32
        against a cached contiguous copy of their vectors; the caller re-ranks exactly.
        With a lifted graph its keys are left out (its search covers them) and at most
        SEARCH_SIGMA_SCAN_LIFTED others are screened: those just below its sigmas and keys
        added since it was built.
        """
        if self._sigma_desc is None:
            sigma = self.sigma().copy()
            lift = self._lift_index()
            cap = SEARCH_SIGMA_SCAN
            if lift is not None:
                sigma[lift.rows] = -np.inf
                cap = min(cap, SEARCH_SIGMA_SCAN_LIFTED)
            order = np.argsort(-sigma, kind="stable")[:cap]
            order = order[sigma[order] > -np.inf]
            vecs = np.ascontiguousarray(self.vectors()[order])
            self._sigma_desc = (order, sigma[order], vecs, np.einsum("ij,ij->i", vecs, vecs))
        order, values, vecs, v_sq = self._sigma_desc
        m = int(np.searchsorted(-values, -limit, side="left"))
        if m == 0:
            return order[:0]
        # einsum, not BLAS: a threaded GEMV for one query stalls on a busy machine
        sq = v_sq[:m] - 2.0 * np.einsum("ij,j->i", vecs[:m], q) + float(np.dot(q, q))
        approx = np.sqrt(np.maximum(sq, 0.0)) / values[:m]
        return order[:m][approx <= kth * (1.0 + 1e-3) + 1e-6]

    # -- writing ----------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, lock_timeout: float = 10.0) -> Iterator[CodebookWriter]:
        """Take the writer lock (waiting up to lock_timeout s) and yield a writer.

        On entry the newest manifest is reloaded and leftovers of crashed writers are
        removed; on exit pending config changes are committed and the lock released.
        """
        with _Lock(self.path, lock_timeout):
            self.refresh()
            w = CodebookWriter(self)
            w._cleanup()
            try:
                yield w
                if w._pending_config:
                    w.commit()
            except BaseException:
                # a failed change (disk full, read-only, interrupted) leaves the previous
                # version as it was: remove what it wrote before the error
                with contextlib.suppress(CodebookError, OSError):
                    self.refresh()
                    w._cleanup()
                raise

    # -- checking ---------------------------------------------------------

    def check(
        self, repair: bool = False, *, lock_timeout: float = 10.0, images: bool = True
    ) -> CheckReport:
        """Verify every file the manifest lists (for `reasonedit doctor`).

        Problems with Parquet segments or images are only reported here (they are the
        source of truth: `reasonedit_cli.repair.repair_codebook`, i.e. `doctor --repair`,
        rebuilds segments from the rest first). With repair=True, damaged or missing
        derived files are rebuilt and committed as a new version.
        """
        self.refresh()
        rep = CheckReport(self.path, self.version)
        vfile = self.path / "versions" / f"v{self.version:06d}.json"
        try:
            raw = _read_regular(vfile, self.path, MAX_MANIFEST_BYTES)
            if _canonical(json.loads(raw)) != _canonical(self.manifest):
                rep.problems.append(f"versions/{vfile.name} differs from {MANIFEST}")
        except (OSError, ValueError):
            rep.problems.append(f"versions/{vfile.name} is missing or damaged")
        segments_ok = True
        for entry in self.manifest["segments"]:
            try:
                self._read_segment(entry)
            except CodebookError as e:
                segments_ok = False
                rep.problems.append(str(e))
        if not segments_ok:
            return rep
        n = self.n_keys
        derived_bad = []
        d = self.manifest.get("derived")
        if n and (not d or d.get("keys") != n):
            derived_bad.append("derived section is missing or out of date")
        files = (d or {}).get("files", {})
        if n:  # base files and every delta, replayed exactly as readers do
            failed = [self._load_sigma_files()[2], self._load_knn_files()[3]]
            derived_bad += [f"{f} is missing or damaged" for f in failed if f]
        derived_bad += [f"{f} is missing or damaged" for f in self._load_graphs(rebuild=False)[1]]
        if n >= self.hnsw_min_keys and not files.get("hnsw"):
            derived_bad.append("hnsw index is not persisted")
        lift_bad = self._load_lift()[1] if n else None
        if lift_bad:
            derived_bad.append(f"{lift_bad} is missing or damaged")
        lift_missing = bool(
            n >= self.hnsw_min_keys
            and files.get("hnsw")
            and not files.get("lift_hnsw")
            and not lift_bad
        )
        if lift_missing and not repair:
            rep.notes.append(
                "the lifted graph of large-sigma keys is not persisted (a codebook written "
                "before it; `doctor --repair` builds it)"
            )
        n_deltas = sum(len(self._deltas(part)) for part in ("sigma", "knn", "hnsw"))
        if images:
            shas = set(self.edits_table().column("image_sha256").to_pylist())
            shas |= set(self.keys_table().column("image_sha256").to_pylist())
            for sha in sorted(shas):
                try:
                    self.read_image_bytes(sha)
                except CodebookError as e:
                    rep.problems.append(str(e))
        leftovers = [str(p.relative_to(self.path)) for p in _tmp_files(self.path)]
        if leftovers:
            rep.notes.append(
                f"{len(leftovers)} temp files of an interrupted writer (removed by the next writer)"
            )
        if (self.path / LOCK).exists():
            rep.notes.append(f"{LOCK} is present: {_lock_owner(self.path / LOCK)}")
        from .staging import check_staging  # staging/ of Ray jobs: never read, not a problem

        check_staging(self.path, rep, repair=repair)
        if (derived_bad or n_deltas or lift_missing) and repair:
            # rebuild what is damaged and fold every delta into new base files
            with self.writer(lock_timeout) as w:
                w.compact()
            rep.repaired.extend(derived_bad)
            if lift_missing:
                rep.repaired.append("built the lifted graph of large-sigma keys")
            if n_deltas:
                rep.notes.append(f"derived index compacted ({n_deltas} delta files folded in)")
            rep.version = self.version
        else:
            rep.problems.extend(f"derived cache: {x}" for x in derived_bad)
        return rep

    verify = check


def _is_own_name(name: str) -> bool:
    return (
        name in _KNOWN_NAMES or name.startswith(MANIFEST + ".tmp-") or name.startswith(LOCK + ".")
    )


def _read_manifest(path: Path) -> dict:
    """Parse and validate manifest.json (format, version, self-checksum, safe paths)."""
    f = path / MANIFEST
    where = f"codebook {path}: {MANIFEST}"
    try:
        raw = _read_regular(f, path, MAX_MANIFEST_BYTES)
    except OSError as e:
        raise CodebookError(f"{where} cannot be read: {e.strerror or e}; {_MANIFEST_HINT}") from e
    return _validate_manifest(raw, path, where)


def _validate_manifest(raw: bytes, path: Path, where: str) -> dict:
    """A manifest (manifest.json or a versions/ copy) parsed and validated, else raise."""
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CodebookError(f"{where} is damaged (not valid JSON); {_MANIFEST_HINT}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CodebookError(
            f"{path} is not a reasonedit codebook ({MANIFEST} has format "
            f"{m.get('format') if isinstance(m, dict) else None!r})"
        )
    fv = m.get("format_version")
    if not isinstance(fv, int):
        raise CodebookError(f"{where} is damaged (format_version missing)")
    if fv > FORMAT_VERSION:
        raise CodebookError(
            f"codebook {path} has format_version {fv}; this reasonedit reads "
            f"up to {FORMAT_VERSION}: upgrade reasonedit"
        )
    body = {k: v for k, v in m.items() if k != "checksum"}
    try:
        ok = m.get("checksum") == "sha256:" + _sha256(_canonical(body))
    except ValueError:
        ok = False
    if not ok:
        raise CodebookError(f"{where} is damaged (checksum mismatch); {_MANIFEST_HINT}")
    try:
        assert isinstance(m["version"], int) and m["version"] >= 0
        assert isinstance(m["config"], dict)
        dim = m["config"].get("dim")
        assert dim is None or (type(dim) is int and 0 < dim <= 1_000_000), "config.dim"
        assert _is_number(m["config"].get("percentile", 25.0)), "config.percentile"
        for s in m["segments"]:
            assert s["kind"] in ("keys", "edits") and isinstance(s["rows"], int)
            assert _SHA_RE.fullmatch(s["sha256"]) and isinstance(s["version"], int)
            _check_rel(s["path"])
        for t in m["removed_edits"]:
            assert isinstance(t["edit_id"], str) and isinstance(t["version"], int)
        d = m.get("derived")
        if d is not None:
            assert isinstance(d, dict) and isinstance(d.get("files", {}), dict), "derived"
            assert d.get("tau") is None or _is_number(d["tau"]), "derived.tau"
            for e in d.get("files", {}).values():
                _check_rel(e["path"])
            deltas = d.get("deltas") or {}
            assert isinstance(deltas, dict), "derived.deltas"
            for entries in deltas.values():
                assert isinstance(entries, list), "derived.deltas"
                for e in entries:
                    _check_rel(e["path"])
    except (AssertionError, KeyError, TypeError, AttributeError) as e:
        raise CodebookError(f"{where} is malformed ({type(e).__name__} {e})") from None
    return m


def _is_number(x: Any) -> bool:
    return type(x) in (int, float) and np.isfinite(x)


def _check_rel(rel: str) -> None:
    # A shared codebook must not point outside its own directory.
    p = Path(rel)
    assert isinstance(rel, str) and not p.is_absolute() and ".." not in p.parts, rel


def _version_files(path: Path) -> list[Path]:
    """versions/v*.json of a codebook, oldest first (by the number in the name)."""
    d = path / "versions"
    out = []
    if d.is_dir() and not d.is_symlink():
        for f in d.glob("v*.json"):
            if re.fullmatch(r"v\d{6,}\.json", f.name):
                out.append(f)
    return sorted(out, key=lambda f: int(f.stem[1:]))


def manifest_problem(path: str | os.PathLike) -> str | None:
    """Why manifest.json cannot be used (one line), or None when it reads fine."""
    p = Path(path).expanduser().absolute()
    if not os.path.lexists(p / MANIFEST):
        return f"{MANIFEST} is missing" if _version_files(p) else None
    try:
        _read_manifest(p)
    except CodebookError as e:
        return str(e)
    return None


def restore_manifest(path: str | os.PathLike, lock_timeout: float = 10.0) -> list[str]:
    """Bring back a damaged or missing manifest.json from versions/ (doctor --repair).

    Takes the newest versions/ copy that validates and whose segments all verify
    (sha256). One exception: when a newer copy validates but names damaged or missing
    segments, that newer copy is taken (the segment repair that follows rebuilds them
    from what survives, instead of losing whole versions) and the older, fully verified
    copy is named as the fallback (`reasonedit restore N`). When the chosen copy is the
    newest one kept, manifest.json becomes a byte-identical copy of it; otherwise its
    content is committed as a new version after every kept number, so no versions/ file
    is overwritten or cleaned away. The damaged manifest.json is moved to damaged/,
    never deleted. Returns the steps taken, one line each.
    """
    p = Path(path).expanduser().absolute()
    problem = manifest_problem(p)
    if problem is None:
        return []
    steps = [f"{MANIFEST}: {problem.split(': ', 1)[-1]}"]
    with _Lock(p, lock_timeout):
        files = _version_files(p)
        newest = int(files[-1].stem[1:]) if files else -1
        chosen: tuple[Path, bytes, dict, list[str]] | None = None
        for f in reversed(files):
            try:
                raw = _read_regular(f, p, MAX_MANIFEST_BYTES)
                m = _validate_manifest(raw, p, f"versions/{f.name}")
            except (CodebookError, OSError) as e:
                steps.append(f"versions/{f.name} passed over: {str(e).split(': ')[-1]}")
                continue
            bad = [s["path"] for s, _ in Codebook(p, m).segment_problems()]
            if chosen is None:
                chosen = (f, raw, m, bad)
            if not bad:
                if chosen[0] != f:
                    steps.append(
                        f"versions/{chosen[0].name} lists {len(chosen[3])} damaged segments "
                        f"({chosen[3][0]}), rebuilt below; versions/{f.name} is the newest "
                        f"copy whose files all verify (fallback: `reasonedit restore "
                        f"{int(f.stem[1:])}`)"
                    )
                break
        if chosen is None:
            raise CodebookError(
                f"codebook {p}: {MANIFEST} is damaged and no versions/ copy is intact; "
                f"restore the codebook from a backup"
            )
        f, raw, m, _ = chosen
        if os.path.lexists(p / MANIFEST):
            _mkdirs(p / DAMAGED)
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            aside = p / DAMAGED / f"{MANIFEST}.{stamp}"
            _rename(p / MANIFEST, aside)
            _fsync_dir(p / DAMAGED)
            steps.append(f"moved the damaged {MANIFEST} to {aside.relative_to(p)}")
        if int(m["version"]) == newest:
            _atomic_write(p / MANIFEST, raw)
            steps.append(f"restored {MANIFEST} from versions/{f.name} (version {newest})")
        else:
            m = {**m, "version": newest + 1, "updated": _now()}
            data = _manifest_bytes(m)
            _atomic_write(p / "versions" / f"v{newest + 1:06d}.json", data)
            _atomic_write(p / MANIFEST, data)
            steps.append(
                f"restored {MANIFEST} from versions/{f.name}, committed as version "
                f"{newest + 1}: the changes of later versions are lost (their copies are "
                f"damaged)"
            )
        return steps


def _tmp_files(path: Path) -> list[Path]:
    out = list(path.glob("*.tmp-*"))
    for sub in ("segments", "index", "versions"):
        out += (path / sub).glob("*.tmp-*")
    out += (path / "images").glob("*/*.tmp-*")
    return out


def _lock_owner(lock: Path) -> str:
    try:
        info = json.loads(_read_regular(lock, lock.parent, MAX_MANIFEST_BYTES))
        return f"pid {info['pid']} on host {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown writer"


def _build_hnsw(vectors: np.ndarray, start: int = 0, M: int = HNSW_M) -> Any:
    """An hnswlib graph of `vectors` labelled start, start+1, ... (their codebook rows)."""
    n, dim = vectors.shape
    index = hnswlib.Index(space=HNSW_SPACE, dim=dim)
    index.init_index(
        max_elements=max(n, 1),
        M=M,
        ef_construction=HNSW_EF_CONSTRUCTION,
        random_seed=HNSW_SEED,
    )
    if n:
        index.add_items(vectors, np.arange(start, start + n))
    return index


# Anything a hand-made or damaged manifest entry can raise while being read.
_ENTRY_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError)


def _int_in(x: Any, lo: int, hi: int) -> int:
    """x if it is an int in [lo, hi] (manifest numbers sized arrays: never trust them)."""
    if type(x) is not int or not lo <= x <= hi:
        raise ValueError(f"{x!r} not in [{lo}, {hi}]")
    return x


def _entry_rows(entry: Any, n: int) -> int:
    """Rows a base derived file covers: its `rows`, or all n keys (files written before
    the delta layout have no `rows`)."""
    if not isinstance(entry, dict):
        raise ValueError("no base file")
    return _int_in(entry.get("rows", n), 0, n)


def _entry_path(entry: Any, what: str) -> str:
    p = entry.get("path") if isinstance(entry, dict) else None
    return p if isinstance(p, str) else what


# ---------------------------------------------------------------------------
# the lock


class _Lock:
    """Exclusive writer lock: `LOCK` created with O_CREAT|O_EXCL holding {pid, host, started}.

    Waits up to `timeout` seconds. A lock left by a dead process on this host is broken;
    locks from other hosts are never broken automatically (the pid means nothing here).
    """

    def __init__(self, path: Path, timeout: float):
        self.dir = path
        self.file = path / LOCK
        self.timeout = timeout
        self.content: bytes = b""

    def __enter__(self) -> _Lock:
        deadline = time.monotonic() + self.timeout
        self.content = _canonical(
            {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
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
                        f"codebook {self.dir} is locked by {_lock_owner(self.file)}; "
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
                    _note("write", self.file)
                    os.fsync(f.fileno())
                    _note("fsync", self.file)
            except OSError as e:  # disk full: leave no empty LOCK behind
                with contextlib.suppress(OSError):
                    _unlink(self.file)
                raise CodebookError(
                    f"codebook {self.dir}: cannot create {LOCK}: {e.strerror or e}"
                ) from e
            return self

    def _break_if_stale(self) -> bool:
        try:
            raw = _read_regular(self.file, self.dir, MAX_MANIFEST_BYTES)
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
            stale = here and (not _pid_alive(int(info["pid"])) or _before_boot(info["started"]))
        except (ValueError, KeyError, TypeError):
            stale = age > 10.0  # unreadable: a writer died while creating it, or is now
        if not stale:
            return False
        # Move it aside, then check we moved the lock we judged (not a fresh one).
        aside = self.dir / f"{LOCK}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.file, aside)
            _note("rename", self.file, aside)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            if _read_regular(aside, self.dir, MAX_MANIFEST_BYTES) != raw:
                with contextlib.suppress(OSError):
                    os.link(aside, self.file)  # put the fresh lock back
                    _note("link", aside, self.file)
        finally:
            with contextlib.suppress(OSError):
                _unlink(aside)
        return True

    def __exit__(self, *exc: object) -> None:
        try:
            if _read_regular(self.file, self.dir, MAX_MANIFEST_BYTES) == self.content:
                _unlink(self.file)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# the writer


class CodebookWriter:
    """Changes a codebook while holding its lock; each change commits one new version."""

    def __init__(self, codebook: Codebook):
        self.cb = codebook
        self._pending_config: dict = {}

    @property
    def path(self) -> Path:
        return self.cb.path

    # -- housekeeping -----------------------------------------------------

    def _cleanup(self) -> None:
        """Delete leftovers of crashed writers: temp files, unreferenced newer segments."""
        for p in _tmp_files(self.path):
            with contextlib.suppress(OSError):
                _unlink(p)
        cur = self.cb.version
        referenced = {s["path"] for s in self.cb.manifest["segments"]}
        for v in (self.path / "versions").glob("v*.json"):
            try:
                num = int(v.stem[1:])
            except ValueError:
                continue
            if num > cur:  # written by a writer that died before replacing the manifest
                with contextlib.suppress(OSError):
                    _unlink(v)
                continue
            try:
                raw = _read_regular(v, self.path, MAX_MANIFEST_BYTES)
                referenced |= {s["path"] for s in json.loads(raw)["segments"]}
            except (OSError, ValueError, KeyError, TypeError):
                continue
        try:
            mtime = (self.path / MANIFEST).stat().st_mtime
        except OSError:
            return
        for seg in (self.path / "segments").glob("*.parquet"):
            rel = f"segments/{seg.name}"
            try:
                if rel not in referenced and seg.lstat().st_mtime >= mtime:
                    _unlink(seg)
            except OSError:
                pass
        # derived files newer than the manifest that it does not list: written by a
        # writer that failed or died before its commit (readers never look at them)
        listed = _derived_paths(self.cb.manifest)
        for f in (self.path / "index").glob("*"):
            try:
                if f"index/{f.name}" not in listed and f.lstat().st_mtime > mtime:
                    if stat.S_ISREG(f.lstat().st_mode):
                        _unlink(f)
            except OSError:
                pass

    # -- images -----------------------------------------------------------

    def store_image(self, data: bytes, ext: str) -> str:
        """Store image bytes content-addressed; returns their sha256 (idempotent)."""
        ext = ext.lower().lstrip(".")
        if not _EXT_RE.fullmatch(ext):
            raise CodebookError(f"codebook {self.path}: bad image extension {ext!r}")
        sha = _sha256(data)
        d = self.path / "images" / sha[:2]
        for existing in d.glob(sha + ".*") if d.is_dir() else []:
            if ".tmp-" in existing.name:
                continue
            try:
                if _sha256(_read_regular(existing, self.path)) == sha:
                    return sha
            except OSError:
                pass
        try:
            _atomic_write(d / f"{sha}.{ext}", data)
        except OSError as e:
            raise CodebookError(
                f"codebook {self.path}: cannot store image: {e.strerror or e}"
            ) from e
        return sha

    # -- changes ----------------------------------------------------------

    def set_config(self, **changes: Any) -> None:
        """Stage config changes; committed with the next change or when the writer closes."""
        _canonical(changes)  # must be plain JSON
        self._pending_config.update(changes)

    def add(self, edits: Sequence[EditRecord], keys: Sequence[KeyRecord]) -> AddResult:
        """Append new edits and their keys as one version; edits already present are skipped.

        Keys must belong to edits of this call; keys of skipped edits are skipped too.
        """
        cb = self.cb
        present = cb.edit_ids()
        res = AddResult(version=cb.version)
        new_edits: dict[str, EditRecord] = {}
        for e in edits:
            if e.edit_id in present or e.edit_id in new_edits:
                res.skipped_edits.append(e.edit_id)
            else:
                new_edits[e.edit_id] = e
        new_keys: dict[str, KeyRecord] = {}
        skipped = set(res.skipped_edits)
        for k in keys:
            if k.edit_id not in new_edits:
                if k.edit_id in present or k.edit_id in skipped:
                    res.skipped_keys += 1
                    continue
                raise CodebookError(f"key for edit {k.edit_id!r} has no edit record")
            kid = k.key_id
            if kid in new_keys:
                res.skipped_keys += 1
            else:
                new_keys[kid] = k
        if not new_edits:
            if self._pending_config:
                res.version = self.commit()
            return res
        dim = self._check_dim([k.vector for k in new_keys.values()])
        now = dt.datetime.now(dt.timezone.utc)
        version = cb.version + 1
        segs = list(cb.manifest["segments"])
        edits_table = _edits_to_table(list(new_edits.values()), now)
        segs.append(self._write_segment("edits", edits_table, version))
        keys_table = _keys_to_table(list(new_keys.items()), dim)
        if keys_table.num_rows:
            segs.append(self._write_segment("keys", keys_table, version))
        # The live tables after this commit, so the derived data updates incrementally.
        old_keys = cb.keys_table()
        kt = keys_table.replace_schema_metadata(None)
        # chunked, not combined: copying every old key per insert is O(codebook)
        live_keys = pa.concat_tables([old_keys, kt]) if old_keys.num_rows else kt
        live_edits = pa.concat_tables(
            [cb.edits_table(), edits_table.replace_schema_metadata(None)]
        ).combine_chunks()
        state = ("append", live_keys, live_edits)
        res.version = self._commit(segs, cb.manifest["removed_edits"], state=state)
        res.added_edits = list(new_edits)
        res.added_keys = len(new_keys)
        return res

    def replace_edits(self, edits: Sequence[EditRecord], keys: Sequence[KeyRecord]) -> AddResult:
        """Replace live edits by new records under the same ids, as ONE new version.

        The old edits are tombstoned up to the current version (which hides every segment
        written so far, so their keys and the values merged keys hold for them go) and the
        new records land in a segment of the new version, which the tombstone does not
        hide. Ids not yet stored are simply added. `restore` of the previous version
        brings the old edits back.
        """
        cb = self.cb
        ids = {e.edit_id for e in edits}
        if len(ids) != len(edits):
            raise CodebookError("replace_edits needs each edit id once")
        old = ids & cb.edit_ids()
        for k in keys:
            if k.edit_id not in ids:
                raise CodebookError(f"key for edit {k.edit_id!r} has no edit record")
        new_keys: dict[str, KeyRecord] = {}
        for k in keys:
            new_keys.setdefault(k.key_id, k)
        dim = self._check_dim([k.vector for k in new_keys.values()])
        version = cb.version + 1
        tomb = [t for t in cb.manifest["removed_edits"] if t["edit_id"] not in old]
        tomb += [{"edit_id": e, "version": cb.version} for e in sorted(old)]
        segs = list(cb.manifest["segments"])
        now = dt.datetime.now(dt.timezone.utc)
        segs.append(self._write_segment("edits", _edits_to_table(list(edits), now), version))
        keys_table = _keys_to_table(list(new_keys.items()), dim)
        if keys_table.num_rows:
            segs.append(self._write_segment("keys", keys_table, version))
        res = AddResult(version=cb.version)
        res.version = self._commit(segs, tomb, state=None)  # rows renumber: derive afresh
        res.added_edits = [e.edit_id for e in edits]
        res.added_keys = len(new_keys)
        return res

    def remove_edits(self, edit_ids: Iterable[str]) -> int:
        """Tombstone edits (their values stop being retrieved); returns the new version.

        A key merged from several edits loses only the removed edits' values and goes
        only when none is left.
        """
        cb = self.cb
        ids = set(edit_ids) & cb.edit_ids()
        if not ids:
            return self.commit()
        version = cb.version + 1
        tomb = [t for t in cb.manifest["removed_edits"] if t["edit_id"] not in ids]
        tomb += [{"edit_id": e, "version": version} for e in sorted(ids)]
        keys, keep = _drop_entries(cb.keys_table(), ids)
        pc = _compute()
        edits = cb.edits_table()
        edits = edits.filter(
            pc.invert(
                pc.is_in(edits.column("edit_id"), value_set=pa.array(sorted(ids), pa.string()))
            )
        )
        state = ("remove", keys.combine_chunks(), edits, keep)
        return self._commit(cb.manifest["segments"], tomb, state=state)

    def replace_all_keys(self, keys: Sequence[KeyRecord]) -> int:
        """Recalibration: one new keys segment replaces all key segments (new dim allowed).

        Old segments stay on disk for older versions; keys of edits that are not live
        are dropped. Config changes staged with set_config (layer, w, dim) land in the
        same version.
        """
        cb = self.cb
        live = cb.edit_ids()
        recs: dict[str, KeyRecord] = {}
        for k in keys:
            rec = _live_record(k, live)
            if rec is not None:
                recs.setdefault(rec.key_id, rec)
        dim = self._check_dim([k.vector for k in recs.values()], replacing=True)
        version = cb.version + 1
        segs = [s for s in cb.manifest["segments"] if s["kind"] != "keys"]
        table = _keys_to_table(list(recs.items()), dim)
        if table.num_rows:
            segs.append(self._write_segment("keys", table, version))
        return self._commit(
            segs, cb.manifest["removed_edits"], state=("full", table, cb.edits_table())
        )

    def rewrite_keys(self, items: Sequence[tuple[str, KeyRecord]], keep: np.ndarray) -> int:
        """Key merging (DESIGN 1.6): the live keys where `keep` is True, rewritten as one
        new keys segment with new radii and merged values; returns the new version.

        `items` are (key_id, record) for the kept rows in order, with their vectors
        unchanged: then the derived data updates like a removal of the dropped rows
        (only neighbour lists that held one are recomputed) instead of from scratch.
        """
        cb = self.cb
        keep = np.asarray(keep, dtype=bool)
        if len(keep) != cb.n_keys or int(keep.sum()) != len(items):
            raise CodebookError(
                f"codebook {self.path}: rewrite_keys needs one record per kept row "
                f"({int(keep.sum())} of {cb.n_keys}), got {len(items)}"
            )
        live = cb.edit_ids()
        for _, k in items:
            gone = sorted({e for _, e in k.entries} - live)
            if gone:
                raise CodebookError(f"key {k.key_id[:12]} holds values of missing edits {gone}")
        dim = cb.dim or 1
        table = _keys_to_table(list(items), dim)
        if not np.array_equal(_vectors_of(table, dim), cb.vectors()[keep]):
            raise CodebookError(f"codebook {self.path}: rewrite_keys must keep the key vectors")
        segs = [s for s in cb.manifest["segments"] if s["kind"] != "keys"]
        if table.num_rows:
            segs.append(self._write_segment("keys", table, cb.version + 1))
        state = ("remove", table.replace_schema_metadata(None), cb.edits_table(), keep)
        return self._commit(segs, cb.manifest["removed_edits"], state=state)

    def restore(self, version: int) -> int:
        """Commit a new version whose content (segments, removals, config) equals `version`."""
        f = self.path / "versions" / f"v{version:06d}.json"
        if not f.exists():
            raise CodebookError(
                f"codebook {self.path}: version {version} is not kept (no versions/{f.name})"
            )
        try:
            old = json.loads(_read_regular(f, self.path, MAX_MANIFEST_BYTES))
            body = {k: v for k, v in old.items() if k != "checksum"}
            ok = old.get("checksum") == "sha256:" + _sha256(_canonical(body))
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise CodebookError(f"codebook {self.path}: versions/{f.name} is damaged")
        self._pending_config = {}
        return self._commit(
            old["segments"], old["removed_edits"], state=None, config=dict(old["config"])
        )

    def compact(self) -> int:
        """Fold every delta of the derived index into new base files, as a new version.

        Inserts append deltas (derived.py) and compact on their own once the deltas
        outgrow the base; this does it now, and rebuilds any damaged derived file
        (`doctor --repair`). Returns the new version.
        """
        cb = self.cb
        return self._commit(
            cb.manifest["segments"], cb.manifest["removed_edits"], state=("compact",)
        )

    def rebuild_segments(
        self, replacements: Sequence[tuple[dict, Sequence[EditRecord] | Sequence[KeyRecord]]]
    ) -> int:
        """Replace damaged segments, in place in the segment list, by new ones holding
        `records` (rebuilt by reasonedit_cli/repair.py), as one new version.

        An empty record list drops the segment from the new version. The damaged files
        stay on disk (older versions list them); derived data is rebuilt from scratch.
        """
        cb = self.cb
        version = cb.version + 1
        new: dict[str, dict | None] = {}
        for entry, records in replacements:
            if not records:
                new[entry["path"]] = None
            elif entry["kind"] == "edits":
                table = _edits_to_table(list(records), dt.datetime.now(dt.timezone.utc))
                new[entry["path"]] = self._write_segment("edits", table, version)
            else:
                # replacing=True: the damaged keys cannot be counted, the width is config's
                dim = self._check_dim([k.vector for k in records], replacing=True)
                if cb.dim is not None and dim != cb.dim:
                    raise CodebookError(
                        f"codebook {self.path}: rebuilt keys are {dim}-d, config says {cb.dim}"
                    )
                table = _keys_to_table([(k.key_id, k) for k in records], dim)
                new[entry["path"]] = self._write_segment("keys", table, version)
        segs = []
        for s in cb.manifest["segments"]:
            if s["path"] not in new:
                segs.append(s)
            elif new[s["path"]] is not None:
                segs.append(new[s["path"]])
        return self._commit(segs, cb.manifest["removed_edits"], state=None)

    def commit(self) -> int:
        """Commit staged config changes (if any); returns the current version."""
        if not self._pending_config:
            return self.cb.version
        cb = self.cb
        return self._commit(cb.manifest["segments"], cb.manifest["removed_edits"], state=("same",))

    # -- internals --------------------------------------------------------

    def _check_dim(self, vectors: list[np.ndarray], replacing: bool = False) -> int:
        """Validate key vectors; the dimension is fixed per codebook (config["dim"]).

        The first keys set it; `replace_all_keys` (recalibration) may change it.
        """
        for v in vectors:
            a = np.asarray(v)
            if a.ndim != 1:
                raise CodebookError(f"key vectors must be 1-D, got shape {a.shape}")
            if not np.isfinite(a).all():
                raise CodebookError("key vector contains NaN or infinity")
        dims = {int(np.asarray(v).size) for v in vectors}
        if len(dims) > 1:
            raise CodebookError(f"key vectors have different dimensions {sorted(dims)}")
        pending = self._pending_config.get("dim")
        if replacing or self.cb.n_keys == 0:
            want = pending  # recalibration or an empty codebook may change the dimension
        else:
            want = self.cb.dim
            if pending is not None and int(pending) != want:
                raise CodebookError(
                    f"codebook {self.path} holds {want}-d keys; cannot set "
                    f"dim={pending} without re-embedding every key"
                )
        if not dims:
            return int(want or self.cb.dim or 1)
        (dim,) = dims
        if want is not None and int(want) != dim:
            raise CodebookError(
                f"codebook {self.path} holds {want}-d keys; got {dim}-d "
                f"vectors (recalibrate to change the embedding)"
            )
        if self.cb.dim != dim:
            self._pending_config["dim"] = dim
        return dim

    def _write_segment(self, kind: str, table: pa.Table, version: int) -> dict:
        rel = f"segments/{kind}-{version:06d}-{uuid.uuid4().hex}.parquet"
        data = _table_bytes(table)
        try:
            _atomic_write(self.path / rel, data)
        except OSError as e:
            raise CodebookError(
                f"codebook {self.path}: cannot write {rel}: {e.strerror or e}"
            ) from e
        return {
            "kind": kind,
            "path": rel,
            "sha256": _sha256(data),
            "rows": table.num_rows,
            "bytes": len(data),
            "version": version,
        }

    def _commit(
        self,
        segments: list[dict],
        removed: list[dict],
        *,
        state: tuple | None,
        config: dict | None = None,
    ) -> int:
        """Compute derived data, write it and the manifest; the rename is the commit.

        state describes how live keys changed, so derived data updates incrementally:
        ("append", keys, edits), ("remove", keys, edits, keep_mask), ("full", keys,
        edits), ("same",), ("compact",) (same keys, derived files rewritten as bases), or
        None (reload everything from the listed segments).
        """
        cb = self.cb
        old = cb.manifest
        version = cb.version + 1
        cfg = dict(old["config"] if config is None else config)
        cfg.update(self._pending_config)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": version,
            "created": old["created"],
            "updated": _now(),
            "config": cfg,
            "segments": segments,
            "removed_edits": removed,
            "derived": None,
        }
        # A scratch reader over the new content computes the derived data.
        new = Codebook(cb.path, manifest, hnsw_min_keys=cb.hnsw_min_keys)
        kind = state[0] if state else None
        if kind in ("append", "remove", "full"):
            new._keys, new._edits = state[1], state[2]
        if kind in ("same", "compact"):
            new._keys, new._edits = cb.keys_table(), cb.edits_table()
        try:
            derived = self._derive(new, kind, state)
            manifest["derived"] = derived
            data = _manifest_bytes(manifest)
            _atomic_write(self.path / "versions" / f"v{version:06d}.json", data)
            _atomic_write(self.path / MANIFEST, data)
        except OSError as e:
            raise CodebookError(
                f"codebook {self.path}: commit of version {version} failed: {e.strerror or e}"
            ) from e
        self._pending_config = {}
        # Hand the computed state to the caller's Codebook instead of rereading it.
        keys, edits, d, h, lift = new._keys, new._edits, new._derived, new._hnsw, new._lift
        cb._set_manifest(json.loads(data))
        cb._keys, cb._edits, cb._derived, cb._hnsw = keys, edits, d, h
        cb._lift, cb._lift_loaded = lift, True
        self._gc_derived(old)
        return version

    def _derive(self, new: Codebook, kind: str | None, state: tuple | None) -> dict:
        """The new version's derived data, written as deltas where that is exact.

        append: a graph part holding just the new keys, and sigma / neighbour-list patches
        of the rows that changed: O(batch) to compute and write (a part is folded into new
        base files once its deltas outgrow the thresholds in derived.py). same (a config
        change): the previous files as they are. compact (`compact`, `doctor --repair`):
        everything loaded, or rebuilt where damaged, then written as base files. remove /
        full / None: recomputed (rows renumber) and written as base files.
        """
        cb = self.cb
        n = new.n_keys
        tag = f"{new.version:06d}"
        old_n = cb.n_keys if kind in ("append", "same", "compact") else 0
        if kind == "append" and old_n:
            layout = self._derive_append(new, old_n, tag)
        elif kind in ("same", "compact") and n:
            layout = self._derive_keep(new, tag, compact=kind == "compact")
        else:
            layout = self._derive_full(new, kind, state, tag)
        n_edits = len(new.edit_ids())
        p = new.percentile
        tau = new.tau_for(p) if n >= 2 else None
        return {
            "keys": n,
            "edits": n_edits,
            "sigma_k": R.SIGMA_K,
            "percentile": p,
            # rule "images" floors p by the number of images, the others by edits
            "effective_percentile": R.effective_percentile(
                p, new.n_images() if new.tau_rule == "images" else n_edits
            ),
            "tau": tau,
            "tau_seed": TAU_SEED,
            "tau_rule": new.tau_rule,
            "tau_pairs": "all" if n <= R.EXACT_PAIRS_MAX_KEYS else R.SAMPLE_PAIRS,
            **layout,
        }

    def _needs_graph(self, new: Codebook, n: int) -> bool:
        # persisted from hnsw_min_keys on; above KNN_EXACT_MAX_KEYS the lists need it too
        return n > 0 and (n >= new.hnsw_min_keys or n > R.KNN_EXACT_MAX_KEYS)

    def _derive_full(self, new: Codebook, kind: str | None, state: tuple | None, tag: str) -> dict:
        n = new.n_keys
        vecs = new.vectors()
        graphs = [D.Graph(_build_hnsw(vecs), 0, n)] if self._needs_graph(new, n) else None
        if kind == "remove" and n:
            od = self.cb._get_derived(need_knn=True)
            idx, dist = R.remove_from_knn_lists(vecs, od.knn_idx, od.knn_dist, state[3], R.SIGMA_K)
            new._derived = _Derived.from_lists(idx, dist)
        else:
            new._derived = _Derived.compute(vecs, graphs)
        new._hnsw = graphs
        return self._write_bases(new, tag, ("sigma", "knn", "hnsw"))

    def _derive_keep(self, new: Codebook, tag: str, *, compact: bool) -> dict:
        cb = self.cb
        d = cb._get_derived(need_knn=True)  # from the files, or recomputed if damaged
        graphs = cb._hnsw_index() if self._needs_graph(new, new.n_keys) else None
        new._derived, new._hnsw = d, graphs
        # rewrite what is not on disk (recomputed after damage); compaction also what
        # has deltas; a base file that is fine stays as it is (GBs at a million keys)
        rewrite = []
        if d.sigma_files is None or (compact and d.sigma_files["deltas"]):
            rewrite.append("sigma")
        if d.knn_files is None or (compact and d.knn_files["deltas"]):
            rewrite.append("knn")
        if graphs and (any(g.entry is None for g in graphs) or (compact and len(graphs) > 1)):
            rewrite.append("hnsw")
        # the lifted graph: rebuilt when damaged; compaction also builds a missing one or
        # one built with other settings
        if not graphs:
            lift, lift_bad = None, None
        elif cb._lift_loaded and cb._lift is not None:  # already verified: no second read
            lift, lift_bad = cb._lift, None
        else:
            lift, lift_bad = cb._load_lift()
        new._lift = lift
        stale = lift is None or lift.entries["lift_hnsw"].get("settings") != D.lift_settings()
        if graphs and (lift_bad or (compact and stale)):
            rewrite.append("lift")
        return self._write_bases(new, tag, tuple(rewrite))

    def _derive_append(self, new: Codebook, old_n: int, tag: str) -> dict:
        """Derived data after appending keys old_n..n-1 (see `_derive`)."""
        cb = self.cb
        n = new.n_keys
        od = cb._get_derived(need_knn=True)
        new_vecs = _vectors_of(new.keys_table().slice(old_n), new.dim or 0)
        graphs = None
        if self._needs_graph(new, n):
            old = cb._hnsw if cb._hnsw is not None else cb._load_graphs(rebuild=True)[0]
            if old:  # the new keys get a graph part of their own
                graphs = [*old, D.Graph(_build_hnsw(new_vecs, start=old_n), old_n, n)]
            else:  # the first graph: all keys
                graphs = [D.Graph(_build_hnsw(new.vectors()), 0, n)]
        if n > R.KNN_EXACT_MAX_KEYS:
            parts = [g.index for g in graphs]
            app = R.append_knn_ann(parts, new_vecs, od.knn_idx, od.knn_dist, R.SIGMA_K)
        else:
            idx, dist = R.update_knn_lists(
                cb.vectors(), od.knn_idx, od.knn_dist, new_vecs, R.SIGMA_K
            )
            app = D.knn_append_from_full(od.knn_idx, od.knn_dist, idx, dist)
        idx, dist = app.apply(od.knn_idx, od.knn_dist)
        # sigma is row-local: recompute it only where a list changed, and for new rows
        touched = np.concatenate([app.rows, np.arange(old_n, n)])
        raw = np.empty(n, dtype=np.float64)
        raw[:old_n] = od.sigma_raw
        raw[touched] = R.sigma_raw_from_knn(dist[touched])
        d = _Derived(raw, idx, dist)
        new._derived, new._hnsw = d, graphs
        # the lifted graph stays valid for the old rows (appends only shrink sigmas); new
        # keys are searched through their graph part and the sigma scan
        new._lift = cb._lift_index() if graphs else None
        rewrite: list[str] = []
        extra = {"keys": n, "version": new.version}
        # sigma: a patch of the touched rows
        sf = od.sigma_files
        if sf is None or D.should_compact_sigma(
            sf["base"]["rows"], sum(e["rows"] for e in sf["deltas"]) + len(touched)
        ):
            rewrite.append("sigma")
        else:
            patch = D.sigma_patch(raw, touched)
            e = self._write_derived(f"index/sigma-delta-{tag}.npy", D.npy_bytes(patch))
            entry = dict(e, rows=len(patch), **extra)
            d.sigma_files = {"base": sf["base"], "deltas": [*sf["deltas"], entry]}
        # neighbour lists: the entries that point at the new keys
        kf = od.knn_files
        patch = D.knn_patch(app, od.knn_idx, od.knn_dist) if kf is not None else None
        base_rows = kf["base"]["knn_idx"]["rows"] if kf is not None else 0
        if patch is None or D.should_compact_knn(
            base_rows, sum(e["entries"] for e in kf["deltas"]) + len(patch)
        ):
            rewrite.append("knn")
        else:
            e = self._write_derived(f"index/knn-delta-{tag}.npy", D.npy_bytes(patch))
            entry = dict(e, entries=len(patch), **extra)
            d.knn_files = {"base": kf["base"], "deltas": [*kf["deltas"], entry]}
        # graph: the new part, unless it is time to fold the parts into the base
        if graphs:
            small = [g.size for g in graphs[1:]]
            if (
                len(graphs) == 1
                or any(g.entry is None for g in graphs[:-1])
                or D.should_fold_graphs(graphs[0].size, small)
            ):
                rewrite.append("hnsw")
            else:
                e = self._save_graph(graphs[-1].index, f"index/hnsw-delta-{tag}.bin")
                graphs[-1].entry = dict(e, start=old_n, stop=n, version=new.version)
        return self._write_bases(new, tag, tuple(rewrite))

    def _write_bases(self, new: Codebook, tag: str, parts: tuple[str, ...]) -> dict:
        """Write new base files for `parts` of new._derived / new._hnsw (dropping their
        deltas; the graph parts are folded into one) and return the manifest layout."""
        d, n = new._derived, new.n_keys
        if "sigma" in parts:
            e = self._write_derived(f"index/sigma-{tag}.npy", D.npy_bytes(d.sigma_raw))
            d.sigma_files = {"base": dict(e, rows=n), "deltas": []}
        if "knn" in parts:
            base = {
                name: dict(self._write_derived(f"index/{name}-{tag}.npy", D.npy_bytes(a)), rows=n)
                for name, a in (("knn_idx", d.knn_idx), ("knn_dist", d.knn_dist))
            }
            d.knn_files = {"base": base, "deltas": []}
        if "hnsw" in parts and new._hnsw:
            index = self._fold_graphs(new._hnsw, n)
            e = self._save_graph(index, f"index/hnsw-{tag}.bin")
            new._hnsw = [D.Graph(index, 0, n, dict(e, rows=n))]
        if ("hnsw" in parts or "lift" in parts) and new._hnsw:
            new._lift = self._write_lift(new, tag)
        return self._layout(new)

    def _write_lift(self, new: Codebook, tag: str) -> D.Lift:
        """Build and write the lifted graph of new's largest-sigma keys (derived.py)."""
        vecs, sigma = new.vectors(), new._derived.sigma
        rows = D.lift_members(sigma)
        params = D.lift_params(vecs[rows], sigma[rows])
        index = _build_hnsw(D.lift_keys(vecs[rows], sigma[rows], params), M=D.LIFT_M)
        n = new.n_keys  # `rows`: the keys there were when it was built
        entries = {
            "lift_hnsw": dict(
                self._save_graph(index, f"index/lift-hnsw-{tag}.bin"),
                rows=n,
                settings=D.lift_settings(),
            ),
            "lift_rows": dict(
                self._write_derived(f"index/lift-rows-{tag}.npy", D.npy_bytes(rows)),
                rows=n,
                count=len(rows),
            ),
            "lift_params": dict(
                self._write_derived(f"index/lift-params-{tag}.npy", D.npy_bytes(params)), rows=n
            ),
        }
        return D.Lift(index, rows, params, entries)

    @staticmethod
    def _layout(new: Codebook) -> dict:
        """The manifest's `files` (base files) and `deltas` for new._derived / new._hnsw."""
        d, graphs = new._derived, new._hnsw or []
        files = {"sigma": d.sigma_files["base"], **d.knn_files["base"]}
        if graphs:
            files["hnsw"] = graphs[0].entry
        if graphs and new._lift is not None and new._lift.entries:
            files.update(new._lift.entries)
        deltas = {
            "sigma": d.sigma_files["deltas"],
            "knn": d.knn_files["deltas"],
            "hnsw": [g.entry for g in graphs[1:]],
        }
        return {"files": files, "deltas": deltas}

    def _fold_graphs(self, graphs: list[D.Graph], n: int) -> Any:
        """One hnswlib index holding every part: the small parts' keys added to the base."""
        base = graphs[0].index
        if len(graphs) == 1:
            return base
        lock = self.cb._hnsw_lock
        self.cb._hnsw = None  # the base grows: no longer the old snapshot's graph
        with lock:
            base.resize_index(n)
            for g in graphs[1:]:
                rows = np.arange(g.start, g.stop)
                base.add_items(g.index.get_items(rows), rows)
        return base

    def _save_graph(self, index: Any, rel: str) -> dict:
        """save_index to a temp name, hash and fsync it in place, rename: a manifest entry."""
        tmp = _tmp_name(self.path / rel)
        try:
            _mkdirs(tmp.parent)
            with self.cb._hnsw_lock:
                index.save_index(str(tmp))
            _note("write", tmp)
            # hash and fsync the saved file in place (GBs at a million keys: no copy)
            with open(tmp, "rb+") as f:
                sha, size = _hash_file(f)
                os.fsync(f.fileno())
                _note("fsync", tmp)
            _rename(tmp, self.path / rel)
            _fsync_dir(self.path / "index")
        finally:
            if tmp.exists():
                with contextlib.suppress(OSError):
                    _unlink(tmp)
        return {
            "path": rel,
            "sha256": sha,
            "bytes": size,
            "space": HNSW_SPACE,
            "M": int(index.M),
            "ef_construction": int(index.ef_construction),
        }

    def _write_derived(self, rel: str, data: bytes) -> dict:
        _atomic_write(self.path / rel, data)
        return {"path": rel, "sha256": _sha256(data), "bytes": len(data)}

    def _gc_derived(self, previous: dict) -> None:
        """Drop derived files not listed by the current or the previous manifest.

        The previous version's files stay so that readers still on it keep their cache
        (base files stay as long as a delta builds on them).
        """
        keep = _derived_paths(previous) | _derived_paths(self.cb.manifest)
        for f in (self.path / "index").glob("*"):
            if f"index/{f.name}" not in keep and ".tmp-" not in f.name:
                with contextlib.suppress(OSError):
                    _unlink(f)


def _derived_paths(manifest: dict) -> set[str]:
    """Every index/ file a manifest lists: base files and deltas."""
    d = manifest.get("derived") or {}
    out = {e["path"] for e in (d.get("files") or {}).values()}
    for entries in (d.get("deltas") or {}).values():
        out |= {e["path"] for e in entries}
    return out


def _edits_to_table(edits: list[EditRecord], now: dt.datetime) -> pa.Table:
    for e in edits:
        if not _SHA_RE.fullmatch(e.image_sha256 or ""):
            raise CodebookError(f"edit {e.edit_id!r}: invalid image hash {e.image_sha256!r}")
    return pa.Table.from_pydict(
        {
            "edit_id": [e.edit_id for e in edits],
            "image_sha256": [e.image_sha256 for e in edits],
            "question": [e.question for e in edits],
            "answer": [e.answer for e in edits],
            "reasoning": [list(e.reasoning) for e in edits],
            "boxes": [
                None
                if e.boxes is None
                else [None if b is None else [int(x) for x in b] for b in e.boxes]
                for e in edits
            ],
            "source": [e.source for e in edits],
            "added": [e.added or now for e in edits],
        },
        schema=EDITS_SCHEMA,
    )


def _keys_to_table(items: list[tuple[str, KeyRecord]], dim: int) -> pa.Table:
    for _, k in items:
        if k.kind not in KINDS:
            raise CodebookError(f"key of edit {k.edit_id!r}: kind {k.kind!r} not in {KINDS}")
        if k.box is not None and len(k.box) != 4:
            raise CodebookError(f"key of edit {k.edit_id!r}: box must have 4 numbers")
    vecs = (
        np.stack([np.asarray(k.vector, dtype=np.float32).reshape(-1) for _, k in items])
        if items
        else np.zeros((0, dim), dtype=np.float32)
    )
    schema = keys_schema(dim)
    cols = {
        "key_id": pa.array([kid for kid, _ in items], pa.string()),
        "edit_id": pa.array([k.edit_id for _, k in items], pa.string()),
        "kind": pa.array([k.kind for _, k in items], pa.string()),
        "value": pa.array([k.value for _, k in items], pa.string()),
        "merged": pa.array(
            [[{"value": v, "edit_id": e} for v, e in k.merged] for _, k in items], MERGED_TYPE
        ),
        "key_text": pa.array([k.key_text for _, k in items], pa.string()),
        "box": pa.array(
            [None if k.box is None else [int(x) for x in k.box] for _, k in items],
            pa.list_(pa.int32()),
        ),
        "image_sha256": pa.array([k.image_sha256 for _, k in items], pa.string()),
        "radius": pa.array(
            [None if k.radius is None else float(k.radius) for _, k in items], pa.float32()
        ),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), dim),
    }
    return pa.Table.from_arrays(list(cols.values()), schema=schema)


# ---------------------------------------------------------------------------
# keys with several values (merged keys)


def _live_record(k: KeyRecord, live: set[str]) -> KeyRecord | None:
    """`k` without the entries of edits not in `live` (None when none is left)."""
    entries = [(v, e) for v, e in k.entries if e in live]
    if not entries:
        return None
    if len(entries) == len(k.merged) + 1:
        return k
    (value, edit_id), *rest = entries
    return dataclasses.replace(k, edit_id=edit_id, value=value, merged=rest)


def _one_chunk(col: pa.ChunkedArray) -> pa.Array:
    if col.num_chunks == 1:
        return col.chunk(0)
    return pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], col.type)


def _mask(arr: Any) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)


def _with_empty_merged(table: pa.Table) -> pa.Table:
    """A format-1 keys table (one value per key) in the current schema: nothing merged."""
    n = table.num_rows
    empty = pa.ListArray.from_arrays(
        pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], ENTRY_TYPE), type=MERGED_TYPE
    )
    at = table.schema.get_field_index("value") + 1
    return table.add_column(at, pa.field("merged", MERGED_TYPE, nullable=False), empty)


def _drop_entries(table: pa.Table, hidden: Iterable[str]) -> tuple[pa.Table, np.ndarray]:
    """Remove the entries (values) of the `hidden` edits from a keys table.

    Returns the rows that still hold an entry and the keep mask over the input rows. A
    key merged from several edits thus survives the removal of one of them; when its own
    entry goes, its first remaining merged entry moves into `edit_id`/`value`, so a
    live key's first entry is always in those columns. Applying the tombstones of two
    removals one after the other gives the same table as applying both at once (the
    incremental `remove_edits` and the from-segments read agree).
    """
    n = table.num_rows
    ids = sorted(set(hidden))
    if not ids or n == 0:
        return table, np.ones(n, dtype=bool)
    pc = _compute()
    value_set = pa.array(ids, pa.string())
    own_gone = _mask(pc.is_in(table.column("edit_id"), value_set=value_set))
    merged = _one_chunk(table.column("merged"))
    flat = merged.flatten()  # every merged entry, row by row (offsets applied)
    if len(flat) == 0:  # nothing merged anywhere: a plain row filter
        keep = ~own_gone
        return (table if keep.all() else table.filter(pa.array(keep))), keep
    parents = np.asarray(pc.list_parent_indices(merged).to_numpy(zero_copy_only=False))
    values, edit_ids = flat.flatten()  # the struct's fields, offsets applied
    stays = ~_mask(pc.is_in(edit_ids, value_set=value_set))
    left = np.bincount(parents[stays], minlength=n)
    keep = ~own_gone | (left > 0)
    if not own_gone.any() and stays.all():
        return table, keep
    promote = own_gone & (left > 0)
    if promote.any():
        pos = np.flatnonzero(stays)
        rows, first = np.unique(parents[pos], return_index=True)
        sel = promote[rows]
        take = pos[first[sel]]  # each promoted row's first remaining merged entry
        stays[take] = False
        mask = pa.array(promote)
        for name, src in (("edit_id", edit_ids), ("value", values)):
            col = pc.replace_with_mask(_one_chunk(table.column(name)), mask, src.take(take))
            at = table.schema.get_field_index(name)
            table = table.set_column(at, table.schema.field(at), col)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(parents[stays], minlength=n), out=offsets[1:])
    new = pa.ListArray.from_arrays(
        pa.array(offsets), flat.filter(pa.array(stays)), type=MERGED_TYPE
    )
    at = table.schema.get_field_index("merged")
    table = table.set_column(at, table.schema.field(at), new)
    return table.filter(pa.array(keep)), keep


def key_entries(row: dict[str, Any]) -> list[Entry]:
    """The (value, edit_id) entries of one `keys_table().to_pylist()` row, own first."""
    return [(row["value"], row["edit_id"])] + [
        (m["value"], m["edit_id"]) for m in row.get("merged") or []
    ]


def history(path: str | Path) -> list[dict[str, Any]]:
    """One summary per kept version (oldest first), for `reasonedit history`.

    Row counts are those of the segments a version lists minus nothing: removed edits
    are reported separately, since tombstones hide rows without rewriting segments.
    """
    cb = Codebook.open(path)
    out = []
    for f in sorted((cb.path / "versions").glob("v*.json")):
        try:
            m = json.loads(_read_regular(f, cb.path, MAX_MANIFEST_BYTES))
            rows = {"keys": 0, "edits": 0}
            for seg in m.get("segments", []):
                rows[seg["kind"]] = rows.get(seg["kind"], 0) + int(seg.get("rows", 0))
            out.append(
                {
                    "version": int(m["version"]),
                    "updated": m.get("updated") or m.get("created"),
                    "segment_edits": rows["edits"],
                    "segment_keys": rows["keys"],
                    "removed_edits": len(m.get("removed_edits", [])),
                    "layer": m.get("config", {}).get("layer"),
                    "current": int(m["version"]) == cb.version,
                }
            )
        except (OSError, ValueError, KeyError, TypeError):
            out.append({"version": None, "file": f.name, "damaged": True})
    return out


# ---------------------------------------------------------------------------
# staged segments: computed elsewhere (Ray workers), committed by one writer


def staged_segment_bytes(kind: str, records: Sequence[Any], dim: int | None = None) -> bytes:
    """Parquet bytes of edit or key records in exactly the schema of committed segments.

    Workers of a distributed add-edit write these into `staging/`; the committer reads
    them back with `read_staged_segment`, so both ends share the segment format.
    """
    if kind == "edits":
        return _table_bytes(_edits_to_table(list(records), dt.datetime.now(dt.timezone.utc)))
    if kind != "keys" or dim is None:
        raise CodebookError(f"staged segment: kind must be keys (with dim) or edits, got {kind!r}")
    return _table_bytes(_keys_to_table([(k.key_id, k) for k in records], dim))


def read_staged_segment(
    codebook: Codebook, entry: dict, dim: int | None
) -> list[KeyRecord] | list[EditRecord]:
    """Records of a staged segment, verified like a committed one (checksum, schema, rows).

    `entry` is a manifest-style entry {kind, path (relative to the codebook), sha256,
    rows}; `dim` the key width the workers reported (the codebook may have none yet).
    Edit records come back without a timestamp: the commit stamps them, as for local adds.
    """
    view = Codebook(codebook.path, {**codebook.manifest, "config": {**codebook.config, "dim": dim}})
    table = view._read_segment(entry)
    rows = table.to_pylist()
    if entry["kind"] == "edits":
        return [
            EditRecord(
                edit_id=r["edit_id"],
                image_sha256=r["image_sha256"],
                question=r["question"],
                answer=r["answer"],
                reasoning=list(r["reasoning"] or []),
                boxes=r["boxes"],
                source=r["source"] or "",
            )
            for r in rows
        ]
    vectors = _vectors_of(table, int(dim or 0))
    return [
        KeyRecord(
            edit_id=r["edit_id"],
            kind=r["kind"],
            value=r["value"],
            key_text=r["key_text"],
            image_sha256=r["image_sha256"],
            box=tuple(r["box"]) if r["box"] else None,
            vector=vectors[i],
            radius=r["radius"],
        )
        for i, r in enumerate(rows)
    ]
