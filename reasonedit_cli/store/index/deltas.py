"""Deltas of the derived index: the log-structured layout of sigma, lists and graphs.

Why: at a million keys the derived data is about 3 GB (hnsw graph ~2.3 GB, neighbour
lists ~480 MB, sigma 8 MB). Rewriting it on every commit made an insert cost O(codebook)
however small the batch. Each of the three parts is therefore a *base*, written when the
codebook is built or compacted, plus *deltas* that each insert appends:

- sigma: base (n_base,) float64 + per commit a patch of (row, new sigma) for the rows
  whose neighbour lists changed and the appended rows;
- neighbour lists: base (n_base, 30) + per commit a patch of (row, neighbour, distance)
  entries that are merged into each row's list (the appended rows start empty);
- hnsw: a base graph for rows 0..n_base-1 plus one small graph per commit holding just
  that commit's keys; a search queries every part and merges (graphs.py).

Readers replay the deltas on open. Compaction (`should_compact_*`, or explicitly, or
`doctor --repair`) writes new bases and drops the deltas, keeping what readers load and
what a search visits bounded. Everything here is pure (arrays in, arrays out); the
derived index does the file I/O and checksums (derived.py, update.py), the writer the commit.

Replay is exact: a patch holds the entries of each changed list that point at the new
keys, in list order, and merging them into the old list with the same stable sort that
produced the list gives it back bit for bit (`knn_patch` checks this on every write).
"""

from __future__ import annotations

import io

import numpy as np

from ... import retrieval as R
from .neighbours import KnnAppend, merge_lists

#: sigma patch: the new (pre-floor) sigma of some rows; rows ascending.
SIGMA_PATCH_DTYPE = np.dtype([("row", "<i8"), ("sigma", "<f8")])
#: neighbour-list patch: entries merged into a row's list; rows ascending, entries of one
#: row in list order.
KNN_PATCH_DTYPE = np.dtype([("row", "<i8"), ("idx", "<i8"), ("dist", "<f8")])

# Compaction thresholds (measured trade-offs in benchmarks/README.md).
SIGMA_DELTA_MAX = 1.0  # sigma patch bytes (16/row) allowed per byte of base (8/row)
KNN_DELTA_MAX = 0.5  # list patch bytes (24/entry) allowed per byte of base (480/row)
GRAPH_DELTA_MAX = 0.1  # keys in the small graphs per key of the base graph
GRAPH_MAX_PARTS = 4  # small graphs at most: each adds a knn_query (~0.16 ms at 1M) per search


def npy_bytes(arr: np.ndarray) -> bytes:
    """`.npy` bytes of a plain (never object) array."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# sigma


def sigma_patch(sigma_raw: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The patch that sets `rows` (ascending) to their values in `sigma_raw`."""
    out = np.empty(len(rows), dtype=SIGMA_PATCH_DTYPE)
    out["row"] = rows
    out["sigma"] = sigma_raw[rows]
    return out


def apply_sigma_patch(sigma_raw: np.ndarray, patch: np.ndarray, keys: int) -> np.ndarray:
    """sigma after one commit: extended to `keys` rows and patched (a new array).

    Raises ValueError when the patch cannot be one the writer made (rows out of order or
    range, an appended row left unset, a value that is not a finite sigma): the caller
    then treats the derived files as damaged and recomputes.
    """
    n_old = len(sigma_raw)
    rows, vals = patch["row"], patch["sigma"]
    if keys < n_old or (len(rows) and (rows[0] < 0 or rows[-1] >= keys)):
        raise ValueError("sigma patch rows out of range")
    if len(rows) > 1 and not (np.diff(rows) > 0).all():
        raise ValueError("sigma patch rows not ascending")
    if not (np.isfinite(vals).all() and (vals >= 0).all()):
        raise ValueError("sigma patch values")
    if int((rows >= n_old).sum()) != keys - n_old:
        raise ValueError("sigma patch leaves appended rows unset")
    out = np.empty(keys, dtype=np.float64)
    out[:n_old] = sigma_raw
    out[rows] = vals
    return out


# ---------------------------------------------------------------------------
# neighbour lists


def knn_append_from_full(
    old_idx: np.ndarray, old_dist: np.ndarray, idx: np.ndarray, dist: np.ndarray
) -> KnnAppend:
    """Describe full new lists (e.g. from the exact update) as an append: which rows changed."""
    n_old = len(old_idx)
    changed = (idx[:n_old] != old_idx).any(axis=1) | (dist[:n_old] != old_dist).any(axis=1)
    rows = np.flatnonzero(changed)
    return KnnAppend(idx[n_old:], dist[n_old:], rows, idx[rows], dist[rows])


