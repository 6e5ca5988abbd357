"""The authors' calibration (REFERENCE rows 4-8), next to ours in `calibration`.

The published code (`ModularityCore`, `AutoLayer`, `AutoScaler` of JiaxingQiu/reasonedit)
calibrates differently from `calibration.calibrate` in five ways; this module implements
each as a small function with the reference's conventions, and `calibrate_reference`
composes them. Re-implemented from the behaviour, not copied.

* **Layout (row 4).** Each run draws `n` samples (image_i, text_i), default 10, and embeds
  every image with every text: n x n pairs in the order p = i * n + j for
  (image i, text j) (`nxn_layout`). Q_vis groups the pairs by image index i, Q_lang by
  text index j -- by sample index, not by content. Q_bi uses a second node set
  (`bimodal_layout`): every anchor (image_i, text_i) with 2(n - 1) augmentations (image
  and text both augmented), labelled as one community, followed by the cross pairs
  (image_i, text_j), i != j, unaugmented, each its own community (the reference's "and"
  target: same image AND same text).
* **Similarity and Q (row 6).** `reference_similarity`: L2 distances min-max scaled over
  the whole matrix, the zero diagonal included, so `A = (max - d) / max`.
  `reference_modularity`: Newman Q with the i = j terms left out of both the adjacency and
  the null model, `Q = sum_{i != j} (A_ij - k_i k_j / 2m) delta(c_i, c_j) / 2m` with
  `k_i = sum_{j != i} A_ij` and `2m = sum_i k_i`.
* **Shift and balance (row 5).** Per run, both Q_vis and Q_lang of every candidate are
  shifted by ONE global minimum (the smallest of all of them in that run), and the score
  is their harmonic mean, 0 when either shifted value is not positive
  (`reference_harmonic`).
* **Aggregation (rows 5, 8).** `n_runs` (10) runs with fresh samples and fresh
  augmentations; the candidate with the highest MEAN over runs of the per-run scores
  wins, the first on ties (`reference_choice`).
* **Layer scoring (row 7).** Layers are scored on the hooked activation alone (no text
  half), by the same shifted harmonic; w is then swept at the chosen layer over the
  reference's absolute grid `REFERENCE_W_GRID` (41 log-spaced values 0.1..100, rounded as
  the reference rounds them: 2 decimals below 1, 1 below 10, integers above).

Where the published code is not self-consistent we say which reading is implemented:
`AutoScaler.get_best_from_agg` reads the unshifted per-run harmonic from its saved runs
although `search` picks the per-run best by the shifted one; `aggregate_key="shifted"`
(default, what REFERENCE.md row 5 describes) averages the shifted scores and
`aggregate_key="raw"` the unshifted ones (2 q_vis q_lang / (q_vis + q_lang) when both are
positive, else 0). The reference draws fresh augmentations for every w; here one run's
augmentations are shared by every w of the grid (the same draw, less noise). `AutoLayer`'s
own Q_bi also augments the cross pairs' images; the layer choice does not use Q_bi, and
the layer table reports it on the `bimodal_layout` of the w sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from reasonedit_cli.augment import Augmenter
from reasonedit_cli.errors import ReasonEditError, UsageError

__all__ = [
    "DEFAULT_N_RUNS",
    "DEFAULT_N_SAMPLES",
    "REFERENCE_W_GRID",
    "bimodal_layout",
    "calibrate_reference",
    "nxn_layout",
    "reference_harmonic",
    "reference_choice",
    "reference_modularity",
    "reference_scores",
    "reference_similarity",
    "reference_w_grid",
]

DEFAULT_N_RUNS = 10  # AutoScaler/AutoLayer bootstrap runs (run/auto_scaler.py n_runs)
DEFAULT_N_SAMPLES = 10  # samples per run (n_samples)

FeatureFn = Callable[[list[Image.Image], list[str], list[str]], Mapping[str, np.ndarray]]
TextFn = Callable[[list[str]], np.ndarray]
ProgressFn = Callable[[str, int], None]


def reference_w_grid() -> list[float]:
    """The reference's default lang_scaler grid: np.logspace(-1, 2, 41) rounded to 2
    decimals below 1, 1 decimal below 10 and to integers from 10, duplicates removed
    (ascending)."""
    raw = np.logspace(-1.0, 2.0, 41)
    rounded = np.where(
        raw < 1, np.round(raw, 2), np.where(raw < 10, np.round(raw, 1), np.round(raw, 0))
    )
    return [float(x) for x in np.unique(rounded)]


REFERENCE_W_GRID: tuple[float, ...] = tuple(reference_w_grid())


# --------------------------------------------------------------------------- graph and Q


def reference_similarity(emb: np.ndarray) -> np.ndarray:
    """Min-max scaled L2 similarity over the WHOLE distance matrix, diagonal included.

    `A_ij = (max - d_ij) / (max - min)` where max and min run over all n^2 entries; the
    diagonal distances are 0, so min = 0 and `A = 1 - d / max` (the diagonal is 1; Q
    ignores it). All ones when max - min < 1e-8 (identical embeddings). float64.
    """
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an (n, d) array, got shape {x.shape}")
    x = x - x.mean(axis=0)  # distances unchanged; less cancellation in the expansion
    sq = np.einsum("ij,ij->i", x, x)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0))
    np.fill_diagonal(d, 0.0)
    hi, lo = float(d.max()), float(d.min())
    if hi - lo < 1e-8:
        return np.ones_like(d)
    return (hi - d) / (hi - lo)


def reference_modularity(a: np.ndarray, communities: Sequence[Any] | np.ndarray) -> float:
    """Newman modularity without the i = j terms (REFERENCE row 6).

    The diagonal of `a` is set to 0; `k_i = sum_{j != i} A_ij`, `2m = sum_i k_i`;
    `Q = sum_{i != j, c_i = c_j} (A_ij - k_i k_j / 2m) / 2m`. Compared with the textbook Q
    (`calibration.modularity`, which keeps the i = j null-model terms -k_i^2 / 2m), this
    is higher by sum_i k_i^2 / (2m)^2, about 1/N on a dense graph. 0 for a graph without
    edges.
    """
    from reasonedit_cli.calibration import modularity

    return modularity(a, np.asarray(communities), self_pairs=False)


# --------------------------------------------------------------------------- layouts


def nxn_layout(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(image index, text index) of the n x n pairs, p = i * n + j for (image i, text j)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    idx = np.arange(n * n)
    return idx // n, idx % n


def bimodal_layout(n: int, n_aug: int | None = None) -> list[tuple[int, int, int]]:
    """The Q_bi node set as (image index, text index, augmentation number) per node.

    First each anchor i in order with its augmentations: (i, i, 0) is the anchor itself,
    (i, i, a) for a = 1..n_aug are augmented copies (image and text both augmented);
    n_aug defaults to 2(n - 1), the number of same-image or same-text partners a pair has
    in the n x n layout. Then the cross pairs (i, j, 0), i != j, in row-major order,
    unaugmented. The bimodal community of a node is its (image, text) pair: anchor plus
    augmentations form one community, every cross pair is a singleton.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    k = 2 * (n - 1) if n_aug is None else int(n_aug)
    nodes = [(i, i, a) for i in range(n) for a in range(1 + k)]
    nodes += [(i, j, 0) for i in range(n) for j in range(n) if i != j]
    return nodes


