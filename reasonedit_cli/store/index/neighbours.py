"""Neighbour lists of the derived index, kept up to date as keys come and go.

Each key's SIGMA_K nearest other keys and their distances: sigma (retrieval.py) is the
median of a key's list, and tau rules read the lists. Building them from scratch is
retrieval.knn_lists (exact); this module keeps them current without rebuilding: exact
updates for appends and removals (O(n_old * n_new), O(changed rows)), and above
KNN_EXACT_MAX_KEYS approximate lists from the hnsw graph parts. `Lists` is what the
derived index holds in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ... import retrieval as R
from .graphs import build_hnsw

KNN_EXACT_MAX_KEYS = 20_000  # above this, neighbour lists come from the hnsw graph
KNN_EF = 96  # hnsw ef for neighbour-list queries (self-recall@30 measured in benchmarks)
REVERSE_FETCH = 100  # neighbours queried per new key to find the existing keys it displaces


def merge_lists(
    idx_a: np.ndarray, dist_a: np.ndarray, idx_b: np.ndarray, dist_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    idx = np.concatenate([idx_a, idx_b], axis=1)
    dist = np.concatenate([dist_a, dist_b], axis=1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(dist, order, axis=1)


def update_knn_lists(
    old_vectors: np.ndarray,
    old_idx: np.ndarray,
    old_dist: np.ndarray,
    new_vectors: np.ndarray,
    k: int = R.SIGMA_K,
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour lists after appending new_vectors (rows n_old..) to old_vectors.

    Exact, like `knn_lists` on the concatenation, at O(n_old * n_new) instead of
    O(n^2): new keys get their neighbours among all keys; an existing key's list changes
    only when a new key is closer than its current k-th neighbour, which the merge with
    its distances to the new keys decides.
    """
    old = R.as_2d_f32(old_vectors).reshape(-1, np.asarray(new_vectors).shape[-1])
    new = R.as_2d_f32(new_vectors)
    n_old, n_new = len(old), len(new)
    if n_new == 0:
        return old_idx.copy(), old_dist.copy()
    if n_old == 0:
        return R.knn_lists(new, k)
    allv = np.concatenate([old, new])
    # new keys: their neighbours among all keys, excluding themselves by position
    kk = min(k, len(allv) - 1)
    new_idx = np.full((n_new, k), -1, dtype=np.int64)
    new_dist = np.full((n_new, k), np.inf, dtype=np.float64)
    step = R.row_chunk(len(allv))
    for start in range(0, n_new, step):
        stop = min(n_new, start + step)
        sq = R.pairwise_sq_l2(new[start:stop], allv)
        sq[np.arange(stop - start), n_old + np.arange(start, stop)] = np.inf
        new_idx[start:stop, :kk], new_dist[start:stop, :kk] = R.topk_sorted(sq, kk)
    # existing keys: merge their lists with distances to the new keys
    upd_idx = np.empty((n_old, k), dtype=np.int64)
    upd_dist = np.empty((n_old, k), dtype=np.float64)
    kb = min(k, n_new)
    step = R.row_chunk(n_new)
    for start in range(0, n_old, step):
        stop = min(n_old, start + step)
        part, pd = R.topk_sorted(R.pairwise_sq_l2(old[start:stop], new), kb)
        ui, ud = merge_lists(old_idx[start:stop], old_dist[start:stop], part + n_old, pd, k)
        upd_idx[start:stop], upd_dist[start:stop] = ui, ud
    return np.concatenate([upd_idx, new_idx]), np.concatenate([upd_dist, new_dist])


