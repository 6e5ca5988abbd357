"""Topology-balanced calibration: choose the hooked layer L and the text weight w.

See docs/method.md#calibration. The embeddings of calibration image-text pairs are the
nodes of a weighted graph (min-max scaled L2 similarity, optionally mutual-kNN
sparsified). Newman modularity of that graph under three partitions tells how the
embedding groups pairs:

* Q_vis  -- pairs sharing an image (a vision-biased embedding scores high);
* Q_lang -- pairs sharing a text (a language-biased embedding scores high);
* Q_bi   -- an anchor pair plus its augmentations (same content, reworded and perturbed).

The layer is chosen by Q_bi (the paper; rule "bimodal") or by the balance score (the
published code; rule "harmonic"), each layer's dual embedding taken at its
`reference_w` (both halves spread equally), and then w by the balance score over a
log-spaced grid. All scores are means over seeded resamples of whole anchor groups. The
balance score is the harmonic mean of the *shifted* modularities: it is high only when the
embedding respects both images and texts, which retrieval with image and text
generalisation needs. The shift must make both terms positive. Two shifts are offered:

* "relative" (default): each modularity minus its minimum over the candidates compared
  (the w grid, or the layers), plus a margin of 10 % of the larger of the two ranges. The
  score then measures where a candidate sits between the vision-biased and the
  language-biased extreme, whatever the absolute size of Q.
* a number c: Q + c. With c = 1 (the literal "Q + 1", positive since Q >= -1/2) the score
  degenerates when Q is small, as it is on dense min-max graphs (Q ~ 0.01-0.1): the
  harmonic mean of 1 + a and 1 + b is about 1 + (a + b) / 2, an arithmetic mean that no
  longer rewards balance, and the w sweep then ends at a grid edge (measured on the
  synthetic halves in tests/test_calibration.py: c = 1 picks w = 100, "relative" an
  interior w where Q_vis and Q_lang cross).

This module is model-free: it works on numpy arrays, and the model-facing parts (the VLM's
hooked features, the sentence encoder) are passed to `calibrate` as callables. That keeps
it fast to test and keeps torch out of the import path of the CLI.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from reasonedit_cli.augment import Augmenter
from reasonedit_cli.errors import ReasonEditError, UsageError

__all__ = [
    "DEFAULT_KNN",
    "DEFAULT_W_GRID",
    "RULES",
    "CHECK_LADDER",
    "DEFAULT_MAX_CHECKS",
    "SELECTIONS",
    "CalibrationPair",
    "CalibrationResult",
    "CheckFn",
    "Modularities",
    "Partitions",
    "add_balance",
    "balance_score",
    "build_pairs",
    "calibrate",
    "calibration_steps",
    "checked_w",
    "dual_concat",
    "layer_scores",
    "modularity",
    "partitions",
    "pick_layer",
    "plot_calibration",
    "reference_w",
    "score_embedding",
    "similarity_graph",
    "w_scores",
]

RULES = ("bimodal", "harmonic")
#: k of the mutual-kNN sparsification when it is enabled (docs/method.md#calibration)
DEFAULT_KNN = 10
DEFAULT_W_GRID: tuple[float, ...] = tuple(float(w) for w in np.logspace(-1.0, 2.0, 41))
# Share of anchor groups drawn (without replacement) in each bootstrap resample.
DEFAULT_SUBSAMPLE = 0.8
RELATIVE_MARGIN = 0.1  # margin of the "relative" shift, as a share of the larger range
#: how `calibrate` chooses: "checked" (the best-balanced candidate whose retrieval self-check
#: passes) or "balance" (the balance score alone, as the paper; module docstring)
SELECTIONS = ("checked", "balance")
#: grid points per rung of the checked search (1.189^4 ~ a factor 2 in w on the default grid)
CHECK_LADDER = 4
#: candidates the checked search may ask the self-check about, over all layers
DEFAULT_MAX_CHECKS = 40
#: a lost probe kind that says the text half weighs too much (lower w); any other lost kind
#: (the perturbed image, the edit itself) says it weighs too little (higher w)
TEXT_HEAVY_KINDS = ("rephrased",)

ProgressFn = Callable[[str, int], None]
FeatureFn = Callable[[list[Image.Image], list[str], list[str]], Mapping[str, np.ndarray]]
TextFn = Callable[[list[str]], np.ndarray]
#: `check(layer, w)`: the probe kinds the candidate retrieves fewer of than the codebook's
#: current settings (empty: it passes); `Editor.calibrate` asks its own edits back
CheckFn = Callable[[str, float], Sequence[str]]


# --------------------------------------------------------------------------- embedding


def dual_concat(h: np.ndarray, s: np.ndarray, w: float) -> np.ndarray:
    """The dual embedding E = concat(h, w * s) as float32 (docs/method.md#dual-key).

    This is the single definition of how the two halves are combined: the embedding
    module calls it for keys and queries, and calibration composes the same geometry, so
    the w chosen here means the same thing at retrieval. `h` is the pooled VLM activation
    and `s` the sentence embedding; both are (n, d) / (n, e) or 1-D for a single pair.
    """
    h = np.asarray(h, dtype=np.float32)
    s = np.asarray(s, dtype=np.float32)
    if h.shape[:-1] != s.shape[:-1]:
        raise ValueError(f"dual_concat: leading shapes differ: {h.shape} vs {s.shape}")
    return np.concatenate([h, np.float32(w) * s], axis=-1)


# --------------------------------------------------------------------------- graphs


def _sq_dists(x: np.ndarray) -> np.ndarray:
    """Pairwise squared L2 distances in float64, exact zeros on the diagonal.

    Squared distances are kept separate per half so that the distances of the dual
    embedding at any w are d_h^2 + w^2 d_s^2 without recomputing them for each w.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0)  # centring reduces cancellation for activations with large offsets
    sq = np.einsum("ij,ij->i", x, x)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def _mutual_knn_mask(d: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of mutual k-nearest-neighbour pairs (symmetric, false diagonal)."""
    n = d.shape[0]
    k = min(k, n - 1)
    masked = d.copy()
    np.fill_diagonal(masked, np.inf)
    # argpartition is linear per row (a full sort dominated the w sweep); it is
    # deterministic, so ties between duplicate points break the same way every run.
    nbrs = np.argpartition(masked, k - 1, axis=1)[:, :k]
    m = np.zeros((n, n), dtype=bool)
    m[np.repeat(np.arange(n), k), nbrs.ravel()] = True
    return m & m.T


def _graph_from_sq(d2: np.ndarray, knn: int | None) -> np.ndarray:
    n = d2.shape[0]
    if n < 2:
        return np.zeros((n, n))
    d = np.sqrt(d2)
    off = ~np.eye(n, dtype=bool)
    lo, hi = float(d[off].min()), float(d[off].max())
    if hi - lo <= 1e-12 * max(hi, 1e-300):
        # All pairs equally far apart: every pair is equally similar.
        a = off.astype(np.float64)
    else:
        a = (hi - d) / (hi - lo)
        np.fill_diagonal(a, 0.0)
    if knn is not None:
        a *= _mutual_knn_mask(d, knn)
    return a


def similarity_graph(emb: np.ndarray, knn: int | None = None) -> np.ndarray:
    """Dense weighted adjacency of the embeddings' similarity graph (docs/method.md#calibration).

    Weights are min-max scaled L2 similarities (max - d) / (max - min) over the
    off-diagonal pairs, so the closest pair weighs 1 and the farthest 0; the diagonal is 0
    (no self-loops). When all pairs are equally far apart every off-diagonal weight is 1.
    With `knn` (the design's default is `DEFAULT_KNN` = 10) an edge is kept only between
    mutual k-nearest neighbours, which removes the many weak long-range edges that
    otherwise flatten modularity on larger calibration sets.
    """
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"similarity_graph expects an (n, d) array, got shape {emb.shape}")
    if knn is not None and knn < 1:
        raise ValueError(f"knn must be >= 1, got {knn}")
    return _graph_from_sq(_sq_dists(emb), knn)


def modularity(a: np.ndarray, communities: np.ndarray, *, self_pairs: bool = True) -> float:
    """Newman modularity Q = (1/2m) sum_ij (A_ij - k_i k_j / 2m) delta(c_i, c_j).

    `self_pairs=False` leaves the i = j terms out of both the adjacency (its diagonal is
    taken as 0) and the null model (the reference's Q, REFERENCE row 6).

    `a` is a symmetric non-negative weighted adjacency matrix and `communities` holds one
    label (any hashable numpy-able values) per node. Computed per community as
    sum_c [in_c - deg_c^2 / 2m] / 2m, with no Python loop over nodes. The diagonal is used as
    given by the matrix definition (similarity graphs have none). A graph without edges has
    no community structure to measure and gets Q = 0.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"modularity expects a square matrix, got shape {a.shape}")
    labels = np.asarray(communities)
    if labels.shape != (a.shape[0],):
        raise ValueError(f"expected {a.shape[0]} community labels, got shape {labels.shape}")
    if not self_pairs:
        a = a.copy()  # the caller's matrix stays as given
        np.fill_diagonal(a, 0.0)
    deg = a.sum(axis=1)
    two_m = float(deg.sum())
    if two_m <= 0.0:
        return 0.0
    _, inv = np.unique(labels, return_inverse=True)
    inv = inv.ravel()
    within = float(a[inv[:, None] == inv[None, :]].sum())
    deg_c = np.bincount(inv, weights=deg)
    null = float(deg_c @ deg_c) - (0.0 if self_pairs else float(deg @ deg))
    return (within - null / two_m) / two_m


# --------------------------------------------------------------------------- partitions


@dataclass(frozen=True, eq=False)
class CalibrationPair:
    """One calibration image-text pair and the ids that define the three partitions.

    Pairs with the same `image_id` form a vision community, the same `text_id` a language
    community, and the same `group_id` (an anchor and its augmentations) a bimodal one.
    """

    image: Image.Image
    text: str
    image_id: str
    text_id: str
    group_id: str


class Modularities(NamedTuple):
    """Modularity of one embedding under the vision, language and bimodal partitions."""

    q_vis: float
    q_lang: float
    q_bi: float


@dataclass(frozen=True)
class Partitions:
    """Integer community labels per pair for the three partitions."""

    vis: np.ndarray
    lang: np.ndarray
    bi: np.ndarray

    def __len__(self) -> int:
        return int(self.vis.shape[0])

    def subset(self, idx: np.ndarray) -> Partitions:
        return Partitions(self.vis[idx], self.lang[idx], self.bi[idx])


def _meta(item: Any, key: str) -> str:
    """Read an id from a CalibrationPair-like object or from a mapping (e.g. a JSON row)."""
    value = item[key] if isinstance(item, Mapping) else getattr(item, key)
    return str(value)


def partitions(pairs_meta: Sequence[Any]) -> Partitions:
    """The three partitions (same image, same text, same anchor group) of the pairs.

    `pairs_meta` items are `CalibrationPair`s or anything with `image_id`, `text_id` and
    `group_id` attributes or keys; only the ids are read.
    """

    def labels(key: str) -> np.ndarray:
        ids = [_meta(p, key) for p in pairs_meta]
        return np.unique(np.asarray(ids, dtype=object), return_inverse=True)[1].ravel()

    if len(pairs_meta) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Partitions(empty, empty, empty)
    return Partitions(labels("image_id"), labels("text_id"), labels("group_id"))


def _as_partitions(pairs_meta: Sequence[Any] | Partitions) -> Partitions:
    return pairs_meta if isinstance(pairs_meta, Partitions) else partitions(pairs_meta)


def _score_sq(d2: np.ndarray, parts: Partitions, knn: int | None) -> Modularities:
    a = _graph_from_sq(d2, knn)
    return Modularities(
        modularity(a, parts.vis), modularity(a, parts.lang), modularity(a, parts.bi)
    )


def score_embedding(
    emb: np.ndarray, pairs_meta: Sequence[Any] | Partitions, knn: int | None = None
) -> Modularities:
    """Q_vis, Q_lang and Q_bi of the similarity graph of `emb` (one row per pair)."""
    parts = _as_partitions(pairs_meta)
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] != len(parts):
        raise ValueError(f"expected ({len(parts)}, d) embeddings, got shape {emb.shape}")
    if knn is not None and knn < 1:
        raise ValueError(f"knn must be >= 1, got {knn}")
    return _score_sq(_sq_dists(emb), parts, knn)


def balance_score(q_vis: float, q_lang: float, shift: float = 1.0) -> float:
    """Harmonic mean of the shifted modularities (q_vis + shift) and (q_lang + shift).

    For one embedding on its own only a fixed shift makes sense; the default 1 keeps both
    terms positive because Newman modularity is at least -1/2. Tables of candidates use
    `add_balance`, whose default shift is relative to the candidates.
    """
    a, b = q_vis + shift, q_lang + shift
    if a <= 0.0 or b <= 0.0:
        raise ValueError(f"shifted modularities must be positive, got {a} and {b}")
    return float(2.0 * a * b / (a + b))


def add_balance(table: list[dict[str, Any]], shift: float | str = "relative") -> None:
    """Set each row's "harmonic" to the balance score of its q_vis and q_lang, in place.

    `shift` is "relative" or a number (see the module docstring). The relative shift is
    taken over the rows given, so scores are comparable within one table only.
    """
    if not table:
        return
    qv = np.array([row["q_vis"] for row in table], dtype=np.float64)
    ql = np.array([row["q_lang"] for row in table], dtype=np.float64)
    if shift == "relative":
        spread = max(float(np.ptp(qv)), float(np.ptp(ql)))
        margin = RELATIVE_MARGIN * spread if spread > 0.0 else 1.0
        a, b = qv - qv.min() + margin, ql - ql.min() + margin
    elif isinstance(shift, (int, float)) and not isinstance(shift, bool):
        a, b = qv + shift, ql + shift
        if (a <= 0.0).any() or (b <= 0.0).any():
            raise UsageError(f"shift {shift} leaves a modularity non-positive; use a larger one")
    else:
        raise UsageError(f"shift must be 'relative' or a number, got {shift!r}")
    for row, h in zip(table, 2.0 * a * b / (a + b), strict=True):
        row["harmonic"] = float(h)


# --------------------------------------------------------------------------- selection


def _resamples(groups: np.ndarray, bootstrap: int, seed: int, subsample: float) -> list[np.ndarray]:
    """Index sets of the bootstrap resamples, drawn by whole anchor groups.

    Groups are drawn, not single pairs, so an anchor always comes with its augmentations
    (otherwise Q_bi would measure broken groups). They are drawn without replacement
    (m-out-of-n subsampling): drawing a group twice would add duplicate nodes at distance
    zero, the strongest possible edges, and inflate every modularity. `bootstrap` = 0 means
    a single evaluation on all pairs. The same resamples are used for every layer and
    every w, so their scores are compared on identical data.
    """
    n = groups.shape[0]
    if bootstrap <= 0:
        return [np.arange(n)]
    n_groups = int(groups.max()) + 1
    size = min(n_groups, max(2, round(subsample * n_groups)))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(bootstrap):
        chosen = rng.choice(n_groups, size=size, replace=False)
        out.append(np.flatnonzero(np.isin(groups, chosen)))
    return out


def _mean_scores(
    d2_h: np.ndarray,
    d2_s: np.ndarray,
    w: float,
    parts: Partitions,
    resamples: list[np.ndarray],
    knn: int | None,
) -> dict[str, float]:
    """Mean and spread of Q_vis, Q_lang, Q_bi of concat(h, w s) over the resamples."""
    rows = []
    for idx in resamples:
        sub = np.ix_(idx, idx)
        rows.append(_score_sq(d2_h[sub] + (w * w) * d2_s[sub], parts.subset(idx), knn))
    arr = np.asarray(rows, dtype=np.float64)
    mean, std = arr.mean(axis=0), arr.std(axis=0)
    out: dict[str, float] = {}
    for i, key in enumerate(Modularities._fields):
        out[key] = float(mean[i])
    for i, key in enumerate(Modularities._fields):
        out[f"{key}_std"] = float(std[i])
    return out


def _reference_w_sq(d2_h: np.ndarray, d2_s: np.ndarray) -> float:
    mean_s = float(d2_s.mean())
    if mean_s <= 0.0:
        return 1.0
    ref = float(np.sqrt(d2_h.mean() / mean_s))
    return ref if ref > 0.0 else 1.0


def reference_w(h: np.ndarray, s: np.ndarray) -> float:
    """The w at which both halves of the dual embedding spread equally.

    sqrt(mean pairwise d_h^2 / mean pairwise d_s^2): at this w the two halves contribute
    the same mean squared distance, so neither dominates the graph. Layers are compared
    at their own reference w because raw activation scales differ by orders of magnitude
    across vision blocks, the merger and decoder blocks; a fixed w (say 1) would compare
    "mostly h" at one layer with "mostly S" at another. The spread is used rather than the
    norm because decoder activations carry a large shared offset that adds to every norm
    but to no distance. Falls back to 1 when either half does not vary.
    """
    return _reference_w_sq(_sq_dists(h), _sq_dists(s))


def _check_options(bootstrap: int, knn: int | None, subsample: float) -> None:
    if bootstrap < 0:
        raise UsageError(f"bootstrap must be >= 0, got {bootstrap}")
    if knn is not None and knn < 1:
        raise UsageError(f"knn must be >= 1, got {knn}")
    if not 0.0 < subsample <= 1.0:
        raise UsageError(f"subsample must be in (0, 1], got {subsample}")


def layer_scores(
    features: Mapping[str, np.ndarray],
    text_emb: np.ndarray,
    pairs_meta: Sequence[Any] | Partitions,
    *,
    bootstrap: int = 5,
    knn: int | None = None,
    seed: int = 0,
    subsample: float = DEFAULT_SUBSAMPLE,
    shift: float | str = "relative",
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """One row per layer: modularities of the dual embedding at the layer's reference w.

    Rows hold layer, w_ref, the bootstrap means of q_vis, q_lang and q_bi, their standard
    deviations over the resamples (q_vis_std, ...), and harmonic, the balance score of the
    means (`add_balance` with `shift`, relative to the layers given).
    """
    _check_options(bootstrap, knn, subsample)
    parts = _as_partitions(pairs_meta)
    d2_s = _sq_dists(text_emb)
    resamples = _resamples(parts.bi, bootstrap, seed, subsample)
    table = []
    for name, h in features.items():
        d2_h = _sq_dists(h)
        w_ref = _reference_w_sq(d2_h, d2_s)
        row = {"layer": name, "w_ref": w_ref}
        row.update(_mean_scores(d2_h, d2_s, w_ref, parts, resamples, knn))
        table.append(row)
        if progress is not None:
            progress(f"scored layer {name}", 1)
    add_balance(table, shift)
    return table


def pick_layer(table: Sequence[Mapping[str, Any]], rule: str = "bimodal") -> str:
    """The layer with the highest q_bi ("bimodal") or balance score ("harmonic").

    Ties go to the earliest layer in the table, i.e. the order the caller listed them.
    """
    if rule not in RULES:
        raise UsageError(f"unknown calibration rule {rule!r}; choose one of {', '.join(RULES)}")
    if not table:
        raise ReasonEditError("no layers to choose from")
    key = "q_bi" if rule == "bimodal" else "harmonic"
    return str(table[int(np.argmax([row[key] for row in table]))]["layer"])


def _check_grid(w_grid: Sequence[float] | None) -> list[float]:
    grid = list(DEFAULT_W_GRID if w_grid is None else w_grid)
    if not grid or not all(np.isfinite(w) and w > 0 for w in grid):
        raise UsageError("the w grid must be a non-empty list of positive numbers")
    return [float(w) for w in grid]


def w_scores(
    h: np.ndarray,
    text_emb: np.ndarray,
    pairs_meta: Sequence[Any] | Partitions,
    w_grid: Sequence[float] | None = None,
    *,
    bootstrap: int = 5,
    knn: int | None = None,
    seed: int = 0,
    subsample: float = DEFAULT_SUBSAMPLE,
    shift: float | str = "relative",
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """One row per w of the grid: bootstrap-mean modularities of concat(h, w s).

    Row keys as in `layer_scores` (w instead of layer and w_ref); harmonic is relative to
    the grid given.
    The grid defaults to `DEFAULT_W_GRID` (41 log-spaced points, 0.1..100,
    docs/method.md#calibration).
    Pairwise distances of each half are computed once; each w only recombines them.
    """
    _check_options(bootstrap, knn, subsample)
    grid = _check_grid(w_grid)
    parts = _as_partitions(pairs_meta)
    d2_h, d2_s = _sq_dists(h), _sq_dists(text_emb)
    resamples = _resamples(parts.bi, bootstrap, seed, subsample)
    table = []
    for w in grid:
        row: dict[str, Any] = {"w": w}
        row.update(_mean_scores(d2_h, d2_s, w, parts, resamples, knn))
        table.append(row)
        if progress is not None:
            progress(f"scored w={w:.3g}", 1)
    add_balance(table, shift)
    return table


class _Budget:
    """Checks left to the checked search, shared by every layer it tries."""

    def __init__(self, n: int) -> None:
        self.left = n


def checked_w(
    w_table: Sequence[Mapping[str, Any]],
    check: Callable[[float], Sequence[str]],
    *,
    ladder: int = CHECK_LADDER,
    budget: _Budget | None = None,
    trail: list[dict[str, Any]] | None = None,
) -> int | None:
    """Index of the best-balanced w of `w_table` whose retrieval check passes, or None.

    The balance score alone can end where retrieval fails (issue #18: on the scenes VLM
    it chose a w at which no rephrased question found its edit). So the search starts at
    the w of the highest balance, the paper's choice, and moves away from it only as far
    as the check demands. A lost rephrased question means the text half weighs too much,
    so it steps down the grid, `ladder` points at a time (about x0.5 in w). Any other lost
    kind (a perturbed image, the edit itself) means it weighs too little, so it steps up.
    At the first rung that passes, or that fails the other way, it checks the points
    in between from the one nearest the peak, so the first that passes is the one with
    the highest balance on that side. A layer can fail both ways at every w; then
    there is no w, and the result is None. Every check is appended to `trail` as
    {w, w_rel, harmonic, lost}.
    Assumes rephrased retrieval falls and perturbed retrieval rises with w, which held
    on every layer measured (docs/evaluation.md).
    """
    budget = budget if budget is not None else _Budget(len(w_table))
    n = len(w_table)
    seen: dict[int, list[str]] = {}

    def lost(i: int) -> list[str] | None:
        if i not in seen:
            if budget.left <= 0:
                return None
            budget.left -= 1
            seen[i] = list(check(float(w_table[i]["w"])))
            if trail is not None:
                row = w_table[i]
                trail.append(
                    {
                        "w": float(row["w"]),
                        "w_rel": row.get("w_rel"),
                        "harmonic": float(row["harmonic"]),
                        "lost": seen[i],
                    }
                )
        return seen[i]

    def heavy(kinds: Sequence[str]) -> bool:
        return any(k in TEXT_HEAVY_KINDS for k in kinds)

    if n == 0:
        return None
    start = int(np.argmax([row["harmonic"] for row in w_table]))
    first = lost(start)
    if first is None:
        return None
    if not first:
        return start
    step = -1 if heavy(first) else 1
    prev = start
    while True:
        j = min(n - 1, max(0, prev + step * ladder))
        if j == prev:
            return None
        at_j = lost(j)
        if at_j is None:
            return None
        flipped = bool(at_j) and heavy(at_j) != (step == -1)
        if not at_j or flipped:
            for k in range(prev + step, j, step):
                at_k = lost(k)
                if at_k is None:
                    return None
                if not at_k:
                    return k
            return None if at_j else j
        prev = j


@dataclass
class CalibrationResult:
    """The chosen layer and w, with the tables that justify them."""

    layer: str
    w: float
    rule: str
    layer_table: list[dict[str, Any]]
    w_table: list[dict[str, Any]]
    n_pairs: int
    n_groups: int = 0
    bootstrap: int = 0
    knn: int | None = None
    seed: int = 0
    shift: float | str = "relative"
    # True when the best w is the first or last grid point: the optimum may lie outside.
    w_at_grid_edge: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (plain str/int/float/bool/None) for the manifest and --json."""

        def clean(v: Any) -> Any:
            if isinstance(v, dict):
                return {str(k): clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if isinstance(v, (bool, np.bool_)):
                return bool(v)
            if isinstance(v, (int, np.integer)):
                return int(v)
            if isinstance(v, (float, np.floating)):
                return float(v) if np.isfinite(v) else None
            return v if v is None or isinstance(v, str) else str(v)

        return clean(
            {
                "layer": self.layer,
                "w": self.w,
                "rule": self.rule,
                "n_pairs": self.n_pairs,
                "n_groups": self.n_groups,
                "bootstrap": self.bootstrap,
                "knn": self.knn,
                "seed": self.seed,
                "shift": self.shift,
                "w_at_grid_edge": self.w_at_grid_edge,
                "layer_table": self.layer_table,
                "w_table": self.w_table,
                **self.extra,
            }
        )


def calibration_steps(n_layers: int, n_w: int = len(DEFAULT_W_GRID)) -> int:
    """Total progress advance `calibrate` reports, for sizing a progress bar."""
    return 2 + n_layers + n_w


def _checked_features(
    raw: Mapping[str, np.ndarray], layers: Sequence[str], n: int
) -> dict[str, np.ndarray]:
    out = {}
    for name in layers:
        if name not in raw:
            raise ReasonEditError(f"the model returned no features for layer {name!r}")
        arr = np.asarray(raw[name], dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise ReasonEditError(
                f"features of layer {name!r} have shape {arr.shape}, expected ({n}, d)"
            )
        if not np.isfinite(arr).all():
            raise ReasonEditError(
                f"features of layer {name!r} contain NaN or inf (try a float32 `dtype`)"
            )
        out[name] = arr
    return out


def calibrate(
    pairs: Sequence[CalibrationPair],
    feature_fn: FeatureFn,
    text_fn: TextFn,
    layers: Sequence[str],
    *,
    rule: str = "bimodal",
    w_grid: Sequence[float] | None = None,
    bootstrap: int = 5,
    knn: int | None = None,
    seed: int = 0,
    shift: float | str = "relative",
    progress: ProgressFn | None = None,
    check: CheckFn | None = None,
    max_checks: int = DEFAULT_MAX_CHECKS,
) -> CalibrationResult:
    """Choose the layer and w for the dual embedding from calibration pairs
    (docs/method.md#calibration).

    `feature_fn(images, texts, layers)` returns the VLM's pooled hooked inputs for all
    `layers` in one pass ({layer: (n, d)}), so the model runs once, not once per layer.
    `text_fn(texts)` returns sentence embeddings; it is called once per distinct text.
    The layer is chosen at each layer's `reference_w` by `rule`, then w over `w_grid` by
    the balance score; everything is averaged over `bootstrap` resamples of anchor groups
    (seeded by `seed`). `shift` is the balance score's shift (module docstring).
    `progress(description, advance)` is called `calibration_steps` times in total
    (checks report an advance of 0).

    With `check` (selection "checked"), the balance score ranks the candidates and the
    check decides among them: the layers in the order of `rule`, and on each the
    best-balanced w that passes `check(layer, w)` (`checked_w`); the first layer that has
    one gives the choice. At most `max_checks` candidates are checked. The paper's choice
    and every check are in `extra["selection"]`; when nothing passes, the result is the
    paper's choice (the caller's self-check then refuses it).
    """
    if rule not in RULES:
        raise UsageError(f"unknown calibration rule {rule!r}; choose one of {', '.join(RULES)}")
    _check_options(bootstrap, knn, DEFAULT_SUBSAMPLE)
    grid = _check_grid(w_grid)
    add_balance([{"q_vis": 0.0, "q_lang": 0.0}], shift)  # reject a bad shift before the model runs
    layers = list(layers)
    if not layers:
        raise UsageError("give at least one candidate layer")
    if len(set(layers)) != len(layers):
        raise UsageError("candidate layers must be distinct")
    parts = partitions(pairs)
    n_groups = int(parts.bi.max()) + 1 if len(parts) else 0
    if n_groups < 2:
        raise ReasonEditError(
            f"calibration needs pairs from at least 2 anchor groups, got {n_groups}"
        )

    def step(msg: str, advance: int = 1) -> None:
        if progress is not None:
            progress(msg, advance)

    images = [p.image for p in pairs]
    texts = [p.text for p in pairs]
    feats = _checked_features(feature_fn(images, texts, layers), layers, len(pairs))
    step("embedded calibration pairs with the VLM")

    # Sentence embeddings depend on the text alone: embed each distinct text once.
    uniq, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    s_uniq = np.asarray(text_fn([str(t) for t in uniq]), dtype=np.float64)
    if s_uniq.ndim != 2 or s_uniq.shape[0] != len(uniq) or not np.isfinite(s_uniq).all():
        raise ReasonEditError(
            f"text embeddings have shape {s_uniq.shape} or non-finite values; "
            f"expected ({len(uniq)}, d)"
        )
    s = s_uniq[inverse.ravel()]
    step("embedded calibration texts")

    layer_table = layer_scores(
        feats,
        s,
        parts,
        bootstrap=bootstrap,
        knn=knn,
        seed=seed,
        shift=shift,
        progress=progress,
    )
    layer = pick_layer(layer_table, rule)

    def sweep(name: str, report: ProgressFn | None) -> list[dict[str, Any]]:
        # The grid is relative to the layer's reference w (equal spread of both halves):
        # activation scales differ by orders of magnitude across layers and models, so an
        # absolute 0.1..100 would cover only "all vision" on one model and "all text" on
        # another.
        w_ref = next(float(r["w_ref"]) for r in layer_table if r["layer"] == name)
        table = w_scores(
            feats[name],
            s,
            parts,
            [g * w_ref for g in grid],
            bootstrap=bootstrap,
            knn=knn,
            seed=seed,
            shift=shift,
            progress=report,
        )
        for g, row in zip(grid, table):
            row["w_rel"] = float(g)
        return table

    w_table = sweep(layer, progress)
    best = int(np.argmax([row["harmonic"] for row in w_table]))
    extra: dict[str, Any] = {}
    if check is not None:
        if max_checks < 1:
            raise UsageError(f"max_checks must be >= 1, got {max_checks}")
        paper = {"layer": layer, "w": float(w_table[best]["w"])}
        budget = _Budget(max_checks)
        key = "q_bi" if rule == "bimodal" else "harmonic"
        # stable: ties keep the caller's layer order, as pick_layer breaks them
        order = sorted(layer_table, key=lambda row: -float(row[key]))
        tried: list[dict[str, Any]] = []
        chosen: tuple[str, list[dict[str, Any]], int] | None = None
        for row in order:
            name = str(row["layer"])
            table = w_table if name == layer else sweep(name, None)
            trail: list[dict[str, Any]] = []
            at = checked_w(table, partial(check, name), budget=budget, trail=trail)
            tried.append({"layer": name, "checks": trail, "passed": at is not None})
            step(f"checked layer {name}", 0)
            if at is not None:
                chosen = (name, table, at)
                break
            if budget.left <= 0:
                break
        if chosen is not None:
            layer, w_table, best = chosen
        extra["selection"] = {
            "select": "checked",
            "paper": paper,
            "passed": chosen is not None,
            "n_checks": max_checks - budget.left,
            "max_checks": max_checks,
            "tried": tried,
        }
    return CalibrationResult(
        layer=layer,
        w=float(w_table[best]["w"]),
        rule=rule,
        layer_table=layer_table,
        w_table=w_table,
        n_pairs=len(pairs),
        n_groups=n_groups,
        bootstrap=bootstrap,
        knn=knn,
        seed=seed,
        shift=shift,
        w_at_grid_edge=len(grid) > 1 and best in (0, len(grid) - 1),
        extra=extra,
    )


# --------------------------------------------------------------------------- pairs


def _image_id(img: Image.Image) -> str:
    """Content address of an image: identical pixels give the same id."""
    h = hashlib.sha256()
    h.update(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    return "img-" + h.hexdigest()[:16]


def _text_id(text: str) -> str:
    return "txt-" + hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


def build_pairs(
    items: Sequence[tuple[Image.Image, str]],
    augment: Augmenter | None = None,
    *,
    n_aug: int = 1,
    max_pairs: int | None = None,
    seed: int = 0,
) -> list[CalibrationPair]:
    """Calibration pairs: each (image, text) anchor plus its augmentations.

    Per anchor and per augmentation round: the text rephrased with the same image, the
    image perturbed with the same text, and both perturbed, all in the anchor's group; so
    a group holds 1 + 3 * n_aug pairs. Ids are content hashes, so anchors that share an
    image (several questions about one picture) or a text (one question about several
    pictures) share image_id / text_id, which is what gives Q_vis and Q_lang their signal.
    Duplicate anchors are dropped. `max_pairs` caps the total by a seeded sample of whole
    anchors. Each anchor's augmentations use their own seed derived from `seed` and the
    anchor's position, so capping does not change the augmentations of the kept anchors.
    """
    if n_aug < 0:
        raise UsageError(f"n_aug must be >= 0, got {n_aug}")
    aug = augment if augment is not None else Augmenter()
    per_anchor = 1 + 3 * n_aug

    anchors: list[tuple[int, Image.Image, str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    for pos, (img, text) in enumerate(items):
        iid, tid = _image_id(img), _text_id(text)
        if (iid, tid) not in seen:
            seen.add((iid, tid))
            anchors.append((pos, img, text, iid, tid))

    if max_pairs is not None:
        keep = max_pairs // per_anchor
        if keep < 1:
            raise UsageError(
                f"max_pairs={max_pairs} cannot hold one anchor with its augmentations "
                f"({per_anchor} pairs)"
            )
        if keep < len(anchors):
            chosen = np.random.default_rng(seed).choice(len(anchors), size=keep, replace=False)
            anchors = [anchors[i] for i in sorted(chosen)]

    pairs: list[CalibrationPair] = []
    for pos, img, text, iid, tid in anchors:
        group = f"grp-{iid[4:12]}{tid[4:12]}"
        pairs.append(CalibrationPair(img, text, iid, tid, group))
        rng = np.random.default_rng([seed, pos])
        for _ in range(n_aug):
            new_text = aug.text(text, rng)
            new_img = aug.image(img, rng)
            ntid, niid = _text_id(new_text), _image_id(new_img)
            pairs.append(CalibrationPair(img, new_text, iid, ntid, group))
            pairs.append(CalibrationPair(new_img, text, niid, tid, group))
            pairs.append(CalibrationPair(new_img, new_text, niid, ntid, group))
    return pairs


# --------------------------------------------------------------------------- plot


def plot_calibration(result: CalibrationResult, path: str | Path) -> Path:
    """Write a PNG: modularities against layer (left) and against w (right, log x).

    Uses matplotlib's object API with the Agg canvas, imported here, so the CLI's startup
    does not pay for matplotlib and no global pyplot backend is switched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_l, ax_w = fig.subplots(1, 2)
    series = (
        ("q_vis", "Q_vis (same image)"),
        ("q_lang", "Q_lang (same text)"),
        ("q_bi", "Q_bi (anchor + augmentations)"),
    )

    names = [str(r["layer"]) for r in result.layer_table]
    x = np.arange(len(names))
    for key, label in series:
        ax_l.plot(x, [r[key] for r in result.layer_table], marker="o", label=label)
    if result.layer in names:
        ax_l.axvline(names.index(result.layer), color="grey", ls="--", lw=1)
    ax_l.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax_l.set_ylabel("modularity")
    ax_l.set_title(f"layers (rule: {result.rule}; chosen {result.layer})")
    ax_l.legend(fontsize=8)

    ws = [r["w"] for r in result.w_table]
    for key, label in series:
        ax_w.plot(ws, [r[key] for r in result.w_table], label=label)
    ax_b = ax_w.twinx()  # the balance score has its own scale
    ax_b.plot(ws, [r["harmonic"] for r in result.w_table], color="black", ls=":")
    ax_b.set_ylabel("balance score (dotted)")
    ax_w.axvline(result.w, color="grey", ls="--", lw=1)
    ax_w.set_xscale("log")
    ax_w.set_xlabel("w (text weight)")
    ax_w.set_title(f"w sweep at {result.layer} (chosen w={result.w:.3g})")
    ax_w.legend(fontsize=8)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path