def bimodal_labels(nodes: Sequence[tuple[int, int, int]], n: int) -> np.ndarray:
    """Community label i * n + j of each `bimodal_layout` node (image i, text j)."""
    return np.asarray([i * n + j for i, j, _ in nodes], dtype=np.int64)


def reference_scores(
    emb_nxn: np.ndarray,
    n: int,
    emb_bimodal: np.ndarray | None = None,
    bimodal_nodes: Sequence[tuple[int, int, int]] | None = None,
) -> dict[str, float]:
    """q_vis, q_lang (on the n x n embeddings) and q_bi (on the bimodal set, if given).

    `emb_nxn` has one row per `nxn_layout(n)` pair; `emb_bimodal` one row per
    `bimodal_layout` node (`bimodal_nodes`, default `bimodal_layout(n)`). Each Q is
    `reference_modularity` of `reference_similarity` of its embeddings.
    """
    emb_nxn = np.asarray(emb_nxn)
    if emb_nxn.shape[0] != n * n:
        raise ValueError(f"expected {n * n} n x n embeddings, got {emb_nxn.shape[0]}")
    a = reference_similarity(emb_nxn)
    img, txt = nxn_layout(n)
    out = {
        "q_vis": reference_modularity(a, img),
        "q_lang": reference_modularity(a, txt),
        "q_bi": float("nan"),
    }
    if emb_bimodal is not None:
        nodes = list(bimodal_layout(n) if bimodal_nodes is None else bimodal_nodes)
        out["q_bi"] = reference_modularity(
            reference_similarity(emb_bimodal), bimodal_labels(nodes, n)
        )
    return out


# --------------------------------------------------------------------------- selection


