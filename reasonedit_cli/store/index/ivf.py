"""A memory-mappable inverted-file index (IVF-flat) over the reduced vectors (issue 22).

Why not hnswlib for the million-key graph: hnswlib has no memory-mapped load;
`load_index` reads the file element by element (measured: 0.7-0.94 s for 200,000 keys
at 257 dimensions, 234 MB, on this 2-core machine under load; 1M keys would take
3.5-4.5 s) and its build took 409 s for 200,000 keys. The target is open + one search
under 1 s at a million keys. An IVF index is a handful of arrays: k-means centroids, the
keys grouped by their nearest centroid (`offsets` into `labels`), and the reduced
vectors in that grouped order, mapped like the full vectors. Opening maps them; a search
compares the query with the centroids, scans the `nprobe` nearest lists and returns the
nearest keys found (benchmarks/README.md compares both on the same codebooks).

Inserted keys go to a delta part (`FlatPart`: scanned in full) until compaction
re-clusters; a damaged IVF file gives wrong candidates, never a crash: labels are checked
to be a permutation of the part's rows when loaded, and every read is a numpy slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KMEANS_ITERS = 6
KMEANS_SAMPLE_PER_LIST = 32  # k-means is fitted on this many keys per list (seeded sample)
KMEANS_SEED = 0
NPROBE = 12  # lists scanned per query (at least, until `k` keys are found)
_ASSIGN_CHUNK = 16_384
BATCH_QUERIES = 64  # from this many queries on, knn_query works list by list
#: no list holds more than this many times the mean list size (`balance`): k-means lists
#: were very uneven on the benchmark's mixture (1M x 4,480: mean 289 keys, max 17,422;
#: the largest 1% of lists held 85% of the neighbour-list cost, ~ sum of squared sizes)
BALANCE_CAP = 3.0
BALANCE_MIN_CAP = 64  # ... but lists of up to this many keys are never split


def n_lists(n: int) -> int:
    """How many lists an IVF of n keys gets: sqrt(NPROBE * n), which balances the
    centroid scan (C rows) against the list scan (NPROBE * n / C rows); ~290 keys a
    list at a million keys, ~29 at 10,000. At least 1, at most n / 8."""
    return max(1, min(n // 8, int(round(np.sqrt(NPROBE * n)))))


def _sq_to(x: np.ndarray, c: np.ndarray, c_sq: np.ndarray) -> np.ndarray:
    """Squared L2 from rows of x to rows of c (float32 GEMM form, clipped at 0). A few
    rows use einsum: a threaded BLAS GEMV took 18.7 ms instead of 0.46 ms (3,000 x 600,
    one thread) on this loaded 2-core machine."""
    sq = (np.einsum("ij,kj->ik", x, c) if len(x) < 4 else x @ c.T) * -2.0
    sq += np.einsum("ij,ij->i", x, x)[:, None]
    sq += c_sq[None, :]
    return np.maximum(sq, 0.0, out=sq)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of each row of x (chunked)."""
    c_sq = np.einsum("ij,ij->i", centroids, centroids)
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), _ASSIGN_CHUNK):
        out[s : s + _ASSIGN_CHUNK] = np.argmin(_sq_to(x[s : s + _ASSIGN_CHUNK], centroids, c_sq), 1)
    return out


def kmeans(x: np.ndarray, k: int, *, iters: int = KMEANS_ITERS, seed: int = KMEANS_SEED):
    """Lloyd's k-means on x (m, d) float32, seeded; empty clusters are re-seeded."""
    rng = np.random.default_rng(seed)
    m = len(x)
    k = max(1, min(k, m))
    cent = x[np.sort(rng.choice(m, size=k, replace=False))].astype(np.float32)
    for _ in range(iters):
        a = assign(x, cent)
        counts = np.bincount(a, minlength=k)
        sums = np.zeros_like(cent, dtype=np.float64)
        np.add.at(sums, a, x)
        empty = counts == 0
        cent = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        if empty.any():
            cent[empty] = x[rng.choice(m, size=int(empty.sum()), replace=False)]
    return cent


