"""A reduced projection of the keys for the ANN graph (issue 22).

Why: an hnsw graph over 4,480-wide keys is as large as the keys (18 GB at a million)
and every distance it computes reads 18 KB. The graph therefore runs on a projection
to `rank` dimensions (PCA fitted at compaction, 128-256), and the candidates it returns
are re-ranked exactly on the full vectors (`reduced.py`).

What the graph sees, `graph_vectors(x) = [P(x - m), |R(x - m)|]`: the PCA coordinates
plus one more, the norm of the residual R (what the projection drops). With an
orthonormal P this is a contraction, |g(q) - g(k)| <= |q - k| (the residuals' norms differ
by at most the norm of their difference), so a key outside the graph's candidates is at
least as far in full width as the bound the graph reports; the search's sigma bound
stays sound. The residual coordinate also separates keys that the projection folds onto
each other.

What the lifted graph sees, `lift_key_vectors` / `lift_query_vectors`: the PCA
coordinates, then the key's residual norm and 0, the query's 0 and its residual norm.
The squared distance between them is |P(q - k)|^2 + |Rq|^2 + |Rk|^2, which is |q - k|^2
up to the cross term 2 Rq.Rk, close to zero for the far-away, isolated keys that the
lifted graph exists to find (their residuals point in unrelated directions).

Stored as one float32 .npy of shape (rank + 1, dim): row 0 the mean, rows 1.. the basis
(orthonormal rows). Keys and queries are projected by the same stored numbers, so the
writer's and every reader's graph vectors agree bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

#: projection rank for keys wider than this (narrower keys are projected onto themselves)
DEFAULT_RANK = 256
#: keys sampled to fit the PCA (seeded: the same codebook gives the same projection)
FIT_SAMPLE = 16_384
FIT_POWER_ITERS = 1
FIT_OVERSAMPLE = 32
FIT_SEED = 0


@dataclass
class Projection:
    """PCA projection: mean (dim,) and an orthonormal basis (rank, dim), both float32."""

    mean: np.ndarray
    basis: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    # -- storage ------------------------------------------------------------------

    def to_array(self) -> np.ndarray:
        """(rank + 1, dim) float32: the mean, then the basis rows (what index/ stores)."""
        return np.concatenate([self.mean[None, :], self.basis]).astype(np.float32)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> Projection:
        """Inverse of `to_array`; ValueError for an array a writer cannot have made
        (not 2-D float32, non-finite, or a basis that is not orthonormal)."""
        a = np.asarray(arr)
        if a.dtype != np.float32 or a.ndim != 2 or a.shape[0] < 2 or a.shape[0] - 1 > a.shape[1]:
            raise ValueError("projection array has the wrong dtype or shape")
        if not np.isfinite(a).all():
            raise ValueError("projection array is not finite")
        basis = np.ascontiguousarray(a[1:])
        # float32 (rounding ~1e-6, far below the 1e-3 tolerance): the float64 Gram of a
        # 256 x 4,480 basis took 0.24 s of a 0.9 s open at 1M x 4,480 on a loaded machine
        gram = basis @ basis.T
        if np.abs(gram - np.eye(len(basis), dtype=np.float32)).max() > 1e-3:
            raise ValueError("projection basis is not orthonormal")
        return cls(np.ascontiguousarray(a[0]), basis)

    # -- fitting ------------------------------------------------------------------

    @classmethod
    def fit(
        cls, sample: np.ndarray, rank: int = DEFAULT_RANK, *, seed: int = FIT_SEED
    ) -> Projection:
        """PCA of `sample` (m, dim) by a seeded randomized SVD (Halko et al. 2011).

        Keys at most `rank` wide get the identity (rank = dim, residual 0): nothing to
        reduce. Cost ~ (2 * FIT_POWER_ITERS + 2) * m * dim * (rank + FIT_OVERSAMPLE).
        """
        x = np.asarray(sample, dtype=np.float32)
        m, dim = x.shape
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        if dim <= rank:
            return cls(mean, np.eye(dim, dtype=np.float32))
        xc = x - mean
        rank = min(rank, m) if m else rank
        ell = min(dim, rank + FIT_OVERSAMPLE)
        rng = np.random.default_rng(seed)
        y = xc @ rng.standard_normal((dim, ell), dtype=np.float32)
        for _ in range(FIT_POWER_ITERS):
            y = xc @ _orth(xc.T @ _orth(y))
        q = _orth(y)
        b = (q.T @ xc).astype(np.float64)  # (ell, dim): small
        with one_thread():
            _, _, vt = np.linalg.svd(b, full_matrices=False)
        basis = _orth(vt[:rank].T.astype(np.float64)).T  # orthonormal to float64 precision
        return cls(mean, np.ascontiguousarray(basis.astype(np.float32)))

    # -- applying -----------------------------------------------------------------

    def project(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P(x - m) as float32 (n, rank), |R(x - m)| as float32 (n,)) for x (n, dim)."""
        xc = np.asarray(x, dtype=np.float32).reshape(-1, self.dim) - self.mean
        # one query: einsum, not BLAS (a threaded GEMV stalls on a busy machine)
        p = np.einsum("ij,kj->ik", xc, self.basis) if len(xc) < 4 else xc @ self.basis.T
        total = np.einsum("ij,ij->i", xc, xc, dtype=np.float64)
        kept = np.einsum("ij,ij->i", p, p, dtype=np.float64)
        resid = np.sqrt(np.maximum(total - kept, 0.0)).astype(np.float32)
        return p.astype(np.float32, copy=False), resid

    def graph_vectors(self, x: np.ndarray) -> np.ndarray:
        """(n, rank + 1) float32 [P(x - m), |R(x - m)|]: what the raw-distance graph holds
        (a contraction of full-width L2, see the module docstring)."""
        p, r = self.project(x)
        return np.concatenate([p, r[:, None]], axis=1)

    @staticmethod
    def lift_key_vectors(graph: np.ndarray) -> np.ndarray:
        """Keys for the lifted graph, from their graph vectors: [P, |R|, 0]."""
        g = np.asarray(graph, dtype=np.float32)
        return np.concatenate([g, np.zeros((len(g), 1), np.float32)], axis=1)

    @staticmethod
    def lift_query_vectors(graph: np.ndarray) -> np.ndarray:
        """Queries for the lifted graph, from their graph vectors: [P, 0, |R|]."""
        g = np.asarray(graph, dtype=np.float32)
        z = np.zeros((len(g), 1), np.float32)
        return np.concatenate([g[:, :-1], z, g[:, -1:]], axis=1)


def one_thread():
    """Single-threaded LAPACK for small factorisations: OpenBLAS's threads made a
    288 x 288 eigh 25x slower (0.67 s vs 0.027 s) on this loaded 2-core machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only speed is lost
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _orth(y: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning y's (m, l), m >= l, via the eigenvectors of the small
    l x l Gram matrix (numpy's QR of a tall matrix took 8 s at 10,000 x 288 here: LAPACK
    threads on a loaded 2-core machine; two GEMMs and an eigh do not)."""
    gram = y.T.astype(np.float64) @ y.astype(np.float64)
    with one_thread():
        w, u = np.linalg.eigh(gram)
    keep = w > w.max() * 1e-12
    return (y @ (u[:, keep] / np.sqrt(w[keep])).astype(y.dtype)).astype(y.dtype)


def fit_sample_rows(n: int, size: int = FIT_SAMPLE, seed: int = FIT_SEED) -> np.ndarray:
    """The rows (ascending) a projection of n keys is fitted on: all, or a seeded sample."""
    if n <= size:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)
