"""The reader: `Codebook`, a read-only snapshot of one committed codebook version.

Opening reads the manifest only; segments, sigma and the index load lazily and are
verified against the manifest's checksums (`read_segment` for Parquet, store/index for
derived files). Readers never take the lock and never write: `Codebook.writer()` opens a
`CodebookWriter` (store/writer.py), which after each commit hands this snapshot the new
version's tables and `DerivedIndex` through `adopt`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import retrieval as R
from ..errors import CodebookError
from . import compat
from . import taucache as TC
from .check import check_codebook
from .engine import FACT_COLUMNS, Engine, engine_section, min_keys
from .files import (
    MAX_MANIFEST_BYTES,
    MAX_PARQUET_FOOTER,
    atomic_write,
    mkdirs,
    parquet_footer_ok,
    read_regular,
)
from .format import (
    EDITS_SCHEMA,
    MANIFEST,
    SHA_RE,
    CheckReport,
    EditRecord,
    edit_records,
    keys_schema,
    now_iso,
    sha256_hex,
    vectors_of,
)
from .index import DerivedIndex
from .index.derived import Hits
from .index.mapped import MappedError
from .lock import WriterLock
from .manifest import (
    MANIFEST_HINT,
    REPAIR_HINT,
    empty_manifest,
    is_own_name,
    manifest_bytes,
    read_manifest,
    validate_manifest,
    version_files,
)
from .merged import compute, drop_entries, without_edits
from .taucache import TauCache
from .writer import CodebookWriter, open_writer

HNSW_MIN_KEYS = 2000  # below this, exact numpy search is as fast and simpler
VECTOR_CHUNK = 20_000  # rows per chunk a streaming rebuild converts at once (vector_chunks)
TAU_SEED = 0


def read_segment(root: Path, entry: dict, dim: int | None) -> pa.Table:
    """One segment a manifest (or a staging job) lists, verified: checksum, Parquet
    footer, row count, kind, schema version and schema; in the current schema."""
    rel = entry["path"]
    f = root / rel
    try:
        data = read_regular(f, root)
    except FileNotFoundError:
        raise CodebookError(
            f"codebook {root}: {rel} is missing; {REPAIR_HINT}, or "
            f"`reasonedit restore` an older version"
        ) from None
    except OSError as e:
        raise CodebookError(f"codebook {root}: cannot read {rel}: {e.strerror or e}") from e
    if sha256_hex(data) != entry["sha256"]:
        raise CodebookError(
            f"codebook {root}: {rel} is damaged (checksum mismatch); "
            f"{REPAIR_HINT}, or `reasonedit restore` an older version"
        )
    bad = parquet_footer_ok(data)
    if bad:
        raise CodebookError(f"codebook {root}: {rel} is not readable Parquet ({bad})")
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
                f"codebook {root}: {rel} declares {declared} rows and "
                f"{pf.metadata.num_columns} columns, manifest says {entry.get('rows')}"
            )
        table = pf.read()
    except (pa.ArrowException, OSError, ValueError) as e:
        why = " ".join(str(e).split())[:300]  # pyarrow messages span lines
        raise CodebookError(f"codebook {root}: {rel} is not readable Parquet ({why})") from e
    meta = table.schema.metadata or {}
    kind = entry["kind"]
    if meta.get(b"reasonedit.segment") != kind.encode():
        raise CodebookError(f"codebook {root}: {rel} is not a {kind} segment")
    sv = meta.get(b"reasonedit.schema_version", b"?").decode(errors="replace")
    if sv not in compat.READ_SCHEMA_VERSIONS:
        raise CodebookError(
            f"codebook {root}: {rel} has schema version {sv}, this reasonedit reads "
            f"{', '.join(compat.READ_SCHEMA_VERSIONS)}; upgrade reasonedit"
        )
    expected = compat.keys_schema_for(dim or 0, sv) if kind == "keys" else EDITS_SCHEMA
    got = table.schema.remove_metadata()
    if kind == "keys" and dim is None:
        raise CodebookError(f"codebook {root}: config has no dim but {rel} holds keys")
    if not got.equals(expected.remove_metadata()):
        raise CodebookError(
            f"codebook {root}: {rel} has an unexpected schema "
            f"(vector width or columns differ from config)"
        )
    if table.num_rows != entry.get("rows", table.num_rows):
        raise CodebookError(
            f"codebook {root}: {rel} has {table.num_rows} rows, manifest says {entry['rows']}"
        )
    if kind == "keys":
        table = compat.upgrade_keys(table, sv)
    return table


class Codebook:
    """A read-only snapshot of one committed codebook version.

    Cheap to open (reads the manifest only); segments, sigma and the index load lazily
    and are verified against the manifest's checksums. Call `refresh()` to move to the
    newest version. Writes go through `writer()`.
    """

    _keys: pa.Table | None  # live keys with vectors
    _edits: pa.Table | None
    _vectors: np.ndarray | None
    _index: DerivedIndex | None  # loaded on first use, or handed over by the writer
    _pair_sample: np.ndarray | None  # tau_rule "all": the seeded sample of pairs
    _engine: Engine | None  # the mapped engine files (store/engine.py), opened on first use

    def __init__(
        self,
        path: Path,
        manifest: dict,
        *,
        hnsw_min_keys: int = HNSW_MIN_KEYS,
        engine_min_keys: int | None = None,
        keys: pa.Table | None = None,
        edits: pa.Table | None = None,
        n_keys: int | None = None,
        tail: tuple[int, pa.Table] | None = None,
    ):
        self.path = path
        self.hnsw_min_keys = hnsw_min_keys
        # writers: engine files from this many keys (store/engine.py)
        self.engine_min_keys = min_keys() if engine_min_keys is None else engine_min_keys
        self.hnsw_lock = threading.Lock()  # hnswlib: no concurrent add and query (index, writer)
        self._set_manifest(manifest)
        self._keys, self._edits = keys, edits
        # a writer's view of content it is about to commit: the live key count and the
        # rows it appends, so that an insert reads no older key (store/engine.py)
        self._n_hint, self._tail = n_keys, tail

    # -- opening ----------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        create: bool = False,
        hnsw_min_keys: int = HNSW_MIN_KEYS,
        engine_min_keys: int | None = None,
    ) -> Codebook:
        """Open the codebook at path; create=True makes an empty one if missing or empty.

        Reads the manifest only: the engine's files (a codebook of ENGINE_MIN_KEYS keys
        or more, store/engine.py) are mapped on the first search, never decoded.
        """
        p = Path(path).expanduser().absolute()
        opts: dict[str, Any] = {"hnsw_min_keys": hnsw_min_keys, "engine_min_keys": engine_min_keys}
        if os.path.lexists(p / MANIFEST):
            return cls(p, read_manifest(p), **opts)
        kept = version_files(p)
        if kept:  # never create a new v0 over a codebook that lost its manifest
            raise CodebookError(
                f"codebook {p}: {MANIFEST} is missing but versions/ holds {len(kept)} "
                f"versions; {MANIFEST_HINT}"
            )
        if p.exists() and not p.is_dir():
            raise CodebookError(f"codebook {p}: not a directory")
        foreign = (
            sorted(x.name for x in p.iterdir() if not is_own_name(x.name)) if p.exists() else []
        )
        if foreign:
            raise CodebookError(
                f"{p} is not a reasonedit codebook (no {MANIFEST}; it contains "
                f"{', '.join(foreign[:3])}{'...' if len(foreign) > 3 else ''})"
            )
        if not create:
            raise CodebookError(f"no codebook at {p} (no {MANIFEST}); add an edit to create one")
        try:
            mkdirs(p)
        except OSError as e:
            raise CodebookError(f"cannot create codebook {p}: {e.strerror or e}") from e
        with WriterLock(p, 10.0):
            if not (p / MANIFEST).exists():  # another creator may have won the race
                for sub in ("segments", "images", "index", "versions"):
                    mkdirs(p / sub)
                data = manifest_bytes(empty_manifest(now_iso()))
                atomic_write(p / "versions" / "v000000.json", data)
                atomic_write(p / MANIFEST, data)
        return cls(p, read_manifest(p), **opts)

    def refresh(self) -> bool:
        """Reload the manifest; True when a newer version was committed since."""
        m = read_manifest(self.path)
        if self._is_manifest(m):
            return False
        self._set_manifest(m)
        return True

    def newer(self) -> Codebook | None:
        """The committed version on disk as a new snapshot when it is not this one, else None.

        Unlike `refresh`, this snapshot stays as it is, so a reader still using it (a
        request in flight in `reasonedit serve`) finishes on its version. Reads only the
        manifest; raises CodebookError when it is damaged.
        """
        m = read_manifest(self.path)
        if self._is_manifest(m):
            return None
        return type(self)(
            self.path, m, hnsw_min_keys=self.hnsw_min_keys, engine_min_keys=self.engine_min_keys
        )

    def view(
        self,
        manifest: dict,
        *,
        keys: pa.Table | None = None,
        edits: pa.Table | None = None,
        n_keys: int | None = None,
        tail: tuple[int, pa.Table] | None = None,
    ) -> Codebook:
        """A snapshot of another manifest of this codebook (a versions/ copy, the content a
        writer is about to commit, a staging job's segments); `keys`/`edits` are its live
        tables when the caller already has them. A writer that has not decoded the keys
        gives their count (`n_keys`) and the rows it appends (`tail`: first row, table),
        which `vectors_from` / `keys_from` then read instead of every segment."""
        return type(self)(
            self.path,
            manifest,
            hnsw_min_keys=self.hnsw_min_keys,
            engine_min_keys=self.engine_min_keys,
            keys=keys,
            edits=edits,
            n_keys=n_keys,
            tail=tail,
        )

    def adopt(
        self, manifest: dict, *, keys: pa.Table | None, edits: pa.Table, index: DerivedIndex
    ) -> None:
        """Move this snapshot to a version just committed: its manifest, live tables and
        derived index as the writer computed them (instead of reading them back); keys
        None: not decoded (an insert through the engine), read on first need."""
        self._set_manifest(manifest)
        self._keys, self._edits = keys, edits
        self._index = index.committed(manifest.get("derived"), vectors=self.vectors)

    def use_index(self, index: DerivedIndex) -> None:
        """Search through another derived index of the same keys (tests, benchmarks)."""
        self._index = index

    def load(self) -> Codebook:
        """Read and verify now everything a query needs: keys, edits, vectors, sigma, tau
        and the search index; returns self.

        A snapshot loaded before it serves reads no file afterwards, so a damaged version
        fails here (CodebookError) rather than in the middle of a request, and a later
        writer's clean-up cannot remove a file from under it. Only the neighbour lists that
        a query with another percentile needs (`tau_for`) still load on first use; they are
        rebuilt from the vectors if their files have gone.

        With the engine's files (store/engine.py) the keys are not decoded: the engine is
        opened and verified here, and its files stay mapped (an unlinked file's pages
        live on while mapped): 1.26 s for a million keys, imports included.
        """
        eng = self.engine()
        if eng is None:
            self.keys_table()
        self.edits_table()
        if self.n_keys:
            if eng is None:
                self.vectors()
                self.sigma()
                if self.n_keys >= self.hnsw_min_keys:
                    self.index.graphs()
                    self.index.lift()
            _ = self.tau
            # one search runs the remaining lazy paths a query takes
            self.search(np.zeros((1, self.dim or self.vectors().shape[1]), np.float32), k=1)
        return self

    def _is_manifest(self, m: dict) -> bool:
        return m["version"] == self.version and m.get("checksum") == self.manifest.get("checksum")

    def _set_manifest(self, manifest: dict) -> None:
        self.manifest = manifest
        self._keys = None
        self._edits = None
        self._vectors = None
        self._index = None
        self._pair_sample = None
        self._engine = None
        self._engine_tried = False
        self._tau_cache: TauCache | None = None
        self._tau_cache_tried = False
        self._n_hint = None
        self._tail = None

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
        """Live keys: the manifest's count when it lists engine files of this version
        (no segment decoded), else the decoded keys table's."""
        if self._keys is None:
            if self._n_hint is not None:
                return self._n_hint
            e = engine_section(self.manifest)
            if e is not None:
                return int(e["keys"])
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
        return compat.tau_rule(self.config, R.TAU_RULES)

    def tau_for(self, p: float) -> float | None:
        """tau for another percentile p (sweeps), by the codebook's `tau_rule`: from the
        per-key measurements the writer kept (store/taucache.py) when this version lists
        them, else from the neighbour lists."""
        if self.tau_rule in TC.RULES and self.n_keys >= 2:
            cache = self.tau_cache()
            if cache is not None:
                # the live edits' count as the writer recorded it (no edits segment read)
                d = self.manifest.get("derived") or {}
                n_edits = d.get("edits") if self._edits is None else None
                if not isinstance(n_edits, int):
                    n_edits = len(self.edit_ids())
                return cache.threshold(self.sigma(), self.tau_rule, p, n_edits)
        if self.tau_rule == "reference":
            if self.n_keys < 2:
                return None
            return R.reference_threshold(
                self.vectors(), self.reference_sigma(), len(self.edit_ids()), p
            )
        if self.tau_rule in ("nearest", "edits", "images"):
            if self.n_keys < 2:
                return None
            d = self.index.lists(need_knn=True)
            if self.tau_rule == "nearest":
                return R.nearest_threshold(d.dist, d.sigma, p, len(self.edit_ids()))
            edit_of = self.key_column("edit_id").to_numpy(zero_copy_only=False)
            _, codes = np.unique(edit_of, return_inverse=True)
            if self.tau_rule == "images":
                image_of = self.key_column("image_sha256").to_numpy(zero_copy_only=False)
                _, image_codes = np.unique(image_of, return_inverse=True)
                return R.other_image_threshold(d.idx, d.dist, d.sigma, image_codes, codes, p)
            return R.other_edit_threshold(d.idx, d.dist, d.sigma, codes, p, len(self.edit_ids()))
        if self._pair_sample is None:
            self._pair_sample = R.corrected_pair_sample(self.vectors(), self.sigma(), seed=TAU_SEED)
        return R.rejection_threshold(None, None, p, len(self.edit_ids()), sample=self._pair_sample)

    def tau_cache(self) -> TauCache | None:
        """The per-key tau measurements this version lists (`files.tau_other`), verified,
        or None (none listed, damaged, or of other keys)."""
        if not self._tau_cache_tried:
            self._tau_cache_tried = True
            d = self.manifest.get("derived") or {}
            entry = (d.get("files") or {}).get("tau_other")
            if entry is not None and d.get("keys") == self.n_keys:
                self._tau_cache = TC.load(self.path, entry, self.n_keys)
        return self._tau_cache

    def use_tau_cache(self, cache: TauCache) -> None:
        """Measure tau from these per-key measurements (a writer's, before its commit)."""
        self._tau_cache, self._tau_cache_tried = cache, True

    def derived_section(self, layout: dict) -> dict:
        """The manifest's `derived` section of this content: counts, tau by the
        codebook's rule, and the index files `layout` (what a writer commits)."""
        n = self.n_keys
        n_edits = len(self.edit_ids())
        p = self.percentile
        tau = self.tau_for(p) if n >= 2 else None
        return {
            "keys": n,
            "edits": n_edits,
            "sigma_k": R.SIGMA_K,
            "percentile": p,
            # rule "images" floors p by the number of images, the others by edits
            "effective_percentile": R.effective_percentile(
                p, self.n_images() if self.tau_rule == "images" else n_edits
            ),
            "tau": tau,
            "tau_seed": TAU_SEED,
            "tau_rule": self.tau_rule,
            "tau_pairs": "all" if n <= R.EXACT_PAIRS_MAX_KEYS else R.SAMPLE_PAIRS,
            **layout,
        }

    # -- Parquet ----------------------------------------------------------

    def read_segment(self, entry: dict) -> pa.Table:
        """One segment this manifest lists, verified (see `read_segment`)."""
        return read_segment(self.path, entry, self.dim)

    def _live_parts(self, kind: str) -> Iterable[pa.Table]:
        """The live rows of each listed segment of `kind`, one segment decoded at a time."""
        tomb = {t["edit_id"]: int(t["version"]) for t in self.manifest["removed_edits"]}
        for entry in self.manifest["segments"]:
            if entry["kind"] != kind:
                continue
            t = self.read_segment(entry)
            hidden = [e for e, v in tomb.items() if int(entry["version"]) <= v]
            if hidden and t.num_rows:
                if kind == "keys":
                    t = drop_entries(t, hidden)[0]  # a merged key loses just their values
                else:
                    t = without_edits(t, hidden)
            yield t.replace_schema_metadata(None)

    def _live_table(self, kind: str) -> pa.Table:
        parts = list(self._live_parts(kind))
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
            self._vectors = vectors_of(self.keys_table(), self.dim or 0)
        return self._vectors

    def vectors_from(self, start: int) -> np.ndarray:
        """The vectors of rows start.. only (a writer's appended keys), without building
        the whole array."""
        return vectors_of(self.keys_from(start), self.dim or 0)

    def keys_from(self, start: int) -> pa.Table:
        """The live keys of rows start.. (a writer's appended keys): the rows the writer
        gave (`view(tail=)`) when they are these, else a slice of the keys table."""
        if self._keys is None and self._tail is not None and self._tail[0] == start:
            return self._tail[1]
        return self.keys_table().slice(start)

    def keys_if_loaded(self) -> pa.Table | None:
        """The live keys table when this snapshot holds it, else None (nothing decoded)."""
        return self._keys

    def vector_chunks(self) -> Iterable[np.ndarray]:
        """Every key vector in row order, float32, one segment (or slice) at a time: what
        a streaming rebuild reads (store/engine.py), never one array of every key."""
        if self._keys is not None:
            for start in range(0, self._keys.num_rows, VECTOR_CHUNK):
                yield vectors_of(self._keys.slice(start, VECTOR_CHUNK), self.dim or 0)
            return
        for table in self._live_parts("keys"):
            for start in range(0, table.num_rows, VECTOR_CHUNK):
                yield vectors_of(table.slice(start, VECTOR_CHUNK), self.dim or 0)

    def facts_table(self) -> pa.Table:
        """The live keys without their vectors (what the engine's facts file holds),
        decoding one segment at a time when the keys table is not loaded."""
        if self._keys is not None:
            return self._keys.drop(["vector"])
        parts = [t.drop(["vector"]) for t in self._live_parts("keys")]
        if not parts:
            return keys_schema(self.dim or 1).remove_metadata().empty_table().drop(["vector"])
        return pa.concat_tables(parts)

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
            for eid in self.read_segment(entry).column("edit_id").to_pylist():
                if eid in live and v > tomb.get(eid, -1):
                    out[eid] = v
        return out

    def n_images(self) -> int:
        """Distinct images the live keys are on (the groups of `tau_rule: images`)."""
        cache = self.tau_cache() if self.tau_rule in TC.RULES else None
        if cache is not None:
            return cache.n_images
        return len(set(self.key_column("image_sha256").to_pylist()))

    def edits(self, ids: Iterable[str] | None = None) -> list[EditRecord]:
        """Live edits in insertion order (only those in `ids` when given)."""
        table = self.edits_table()
        if ids is not None:
            wanted = pa.array(sorted(set(ids)), pa.string())
            table = table.filter(compute().is_in(table.column("edit_id"), value_set=wanted))
        return edit_records(table)

    # -- what survives damage (doctor --repair, store/repair.py) ----------

    def segment_problems(self) -> list[tuple[dict, str]]:
        """(manifest entry, one-line error) of every listed segment that fails to read."""
        out = []
        for entry in self.manifest["segments"]:
            try:
                self.read_segment(entry)
            except CodebookError as e:
                out.append((entry, str(e)))
        return out

    def surviving_table(self, kind: str, skip: Iterable[str]) -> pa.Table:
        """The live view of `kind` built from every listed segment except the `skip`
        paths (damaged ones): what the rest of the codebook still holds."""
        bad = set(skip)
        segments = [s for s in self.manifest["segments"] if s["path"] not in bad]
        view = self.view({**self.manifest, "segments": segments})
        return view.keys_table() if kind == "keys" else view.edits_table()

    def kept_key_tables(self, skip: Iterable[str]) -> list[tuple[int, pa.Table]]:
        """(version, table) of every keys segment some intact versions/ copy lists, the
        `skip` paths left out, each verified against that copy: older key layouts (patch
        boxes, kinds) that repair can re-embed. Newest first."""
        bad, seen, out = set(skip), set(), []
        for f in reversed(version_files(self.path)):
            try:
                m = validate_manifest(
                    read_regular(f, self.path, MAX_MANIFEST_BYTES), self.path, str(f)
                )
            except (CodebookError, OSError):
                continue
            dim = (m.get("config") or {}).get("dim")
            for entry in m["segments"]:
                if entry["kind"] != "keys" or entry["path"] in bad or entry["path"] in seen:
                    continue
                seen.add(entry["path"])
                if not dim:
                    continue
                try:
                    out.append((int(entry["version"]), read_segment(self.path, entry, int(dim))))
                except CodebookError:
                    continue
        return sorted(out, key=lambda t: -t[0])

    # -- images -----------------------------------------------------------

    def image_path(self, sha: str) -> Path:
        """Path of a stored image (content-addressed: images/<sha[:2]>/<sha>.<ext>)."""
        if not SHA_RE.fullmatch(sha or ""):
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
            data = read_regular(p, self.path)
        except OSError as e:
            raise CodebookError(
                f"codebook {self.path}: cannot read {p.relative_to(self.path)}: {e.strerror or e}"
            ) from e
        if sha256_hex(data) != sha:
            raise CodebookError(
                f"codebook {self.path}: {p.relative_to(self.path)} is damaged (checksum mismatch)"
            )
        return data

    # -- derived data (store/index) ---------------------------------------

    @property
    def index(self) -> DerivedIndex:
        """The derived index of this version: sigma, neighbour lists, graphs, lifted graph."""
        if self._index is None:
            self._index = DerivedIndex(
                self.path,
                self.manifest.get("derived"),
                self.n_keys,
                self.dim or 0,
                self.vectors,
                reference=self.tau_rule == "reference",
                lock=self.hnsw_lock,
            )
        return self._index

    def sigma(self) -> np.ndarray:
        """Per-key hubness scale sigma_k (float64), in keys_table() order: what search
        divides raw distances by.

        With `tau_rule: reference` it is the reference's `reference_sigma + 1e-6` (1 for a
        key without neighbours), computed from the stored neighbour lists; otherwise the
        numpy median with the duplicate floor (the derived sigma files).
        """
        return self.index.sigma()

    def reference_sigma(self) -> np.ndarray:
        """The reference's sigma (retrieval.reference_sigma_from_knn: lower median of the
        30 nearest distances, NaN without neighbours), in keys_table() order."""
        return self.index.reference_sigma()

    def engine(self) -> Engine | None:
        """The engine files of this version, mapped and checked (store/engine.py), or
        None: none listed (fewer than ENGINE_MIN_KEYS keys, a codebook written before
        them, `tau_rule: reference`) or damaged. Then search and facts take the decoded
        path, so damage there costs speed, never an answer (`doctor` reports it)."""
        if not self._engine_tried:
            self._engine_tried = True
            section = engine_section(self.manifest)
            if section is not None and section.get("keys") and self.dim:
                try:
                    eng = Engine(self.path, self.manifest["derived"])
                    if eng.index.dim == self.dim:
                        self._engine = eng
                except (MappedError, KeyError, TypeError, ValueError, AttributeError):
                    self._engine = None  # damaged or malformed: the decoded path answers
        return self._engine

    def key_column(self, name: str) -> pa.ChunkedArray:
        """One column of the live keys (not `vector`) in row order: from the mapped facts
        files when the engine is open (no segment decoded: tau for another percentile),
        else from the keys table."""
        eng = self.engine() if self._keys is None else None
        if eng is not None:
            return eng.column(name)
        return self.keys_table().column(name)

    def key_facts(self, rows: Iterable[int]) -> list[dict]:
        """The facts of these key rows (engine.FACT_COLUMNS: value, kind, edit_id,
        key_id, box, merged, radius): from the mapped facts file when the engine is
        open, else from the decoded keys table."""
        rows = [int(r) for r in rows]
        eng = self.engine() if self._keys is None else None
        if eng is not None:
            return eng.row_facts(rows)
        table = self.keys_table()
        cols = {c: table.column(c) for c in FACT_COLUMNS}
        return [{c: cols[c][r].as_py() for c in FACT_COLUMNS} for r in rows]

    # -- search -----------------------------------------------------------

    def search(self, queries: np.ndarray, k: int = 5, *, method: str = "auto") -> Hits:
        """k nearest keys per query by hubness-corrected distance.

        Returns per query a list of (row, raw L2 distance, corrected distance), best
        first. method: "exact" (numpy brute force), "hnsw", or "auto": the mapped engine
        when this version has one (store/engine.py: the same numbers, nothing decoded),
        else hnsw from `hnsw_min_keys` keys on. The hnsw path over-fetches candidates
        by raw distance, adds those of the lifted graph (the large-sigma keys, searched by corrected
        distance: store/index/lift.py), and re-ranks them exactly, since the correction
        can reorder neighbours.
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
        if method == "auto":
            eng = self.engine()
            if eng is not None:
                try:
                    return eng.search(q, k)
                except MappedError:
                    # damage the open's checks let through (a graph file changed in
                    # place, its mtime put back, that can no longer answer): as for
                    # damage found on open, the decoded path answers from now on
                    self._engine = None
        use_hnsw = method == "hnsw" or (method == "auto" and n >= self.hnsw_min_keys)
        return self.index.search(q, k, use_hnsw=use_hnsw)

    # -- writing and checking ---------------------------------------------

    def writer(
        self, lock_timeout: float = 10.0
    ) -> contextlib.AbstractContextManager[CodebookWriter]:
        """Take the writer lock (waiting up to lock_timeout s) and yield a writer.

        On entry the newest manifest is reloaded and leftovers of crashed writers are
        removed; on exit pending config changes are committed and the lock released.
        """
        return open_writer(self, lock_timeout)

    def check(
        self, repair: bool = False, *, lock_timeout: float = 10.0, images: bool = True
    ) -> CheckReport:
        """Verify every file the manifest lists (for `reasonedit doctor`); with
        repair=True rebuild damaged derived files (see store/check.py)."""
        return check_codebook(self, repair, lock_timeout=lock_timeout, images=images)


def history(path: str | Path) -> list[dict[str, Any]]:
    """One summary per kept version (oldest first), for `reasonedit history`.

    Row counts are those of the segments a version lists minus nothing: removed edits
    are reported separately, since tombstones hide rows without rewriting segments.
    """
    cb = Codebook.open(path)
    out: list[dict[str, Any]] = []
    for f in sorted((cb.path / "versions").glob("v*.json")):
        try:
            m = json.loads(read_regular(f, cb.path, MAX_MANIFEST_BYTES))
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