def _split_sorted(x: np.ndarray, pieces: int) -> np.ndarray:
    """Labels 0..pieces-1 cutting x into equal runs along its direction of largest
    spread (its first principal axis, by a few power iterations): the fallback for a
    list k-means cannot split (near-duplicate keys)."""
    c = x - x.mean(0)
    v = c[np.argmax(np.einsum("ij,ij->i", c, c))].astype(np.float64)
    for _ in range(4):
        v = c.T @ (c @ v)
        nv = float(np.linalg.norm(v))
        if nv == 0.0:
            break
        v /= nv
    order = np.argsort(c @ v, kind="stable")
    out = np.empty(len(x), dtype=np.int64)
    out[order] = np.arange(len(x)) * pieces // len(x)
    return out


def balance(
    g: np.ndarray, cent: np.ndarray, a: np.ndarray, *, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids and assignment with no list above `cap` keys.

    Each list above the cap is split by k-means on its own members into
    ceil(size / mean) lists (mean = the target mean list size, n / number of lists),
    recursively; a piece k-means leaves above the cap (near-duplicate keys) is cut into
    equal runs along its first principal axis. A split list's centroid is replaced by
    its pieces' means, so a query probing the nearest centroids finds them as before.
    Deterministic (seeded). The sum of squared list sizes, which the neighbour lists
    cost (each list against its nearest lists, full width), is then at most n * cap.
    """
    n = len(a)
    a = np.asarray(a, dtype=np.int64).copy()
    cents = [np.asarray(cent, dtype=np.float32).copy()]  # the k-means ones, then new pieces
    n_c = len(cent)
    mean = max(1.0, n / max(1, n_c))
    counts = np.bincount(a, minlength=n_c)
    todo = [(int(j), 0) for j in np.flatnonzero(counts > cap)]
    order = np.argsort(a, kind="stable")
    off = np.concatenate([[0], np.cumsum(counts)])
    members = {j: order[off[j] : off[j + 1]] for j, _ in todo}
    while todo:
        j, depth = todo.pop()
        rows = members.pop(j)
        x = np.asarray(g[rows], dtype=np.float32)
        pieces = int(np.ceil(len(rows) / mean))
        if depth < 2:
            sub = kmeans(_sample(x, pieces), pieces, seed=KMEANS_SEED + 1 + depth)
            lab = assign(x, sub)
        else:
            lab = _split_sorted(x, int(np.ceil(len(rows) / cap)))
        used = np.unique(lab)
        if len(used) <= 1:  # k-means found one cluster: cut along the axis instead
            lab = _split_sorted(x, int(np.ceil(len(rows) / cap)))
            used = np.unique(lab)
        sub_counts = np.bincount(lab)
        new_c = np.stack([x[lab == u].mean(0) for u in used]).astype(np.float32)
        # piece 0 keeps list j (its centroid is replaced), the others become new lists
        ids = np.concatenate([[j], n_c + np.arange(len(used) - 1)])
        if j < len(cents[0]):
            cents[0][j] = new_c[0]
        else:  # a piece of an earlier split, split again
            cents = [np.concatenate(cents)]
            cents[0][j] = new_c[0]
        if len(used) > 1:
            cents.append(new_c[1:])
        n_c += len(used) - 1
        for u, new in zip(used, ids, strict=True):
            r = rows[lab == u]
            a[r] = new
            if sub_counts[u] > cap:
                members[int(new)] = r
                todo.append((int(new), depth + 1))
    return np.concatenate(cents), a


def _sample(x: np.ndarray, k: int) -> np.ndarray:
    """A seeded sample of KMEANS_SAMPLE_PER_LIST rows a list (all rows if fewer)."""
    m = min(len(x), k * KMEANS_SAMPLE_PER_LIST)
    if m >= len(x):
        return x
    rng = np.random.default_rng(KMEANS_SEED)
    return x[np.sort(rng.choice(len(x), size=m, replace=False))]


def balance_cap(n: int, lists: int) -> int:
    """The largest list `IVFPart.build` leaves: BALANCE_CAP x the mean, at least
    BALANCE_MIN_CAP keys."""
    return max(BALANCE_MIN_CAP, int(np.ceil(BALANCE_CAP * n / max(1, lists))))


@dataclass
class IVFPart:
    """IVF over rows start..stop-1: lists of labels (codebook rows) with their vectors."""

    centroids: np.ndarray  # (C, d) float32
    offsets: np.ndarray  # (C + 1,) int64: list j is labels[offsets[j]:offsets[j+1]]
    labels: np.ndarray  # (N,) int64, grouped by list
    vecs: np.ndarray  # (N, d) float32 in the same order (mapped)
    start: int
    stop: int

    def __post_init__(self) -> None:
        self.c_sq = np.einsum("ij,ij->i", self.centroids, self.centroids)
        self._positions: np.ndarray | None = None
        self._vsq: np.ndarray | None = None  # |v|^2 by position, filled list by list

    def list_sq(self, j: int) -> np.ndarray:
        """Squared norms of list j's reduced vectors, computed on first use and kept
        (a search then reads each probed list once: |v|^2 - 2 v.q + |q|^2)."""
        lo, hi = int(self.offsets[j]), int(self.offsets[j + 1])
        if self._vsq is None:
            self._vsq = np.full(len(self.labels), np.nan, dtype=np.float32)
        out = self._vsq[lo:hi]
        if hi > lo and np.isnan(out[0]):
            v = self.vecs[lo:hi]
            out[:] = np.einsum("ij,ij->i", v, v)
        return out

    @property
    def positions(self) -> np.ndarray:
        """Local row (label - start) -> index into `labels` / `vecs` (the inverse of the
        list order; an IVF-ordered vector file has the same positions)."""
        if self._positions is None:
            pos = np.empty(len(self.labels), dtype=np.int64)
            pos[self.labels - self.start] = np.arange(len(self.labels))
            self._positions = pos
        return self._positions

    @property
    def size(self) -> int:
        return self.stop - self.start

    def graph_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored reduced vectors of codebook rows start..stop-1 (a copy)."""
        return self.vecs[self.positions[np.asarray(rows, dtype=np.int64) - self.start]]

    @classmethod
    def build(
        cls, g: np.ndarray, start: int = 0, *, lists: int | None = None, balanced: bool = True
    ) -> tuple:
        """(part arrays without vecs: centroids, offsets, labels) and the order to write
        the vectors in (`vecs = g[order]`). `balanced`: no list above `balance_cap`
        (splits the lists k-means leaves larger; more lists than `lists` then)."""
        n = len(g)
        k = lists or n_lists(n)
        rng = np.random.default_rng(KMEANS_SEED)
        m = min(n, k * KMEANS_SAMPLE_PER_LIST)
        sample = g[np.sort(rng.choice(n, size=m, replace=False))] if m < n else g
        cent = kmeans(np.asarray(sample, np.float32), k)
        a = assign(g, cent)
        if balanced:
            cent, a = balance(g, cent, a, cap=balance_cap(n, len(cent)))
        order = np.argsort(a, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(np.bincount(a, minlength=len(cent)))])
        return cent, offsets.astype(np.int64), (order + start).astype(np.int64), order

    def lists_near(self, g: np.ndarray, nprobe: int, at_least: int) -> np.ndarray:
        """The nprobe nearest lists to g (more, nearest first, until they hold
        `at_least` keys)."""
        # einsum, not BLAS: a threaded GEMV for one query stalls on a busy machine
        d = self.c_sq - 2.0 * np.einsum("ij,j->i", self.centroids, g)
        c = len(d)
        p = min(c, nprobe)
        near = np.argpartition(d, p - 1)[:p] if p < c else np.arange(c)
        near = near[np.argsort(d[near])]
        sizes = self.offsets[near + 1] - self.offsets[near]
        if sizes.sum() < at_least and p < c:
            near = np.argsort(d)
            sizes = self.offsets[near + 1] - self.offsets[near]
            p = int(np.searchsorted(np.cumsum(sizes), at_least) + 1)
            near = near[: max(p, nprobe)]
        return near

    def knn_query(self, q: np.ndarray, k: int, nprobe: int = NPROBE):
        """(labels (m, k) int64, squared distances (m, k) float32) of the nearest keys
        among the probed lists of each query; k <= size is always filled."""
        q = np.asarray(q, dtype=np.float32).reshape(-1, self.centroids.shape[1])
        k = min(k, self.size)
        if len(q) >= BATCH_QUERIES:
            return self._knn_batch(q, k, nprobe)
        lab, sq, _ = self.knn_query_corrected(q, k, nprobe, None, 0)
        return lab, sq

    def knn_query_corrected(
        self, q: np.ndarray, k: int, nprobe: int, sigma: np.ndarray | None, extra: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`knn_query` one query at a time, plus (m, extra) labels: the keys of the same
        probed lists with the smallest reduced distance / sigma (`sigma` by codebook
        row) that are not among the k (rows repeated where the lists hold fewer). What
        `search` finally ranks by is the corrected distance, so a key of a large radius
        a little further away wins over nearer ones; the reduced distances are computed
        for every key of the probed lists anyway."""
        q = np.asarray(q, dtype=np.float32).reshape(-1, self.centroids.shape[1])
        k = min(k, self.size)
        lab = np.empty((len(q), k), dtype=np.int64)
        sq = np.empty((len(q), k), dtype=np.float32)
        xl = np.empty((len(q), extra if sigma is not None else 0), dtype=np.int64)
        for i in range(len(q)):
            near = self.lists_near(q[i], nprobe, k)
            near = near[self.offsets[near + 1] > self.offsets[near]]
            q_sq = float(np.dot(q[i], q[i]))
            # per list |v|^2 - 2 v.q + |q|^2 on the mapped slice: one pass over each list,
            # no copy (einsum: a threaded BLAS GEMV stalls on a busy machine)
            parts = [self.list_sq(j) - 2.0 * np.einsum("ij,j->i", self.vecs[
                self.offsets[j] : self.offsets[j + 1]], q[i]) for j in near]  # fmt: skip
            idx = np.concatenate([np.arange(self.offsets[j], self.offsets[j + 1]) for j in near])
            dd = np.concatenate(parts)
            dd += q_sq
            np.maximum(dd, 0.0, out=dd)
            part = np.argpartition(dd, k - 1)[:k] if k < len(dd) else np.arange(len(dd))
            part = part[np.argsort(dd[part], kind="stable")]
            lab[i], sq[i] = self.labels[idx[part]], dd[part]
            if xl.shape[1]:
                assert sigma is not None
                xl[i] = corrected_extra(dd, self.labels[idx], part, sigma, xl.shape[1])
        return lab, sq, xl

    def _knn_batch(self, q: np.ndarray, k: int, nprobe: int):
        """knn_query for many queries (an insert's keys): list by list, one GEMM per
        list against the queries that probe it, merged into each query's best k."""
        m, c = len(q), len(self.centroids)
        p = min(c, nprobe)
        dc = _sq_to(q, self.centroids, self.c_sq)
        near = np.argpartition(dc, p - 1, axis=1)[:, :p] if p < c else np.tile(np.arange(c), (m, 1))
        sizes = (self.offsets[near + 1] - self.offsets[near]).sum(axis=1)
        best_l = np.full((m, k), -1, dtype=np.int64)
        best_d = np.full((m, k), np.inf, dtype=np.float32)
        short = np.flatnonzero(sizes < k)  # too few keys in their lists: one at a time
        if len(short):
            for s0 in range(0, len(short), BATCH_QUERIES - 1):  # below the batch size
                sl = short[s0 : s0 + BATCH_QUERIES - 1]
                best_l[sl], best_d[sl] = self.knn_query(q[sl], k, p)
        ok = np.ones(m, bool)
        ok[short] = False
        qi = np.repeat(np.arange(m), p)[np.repeat(ok, p)]
        li = near[ok].reshape(-1)
        order = np.argsort(li, kind="stable")
        qi, li = qi[order], li[order]
        lists, first = np.unique(li, return_index=True)
        bounds = np.append(first, len(li))
        for j, a, b in zip(lists, bounds[:-1], bounds[1:], strict=True):
            qs = qi[a:b]
            lo, hi = self.offsets[j], self.offsets[j + 1]
            if hi == lo:
                continue
            v = self.vecs[lo:hi]
            d = _sq_to(q[qs], v, np.einsum("ij,ij->i", v, v))
            cl = np.concatenate([best_l[qs], np.broadcast_to(self.labels[lo:hi], d.shape)], 1)
            cd = np.concatenate([best_d[qs], d], axis=1)
            part = np.argpartition(cd, k - 1, axis=1)[:, :k]
            best_l[qs] = np.take_along_axis(cl, part, 1)
            best_d[qs] = np.take_along_axis(cd, part, 1)
        order = np.argsort(best_d, axis=1, kind="stable")
        return np.take_along_axis(best_l, order, 1), np.take_along_axis(best_d, order, 1)


@dataclass
class FlatPart:
    """Rows start..stop-1 scanned in full (recent inserts until compaction)."""

    vecs: np.ndarray  # (size, d) float32
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def graph_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored reduced vectors of codebook rows start..stop-1 (a copy)."""
        return self.vecs[np.asarray(rows, dtype=np.int64) - self.start]

    def knn_query(self, q: np.ndarray, k: int, nprobe: int = 0):
        lab, sq, _ = self.knn_query_corrected(q, k, nprobe, None, 0)
        return lab, sq

    def knn_query_corrected(
        self, q: np.ndarray, k: int, nprobe: int, sigma: np.ndarray | None, extra: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`knn_query` plus the `extra` keys by reduced distance / sigma (IVFPart's),
        from the same distances to every row of the part."""
        q = np.asarray(q, dtype=np.float32).reshape(-1, self.vecs.shape[1])
        k = min(k, self.size)
        v_sq = np.einsum("ij,ij->i", self.vecs, self.vecs)
        sq = _sq_to(q, self.vecs, v_sq)
        part = (
            np.argpartition(sq, k - 1, axis=1)[:, :k]
            if k < self.size
            else np.tile(np.arange(self.size), (len(q), 1))
        )
        pd = np.take_along_axis(sq, part, 1)
        order = np.argsort(pd, axis=1, kind="stable")
        local = np.take_along_axis(part, order, 1)
        xl = np.empty((len(q), extra if sigma is not None else 0), dtype=np.int64)
        if xl.shape[1]:
            assert sigma is not None
            rows = np.arange(self.start, self.stop)
            for i, d in enumerate(sq):
                xl[i] = corrected_extra(d, rows, local[i], sigma, xl.shape[1])
        return local + self.start, np.take_along_axis(pd, order, 1), xl


def corrected_extra(
    dd: np.ndarray, rows: np.ndarray, taken: np.ndarray, sigma: np.ndarray, extra: int
) -> np.ndarray:
    """`extra` rows with the smallest dd / sigma^2 (squared reduced distance over the
    squared radius: the corrected distance's order) among `rows` not at the positions
    `taken`; padded with rows[taken[0]] (the caller drops repeats) when too few remain."""
    score = dd / np.square(np.maximum(sigma[rows], 1e-12))
    score[taken] = np.inf
    m = min(extra, len(score) - len(taken))
    out = np.full(extra, rows[taken[0]] if len(taken) else rows[0], dtype=np.int64)
    if m > 0:
        part = np.argpartition(score, m - 1)[:m] if m < len(score) else np.arange(len(score))
        part = part[np.isfinite(score[part])]
        out[: len(part)] = rows[part]
    return out


def valid_ivf(offsets: np.ndarray, labels: np.ndarray, start: int, stop: int, lists: int) -> bool:
    """Whether stored offsets / labels can be ones a writer made for rows start..stop-1."""
    n = stop - start
    if offsets.shape != (lists + 1,) or labels.shape != (n,):
        return False
    if offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
        return False
    if n and (labels.min() != start or labels.max() != stop - 1):
        return False
    return bool(n == 0 or np.bincount(labels - start, minlength=n).max() == 1)
