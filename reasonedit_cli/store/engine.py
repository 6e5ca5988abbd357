"""The wide-key engine in the store (issue 22): what `ask` maps instead of decoding.

A codebook of `ENGINE_MIN_KEYS` keys or more gets, besides the Parquet segments (the
source of truth) and the `DerivedIndex` files, the engine's derived files: the keys'
full vectors memory-mapped, the reduced-projection index (`ReducedIndex`,
store/index/reduced.py) and the facts file (the keys table without vectors, Arrow IPC,
store/index/facts.py). The manifest lists them under `derived.engine`.

A reader that finds them (`Codebook.engine`) opens the codebook by mapping them: its
search goes through `ReducedIndex.search` and its hits' facts through `facts.row_facts`,
so `ask` decodes no segment, whatever the codebook's size. The engine searches with the
store's sigma (section `"sigma": "store"`: the derived section's sigma files), and the
winners' distances are recomputed by the store's one distance function (`retrieval.direct_l2`),
so both paths return the same numbers as the exact search.

Policy (docs/codebook-format.md#wide-keys-in-the-store): below ENGINE_MIN_KEYS keys no
engine files are written and readers use the `DerivedIndex` as before (measured in
benchmarks/README.md: equal at 100-500 keys, the engine faster at 2,000); a codebook
written before the engine (or with `tau_rule: reference`, whose sigma is the
reference's) opens exactly as before and gets the engine files on its next write. The
writer (`derive_engine`) appends to the engine on an insert (`ReducedIndex.append_files`
plus a facts file of the new rows) and rebuilds it (`ReducedIndex.build`, which refits
the projection) on every other change and once the appended parts outgrow
REBUILD_FRACTION of the keys.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import retrieval as R
from .index import DerivedIndex
from .index.facts import open_facts, write_facts
from .index.ivf import NPROBE, IVFPart
from .index.mapped import MappedArray, MappedError, VectorParts, open_vectors, write_vectors
from .index.reduced import ReducedIndex
from .manifest import engine_entries

#: below this many keys no engine files are written (the decoded path is as fast there:
#: benchmarks/README.md, "Cold ask vs codebook size"); REASONEDIT_ENGINE_MIN_KEYS
#: overrides it (`min_keys`)
ENGINE_MIN_KEYS = 500


def min_keys() -> int:
    """The engine threshold writers use by default: REASONEDIT_ENGINE_MIN_KEYS when set
    (tests, the crash harness, benchmarks), else ENGINE_MIN_KEYS."""
    try:
        return int(os.environ.get("REASONEDIT_ENGINE_MIN_KEYS") or ENGINE_MIN_KEYS)
    except ValueError:
        return ENGINE_MIN_KEYS


RERANK_EXTRA = 8  # winners asked of the engine beyond k, re-ranked by direct_l2
#: keys scanned in the reduced space per query: IVF lists are probed until they hold
#: this many (at least the engine's NPROBE). With the engine's 12 lists a 20k-key
#: codebook (490 lists of ~41 keys) found 0.67 of the exact top 5 on isotropic 24-d
#: keys (tests/test_codebook.py::test_hnsw_recall_20k); 100 lists (4,100 keys) found
#: 0.98 at 3.6 ms a query. At a million keys (~290 a list) this is 15 lists: 96 lists
#: there cost 239 ms a query against 31 ms for 12 (1M x 512, loaded machine)
SEARCH_ROWS = 4096
SEARCH_FETCH = 128  # candidates per part re-ranked on the full vectors (the engine's)
REBUILD_FRACTION = 0.25  # appended rows above this share of the keys: rebuild (refit)
MAX_APPENDS = 32  # ... or more appended parts than this (each is scanned in full)
#: the facts columns `retrieve` reads
FACT_COLUMNS = ("value", "kind", "edit_id", "key_id", "box", "merged", "radius")


def engine_section(manifest: dict) -> dict | None:
    """The manifest's `derived.engine` when it is of this version's keys, else None."""
    d = manifest.get("derived") or {}
    e = d.get("engine")
    if not isinstance(e, dict) or not isinstance(e.get("index"), dict):
        return None
    try:
        if int(e["keys"]) != int(d.get("keys", -1)) or int(e["index"]["keys"]) != int(e["keys"]):
            return None
    except (KeyError, TypeError, ValueError):
        return None
    return e


def engine_files(manifest: dict) -> list[dict]:
    """The entries of the engine's files that record an mtime (the mapped and large
    files a normal open checks by size and mtime): what `doctor` re-stamps."""
    return [e for e in engine_entries(manifest) if "mtime_ns" in e]


class Engine:
    """One codebook version's engine, opened: the mapped index and the facts parts."""

    def __init__(
        self,
        root: Path,
        derived: dict,
        *,
        full_check: bool = False,
        lists: bool = False,
    ):
        self.root = root
        section = derived["engine"]
        self.section = section
        # open() keeps the entries; a copy, so that no later change touches the manifest
        self.index = ReducedIndex.open(
            root, copy.deepcopy(section["index"]), lists=lists, full_check=full_check
        )
        if section.get("sigma", "store") == "store":
            self.index.set_sigma(store_sigma(root, derived, self.index.n))
        per_list = [p.size / max(1, len(p.centroids)) for p in self.index.parts
                    if isinstance(p, IVFPart)]  # fmt: skip
        self.nprobe = max([NPROBE] + [math.ceil(SEARCH_ROWS / max(1.0, m)) for m in per_list])
        self.facts = self.facts_tables(root, section, full_check=full_check)
        if sum(t.num_rows for _, t in self.facts) != self.index.n:
            raise MappedError("facts files do not cover every key")

    @staticmethod
    def facts_tables(
        root: Path, section: dict, *, full_check: bool = False
    ) -> list[tuple[int, pa.Table]]:
        """(first row, mapped table) of each facts file of an engine section, checked to
        follow each other and to hold FACT_COLUMNS. Raises MappedError."""
        out: list[tuple[int, pa.Table]] = []
        start = 0
        for fe in section["facts"]:
            if int(fe["start"]) != start:
                raise MappedError("facts files do not follow each other")
            table = open_facts(root / fe["path"], fe, full_check=full_check)
            missing = [c for c in FACT_COLUMNS if c not in table.column_names]
            if missing:
                raise MappedError(f"{fe['path']} lacks {', '.join(missing)}")
            out.append((start, table))
            start += table.num_rows
        return out

    @property
    def n(self) -> int:
        return self.index.n

    @property
    def sigma(self) -> np.ndarray:
        return self.index.sigma

    def search(self, q: np.ndarray, k: int) -> list[list[tuple[int, float, float]]]:
        """k nearest keys per query by corrected distance, (row, raw, corrected), with
        the numbers of the store's exact path: the engine's winners (and RERANK_EXTRA
        more) re-ranked by `retrieval.direct_l2` over the same vectors and sigma."""
        res = self.index.search(q, k + RERANK_EXTRA, nprobe=self.nprobe, fetch=SEARCH_FETCH)
        out: list[list[tuple[int, float, float]]] = []
        sigma = self.index.sigma
        for i, hits in enumerate(res):
            if not hits:
                out.append([])
                continue
            rows = np.array([r for r, _, _ in hits], dtype=np.int64)
            raw = R.direct_l2(q[i], self.index.vectors.take(rows))
            raw = np.where(np.isfinite(raw), raw, np.inf)  # damaged rows: never nearest
            corr = raw / sigma[rows]
            order = np.lexsort((rows, corr))[:k]
            out.append([(int(rows[j]), float(raw[j]), float(corr[j])) for j in order])
        return out

    def column(self, name: str) -> pa.ChunkedArray:
        """One facts column over every row (the facts files' chunks, not copied)."""
        chunks = [c for _, t in self.facts for c in t.column(name).chunks]
        return pa.chunked_array(chunks, type=self.facts[0][1].schema.field(name).type)

    def row_facts(self, rows: Sequence[int]) -> list[dict]:
        """The facts (FACT_COLUMNS) of these rows, reading only their entries."""
        out = []
        for r in rows:
            for start, table in reversed(self.facts):
                if r >= start:
                    out.append({c: table.column(c)[int(r) - start].as_py() for c in FACT_COLUMNS})
                    break
        return out


