"""Tests of topology-balanced calibration, on numpy data and tiny images.

See docs/method.md#calibration.
"""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest
from networkx.algorithms.community import modularity as nx_modularity
from PIL import Image

from reasonedit_cli.augment import Augmenter
from reasonedit_cli.calibration import (
    DEFAULT_W_GRID,
    CalibrationPair,
    CalibrationResult,
    _resamples,
    add_balance,
    balance_score,
    build_pairs,
    calibrate,
    calibration_steps,
    checked_w,
    dual_concat,
    layer_scores,
    modularity,
    partitions,
    pick_layer,
    plot_calibration,
    reference_w,
    score_embedding,
    similarity_graph,
    w_scores,
)
from reasonedit_cli.errors import ReasonEditError, UsageError

# --------------------------------------------------------------------------- modularity


@pytest.mark.parametrize("seed", range(6))
def test_modularity_matches_networkx(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 16))
    a = rng.random((n, n)) * (rng.random((n, n)) < 0.6)  # weighted, some missing edges
    a = np.triu(a, 1)
    a = a + a.T
    labels = rng.integers(0, 3, size=n)
    g = nx.from_numpy_array(a)
    comms = [set(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]
    assert modularity(a, labels) == pytest.approx(nx_modularity(g, comms), abs=1e-9)


def test_modularity_two_disconnected_triangles() -> None:
    tri = np.ones((3, 3)) - np.eye(3)
    a = np.block([[tri, np.zeros((3, 3))], [np.zeros((3, 3)), tri]])
    assert modularity(a, np.array([0, 0, 0, 1, 1, 1])) == pytest.approx(0.5)
    # String labels work; one community for everything has Q = 0.
    assert modularity(a, np.array(list("aaabbb"))) == pytest.approx(0.5)
    assert modularity(a, np.zeros(6)) == pytest.approx(0.0)
    # Splitting each triangle into singletons gives the negative expected-edge term only.
    assert modularity(a, np.arange(6)) == pytest.approx(-6 * (2 / 12) ** 2)


def test_modularity_edge_cases() -> None:
    assert modularity(np.zeros((4, 4)), np.arange(4)) == 0.0
    with pytest.raises(ValueError):
        modularity(np.ones((3, 4)), np.arange(3))
    with pytest.raises(ValueError):
        modularity(np.ones((3, 3)), np.arange(4))


# --------------------------------------------------------------------------- graph


def test_similarity_graph_min_max_scaling() -> None:
    # Points on a line at 0, 1, 3: distances 1 (0-1), 3 (0-2), 2 (1-2).
    a = similarity_graph(np.array([[0.0], [1.0], [3.0]]))
    expected = np.array([[0, 1, 0], [1, 0, 0.5], [0, 0.5, 0]])
    np.testing.assert_allclose(a, expected, atol=1e-12)


def test_similarity_graph_equidistant_and_tiny() -> None:
    np.testing.assert_allclose(similarity_graph(np.eye(4)), np.ones((4, 4)) - np.eye(4))
    np.testing.assert_allclose(similarity_graph(np.zeros((3, 2))), np.ones((3, 3)) - np.eye(3))
    assert similarity_graph(np.zeros((1, 5))).shape == (1, 1)


def test_similarity_graph_mutual_knn() -> None:
    x = np.random.default_rng(0).normal(size=(30, 5))
    dense = similarity_graph(x)
    sparse = similarity_graph(x, knn=3)
    np.testing.assert_array_equal(sparse, sparse.T)
    assert ((sparse > 0).sum(axis=1) <= 3).all()
    assert np.all((sparse == 0) | (sparse == dense))  # kept edges keep their weights
    assert np.all(np.diag(sparse) == 0)
    # Mutual: i-j kept only if each is among the other's 3 nearest.
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :3]
    for i, j in zip(*np.nonzero(sparse), strict=True):
        assert j in nn[i] and i in nn[j]
    np.testing.assert_allclose(similarity_graph(x, knn=100), dense)