def remove_from_knn_lists(
    vectors_kept: np.ndarray,
    old_idx: np.ndarray,
    old_dist: np.ndarray,
    keep: np.ndarray,
    k: int = R.SIGMA_K,
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour lists after deleting the rows where `keep` is False.

    `vectors_kept` are the surviving rows in order. Lists that never mentioned a removed
    key stay valid (only renumbered); the others, and every list while the codebook has
    at most k keys, are recomputed exactly against the survivors.
    """
    keep = np.asarray(keep, dtype=bool)
    v = R.as_2d_f32(vectors_kept)
    n = len(v)
    if n <= k + 1:
        return R.knn_lists(v, k)
    remap = np.full(len(keep) + 1, -1, dtype=np.int64)  # extra slot maps padding (-1)
    remap[:-1][keep] = np.arange(n)
    idx = remap[old_idx[keep]]
    dist = old_dist[keep].copy()
    dirty = np.flatnonzero((idx < 0).any(axis=1))
    if len(dirty):
        step = R.row_chunk(n)
        for start in range(0, len(dirty), step):
            rows = dirty[start : start + step]
            sq = R.pairwise_sq_l2(v[rows], v)
            sq[np.arange(len(rows)), rows] = np.inf
            idx[rows], dist[rows] = R.topk_sorted(sq, k)
    return idx, dist


# -- approximate neighbour lists from an hnswlib index (large codebooks) ---------------
#
# Exact lists cost O(n^2) to build and O(n_old * n_new) per insert, impossible at a
# million keys. Above KNN_EXACT_MAX_KEYS the codebook asks its hnsw index instead: each
# key's list is its k+1 graph neighbours minus itself, and an insert queries only the new
# keys. An existing key's list changes only when a new key comes closer than its current
# k-th neighbour; such existing keys are found as the REVERSE_FETCH graph neighbours of
# the new keys (a key that a new key displaces is almost always among the new key's own
# nearest keys). Both steps can miss a true neighbour (ANN recall < 1), which makes the
# k-th distance, and so sigma (a median of 30), slightly too large; benchmarks/README.md
# reports the measured sigma error against exact search.


def _knn_query(index: Any, queries: np.ndarray, kq: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
    """kq nearest labels and L2 distances from one hnswlib index or a list of them.

    A codebook's graph can be split in parts (a base graph and small graphs of recently
    added keys, see graphs.py): each part is asked for its own kq nearest, and the
    union is cut back to the kq nearest overall, padded with -1 / inf when all parts
    together hold fewer than kq keys.
    """
    parts = index if isinstance(index, (list, tuple)) else [index]
    labs, dists = [], []
    for ix in parts:
        kk = min(kq, int(ix.get_current_count()))
        if kk <= 0:
            continue
        ix.set_ef(max(ef, kk))
        labels, sq = ix.knn_query(queries, k=kk)
        labs.append(labels.astype(np.int64))
        dists.append(np.sqrt(sq.astype(np.float64)))
    m = len(queries)
    if len(labs) == 1 and labs[0].shape[1] == kq:
        return labs[0], dists[0]
    lab = np.concatenate(labs + [np.full((m, kq), -1, dtype=np.int64)], axis=1)
    dist = np.concatenate(dists + [np.full((m, kq), np.inf)], axis=1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :kq]
    return np.take_along_axis(lab, order, axis=1), np.take_along_axis(dist, order, axis=1)


def _drop_self(
    labels: np.ndarray, dist: np.ndarray, self_rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row the first k results that are not the query key itself (by label)."""
    other = labels != self_rows[:, None]
    order = np.argsort(~other, axis=1, kind="stable")[:, :k]  # non-self first, in order
    return np.take_along_axis(labels, order, axis=1), np.take_along_axis(dist, order, axis=1)


def knn_lists_ann(
    index: Any, vectors: np.ndarray, k: int = R.SIGMA_K, *, ef: int = KNN_EF, batch: int = 20_000
) -> tuple[np.ndarray, np.ndarray]:
    """Like `knn_lists`, from an hnswlib index (or a list of parts) holding `vectors` with
    labels 0..n-1.

    Approximate (see above); distances are hnswlib's own (explicit differences, float32
    accumulation), float64 on return. Needs n > k.
    """
    v = R.as_2d_f32(vectors)
    n = len(v)
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float64)
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        lab, d = _knn_query(index, v[start:stop], k + 1, ef)
        idx[start:stop], dist[start:stop] = _drop_self(lab, d, np.arange(start, stop), k)
    return idx, dist