# -- the writer's side ------------------------------------------------------------------


def store_sigma(root: Path, derived: dict, n: int) -> np.ndarray:
    """The store's sigma before the floor (the derived section's sigma base file and its
    patches, verified as `DerivedIndex` reads them): what the engine searches by, so its
    numbers are the store's. Raises MappedError when they are missing or damaged."""
    index = DerivedIndex(root, derived, n, 0, _no_vectors)
    raw, _, bad = index.load_sigma_files()
    if raw is None:
        raise MappedError(f"{bad or 'sigma'} is missing or damaged")
    return raw


def _no_vectors() -> np.ndarray:
    raise MappedError("the store's sigma files are incomplete")  # never called


def derive_engine(
    root: Path,
    version: int,
    old_manifest: dict,
    kind: str | None,
    new: Any,
    n: int,
) -> tuple[ReducedIndex | None, dict]:
    """The engine of a commit of `n` keys, its files written: (the index with its
    neighbour lists, or None when the previous section is kept as it is; the section).

    The engine is the store's source of sigma and neighbour lists (`store_layout`): the
    writer derives no full-width index beside it. `new` is the new version's Codebook
    view; only the appended rows (`vectors_from`, `keys_from`) are read on an insert that
    appends, and a rebuild streams the vectors (`_build`). kind "append" appends when the
    previous version has an engine of its first rows; "same" keeps the previous section;
    everything else rebuilds (refitting the projection).
    """
    tag = f"{version:06d}"
    old = engine_section(old_manifest)
    if kind == "same" and old is not None and int(old["keys"]) == n:
        return None, copy.deepcopy(old)
    eng: ReducedIndex | None = None
    section: dict | None = None
    if kind == "append" and old is not None and int(old["keys"]) < n:
        try:
            # the writer never searches: the lifted graph is verified, not loaded; the
            # facts files it keeps are checked like a reader's (size, mtime)
            previous = ReducedIndex.open(
                root, copy.deepcopy(old["index"]), lists=True, lift="verify",
                spare_rows=n - int(old["keys"]),
            )  # fmt: skip
            Engine.facts_tables(root, old)
        except (MappedError, KeyError, TypeError, ValueError, IndexError):
            previous = None  # the previous engine is damaged: rebuild it from the keys
        if previous is not None and previous.dim == new.dim:
            n_old = previous.n
            if _append_fits(old, n):
                eng, section = _append(root, tag, old, previous, new)
            else:  # appended parts outgrew the base: refit over the mapped rows + new
                delta = _delta_vectors(root, tag, new.vectors_from(n_old))
                eng = _build_from(root, tag, previous.vectors.with_part(delta.array, delta))
                facts = [t for _, t in Engine.facts_tables(root, old)]
                facts.append(new.keys_from(n_old))
                section = {"index": eng.entries, "facts": [_write_all_facts(root, tag, facts)]}
    if eng is None or section is None:
        eng, section = _build(root, tag, new)
    section["keys"] = n
    section["sigma"] = "own"  # its own sigma files, which are the store's (store_layout)
    return eng, section