def reference_harmonic(q_vis: Sequence[float], q_lang: Sequence[float]) -> np.ndarray:
    """One run's balance score of each candidate (REFERENCE row 5).

    Both modularities of every candidate are shifted by ONE global minimum,
    `g = min(min(q_vis), min(q_lang))`; the score is `2 v l / (v + l)` of
    `v = q_vis - g`, `l = q_lang - g`, and 0 unless both are > 0 (so the candidate holding
    the global minimum scores 0).
    """
    qv = np.asarray(q_vis, dtype=np.float64)
    ql = np.asarray(q_lang, dtype=np.float64)
    if qv.shape != ql.shape or qv.ndim != 1 or qv.size == 0:
        raise ValueError("q_vis and q_lang must be non-empty 1-D arrays of one length")
    g = min(float(qv.min()), float(ql.min()))
    v, lang = qv - g, ql - g
    ok = (v > 0) & (lang > 0)
    out = np.zeros_like(v)
    out[ok] = 2.0 * v[ok] * lang[ok] / (v[ok] + lang[ok])
    return out


def raw_harmonic(q_vis: Sequence[float], q_lang: Sequence[float]) -> np.ndarray:
    """The unshifted score: 2 q_vis q_lang / (q_vis + q_lang) when both > 0, else 0."""
    qv = np.asarray(q_vis, dtype=np.float64)
    ql = np.asarray(q_lang, dtype=np.float64)
    ok = (qv > 0) & (ql > 0)
    out = np.zeros_like(qv)
    out[ok] = 2.0 * qv[ok] * ql[ok] / (qv[ok] + ql[ok])
    return out


def reference_choice(per_run_scores: np.ndarray) -> int:
    """Index of the candidate with the highest mean over runs (rows) of the per-run
    scores; the first such candidate on ties (REFERENCE rows 5, 8)."""
    s = np.asarray(per_run_scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"expected a (runs, candidates) array, got shape {s.shape}")
    return int(np.argmax(s.mean(axis=0)))


# --------------------------------------------------------------------------- calibrate


def _sample_run(
    items: Sequence[tuple[Image.Image, str]], n: int, rng: np.random.Generator
) -> list[tuple[Image.Image, str]]:
    idx = rng.choice(len(items), size=n, replace=False)
    return [items[int(i)] for i in idx]


def _run_inputs(
    samples: Sequence[tuple[Image.Image, str]],
    aug: Augmenter,
    rng: np.random.Generator,
    with_bimodal: bool,
) -> tuple[list[Image.Image], list[str], list[tuple[int, int, int]], list[int]]:
    """Images and texts of one run: the n x n pairs, then the augmented bimodal nodes.

    Returns (images, texts, bimodal nodes, row of each bimodal node in images/texts): the
    anchors and cross pairs of the bimodal set are n x n pairs already and reuse their
    rows; only the augmented copies are new inputs.
    """
    n = len(samples)
    images = [samples[i][0] for i in range(n) for _ in range(n)]
    texts = [samples[j][1] for _ in range(n) for j in range(n)]
    nodes = bimodal_layout(n) if with_bimodal else []
    rows = []
    for i, j, a in nodes:
        if a == 0:
            rows.append(i * n + j)
            continue
        images.append(aug.image(samples[i][0], rng))
        texts.append(aug.text(samples[i][1], rng))
        rows.append(len(images) - 1)
    return images, texts, nodes, rows


