"""Hubness-corrected retrieval over codebook keys (docs/method.md#retrieval,
docs/method.md#answering).

Pure numpy functions shared by the codebook (which caches their results as derived data)
and by evaluation (which sweeps the threshold). Distances are Euclidean (L2, not squared).

Hubness correction: some keys ("hubs") sit close to everything in high-dimensional spaces
and would win most queries. Dividing the distance to key k by sigma_k, the median distance
from k to its nearest other keys, puts every key on its own local scale. A query is
rejected (no edit applies) when even the best corrected distance exceeds tau, the p-th
percentile of key-to-key corrected distances, so locality holds for unrelated inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SIGMA_K = 30  # neighbours used for sigma (docs/method.md#retrieval)
DEFAULT_PERCENTILE = 25.0
EXACT_PAIRS_MAX_KEYS = 2000  # above this many keys tau uses a seeded sample of pairs
SAMPLE_PAIRS = 1_000_000
_CHUNK_ELEMS = 8_000_000  # float64 elements per distance block (~64 MB)


# ---------------------------------------------------------------------------
# exact distances and kNN


def as_2d_f32(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {a.shape}")
    return a


def pairwise_sq_l2(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None) -> np.ndarray:
    """Exact squared L2 distances, shape (len(a), len(b)), float64, computed in place.

    Uses float64 for the |a|^2 + |b|^2 - 2ab expansion: in float32 near-duplicate keys
    lose all precision and sigma (a median of small distances) would be noise.
    """
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    if b_sq is None:
        b_sq = np.einsum("ij,ij->i", b64, b64)
    sq = a64 @ b64.T
    sq *= -2.0
    sq += np.einsum("ij,ij->i", a64, a64)[:, None]
    sq += b_sq[None, :]
    np.maximum(sq, 0.0, out=sq)
    return sq


def pairwise_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact L2 distances between rows of a and rows of b, shape (len(a), len(b)), float64."""
    sq = pairwise_sq_l2(a, b)
    return np.sqrt(sq, out=sq)