def knn_patch(
    app: KnnAppend, n_old: int, old_rows_idx: np.ndarray, old_rows_dist: np.ndarray
) -> np.ndarray | None:
    """The patch that replays `app` on the old lists of n_old keys, or None if replay
    would differ. `old_rows_idx` / `old_rows_dist`: the old lists of `app.rows` (all the
    patch reads of the old lists, so a writer may update the lists in place first).

    A changed existing row stores the entries of its new list that point at appended
    keys; an appended row stores its whole list. The None case never happened in tests;
    it is there so that a file never claims a state it does not reproduce (the caller
    then writes a new base instead).
    """
    k = app.new_idx.shape[1]
    n_new = len(app.new_idx)
    rows = np.concatenate([app.rows, np.arange(n_old, n_old + n_new)])
    li = np.concatenate([app.rows_idx, app.new_idx])
    ld = np.concatenate([app.rows_dist, app.new_dist])
    take = np.concatenate(
        [app.rows_idx >= n_old, app.new_idx >= 0]
    )  # old rows gained new keys; new rows hold any real neighbour
    out = np.empty(int(take.sum()), dtype=KNN_PATCH_DTYPE)
    out["row"] = np.repeat(rows, take.sum(axis=1))
    out["idx"] = li[take]
    out["dist"] = ld[take]
    base_idx = np.full((len(rows), k), -1, dtype=np.int64)
    base_dist = np.full((len(rows), k), np.inf)
    base_idx[: len(app.rows)] = old_rows_idx
    base_dist[: len(app.rows)] = old_rows_dist
    try:
        ri, rd = _merge_patch(base_idx, base_dist, rows, out, k)
    except ValueError:
        return None
    if not (np.array_equal(ri, li) and np.array_equal(rd, ld)):
        return None
    return out


def _merge_patch(
    idx: np.ndarray, dist: np.ndarray, rows: np.ndarray, patch: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge patch entries into the lists of `rows` (idx/dist hold those rows' lists)."""
    if len(patch) == 0:
        return idx, dist
    prow = patch["row"]
    if len(prow) > 1 and (np.diff(prow) < 0).any():
        raise ValueError("knn patch rows not ascending")
    urows, first, counts = np.unique(prow, return_index=True, return_counts=True)
    if counts.max() > k:
        raise ValueError("knn patch gives a row more than k entries")
    slot = np.searchsorted(rows, urows)
    if (slot >= len(rows)).any() or (rows[np.minimum(slot, len(rows) - 1)] != urows).any():
        raise ValueError("knn patch row not covered")
    rank = np.arange(len(prow)) - np.repeat(first, counts)
    add_idx = np.full((len(urows), k), -1, dtype=np.int64)
    add_dist = np.full((len(urows), k), np.inf)
    grp = np.repeat(np.arange(len(urows)), counts)
    add_idx[grp, rank] = patch["idx"]
    add_dist[grp, rank] = patch["dist"]
    idx, dist = idx.copy(), dist.copy()
    idx[slot], dist[slot] = merge_lists(idx[slot], dist[slot], add_idx, add_dist, k)
    return idx, dist


def apply_knn_patch(
    idx: np.ndarray, dist: np.ndarray, n_old: int, patch: np.ndarray, keys: int
) -> None:
    """Replay one commit's patch in place on lists that currently cover n_old rows.

    idx/dist have at least `keys` rows; rows n_old..keys-1 (the commit's appended keys)
    are still empty (-1 / inf). Raises ValueError for a patch the writer cannot have made
    (see `apply_sigma_patch`).
    """
    k = idx.shape[1]
    prow, pidx, pdist = patch["row"], patch["idx"], patch["dist"]
    if not n_old <= keys <= len(idx) or (len(prow) and (prow.min() < 0 or prow.max() >= keys)):
        raise ValueError("knn patch rows out of range")
    if len(pidx) and (pidx.min() < 0 or pidx.max() >= keys or (pidx == prow).any()):
        raise ValueError("knn patch neighbours out of range")
    if not (np.isfinite(pdist).all() and (pdist >= 0).all()):
        raise ValueError("knn patch distances")
    rows = np.unique(prow)
    idx[rows], dist[rows] = _merge_patch(idx[rows], dist[rows], rows, patch, k)


# ---------------------------------------------------------------------------
# compaction policy


def should_compact_sigma(base_rows: int, patch_rows: int) -> bool:
    """Fold sigma patches into a new base once they outweigh SIGMA_DELTA_MAX x the base."""
    return 16 * patch_rows > SIGMA_DELTA_MAX * 8 * max(base_rows, 1)


def should_compact_knn(base_rows: int, patch_entries: int) -> bool:
    """Fold list patches into new base lists once they outweigh KNN_DELTA_MAX x the base."""
    return 24 * patch_entries > KNN_DELTA_MAX * 16 * R.SIGMA_K * max(base_rows, 1)


def should_fold_graphs(base_rows: int, part_rows: list[int]) -> bool:
    """Fold the small graphs into the base when they hold too many keys or are too many."""
    return len(part_rows) > GRAPH_MAX_PARTS or sum(part_rows) > GRAPH_DELTA_MAX * base_rows
