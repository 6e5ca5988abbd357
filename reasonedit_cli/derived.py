"""The codebook's derived index, kept append-friendly (a log-structured layout).

Why: at a million keys the derived data is about 3 GB (hnsw graph ~2.3 GB, neighbour
lists ~480 MB, sigma 8 MB). Rewriting it on every commit made an insert cost O(codebook)
however small the batch. Each of the three parts is therefore a *base*, written when the
codebook is built or compacted, plus *deltas* that each insert appends:

- sigma: base (n_base,) float64 + per commit a patch of (row, new sigma) for the rows
  whose neighbour lists changed and the appended rows;
- neighbour lists: base (n_base, 30) + per commit a patch of (row, neighbour, distance)
  entries that are merged into each row's list (the appended rows start empty);
- hnsw: a base graph for rows 0..n_base-1 plus one small graph per commit holding just
  that commit's keys; a search queries every part and merges (`search_candidates`).

Readers replay the deltas on open. Compaction (`should_compact_*`, or explicitly, or
`doctor --repair`) writes new bases and drops the deltas, keeping what readers load and
what a search visits bounded. Everything here is pure (arrays in, arrays out); the
codebook does the file I/O, checksums and the commit (codebook.py).

Replay is exact: a patch holds the entries of each changed list that point at the new
keys, in list order, and merging them into the old list with the same stable sort that
produced the list gives it back bit for bit (`knn_patch` checks this on every write).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import retrieval as R

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

# The lifted graph of large-sigma keys (see `lift_keys`; figures in benchmarks/README.md).
LIFT_FRACTION = 0.05  # share of keys, the largest sigmas, that the lifted graph holds
LIFT_FETCH = 10  # candidates it returns per query (re-ranked exactly with the others)
LIFT_EF = 64  # its hnsw ef
LIFT_M = 48  # its hnsw M (a lifted graph navigates worse than a raw one: more links)
LIFT_B_WEIGHT = 3.0  # weight of the direction block against the two scalar blocks
LIFT_PARAMS = 6  # params: scale a, b, c, radius, mean a, mean c; then mu (dim), mean b (dim)


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
) -> R.KnnAppend:
    """Describe full new lists (e.g. from the exact update) as an append: which rows changed."""
    n_old = len(old_idx)
    changed = (idx[:n_old] != old_idx).any(axis=1) | (dist[:n_old] != old_dist).any(axis=1)
    rows = np.flatnonzero(changed)
    return R.KnnAppend(idx[n_old:], dist[n_old:], rows, idx[rows], dist[rows])


def knn_patch(app: R.KnnAppend, old_idx: np.ndarray, old_dist: np.ndarray) -> np.ndarray | None:
    """The patch that replays `app` on the old lists, or None if replay would differ.

    A changed existing row stores the entries of its new list that point at appended
    keys; an appended row stores its whole list. The None case never happened in tests;
    it is there so that a file never claims a state it does not reproduce (the caller
    then writes a new base instead).
    """
    n_old, k = len(old_idx), app.new_idx.shape[1]
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
    base_idx[: len(app.rows)] = old_idx[app.rows]
    base_dist[: len(app.rows)] = old_dist[app.rows]
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
    idx[slot], dist[slot] = R._merge_lists(idx[slot], dist[slot], add_idx, add_dist, k)
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
# graphs


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


# ---------------------------------------------------------------------------
# the lifted graph: corrected distance as a plain L2 search, for large-sigma keys
#
# Why: a raw-distance graph finds keys near the query, but the corrected distance
# |q - k| / sigma_k can rank first an isolated key (a large sigma) that is far away in raw
# distance. In high dimensions raw distances to far keys concentrate, so for such a
# query the winners are decided by sigma, deep in the raw order (raw ranks in the
# hundreds of thousands at a million keys), where no over-fetch reaches. The squared
# corrected distance is linear in a lifted key vector:
#
#     |q - k|^2 / s^2 = |u|^2 a - 2 u.b + c,   u = q - mu,  a = 1/s^2,  b = (k - mu)/s^2,
#                                              c = |k - mu|^2 / s^2
#
# i.e. minus the inner product of Y = (-|u|^2, 2u, -1) with X = (a, b, c). Padding every X
# to a common norm R with one more coordinate (sqrt(R^2 - |X|^2)) and normalising Y
# turns that maximum inner product into an L2 nearest-neighbour search (the MIPS-to-NN
# reduction of Bachrach et al., 2014), which hnswlib does well. Each block of X is
# centred (that shifts every key's inner product with Y by the same amount, so the
# ranking is unchanged, and keeps the padding radius small: float32 resolution is
# relative to it) and scaled to a similar spread (the query scaled inversely) to keep
# the graph navigable. The lifted graph holds the LIFT_FRACTION keys
# of largest sigma (measured: over all keys its recall saturates, over the top few per
# cent it is high); the raw graph covers the rest.


@dataclass
class Lift:
    """The lifted graph: hnswlib index whose label j is codebook row rows[j]."""

    index: Any
    rows: np.ndarray  # (m,) int64 ascending
    params: np.ndarray  # (LIFT_PARAMS + 2 * dim,) float64
    entries: dict | None = None  # manifest entries {lift_hnsw, lift_rows, lift_params}


def lift_members(sigma: np.ndarray, fraction: float = LIFT_FRACTION) -> np.ndarray:
    """Rows of the ceil(fraction * n) largest sigmas, ascending (ties: the lower row)."""
    n = len(sigma)
    m = min(n, max(1, int(np.ceil(fraction * n)))) if n else 0
    order = np.argsort(-np.asarray(sigma, dtype=np.float64), kind="stable")[:m]
    return np.sort(order).astype(np.int64)


def _inv_spread(x: np.ndarray) -> float:
    sd = float(np.sqrt(np.sum(np.var(x, axis=0))))
    if sd > 0 and np.isfinite(sd):
        return 1.0 / sd
    mean = float(np.abs(np.mean(x))) if x.size else 0.0
    return 1.0 / mean if mean > 0 and np.isfinite(mean) else 1.0


def _lift_blocks(vectors: np.ndarray, sigma: np.ndarray, mu: np.ndarray):
    v = np.asarray(vectors, dtype=np.float64) - mu
    inv = 1.0 / np.asarray(sigma, dtype=np.float64) ** 2
    return inv, v * inv[:, None], np.einsum("ij,ij->i", v, v) * inv


def _lift_x(blocks, scales, means) -> np.ndarray:
    (a, b, c), (sa, sb, sc), (ma, mb, mc) = blocks, scales, means
    return np.concatenate([((a - ma) * sa)[:, None], (b - mb) * sb, ((c - mc) * sc)[:, None]], 1)


def lift_params(
    vectors: np.ndarray, sigma: np.ndarray, b_weight: float = LIFT_B_WEIGHT
) -> np.ndarray:
    """The lift's scales, radius and centres for these keys and their sigmas.

    Each block is scaled to unit spread, the direction block (b) then by b_weight: the
    two scalar blocks alone would decide a lifted key's graph neighbours (measured at a
    million keys: recall@5 0.96 at b_weight 1, 0.97 at 3, 0.89 at 0.3).
    """
    mu = np.asarray(vectors, dtype=np.float64).mean(axis=0)
    a, b, c = _lift_blocks(vectors, sigma, mu)
    scales = _inv_spread(a), b_weight * _inv_spread(b), _inv_spread(c)
    means = float(a.mean()), b.mean(axis=0), float(c.mean())
    x = _lift_x((a, b, c), scales, means)
    radius = float(np.sqrt(np.einsum("ij,ij->i", x, x).max())) * (1.0 + 1e-6) if len(x) else 1.0
    return np.concatenate([[*scales, radius, means[0], means[2]], mu, means[1]])


def _split_params(params: np.ndarray):
    dim = (len(params) - LIFT_PARAMS) // 2
    sa, sb, sc, radius, ma, mc = params[:LIFT_PARAMS]
    mu, mb = params[LIFT_PARAMS : LIFT_PARAMS + dim], params[LIFT_PARAMS + dim :]
    return (sa, sb, sc), radius, (ma, mb, mc), mu


def lift_keys(
    vectors: np.ndarray, sigma: np.ndarray, params: np.ndarray, dtype: Any = np.float32
) -> np.ndarray:
    """Lifted keys (m, dim + 3): L2 to a lifted query ranks by corrected distance."""
    scales, radius, means, mu = _split_params(params)
    x = _lift_x(_lift_blocks(vectors, sigma, mu), scales, means)
    pad = np.sqrt(np.maximum(radius**2 - np.einsum("ij,ij->i", x, x), 0.0))
    return np.concatenate([x, pad[:, None]], axis=1).astype(dtype)


def lift_queries(queries: np.ndarray, params: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """Lifted query vectors (nq, dim + 3), unit norm (see `lift_keys`)."""
    (sa, sb, sc), _, _, mu = _split_params(params)
    u = np.asarray(queries, dtype=np.float64).reshape(len(queries), -1) - mu
    y = np.concatenate(
        [
            (-np.einsum("ij,ij->i", u, u) / sa)[:, None],
            2.0 * u / sb,
            np.full((len(u), 1), -1.0 / sc),
        ],
        axis=1,
    )
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return np.concatenate([y, np.zeros((len(u), 1))], axis=1).astype(dtype)


def lift_settings() -> dict:
    """What a lifted graph is built with; one built otherwise is rebuilt by compaction."""
    return {"fraction": LIFT_FRACTION, "M": LIFT_M, "b_weight": LIFT_B_WEIGHT}


def valid_lift(rows: np.ndarray, params: np.ndarray, n_keys: int, dim: int) -> bool:
    """Whether stored lift rows and params can be ones a writer made for this codebook."""
    if rows.ndim != 1 or not len(rows) or params.shape != (LIFT_PARAMS + 2 * dim,):
        return False
    if rows[0] < 0 or rows[-1] >= n_keys or (len(rows) > 1 and (np.diff(rows) <= 0).any()):
        return False
    return bool(np.isfinite(params).all() and (params[:4] > 0).all())