def _append_fits(old: dict, n: int) -> bool:
    """Whether an insert appends (else the engine is rebuilt, refitting the projection):
    the previous section is well formed and its appended parts stay small."""
    try:
        parts = old["index"]["parts"]
        appended = sum(int(p["stop"]) - int(p["start"]) for p in parts[1:])
        appended += n - int(old["keys"])
        return (
            0 < n - int(old["keys"])
            and len(parts) <= MAX_APPENDS
            and (appended <= REBUILD_FRACTION * n)
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def _delta_vectors(root: Path, tag: str, vectors: np.ndarray) -> MappedArray:
    rel = f"index/vectors-input-{tag}.npy"
    v = np.asarray(vectors, dtype=np.float32)
    ent = dict(write_vectors(root / rel, [v], len(v), v.shape[1]), path=rel)
    return open_vectors(root / rel, ent)


def _build_from(root: Path, tag: str, vectors: VectorParts) -> ReducedIndex:
    """fit, index, lists, sigma and lifted graph of these (mapped) vectors, saved; the
    full vectors are read in passes (IVF-ordered copy `index/vectors-<tag>.npy`)."""
    eng = ReducedIndex.build(vectors, lift=False, root=root, tag=tag)
    if eng.n > SEARCH_FETCH:  # fewer keys are all candidates of every search anyway
        eng.lift = eng.build_lift()
    eng.save(root, tag)
    return eng


def _build(root: Path, tag: str, new: Any) -> tuple[ReducedIndex, dict]:
    """Every engine file from the new version's keys, the vectors streamed in chunks
    into a row-order input file (never one float32 array of all keys: 18 GB at a
    million 4,480-wide keys) that the build reads in passes; the facts file of every row."""
    n, dim = int(new.n_keys), int(new.dim)
    rel = f"index/vectors-input-{tag}.npy"
    ent = dict(write_vectors(root / rel, new.vector_chunks(), n, dim), path=rel)
    m = open_vectors(root / rel, ent)
    eng = _build_from(root, tag, VectorParts([m.array], [m]))
    fe = dict(write_facts(root / f"index/facts-{tag}.arrow", new.facts_table()), start=0)
    return eng, {"index": eng.entries, "facts": [dict(fe, path=f"index/facts-{tag}.arrow")]}


def _write_all_facts(root: Path, tag: str, tables: list[pa.Table]) -> dict:
    rel = f"index/facts-{tag}.arrow"
    cols = list(FACT_COLUMNS) + [c for c in tables[0].column_names if c not in FACT_COLUMNS]
    parts = [t.drop([c for c in t.column_names if c == "vector"]) for t in tables]
    parts = [t.select([c for c in cols if c in t.column_names]) for t in parts]
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in parts])
    return dict(write_facts(root / rel, table), path=rel, start=0)


