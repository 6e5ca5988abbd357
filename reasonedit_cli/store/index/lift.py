"""The lifted graph: corrected distance as a plain L2 search, for large-sigma keys.

Why: a raw-distance graph cannot find an isolated key (large sigma) that wins by its
sigma from far away; this graph of the largest-sigma keys can (the derivation is in the
comment below). Pure math here; derived.py loads and verifies the files, update.py
builds and writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# The lifted graph of large-sigma keys (see `lift_keys`; figures in benchmarks/README.md).
LIFT_FRACTION = 0.05  # share of keys, the largest sigmas, that the lifted graph holds
LIFT_FETCH = 10  # candidates it returns per query (re-ranked exactly with the others)
LIFT_EF = 64  # its hnsw ef
LIFT_M = 48  # its hnsw M (a lifted graph navigates worse than a raw one: more links)
LIFT_B_WEIGHT = 3.0  # weight of the direction block against the two scalar blocks
LIFT_PARAMS = 6  # params: scale a, b, c, radius, mean a, mean c; then mu (dim), mean b (dim)


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
    # one key (a codebook of 2-20 keys) is its own centre: radius 0, which `valid_lift`
    # rightly refuses (the engine's lift then failed to reopen); any positive radius
    # only adds the same constant to every lifted distance
    radius = radius if radius > 0 and np.isfinite(radius) else 1.0
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
