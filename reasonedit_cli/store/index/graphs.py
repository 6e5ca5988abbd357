"""hnswlib graphs of the derived index: build, verified load, save, and multi-part search.

The graph is a base part for rows 0..n_base-1 plus one small part per recent commit
(deltas.py); a search asks every part and merges (`search_candidates`). A damaged or
crafted hnswlib file can crash the loader instead of raising, so `load_hnsw_file` loads
only a private copy of bytes whose checksum matched the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from .. import files as fs
from ..files import hash_file, mkdirs, note, open_regular, rename, tmp_name, unlink

HNSW_SPACE = "l2"
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_SEED = 100


@dataclass
class Graph:
    """One part of the hnsw index: an hnswlib index whose labels are rows start..stop-1."""

    index: Any
    start: int
    stop: int
    entry: dict | None = None  # the manifest entry it was loaded from; None = not on disk

    @property
    def size(self) -> int:
        return self.stop - self.start


def search_candidates(
    graphs: list[Graph], q: np.ndarray, fetch: int, ef: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw-distance candidates from every graph part, and a bound per query.

    Each part returns its `fetch` nearest (all of its keys if it has fewer). A key that
    no part returned is at least as far as the last candidate of its own part, so the
    smallest such last distance over the parts that held more than `fetch` keys bounds
    every key outside the candidates (None: every key is a candidate). With one part this
    is exactly the single-graph search.
    """
    labels, bound = [], None
    for g in graphs:
        f = min(g.size, fetch)
        if f <= 0:
            continue
        g.index.set_ef(max(ef, f))
        lab, sq = g.index.knn_query(q, k=f)
        labels.append(lab.astype(np.int64))
        if f < g.size:
            b = np.sqrt(sq[:, -1].astype(np.float64))
            bound = b if bound is None else np.minimum(bound, b)
    cand = labels[0] if len(labels) == 1 else np.concatenate(labels, axis=1)
    return cand, bound


def graphs_cover(graphs: list[Graph], n: int) -> bool:
    """Whether the parts hold rows 0..n-1 in order, each exactly once."""
    at = 0
    for g in graphs:
        if g.start != at or g.stop < g.start:
            return False
        at = g.stop
    return at == n


def build_hnsw(vectors: np.ndarray, start: int = 0, M: int = HNSW_M) -> Any:
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


def load_hnsw_file(
    root: Path, entry: dict, dim: int, count: int, first_label: int | None = None
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
        src_fd = open_regular(root / entry["path"], root)
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


def save_graph(root: Path, index: Any, rel: str, lock: threading.Lock) -> dict:
    """save_index to a temp name, hash and fsync it in place, rename: a manifest entry."""
    tmp = tmp_name(root / rel)
    try:
        mkdirs(tmp.parent)
        with lock:
            index.save_index(str(tmp))
        note("write", tmp)
        # hash and fsync the saved file in place (GBs at a million keys: no copy)
        with open(tmp, "rb+") as f:
            sha, size = hash_file(f)
            os.fsync(f.fileno())
            note("fsync", tmp)
        rename(tmp, root / rel)
        fs.fsync_dir(root / "index")
    finally:
        if tmp.exists():
            with contextlib.suppress(OSError):
                unlink(tmp)
    return {
        "path": rel,
        "sha256": sha,
        "bytes": size,
        "space": HNSW_SPACE,
        "M": int(index.M),
        "ef_construction": int(index.ef_construction),
    }


def fold_graphs(graphs: list[Graph], n: int, lock: threading.Lock) -> Any:
    """One hnswlib index holding every part: the small parts' keys added to the base
    (which grows in place: the parts it came from are no longer a snapshot's graph)."""
    base = graphs[0].index
    if len(graphs) == 1:
        return base
    with lock:
        base.resize_index(n)
        for g in graphs[1:]:
            rows = np.arange(g.start, g.stop)
            base.add_items(g.index.get_items(rows), rows)
    return base