def _append(
    root: Path, tag: str, old: dict, eng: ReducedIndex, new: Any
) -> tuple[ReducedIndex, dict]:
    """The previous engine (opened with its lists) plus the new rows: a delta vector
    file, a flat part, list patches (ReducedIndex.append_files) and a facts file of the
    new rows. Reads only the new rows of `new`."""
    n_old = eng.n
    index = eng.append_files(root, tag, new.vectors_from(n_old))
    rel = f"index/facts-delta-{tag}.arrow"
    fe = dict(write_facts(root / rel, new.keys_from(n_old)), path=rel, start=n_old)
    return eng, {"index": index, "facts": [*copy.deepcopy(old["facts"]), fe]}


def store_layout(root: Path, section: dict) -> dict:
    """The store's `files` / `deltas` for sigma and the neighbour lists, from the engine
    section: the same files (one copy at a million keys, not two), listed with the
    fields `DerivedIndex` reads (`rows`, `entries`, `keys`)."""
    e = section["index"]
    rows = int(e["sigma"]["rows"])
    deltas = e.get("deltas") or {}
    sig = [
        dict(d, rows=d["rows"] if "rows" in d else _npy_len(root, d))
        for d in deltas.get("sigma") or []
    ]
    knn = [
        dict(d, entries=d["entries"] if "entries" in d else _npy_len(root, d))
        for d in deltas.get("knn") or []
    ]
    files = {
        "sigma": dict(e["sigma"], rows=rows),
        "knn_idx": dict(e["knn_idx"], rows=rows),
        "knn_dist": dict(e["knn_dist"], rows=rows),
    }
    return {"files": files, "deltas": {"sigma": sig, "knn": knn, "hnsw": []}}


def _npy_len(root: Path, entry: dict) -> int:
    """Rows of a patch file an older engine section lists without a count (`DerivedIndex`
    verifies the file itself before it uses it; an unreadable one counts 0, which fails
    that check)."""
    try:
        return int(np.load(root / entry["path"], mmap_mode="r", allow_pickle=False).shape[0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 0


# -- doctor -------------------------------------------------------------------------------


def verify_engine(root: Path, manifest: dict) -> list[str]:
    """What `doctor` reports about the engine files: every file rehashed in full and
    replayed ([] when all is well). A file whose mtime changed but whose bytes are the
    recorded ones gets its recorded mtime back, so that the next `ask` opens it cheaply."""
    section = engine_section(manifest)
    d = manifest.get("derived") or {}
    if section is None:
        if d.get("engine") is not None:
            return ["the engine section is out of date"]
        return []
    try:
        Engine(root, manifest["derived"], full_check=True, lists=True)
    except MappedError as e:
        return [f"engine: {e}"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return [f"engine: malformed entries ({type(e).__name__} {e})"]
    for entry in engine_files(manifest):
        p = root / entry["path"]
        try:
            st = os.lstat(p)
            want = int(entry["mtime_ns"])
            if st.st_mtime_ns != want:
                os.utime(p, ns=(st.st_atime_ns, want), follow_symlinks=False)
        except (OSError, ValueError, TypeError, NotImplementedError):
            continue
    return []