@dataclass
class KnnAppend:
    """How neighbour lists change when keys are appended: the appended keys' own lists
    and the new lists of the existing rows that changed (ascending)."""

    new_idx: np.ndarray  # (n_new, k)
    new_dist: np.ndarray
    rows: np.ndarray  # existing rows whose list changed
    rows_idx: np.ndarray  # (len(rows), k)
    rows_dist: np.ndarray

    def apply(self, old_idx: np.ndarray, old_dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The full lists after the append (copies; old arrays untouched)."""
        idx = np.concatenate([old_idx, self.new_idx])
        dist = np.concatenate([old_dist, self.new_dist])
        idx[self.rows], dist[self.rows] = self.rows_idx, self.rows_dist
        return idx, dist


def append_knn_ann(
    index: Any,
    new_vectors: np.ndarray,
    old_idx: np.ndarray,
    old_dist: np.ndarray,
    k: int = R.SIGMA_K,
    *,
    ef: int = KNN_EF,
    reverse_fetch: int = REVERSE_FETCH,
) -> KnnAppend:
    """What appending `new_vectors` (rows n_old.., already in `index`) does to the lists.

    Costs O(n_new) queries plus the changed rows: nothing here touches all n_old rows,
    so a codebook of a million keys pays for the batch only. Approximate: see the note
    above `knn_lists_ann`. `index` may be a list of hnswlib parts.
    """
    n_old = len(old_idx)
    new = R.as_2d_f32(new_vectors)
    n_new = len(new)
    n = n_old + n_new
    empty = np.zeros(0, dtype=np.int64)
    if n_new == 0:
        return KnnAppend(
            np.zeros((0, k), np.int64), np.zeros((0, k)), empty, np.zeros((0, k), np.int64),
            np.zeros((0, k)),
        )  # fmt: skip
    kq = min(n, max(k + 1, reverse_fetch + 1))
    lab, d = _knn_query(index, new, kq, ef)
    new_rows = np.arange(n_old, n)
    new_idx, new_dist = _drop_self(lab, d, new_rows, k)
    # reverse neighbours: existing keys i found near a new key j, where j beats i's k-th
    src = np.repeat(new_rows, kq)
    tgt = lab.reshape(-1)
    dd = d.reshape(-1)
    ok = (tgt >= 0) & (tgt < n_old)
    src, tgt, dd = src[ok], tgt[ok], dd[ok]
    ok = dd < old_dist[tgt, k - 1]
    src, tgt, dd = src[ok], tgt[ok], dd[ok]
    if not len(tgt):
        return KnnAppend(new_idx, new_dist, empty, np.zeros((0, k), np.int64), np.zeros((0, k)))
    order = np.lexsort((dd, tgt))  # by target row, then distance
    src, tgt, dd = src[order], tgt[order], dd[order]
    rows, first, counts = np.unique(tgt, return_index=True, return_counts=True)
    rank = np.arange(len(tgt)) - np.repeat(first, counts)
    keep = rank < k
    slot = np.searchsorted(rows, tgt[keep])
    add_idx = np.full((len(rows), k), -1, dtype=np.int64)
    add_dist = np.full((len(rows), k), np.inf, dtype=np.float64)
    add_idx[slot, rank[keep]] = src[keep]
    add_dist[slot, rank[keep]] = dd[keep]
    ri, rd = merge_lists(old_idx[rows], old_dist[rows], add_idx, add_dist, k)
    return KnnAppend(new_idx, new_dist, rows, ri, rd)


@dataclass
class Lists:
    """sigma and (for writers and tau) the neighbour lists, and the files they came from."""

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
    def from_lists(cls, idx: np.ndarray, dist: np.ndarray, **files: Any) -> Lists:
        return cls(R.sigma_raw_from_knn(dist), idx, dist, **files)

    @classmethod
    def compute(cls, vectors: np.ndarray, index: Any = None) -> Lists:
        """From scratch: exact lists up to KNN_EXACT_MAX_KEYS keys, else from the index
        (an hnswlib index or a list of graph parts)."""
        if len(vectors) > KNN_EXACT_MAX_KEYS:
            if index is None:
                index = build_hnsw(vectors)
            if isinstance(index, list):
                index = [g.index for g in index]
            idx, dist = knn_lists_ann(index, vectors, R.SIGMA_K)
        else:
            idx, dist = R.knn_lists(vectors, R.SIGMA_K)
        return cls.from_lists(idx, dist)

    @property
    def idx(self) -> np.ndarray:
        """The neighbour indices (loaded with need_knn=True)."""
        assert self.knn_idx is not None, "neighbour lists not loaded"
        return self.knn_idx

    @property
    def dist(self) -> np.ndarray:
        """The neighbour distances (loaded with need_knn=True)."""
        assert self.knn_dist is not None, "neighbour lists not loaded"
        return self.knn_dist