def direct_l2(query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """L2 distances from one query to some rows by explicit differences (no cancellation)."""
    diff = np.asarray(rows, dtype=np.float64) - np.asarray(query, dtype=np.float64).reshape(-1)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def topk_sorted(sq: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row the kk smallest squared distances: (columns, distances) ascending, sqrt'ed."""
    if kk < sq.shape[1]:
        part = np.argpartition(sq, kk - 1, axis=1)[:, :kk]
    else:
        part = np.tile(np.arange(sq.shape[1]), (len(sq), 1))
    pd = np.take_along_axis(sq, part, axis=1)
    order = np.argsort(pd, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.sqrt(np.take_along_axis(pd, order, axis=1))


def row_chunk(n_cols: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, n_cols))


def brute_force_knn(
    vectors: np.ndarray, queries: np.ndarray, k: int, *, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of `vectors` for each query: (indices int64, distances float64).

    The reference search for tests and benchmarks. With exclude_self, queries must be
    `vectors` itself and row i never returns i (by position, so exact duplicates of a key
    still count as its neighbours). Rows with fewer than k candidates are padded with
    index -1 and distance inf.
    """
    v = as_2d_f32(vectors)
    q = as_2d_f32(queries)
    n, m = len(v), len(q)
    idx_out = np.full((m, k), -1, dtype=np.int64)
    dist_out = np.full((m, k), np.inf, dtype=np.float64)
    if n == 0 or k == 0 or m == 0:
        return idx_out, dist_out
    kk = min(k, n - 1 if exclude_self else n)
    if kk <= 0:
        return idx_out, dist_out
    v_sq = np.einsum("ij,ij->i", v.astype(np.float64), v.astype(np.float64))
    step = row_chunk(n)
    for start in range(0, m, step):
        stop = min(m, start + step)
        sq = pairwise_sq_l2(q[start:stop], v, v_sq)
        if exclude_self:
            sq[np.arange(stop - start), np.arange(start, stop)] = np.inf
        idx_out[start:stop, :kk], dist_out[start:stop, :kk] = topk_sorted(sq, kk)
    return idx_out, dist_out


# ---------------------------------------------------------------------------
# neighbour lists and sigma from scratch (kept current by the codebook's derived index:
# reasonedit_cli/store/index/neighbours.py)


def knn_lists(vectors: np.ndarray, k: int = SIGMA_K) -> tuple[np.ndarray, np.ndarray]:
    """Each key's k nearest OTHER keys from scratch: (idx (n,k) int64, dist (n,k) float64).

    Padded with -1 / inf while the codebook has fewer than k+1 keys.
    """
    v = as_2d_f32(vectors)
    return brute_force_knn(v, v, k, exclude_self=True)


def sigma_raw_from_knn(knn_dist: np.ndarray) -> np.ndarray:
    """Per key the median of its finite neighbour distances (float64), before the floor.

    Row-local, so the codebook recomputes it only for rows whose lists changed. A key
    with no neighbour (a one-key codebook) gets 1, i.e. no correction.
    """
    d = np.asarray(knn_dist, dtype=np.float64)
    n = len(d)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] == 0:
        return np.ones(n, dtype=np.float64)
    finite = np.isfinite(d)
    if finite.all():
        sigma = np.median(d, axis=1)
    else:
        with warnings.catch_warnings():  # rows with no neighbour at all: handled below
            warnings.simplefilter("ignore", RuntimeWarning)
            sigma = np.nanmedian(np.where(finite, d, np.nan), axis=1)
    return np.where(finite.any(axis=1), sigma, 1.0)


def floor_sigma(sigma_raw: np.ndarray) -> np.ndarray:
    """Zero sigmas (exact duplicate keys) floored at 1e-6 x the median positive sigma.

    The floor depends on every key, so it is applied to the whole array after any
    row-wise update, never stored.
    """
    sigma = np.asarray(sigma_raw, dtype=np.float64)
    if len(sigma) == 0:
        return sigma.copy()
    positive = sigma[sigma > 0]
    floor = 1e-6 * (float(np.median(positive)) if len(positive) else 1.0)
    return np.maximum(sigma, floor)


def sigma_from_knn(knn_dist: np.ndarray) -> np.ndarray:
    """sigma_k = median of the finite neighbour distances of each key (float64).

    A key with no neighbour (a one-key codebook) gets sigma 1, i.e. no correction. Zero
    sigmas (exact duplicate keys) are floored at a tiny fraction of the typical sigma so
    corrected distances stay finite.
    """
    return floor_sigma(sigma_raw_from_knn(knn_dist))


def hubness_sigma(vectors: np.ndarray, k: int = SIGMA_K) -> np.ndarray:
    """sigma_k for every key: median L2 distance to its min(k, n-1) nearest other keys."""
    return sigma_from_knn(knn_lists(vectors, k)[1])


# ---------------------------------------------------------------------------
# rejection threshold


def effective_percentile(p: float, n_edits: int) -> float:
    """max(p, 100 / n_edits), capped at 100: few edits need a looser tau.

    See docs/method.md#threshold.
    """
    if n_edits <= 0:
        return float(min(100.0, p))
    return float(min(100.0, max(p, 100.0 / n_edits)))


def corrected_pair_sample(
    vectors: np.ndarray,
    sigma: np.ndarray,
    *,
    seed: int = 0,
    max_exact_keys: int = EXACT_PAIRS_MAX_KEYS,
    n_pairs: int = SAMPLE_PAIRS,
) -> np.ndarray:
    """Corrected key-key distances d(a, b) / sigma_a over ordered pairs a != b.

    All pairs up to `max_exact_keys` keys; above that a fixed seeded sample of `n_pairs`
    pairs, so tau is reproducible from the Parquet data alone. Evaluation sweeps p over
    one sample instead of recomputing distances per p.
    """
    v = as_2d_f32(vectors)
    s = np.asarray(sigma, dtype=np.float64)
    n = len(v)
    if n < 2:
        return np.zeros(0, dtype=np.float64)
    if n <= max_exact_keys:
        chunks: list[np.ndarray] = []
        step = row_chunk(n)
        for start in range(0, n, step):
            stop = min(n, start + step)
            d = pairwise_l2(v[start:stop], v) / s[start:stop, None]
            mask = np.ones(d.shape, dtype=bool)
            mask[np.arange(stop - start), np.arange(start, stop)] = False
            chunks.append(d[mask])
        return np.concatenate(chunks)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, size=n_pairs)
    b = rng.integers(0, n - 1, size=n_pairs)
    b = b + (b >= a)  # uniform over b != a
    out = np.empty(n_pairs, dtype=np.float64)
    step = max(1, _CHUNK_ELEMS // max(1, v.shape[1]))
    for start in range(0, n_pairs, step):
        stop = min(n_pairs, start + step)
        # explicit differences (no cancellation), so float32 is accurate to ~1e-6 here
        diff = v[a[start:stop]] - v[b[start:stop]]
        sq = np.einsum("ij,ij->i", diff, diff).astype(np.float64)
        out[start:stop] = np.sqrt(sq) / s[a[start:stop]]
    return out


TAU_RULES = ("images", "edits", "nearest", "all", "reference")
#: new codebooks measure tau between images (#19); "edits" stays readable for older ones
DEFAULT_TAU_RULE = "images"
HALFWAY = 0.5  # rule "edits": a query must come within half the gap to the next edit


def other_edit_threshold(
    knn_idx: np.ndarray,
    knn_dist: np.ndarray,
    sigma: np.ndarray,
    edit_codes: np.ndarray,
    p: float,
    n_edits: int,
) -> float | None:
    """tau from each key's nearest key of ANOTHER edit (the default `tau_rule`, "edits"):
    HALFWAY x the max(p, 100/n_edits)-th percentile of d(k, nearest other-edit key) / sigma_k.

    Why another edit: the keys of one edit (question, each sentence, their crops) share an
    image and sit close together by construction, so a key's plain nearest neighbour
    (rule "nearest") is usually its own sibling and tau shrinks to near-duplicate
    distances: on easy-vqa with the demo VLM a rephrased question on the SAME image was
    rejected 9 times in 10. What separates edits is how close two *different* edits' keys
    come. Why half of it: a query as far from a key as the next edit is could as well be
    about that other edit; within half the gap it is nearer to this edit's region than to
    any other's. Measured on easy-vqa (100 edits): at the full gap and p = 25 a quarter of
    the locality probes borrowed a fact; at half the gap none did, and rephrased
    questions on the edited image were still all retrieved. Keys whose 30 nearest keys
    all belong to their own edit give no measurement and are left out.
    """
    idx = np.asarray(knn_idx)
    if idx.ndim != 2 or idx.shape[1] == 0 or len(idx) < 2:
        return None
    other = nearest_other_distances(idx, knn_dist, edit_codes)
    return halfway_threshold(other, sigma, p, n_edits)


def nearest_other_distances(
    knn_idx: np.ndarray,
    knn_dist: np.ndarray,
    codes: np.ndarray,
    own: np.ndarray | None = None,
) -> np.ndarray:
    """Per key the raw distance to the first key of its neighbour list whose code (edit,
    image) differs from its own; NaN where the list holds none. What the rules "edits"
    and "images" measure, kept per key by the store (store/taucache.py) so that tau for
    another percentile does not rescan a million lists. `codes` are every key's; the
    lists may be of some keys only, whose codes `own` then gives (default: all keys)."""
    idx = np.asarray(knn_idx)
    d = np.asarray(knn_dist, dtype=np.float64)
    codes = np.asarray(codes)
    mine = codes if own is None else np.asarray(own)
    out = np.full(len(idx), np.nan)
    if idx.ndim != 2 or idx.shape[1] == 0 or len(idx) == 0:
        return out
    valid = idx >= 0
    other = valid & (codes[np.where(valid, idx, 0)] != mine[:, None])
    has = other.any(axis=1)
    rows = np.flatnonzero(has)
    out[rows] = d[rows, np.argmax(other[rows], axis=1)]
    return out


def halfway_threshold(
    other: np.ndarray, sigma: np.ndarray, p: float, n_groups: int
) -> float | None:
    """HALFWAY x the max(p, 100/n_groups)-th percentile of other / sigma over the keys
    with a measurement (`nearest_other_distances`); None without any."""
    nn = np.asarray(other, dtype=np.float64) / np.asarray(sigma, dtype=np.float64)
    nn = nn[np.isfinite(nn)]
    if len(nn) == 0:
        return None
    return HALFWAY * float(np.percentile(nn, effective_percentile(p, n_groups)))


def other_image_threshold(
    knn_idx: np.ndarray,
    knn_dist: np.ndarray,
    sigma: np.ndarray,
    image_codes: np.ndarray,
    edit_codes: np.ndarray,
    p: float,
) -> float | None:
    """tau from each key's nearest key on ANOTHER image (the default `tau_rule`, "images"):
    HALFWAY x the max(p, 100/n_images)-th percentile of d(k, nearest other-image key) /
    sigma_k.

    Why another image, not another edit (rule "edits"): several edits on one image are
    normal use (one per question or object), and their keys share the image half of the
    dual key, so they sit almost on top of each other. Under "edits" one such pair set
    the threshold for the whole codebook: on the demo a second edit on an edited image
    moved tau from 0.237 to 0.093 and lost four probes on *other* images (issue #19). The
    image half decides which image a query is about (README, "Why these defaults"), so
    the gap to be measured is the one between images; which of an image's edits applies
    is left to the text half, which ranks that image's keys. A key's image is its
    `image_sha256` (crops share their edit's image). The percentile floor counts images
    for the same reason. Keys whose listed neighbours are all on their own image give no
    measurement and are left out; with no measurement at all (one image only) this
    falls back to rule "edits", the only gap there is.
    """
    images = np.asarray(image_codes)
    n_images = len(np.unique(images)) if len(images) else 0
    tau = other_edit_threshold(knn_idx, knn_dist, sigma, images, p, n_images)
    if tau is not None:
        return tau
    edits = np.asarray(edit_codes)
    n_edits = len(np.unique(edits)) if len(edits) else 0
    return other_edit_threshold(knn_idx, knn_dist, sigma, edits, p, n_edits)


def nearest_threshold(
    knn_dist: np.ndarray, sigma: np.ndarray, p: float, n_edits: int
) -> float | None:
    """tau from each key's NEAREST other key: the max(p, 100/n_edits)-th percentile of
    d(k, nn(k)) / sigma_k (the default `tau_rule`, "nearest").

    Why not all pairs (rule "all", docs/method.md#threshold read literally): sigma_k is the median
    distance to a key's 30 nearest keys, so with hundreds of keys almost every pair lies
    beyond it and even the 10th percentile of all corrected pairs exceeds 1, while a query
    near any key scores below 1. On easy-vqa with the demo VLM (100 edits), the all-pairs
    tau rejected 0% of the locality probes at every p from 10 to 90; this one rejects 99%
    at p = 25 and trades locality for generality smoothly as p grows (README, Evaluation).
    """
    d = np.asarray(knn_dist, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] == 0 or len(d) < 2:
        return None
    nn = d[:, 0] / np.asarray(sigma, dtype=np.float64)
    nn = nn[np.isfinite(nn)]
    if len(nn) == 0:
        return None
    return float(np.percentile(nn, effective_percentile(p, n_edits)))


def rejection_threshold(
    vectors: np.ndarray | None,
    sigma: np.ndarray | None,
    p: float = DEFAULT_PERCENTILE,
    n_edits: int = 0,
    *,
    seed: int = 0,
    sample: np.ndarray | None = None,
) -> float | None:
    """tau = the max(p, 100/n_edits)-th percentile of corrected key-key distances.

    None with fewer than two keys (no pair to measure). Pass `sample` (from
    `corrected_pair_sample`) to reuse the pair distances across several p.
    """
    if sample is None:
        if vectors is None or sigma is None:
            raise ValueError("rejection_threshold needs vectors and sigma, or a sample")
        sample = corrected_pair_sample(vectors, sigma, seed=seed)
    if len(sample) == 0:
        return None
    return float(np.percentile(sample, effective_percentile(p, n_edits)))


# ---------------------------------------------------------------------------
# the reference's rules (REFERENCE rows 11-13; `tau_rule: reference`)

REFERENCE_EPS = 1e-6  # added to sigma before dividing (the reference's hubness_eps)
REFERENCE_PERCENTILE = 1.0  # the reference's reject_threshold_pct
REFERENCE_MAX_KEYS = 2000  # the reference measures tau on at most this many keys
HIT_RULES = ("tau", "reference")


def reference_sigma_from_knn(knn_dist: np.ndarray) -> np.ndarray:
    """sigma_k as the reference computes it: the LOWER middle value of the distances to
    the min(30, n - 1) nearest other keys (torch's median), float64.

    `knn_dist` rows are ascending and padded with inf (as `knn_lists` returns them); with
    m finite distances sigma is the ((m - 1) // 2)-th smallest, e.g. the 15th of 30 (the
    numpy median would average the 15th and 16th). Keys with no neighbour get NaN: the
    reference applies no correction then (see `reference_corrected`).
    """
    d = np.asarray(knn_dist, dtype=np.float64)
    n = len(d)
    if n == 0 or d.ndim != 2 or d.shape[1] == 0:
        return np.full(n, np.nan)
    srt = np.sort(d, axis=1)
    m = np.isfinite(srt).sum(axis=1)
    pos = np.maximum(m - 1, 0) // 2
    out = srt[np.arange(n), pos]
    return np.where(m > 0, out, np.nan)


def reference_sigma(vectors: np.ndarray, k: int = SIGMA_K) -> np.ndarray:
    """`reference_sigma_from_knn` of exact neighbour lists of `vectors`."""
    return reference_sigma_from_knn(knn_lists(vectors, k)[1])


def reference_corrected(raw: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """d / (sigma + REFERENCE_EPS) per key (last axis); unchanged where sigma is NaN."""
    s = np.asarray(sigma, dtype=np.float64)
    scale = np.where(np.isnan(s), 1.0, s + REFERENCE_EPS)
    return np.asarray(raw, dtype=np.float64) / scale


def reference_percentile(p: float, n_edits: int) -> float:
    """max(p, 100 / n_edits) (the reference's "stat" warm-up; n_edits >= 1)."""
    return float(max(p, 100.0 / max(1, int(n_edits))))


def reference_threshold(
    vectors: np.ndarray,
    sigma: np.ndarray,
    n_edits: int,
    p: float = REFERENCE_PERCENTILE,
    *,
    order: np.ndarray | None = None,
) -> float | None:
    """tau as the reference computes it (REFERENCE row 12, `tau_rule: reference`).

    Over every unordered pair of keys a < b (positions in `order`, default key order),
    the corrected distance `d(key_a, key_b) / (sigma_b + 1e-6)` -- the sigma of the pair's
    LATER key, the reference's upper triangle of `cdist / sigma[None, :]` -- and tau is
    `np.percentile` (linear interpolation) of these at max(p, 100 / n_edits). None with
    fewer than two keys (the reference then leaves the gate open). The reference draws
    `order` as a fresh random permutation of at most 2000 keys each time; here the order
    is the codebook's key order (above 2000 keys: a seeded sample of 2000, in key order),
    so tau is reproducible. `sigma` is `reference_sigma_from_knn` (NaN: no correction).
    """
    v = as_2d_f32(vectors)
    n = len(v)
    idx = np.arange(n) if order is None else np.asarray(order, dtype=np.int64)
    if order is None and n > REFERENCE_MAX_KEYS:
        rng = np.random.default_rng(0)
        idx = np.sort(rng.choice(n, size=REFERENCE_MAX_KEYS, replace=False))
    if len(idx) < 2:
        return None
    sub = v[idx]
    d = pairwise_l2(sub, sub)
    corr = reference_corrected(d, np.asarray(sigma, dtype=np.float64)[idx])
    iu = np.triu_indices(len(idx), k=1)
    return float(np.percentile(corr[iu], reference_percentile(p, n_edits)))


def reference_hits(corrected: Sequence[float], tau: float | None, k: int = 5) -> list[int]:
    """Positions of the hits under the reference's rule (REFERENCE row 13).

    `corrected` are the candidates' corrected distances, nearest first. Rejected (empty)
    when the nearest exceeds tau; otherwise the k nearest, with no further tau filter.
    tau None (fewer than two keys) is an open gate: the k nearest.
    """
    c = list(corrected)
    if not c or (tau is not None and c[0] > tau):
        return []
    return list(range(min(k, len(c))))


# ---------------------------------------------------------------------------
# retrieval and prompt


@dataclass
class Hit:
    """One retrieved key: its facts and where they came from.

    `value`/`edit_id` are the key's own (first) entry; a merged key (docs/method.md#merging) holds
    more, and `entries` lists them all as (value, edit_id), own first. Its facts are
    `values`, the distinct values in that order.
    """

    value: str
    distance: float  # hubness-corrected
    raw_distance: float  # plain L2
    kind: str
    edit_id: str
    key_id: str
    box: tuple[int, int, int, int] | None
    row: int = -1  # position in the codebook's live key order
    entries: list[tuple[str, str]] = field(default_factory=list)  # empty: just `value`

    @property
    def values(self) -> list[str]:
        """The key's distinct values, own first."""
        return list(dict.fromkeys([self.value, *(v for v, _ in self.entries)]))

    @property
    def edit_ids(self) -> list[str]:
        """The distinct edits whose values the key holds, own first."""
        return list(dict.fromkeys([self.edit_id, *(e for _, e in self.entries)]))


@dataclass
class Retrieval:
    """Outcome of one query: rejected (no edit applies) or the hits under tau.

    `hits` are nearest first; `facts` are their distinct values in PROMPT order, nearest
    last, so the most relevant fact stands right before the question.
    """

    rejected: bool
    hits: list[Hit] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    tau: float | None = None
    nearest: float | None = None  # best corrected distance, also when rejected
    # the object index's own retrieval when the codebook has one (reasonedit_cli.objects;
    # its hits are in `hits` too), the facts only it found, or why it was skipped
    objects: Retrieval | None = None
    object_facts: list[str] = field(default_factory=list)
    objects_problem: str | None = None

    @property
    def edit_ids(self) -> list[str]:
        """The distinct edits whose values were retrieved (merged keys count each)."""
        return list(dict.fromkeys(e for h in self.hits for e in h.edit_ids))


def distinct_values(hits: Sequence[Hit]) -> list[str]:
    """Distinct values in hit order (nearest first; a merged key's own value first, then
    the values it gained): the facts to prepend."""
    seen: dict[str, None] = {}
    for h in hits:
        for v in h.values:
            seen.setdefault(v, None)
    return list(seen)


def retrieve(
    codebook: Any,
    query_vector: np.ndarray,
    k: int = 5,
    p: float | None = None,
    *,
    hit_rule: str | None = None,
) -> Retrieval:
    """Retrieve the facts that apply to one query embedding (docs/method.md#retrieval).

    Reject when the nearest corrected distance exceeds tau; otherwise return the k
    nearest keys whose corrected distance is within tau and their distinct values.
    p=None uses the codebook's stored tau; another p recomputes tau (for sweeps).

    A codebook with a single key has no tau; then the key applies only within its
    deferral radius (raw distance <= radius), and never when it has no radius.

    `hit_rule` (default: the codebook's config `hits_rule`, else "tau") "reference" is the
    reference's rule instead (`reference_hits`): the k nearest once the nearest passes,
    an open gate without tau, and facts in hit order, nearest first.
    """
    q = np.asarray(query_vector, dtype=np.float32).reshape(1, -1)
    rule = hit_rule or getattr(codebook, "config", {}).get("hits_rule") or "tau"
    if rule not in HIT_RULES:
        raise ValueError(f"unknown hits rule {rule!r}; choose one of {HIT_RULES}")
    tau = codebook.tau if p is None else codebook.tau_for(p)
    results = codebook.search(q, k=k)[0]
    if not results:
        return Retrieval(rejected=True, tau=tau)
    nearest = results[0][2]
    if rule == "reference":
        ok = [results[i] for i in reference_hits([r[2] for r in results], tau, k)]
    elif tau is None:
        radius = codebook.key_facts([results[0][0]])[0]["radius"]
        ok = [r for r in results[:1] if radius is not None and r[1] <= radius]
    else:
        ok = [r for r in results if r[2] <= tau]
    if not ok:
        return Retrieval(rejected=True, tau=tau, nearest=nearest)
    hits = []
    for (row, raw, corr), f in zip(ok, codebook.key_facts([r[0] for r in ok])):
        box = f["box"]
        value, edit_id = f["value"], f["edit_id"]
        merged = [(m["value"], m["edit_id"]) for m in f["merged"]]
        hits.append(
            Hit(
                value=value,
                distance=float(corr),
                raw_distance=float(raw),
                kind=f["kind"],
                edit_id=edit_id,
                key_id=f["key_id"],
                box=tuple(box) if box is not None else None,
                row=int(row),
                entries=[(value, edit_id), *merged],
            )
        )
    return Retrieval(
        rejected=False,
        hits=hits,
        # nearest fact LAST, right before the question: measured on the demo VLM, the fact
        # next to the question weighs most (sample edits 2/6 -> 5/6 right with K=5). The
        # reference joins a Python set (no defined order); its rule keeps hit order.
        facts=distinct_values(hits) if rule == "reference" else distinct_values(hits)[::-1],
        tau=tau,
        nearest=nearest,
    )


def build_prompt(facts: Sequence[str], prompt: str) -> str:
    """`<facts joined by spaces> <prompt>`; the prompt unchanged when there are no facts.

    Unchanged means byte-identical, so an unedited query runs exactly as the base model
    (locality, docs/method.md#answering).
    """
    facts = [f for f in facts if f]
    if not facts:
        return prompt
    return " ".join(facts) + " " + prompt