def _summary(rows: list[dict[str, float]], scores: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("q_vis", "q_lang", "q_bi"):
        vals = np.asarray([r[key] for r in rows], dtype=np.float64)
        out[key] = float(np.mean(vals))
        out[f"{key}_std"] = float(np.std(vals))
    out["harmonic"] = float(np.mean(scores))
    out["harmonic_std"] = float(np.std(scores))
    return out


def calibrate_reference(
    items: Sequence[tuple[Image.Image, str]],
    feature_fn: FeatureFn,
    text_fn: TextFn,
    layers: Sequence[str],
    *,
    n_runs: int = DEFAULT_N_RUNS,
    n_samples: int = DEFAULT_N_SAMPLES,
    w_grid: Sequence[float] | None = None,
    seed: int = 0,
    augment: Augmenter | None = None,
    aggregate_key: str = "shifted",
    progress: ProgressFn | None = None,
) -> Any:
    """Choose the layer and w as the authors' code does (module docstring).

    `items` are the anchor (image, text) samples to draw from (an edit's image with its
    question, as the reference samples dataset questions). Layers: `n_runs` runs, each
    with `n_samples` fresh samples; every layer's hooked activation alone is scored on the
    run's n x n pairs (q_vis, q_lang; q_bi on the bimodal set) and the layer with the best
    mean of per-run `reference_harmonic` wins. w: `n_runs` further runs with fresh samples
    and augmentations at the chosen layer, concat(h, w * S(t)) for each w of `w_grid`
    (default `REFERENCE_W_GRID`, absolute values), chosen the same way. Returns a
    `calibration.CalibrationResult` (rule "harmonic", shift "global").
    """
    from reasonedit_cli.calibration import CalibrationResult, dual_concat

    if aggregate_key not in ("shifted", "raw"):
        raise UsageError(f"aggregate_key must be 'shifted' or 'raw', got {aggregate_key!r}")
    if n_runs < 1:
        raise UsageError(f"the reference calibration needs >= 1 run, got {n_runs}")
    layers = list(layers)
    if not layers or len(set(layers)) != len(layers):
        raise UsageError("give at least one candidate layer, each once")
    grid = [float(w) for w in (REFERENCE_W_GRID if w_grid is None else w_grid)]
    if not grid or not all(np.isfinite(w) and w > 0 for w in grid):
        raise UsageError("the w grid must be a non-empty list of positive numbers")
    uniq: dict[tuple[bytes, str], tuple[Image.Image, str]] = {}
    for img, text in items:
        uniq.setdefault((img.tobytes() + repr(img.size).encode(), text), (img, text))
    pool = list(uniq.values())
    n = min(int(n_samples), len(pool))
    if n < 2:
        raise ReasonEditError(f"the reference calibration needs >= 2 distinct samples, got {n}")
    aug = augment if augment is not None else Augmenter()
    score_fn = reference_harmonic if aggregate_key == "shifted" else raw_harmonic

    def step(msg: str) -> None:
        if progress is not None:
            progress(msg, 1)

    def features(images: list[Image.Image], texts: list[str], names: list[str]) -> dict:
        raw = feature_fn(images, texts, names)
        out = {}
        for name in names:
            arr = np.asarray(raw[name], dtype=np.float64)
            if arr.shape[0] != len(images) or not np.isfinite(arr).all():
                raise ReasonEditError(f"features of layer {name!r} are missing or not finite")
            out[name] = arr
        return out

    # --- layers: the hooked activation alone
    layer_runs: list[list[dict[str, float]]] = []
    for r in range(n_runs):
        rng = np.random.default_rng([seed, 0, r])
        samples = _sample_run(pool, n, rng)
        images, texts, nodes, rows = _run_inputs(samples, aug, rng, with_bimodal=True)
        feats = features(images, texts, layers)
        nn = n * n
        layer_runs.append(
            [reference_scores(feats[name][:nn], n, feats[name][rows], nodes) for name in layers]
        )
        step(f"layer run {r + 1}/{n_runs}")
    layer_scores = np.asarray(
        [score_fn([s["q_vis"] for s in run], [s["q_lang"] for s in run]) for run in layer_runs]
    )
    best_layer = reference_choice(layer_scores)
    layer = layers[best_layer]
    layer_table = [
        {"layer": name, **_summary([run[k] for run in layer_runs], layer_scores[:, k])}
        for k, name in enumerate(layers)
    ]

    # --- w: concat(h, w * S(t)) at the chosen layer, fresh samples
    w_runs: list[list[dict[str, float]]] = []
    for r in range(n_runs):
        rng = np.random.default_rng([seed, 1, r])
        samples = _sample_run(pool, n, rng)
        images, texts, nodes, rows = _run_inputs(samples, aug, rng, with_bimodal=True)
        h = features(images, texts, [layer])[layer]
        s = np.asarray(text_fn(texts), dtype=np.float64)
        if s.shape[0] != len(texts) or not np.isfinite(s).all():
            raise ReasonEditError(
                f"text embeddings have shape {s.shape}; expected ({len(texts)}, d)"
            )
        nn = n * n
        run = []
        for w in grid:
            e = dual_concat(h, s, w).astype(np.float64)
            run.append(reference_scores(e[:nn], n, e[rows], nodes))
        w_runs.append(run)
        step(f"w run {r + 1}/{n_runs}")
    w_scores = np.asarray(
        [score_fn([s["q_vis"] for s in run], [s["q_lang"] for s in run]) for run in w_runs]
    )
    best_w = reference_choice(w_scores)
    w_table = [
        {"w": w, **_summary([run[k] for run in w_runs], w_scores[:, k])} for k, w in enumerate(grid)
    ]
    return CalibrationResult(
        layer=layer,
        w=grid[best_w],
        rule="harmonic",
        layer_table=layer_table,
        w_table=w_table,
        n_pairs=n * n,
        n_groups=n,
        bootstrap=n_runs,
        knn=None,
        seed=seed,
        shift="global",
        w_at_grid_edge=len(grid) > 1 and best_w in (0, len(grid) - 1),
        extra={
            "method": "reference",
            "n_samples": n,
            "aggregate": f"mean over runs of per-run {aggregate_key} harmonic",
        },
    )
