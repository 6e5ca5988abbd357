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
from .index.mapped import MappedError, VectorParts
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
        self.facts: list[tuple[int, pa.Table]] = []
        start = 0
        for fe in section["facts"]:
            if int(fe["start"]) != start:
                raise MappedError("facts files do not follow each other")
            table = open_facts(root / fe["path"], fe, full_check=full_check)
            missing = [c for c in FACT_COLUMNS if c not in table.column_names]
            if missing:
                raise MappedError(f"{fe['path']} lacks {', '.join(missing)}")
            self.facts.append((start, table))
            start += table.num_rows
        if start != self.index.n:
            raise MappedError("facts files do not cover every key")

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
    derived: dict,
    sigma_raw: np.ndarray,
    *,
    min_keys: int = ENGINE_MIN_KEYS,
) -> dict | None:
    """The engine section of a commit (None: no engine files), its files written.

    `new` is the new version's Codebook view (keys table, vectors), `derived` the new
    manifest's derived section (the store's sigma files), `sigma_raw` the store's sigma
    before the floor. kind "append" appends when the previous version has an engine of
    its first rows; "same" keeps the previous section; everything else rebuilds.
    """
    n = int(new.n_keys)
    if n < min_keys or new.tau_rule == "reference" or not new.dim:
        return None
    if not isinstance((derived.get("files") or {}).get("sigma"), dict):
        return None  # the store persisted no sigma to search by
    tag = f"{version:06d}"
    old = engine_section(old_manifest)
    section: dict | None = None
    if kind == "same" and old is not None and int(old["keys"]) == n:
        section = copy.deepcopy(old)
    else:
        if kind == "append" and old is not None and _append_fits(old, n):
            try:
                section = _append(root, tag, old, new)
            except (MappedError, KeyError, TypeError, ValueError, IndexError):
                section = None  # the previous engine is damaged: rebuild it from the keys
        if section is None:
            section = _build(root, tag, new, sigma_raw)
    section["keys"] = n
    section["sigma"] = "store"  # search divides by the derived section's sigma files
    return section


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


def _build(root: Path, tag: str, new: Any, sigma_raw: np.ndarray) -> dict:
    """Every engine file from the new version's keys: fit, index, lifted graph over the
    store's sigma; the facts file of every row."""
    vectors = np.ascontiguousarray(new.vectors(), dtype=np.float32)
    eng = ReducedIndex.build(VectorParts([vectors]), lift=False)
    eng.set_sigma(sigma_raw)  # the store's: the lifted graph holds its largest sigmas
    if eng.n > SEARCH_FETCH:  # fewer keys are all candidates of every search anyway
        eng.lift = eng.build_lift()  # (and a lift of 3 keys failed to reopen: lift rows)
    index = eng.save(root, tag)
    rel = f"index/facts-{tag}.arrow"
    fe = dict(write_facts(root / rel, new.keys_table()), path=rel, start=0)
    return {"index": index, "facts": [fe]}


def _append(root: Path, tag: str, old: dict, new: Any) -> dict:
    """The previous engine plus the new rows: a delta vector file, a flat part, list
    patches (ReducedIndex.append_files) and a facts file of the new rows."""
    n_old = int(old["keys"])
    eng = ReducedIndex.open(root, copy.deepcopy(old["index"]), lists=True)
    index = eng.append_files(root, tag, new.vectors_from(n_old))
    rel = f"index/facts-delta-{tag}.arrow"
    table = new.keys_table().slice(n_old)
    fe = dict(write_facts(root / rel, table), path=rel, start=n_old)
    return {"index": index, "facts": [*copy.deepcopy(old["facts"]), fe]}


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