def test_dual_concat() -> None:
    h = np.ones((2, 3), dtype=np.float64)
    s = np.full((2, 2), 2.0)
    e = dual_concat(h, s, 0.5)
    assert e.dtype == np.float32 and e.shape == (2, 5)
    np.testing.assert_allclose(e[:, 3:], 1.0)
    assert dual_concat(np.ones(3), np.ones(2), 2.0).shape == (5,)
    with pytest.raises(ValueError):
        dual_concat(np.ones((2, 3)), np.ones((3, 2)), 1.0)


# --------------------------------------------------------------------------- partitions


def test_partitions_from_pairs_and_dicts() -> None:
    img = Image.new("RGB", (2, 2))
    pairs = [
        CalibrationPair(img, "a", "i1", "t1", "g1"),
        CalibrationPair(img, "b", "i1", "t2", "g1"),
        CalibrationPair(img, "a", "i2", "t1", "g2"),
    ]
    p = partitions(pairs)
    assert p.vis[0] == p.vis[1] != p.vis[2]
    assert p.lang[0] == p.lang[2] != p.lang[1]
    assert p.bi[0] == p.bi[1] != p.bi[2]
    q = partitions(
        [{"image_id": x.image_id, "text_id": x.text_id, "group_id": x.group_id} for x in pairs]
    )
    for a, b in ((p.vis, q.vis), (p.lang, q.lang), (p.bi, q.bi)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- synthetic data


def synth(n_img: int = 4, n_txt: int = 4, d: int = 16, seed: int = 0):
    """Anchors (image a, text b) for all a, b, each with 3 augmentations
    (docs/method.md#calibration).

    Three kinds of features, one row per pair:
    * "vision": keyed by the exact image id (an augmented image is a new random point):
      clusters by image, blind to text and to augmentation;
    * "language": keyed by the exact text id, the same for texts;
    * "balanced": semantic image and text vectors (an augmentation stays near its base):
      groups an anchor with its augmentations.
    `s` is a semantic sentence embedding; `text_exact` the exact-text features.
    """
    rng = np.random.default_rng(seed)
    base_i, base_t = rng.normal(size=(n_img, d)), rng.normal(size=(n_txt, d))
    meta = []
    for a in range(n_img):
        for b in range(n_txt):
            ia, ib, ta, tb = f"I{a}", f"I{a}-{b}", f"T{b}", f"T{b}-{a}"
            for iid, tid in ((ia, ta), (ia, tb), (ib, ta), (ib, tb)):
                meta.append(
                    {"image_id": iid, "text_id": tid, "group_id": f"g{a}{b}", "a": a, "b": b}
                )
    iids = sorted({m["image_id"] for m in meta})
    tids = sorted({m["text_id"] for m in meta})
    exact_i = {k: rng.normal(size=d) for k in iids}
    exact_t = {k: rng.normal(size=d) for k in tids}
    sem_i = {k: base_i[int(k[1])] + 0.2 * rng.normal(size=d) for k in iids}
    sem_t = {k: base_t[int(k[1])] + 0.2 * rng.normal(size=d) for k in tids}
    n = len(meta)

    def noise(k: int = d) -> np.ndarray:
        return 0.05 * rng.normal(size=(n, k))

    feats = {
        "vision": np.array([exact_i[m["image_id"]] for m in meta]) + noise(),
        "language": np.array([exact_t[m["text_id"]] for m in meta]) + noise(),
        "balanced": np.hstack(
            [
                np.array([sem_i[m["image_id"]] for m in meta]),
                np.array([sem_t[m["text_id"]] for m in meta]),
            ]
        )
        + noise(2 * d),
    }
    s = np.array([sem_t[m["text_id"]] for m in meta]) + noise()
    text_exact = np.array([exact_t[m["text_id"]] for m in meta]) + noise()
    return meta, feats, s, text_exact, sem_t


@pytest.fixture(scope="module")
def data():
    return synth()


def test_single_layers_show_their_bias(data) -> None:
    meta, feats, *_ = data
    vis = score_embedding(feats["vision"], meta)
    lang = score_embedding(feats["language"], meta)
    bal = score_embedding(feats["balanced"], meta)
    assert vis.q_vis > vis.q_lang
    assert lang.q_lang > lang.q_vis
    assert bal.q_bi > max(vis.q_bi, lang.q_bi)
    for q in (vis, lang, bal):
        assert all(-0.5 <= v <= 1.0 for v in q)


def test_bimodal_rule_picks_balanced_layer(data) -> None:
    meta, feats, s, *_ = data
    table = layer_scores(feats, s, meta, bootstrap=3, seed=0)
    assert [row["layer"] for row in table] == list(feats)
    assert pick_layer(table, "bimodal") == "balanced"
    assert pick_layer(table, "harmonic") in feats  # reported, may differ from bimodal
    for row in table:
        assert {"q_vis", "q_lang", "q_bi", "harmonic", "w_ref"} <= set(row)
    with pytest.raises(UsageError):
        pick_layer(table, "nope")


def test_w_sweep_picks_interior_w(data) -> None:
    meta, feats, _, text_exact, _ = data
    # h clusters by image, s by text: small w is vision-biased, large w language-biased.
    table = w_scores(feats["vision"], text_exact, meta, bootstrap=3, seed=0)
    assert [row["w"] for row in table] == list(DEFAULT_W_GRID)
    assert table[0]["q_vis"] > table[0]["q_lang"]
    assert table[-1]["q_lang"] > table[-1]["q_vis"]
    best = int(np.argmax([row["harmonic"] for row in table]))
    assert 0 < best < len(table) - 1
    # Near the crossover of the two modularities.
    assert abs(table[best]["q_vis"] - table[best]["q_lang"]) < 0.5 * abs(
        table[0]["q_vis"] - table[0]["q_lang"]
    )
    # The literal "Q + 1" shift degenerates to an arithmetic mean here (module docstring).
    fixed = w_scores(feats["vision"], text_exact, meta, bootstrap=3, shift=1.0)
    assert int(np.argmax([row["harmonic"] for row in fixed])) in (0, len(fixed) - 1)


def test_w_sweep_with_mutual_knn(data) -> None:
    meta, feats, _, text_exact, _ = data
    table = w_scores(feats["vision"], text_exact, meta, [0.1, 1.0, 10.0], bootstrap=2, knn=10)
    assert table[0]["q_vis"] > table[-1]["q_vis"]
    assert table[-1]["q_lang"] > table[0]["q_lang"]
    assert int(np.argmax([row["harmonic"] for row in table])) == 1


def test_bootstrap_is_seeded_and_keeps_groups(data) -> None:
    meta, feats, s, *_ = data
    a = layer_scores(feats, s, meta, bootstrap=3, seed=7)
    b = layer_scores(feats, s, meta, bootstrap=3, seed=7)
    c = layer_scores(feats, s, meta, bootstrap=3, seed=8)
    assert a == b
    assert a != c
    groups = partitions(meta).bi
    for idx in _resamples(groups, 4, seed=0, subsample=0.5):
        chosen = np.unique(groups[idx])
        assert len(chosen) == 8  # half of the 16 groups, each complete
        assert len(idx) == 4 * len(chosen)
    assert len(_resamples(groups, 0, seed=0, subsample=0.5)[0]) == len(groups)


def test_balance_scores() -> None:
    assert balance_score(0.0, 0.0) == pytest.approx(1.0)
    assert balance_score(0.5, -0.5) == pytest.approx(2 * 1.5 * 0.5 / 2.0)
    rows = [
        {"q_vis": 0.3, "q_lang": 0.0},
        {"q_vis": 0.2, "q_lang": 0.2},
        {"q_vis": 0.0, "q_lang": 0.3},
    ]
    add_balance(rows)
    assert int(np.argmax([r["harmonic"] for r in rows])) == 1
    with pytest.raises(UsageError):
        add_balance(rows, shift="bogus")


def test_reference_w_equalises_spread() -> None:
    rng = np.random.default_rng(0)
    h, s = 10.0 * rng.normal(size=(20, 8)) + 100.0, rng.normal(size=(20, 8))
    w = reference_w(h, s)
    assert 5.0 < w < 20.0  # the offset of 100 does not count, only the spread
    assert reference_w(h, np.ones((20, 3))) == 1.0


# --------------------------------------------------------------------------- calibrate


def _fake_model(data):
    meta, feats, _, _, sem_t = data
    img = Image.new("RGB", (2, 2))
    pairs = [
        CalibrationPair(img, m["text_id"], m["image_id"], m["text_id"], m["group_id"]) for m in meta
    ]
    calls: dict[str, list] = {"features": [], "text": []}

    def feature_fn(images, texts, layers):
        calls["features"].append(list(layers))
        assert len(images) == len(texts) == len(pairs)
        return {name: feats[name] for name in layers}

    def text_fn(texts):
        calls["text"].append(list(texts))
        return np.array([sem_t[t] for t in texts])

    return pairs, feature_fn, text_fn, calls


def test_calibrate_end_to_end(data, tmp_path) -> None:
    pairs, feature_fn, text_fn, calls = _fake_model(data)
    steps: list[int] = []
    grid = list(np.logspace(-1, 2, 13))
    res = calibrate(
        pairs,
        feature_fn,
        text_fn,
        ["vision", "language", "balanced"],
        w_grid=grid,
        bootstrap=2,
        progress=lambda msg, adv: steps.append(adv),
    )
    assert res.layer == "balanced" and res.rule == "bimodal"
    assert res.n_pairs == len(pairs) and res.n_groups == 16
    # the grid is relative to the chosen layer's reference w (equal spread of both halves)
    w_ref = next(r["w_ref"] for r in res.layer_table if r["layer"] == res.layer)
    chosen = next(r for r in res.w_table if r["w"] == res.w)
    assert chosen["w_rel"] in grid and np.isclose(res.w, chosen["w_rel"] * w_ref)
    assert not res.w_at_grid_edge
    assert sum(steps) == calibration_steps(3, len(grid))
    assert len(calls["features"]) == 1  # the VLM runs once for all layers
    assert len(calls["text"][0]) == len({p.text for p in pairs})  # each text embedded once
    d = json.loads(json.dumps(res.to_dict()))
    assert d["layer"] == "balanced" and len(d["w_table"]) == len(grid)
    assert {"layer", "q_vis", "q_lang", "q_bi", "harmonic"} <= set(d["layer_table"][0])

    png = plot_calibration(res, tmp_path / "sub" / "calibration.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- checked selection


def _w_table(n: int = 41, peak: int = 30) -> list[dict]:
    """A w sweep whose balance rises to a peak at index `peak` and falls after it."""
    return [
        {"w": float(w), "w_rel": float(w), "harmonic": 1.0 - abs(i - peak) / n}
        for i, w in enumerate(np.logspace(-1, 2, n))
    ]


def _retrieval(lo: int, hi: int, table: list[dict], asked: list[int]):
    """A self-check that passes for indices lo..hi: above hi the text half weighs too much
    (rephrased questions are lost), below lo too little (perturbed images are lost)."""
    index = {row["w"]: i for i, row in enumerate(table)}

    def check(w: float) -> list[str]:
        i = index[w]
        asked.append(i)
        return (["rephrased"] if i > hi else []) + (["perturbed"] if i < lo else [])

    return check


@pytest.mark.parametrize(
    "lo, hi, want",
    [
        (0, 40, 30),  # the balance's own choice passes: kept, one check
        (3, 8, 8),  # a window below the peak: its top, the best balance that passes
        (5, 5, 5),  # a single passing point between two rungs
        (34, 38, 34),  # a window above the peak (perturbed lost): its bottom
        (12, 11, None),  # no w passes: lost both ways
    ],
)
def test_checked_w_finds_the_best_balanced_passing_w(lo, hi, want) -> None:
    table, asked, trail = _w_table(), [], []
    got = checked_w(table, _retrieval(lo, hi, table, asked), trail=trail)
    assert got == want
    assert asked[0] == 30  # the paper's choice is asked first
    assert len(asked) == len(set(asked)) <= 12  # rungs of ~x2, then at most 3 between
    assert [t["w"] for t in trail] == [table[i]["w"] for i in asked]
    if want is not None:
        assert [t["lost"] for t in trail if t["w"] == table[want]["w"]] == [[]]


def test_checked_w_stops_when_the_budget_is_spent() -> None:
    from reasonedit_cli.calibration import _Budget

    table, asked = _w_table(), []
    budget = _Budget(3)
    assert checked_w(table, _retrieval(3, 8, table, asked), budget=budget) is None
    assert len(asked) == 3 and budget.left == 0


def test_calibrate_with_a_check_skips_layers_that_lose_retrieval(data) -> None:
    """Checked selection: the paper's layer ("balanced", by Q_bi) loses rephrased questions
    at every w, so the choice moves to the next layer by the rule, at its best-balanced
    w that passes; the paper's choice and every check are reported."""
    pairs, feature_fn, text_fn, _ = _fake_model(data)
    grid = list(np.logspace(-1, 2, 13))
    plain = calibrate(
        pairs, feature_fn, text_fn, ["vision", "language", "balanced"], w_grid=grid, bootstrap=2
    )
    asked: list[tuple[str, float]] = []

    def check(layer: str, w: float) -> list[str]:
        asked.append((layer, w))
        return ["rephrased"] if layer == "balanced" or w > 3.0 else []

    res = calibrate(
        pairs,
        feature_fn,
        text_fn,
        ["vision", "language", "balanced"],
        w_grid=grid,
        bootstrap=2,
        check=check,
    )
    sel = res.extra["selection"]
    assert sel["paper"] == {"layer": plain.layer, "w": plain.w} and plain.layer == "balanced"
    assert res.layer != "balanced" and res.w <= 3.0 and sel["passed"]
    assert [t["layer"] for t in sel["tried"]][0] == "balanced"
    assert sel["n_checks"] == len(asked) == sum(len(t["checks"]) for t in sel["tried"])
    assert res.w_table[0]["w"] == pytest.approx(
        grid[0] * next(r["w_ref"] for r in res.layer_table if r["layer"] == res.layer)
    )
    # the top of the passing window, or the layer's own balance peak when that passes
    ws = [r["w"] for r in res.w_table]
    peak = ws[int(np.argmax([r["harmonic"] for r in res.w_table]))]
    assert res.w == (peak if peak <= 3.0 else max(w for w in ws if w <= 3.0))
    json.dumps(res.to_dict())
    # nothing passes: the paper's choice stands, marked as not passed
    none = calibrate(
        pairs,
        feature_fn,
        text_fn,
        ["vision", "balanced"],
        w_grid=grid,
        bootstrap=2,
        check=lambda la, w: ["rephrased", "perturbed"],
        max_checks=5,
    )
    assert (none.layer, none.w) == (plain.layer, plain.w)
    assert not none.extra["selection"]["passed"] and none.extra["selection"]["n_checks"] <= 5
    with pytest.raises(UsageError):
        calibrate(pairs, feature_fn, text_fn, ["vision"], check=check, max_checks=0)


def test_calibrate_errors(data) -> None:
    pairs, feature_fn, text_fn, _ = _fake_model(data)
    with pytest.raises(UsageError) as e:
        calibrate(pairs, feature_fn, text_fn, ["vision"], rule="best")
    assert e.value.exit_code == 2
    for kwargs in (
        {"w_grid": []},
        {"w_grid": [0.0, 1.0]},
        {"bootstrap": -1},
        {"knn": 0},
        {"shift": "x"},
    ):
        with pytest.raises(UsageError):
            calibrate(pairs, feature_fn, text_fn, ["vision"], **kwargs)
    with pytest.raises(UsageError):
        calibrate(pairs, feature_fn, text_fn, [])
    with pytest.raises(ReasonEditError, match="no features"):
        calibrate(pairs, lambda i, t, ls: {}, text_fn, ["vision"])
    with pytest.raises(ReasonEditError, match="NaN"):
        calibrate(pairs, lambda i, t, ls: {"v": np.full((len(pairs), 2), np.nan)}, text_fn, ["v"])
    with pytest.raises(ReasonEditError, match="2 anchor groups"):
        calibrate(pairs[:4], feature_fn, text_fn, ["vision"])


def test_result_to_dict_is_json_safe() -> None:
    res = CalibrationResult(
        "L",
        np.float32(2.0),
        "bimodal",
        [{"layer": "L", "q_bi": np.float64(np.nan)}],
        [],
        np.int64(5),
    )
    d = json.loads(json.dumps(res.to_dict()))
    assert d["w"] == 2.0 and d["n_pairs"] == 5 and d["layer_table"][0]["q_bi"] is None


# --------------------------------------------------------------------------- pairs


def _solid(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (16, 16), colour)


def test_build_pairs_structure() -> None:
    red, blue = _solid((200, 0, 0)), _solid((0, 0, 200))
    items = [
        (red, "What colour is it?"),
        (red, "What shape is it?"),
        (blue, "What colour is it?"),
        (red.copy(), "What colour is it?"),
    ]  # dup
    pairs = build_pairs(items, n_aug=1, seed=0)
    assert len(pairs) == 3 * 4  # the duplicate anchor is dropped
    groups: dict[str, list[CalibrationPair]] = {}
    for p in pairs:
        groups.setdefault(p.group_id, []).append(p)
    assert len(groups) == 3
    for members in groups.values():
        anchor, text_aug, img_aug, both = members
        assert text_aug.image_id == anchor.image_id and text_aug.text_id != anchor.text_id
        assert img_aug.text_id == anchor.text_id and img_aug.image_id != anchor.image_id
        assert both.image_id == img_aug.image_id and both.text_id == text_aug.text_id
        assert img_aug.image.size == anchor.image.size
    # Shared images and texts across anchors share ids (the vis / lang signal).
    anchors = [m[0] for m in groups.values()]
    assert anchors[0].image_id == anchors[1].image_id != anchors[2].image_id
    assert anchors[0].text_id == anchors[2].text_id != anchors[1].text_id

    again = build_pairs(items, n_aug=1, seed=0)
    assert [(p.image_id, p.text_id, p.text) for p in again] == [
        (p.image_id, p.text_id, p.text) for p in pairs
    ]
    assert len(build_pairs(items, n_aug=2)) == 3 * 7


def test_build_pairs_cap_and_errors() -> None:
    items = [(_solid((i * 20, 0, 0)), f"What colour is shape {i}?") for i in range(6)]
    identity = Augmenter(image=lambda im, g: im.rotate(90), text=lambda t, g: t + " please")
    full = build_pairs(items, identity, seed=3)
    capped = build_pairs(items, identity, max_pairs=10, seed=3)
    assert len(capped) == 8  # two whole groups of 4 fit in 10
    assert {p.group_id for p in capped} < {p.group_id for p in full}
    assert [p.text for p in build_pairs(items, identity, max_pairs=10, seed=3)] == [
        p.text for p in capped
    ]
    with pytest.raises(UsageError):
        build_pairs(items, identity, max_pairs=3)
    with pytest.raises(UsageError):
        build_pairs(items, identity, n_aug=-1)
