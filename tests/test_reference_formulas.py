"""The reference formulas (REFERENCE rows 4-8, 11-13) on hand-computed examples.

Each function is checked against numbers worked out by hand in the comments, so an
independent re-implementation of the authors' conventions can be compared with them.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from reasonedit_cli import calibration as C
from reasonedit_cli import calibration_reference as CR
from reasonedit_cli import retrieval as R

# a path graph 0 - 1 - 2 - 3, communities {0, 1} and {2, 3}
PATH4 = np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=float)
HALVES = np.array([0, 0, 1, 1])


def test_modularity_without_self_terms_on_a_4_node_graph() -> None:
    # k = [1, 2, 2, 1], 2m = 6; within-community weight 4; sum_c deg_c^2 = 3^2 + 3^2 = 18,
    # sum_i k_i^2 = 10. Reference: (4 - (18 - 10) / 6) / 6 = 4/9.
    # Textbook (i = j terms kept): (4 - 18 / 6) / 6 = 1/6; the gap is 10 / 36.
    assert CR.reference_modularity(PATH4, HALVES) == pytest.approx(4 / 9)
    assert C.modularity(PATH4, HALVES) == pytest.approx(1 / 6)
    # a diagonal in the input is ignored, by definition
    assert CR.reference_modularity(PATH4 + np.eye(4), HALVES) == pytest.approx(4 / 9)
    assert CR.reference_modularity(np.zeros((3, 3)), [0, 0, 1]) == 0.0


def test_similarity_min_max_over_the_whole_matrix() -> None:
    # points 0, 1, 3 on a line: max distance 3, min 0 (the diagonal): A = 1 - d / 3
    a = CR.reference_similarity(np.array([[0.0], [1.0], [3.0]]))
    assert a[0, 1] == pytest.approx(2 / 3) and a[1, 2] == pytest.approx(1 / 3)
    assert a[0, 2] == pytest.approx(0.0) and np.allclose(np.diag(a), 1.0)
    # ours scales by the off-diagonal minimum instead: (3 - d) / (3 - 1)
    ours = C.similarity_graph(np.array([[0.0], [1.0], [3.0]]))
    assert ours[0, 1] == pytest.approx(1.0) and ours[1, 2] == pytest.approx(0.5)
    assert np.array_equal(CR.reference_similarity(np.ones((3, 2))), np.ones((3, 3)))


def test_layouts() -> None:
    img, txt = CR.nxn_layout(3)
    assert list(img) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and list(txt) == [0, 1, 2] * 3
    nodes = CR.bimodal_layout(3)
    # 3 anchors with 2(n-1) = 4 augmentations each, then the 6 cross pairs
    assert len(nodes) == 3 * 5 + 6
    assert nodes[:5] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 0, 4)]
    assert nodes[15:] == [(0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 2, 0), (2, 0, 0), (2, 1, 0)]
    labels = CR.bimodal_labels(nodes, 3)
    assert len(set(labels[15:])) == 6 and set(labels[15:]).isdisjoint(labels[:15])
    assert len(set(labels[:15])) == 3


def test_reference_scores_on_a_vision_biased_embedding() -> None:
    # n = 2: pairs (i0,t0), (i0,t1), (i1,t0), (i1,t1); the embedding is the image index
    # plus a tiny text offset. Distances: same image 0.1, different image ~1 -> A = 1 - d/max.
    emb = np.array([[0.0, 0.0], [0.0, 0.1], [1.0, 0.0], [1.0, 0.1]])
    s = CR.reference_scores(emb, 2)
    a = CR.reference_similarity(emb)
    assert s["q_vis"] == pytest.approx(CR.reference_modularity(a, [0, 0, 1, 1]))
    assert s["q_lang"] == pytest.approx(CR.reference_modularity(a, [0, 1, 0, 1]))
    assert s["q_vis"] > 0 > s["q_lang"]
    assert np.isnan(s["q_bi"])


def test_harmonic_with_one_global_shift() -> None:
    # g = min(0.1, 0.3, 0.2, -0.1) = -0.1: v = [0.2, 0.4], l = [0.3, 0.0]
    # -> [2 * 0.2 * 0.3 / 0.5, 0] = [0.24, 0] (0 where a shifted value is not positive)
    h = CR.reference_harmonic([0.1, 0.3], [0.2, -0.1])
    assert h == pytest.approx([0.24, 0.0])
    assert CR.raw_harmonic([0.1, 0.3], [0.2, -0.1]) == pytest.approx([2 * 0.02 / 0.3, 0.0])
    # mean over runs of per-run scores, first candidate on ties
    assert CR.reference_choice(np.array([[0.1, 0.3, 0.3], [0.5, 0.2, 0.2]])) == 0
    assert CR.reference_choice(np.array([[0.0, 0.4, 0.4]])) == 1


def test_reference_w_grid() -> None:
    g = CR.REFERENCE_W_GRID
    assert g[0] == 0.1 and g[-1] == 100.0 and list(g) == sorted(set(g))
    assert 30.0 in g and 0.12 in g and 1.1 in g and 5.3 in g and 6.3 in g
    assert len(g) == 41  # the rounding happens to keep all 41 points distinct


# --------------------------------------------------------------------------- end to end


def _img(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (8, 8), colour)


def _text_vec(text: str, d: int = 8) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.strip().lower().rstrip("?.!").encode()).digest()[:4])
    return np.random.default_rng(seed).normal(size=d)


def _features(images, texts, layers):
    vis = np.asarray([np.asarray(im, dtype=float).mean(axis=(0, 1)) / 25 for im in images])
    txt = np.asarray([_text_vec(t) for t in texts])
    out = {"vision": vis, "text": txt * 3, "both": np.concatenate([vis, txt], axis=1)}
    return {name: out[name] for name in layers}


def test_calibrate_reference_end_to_end() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0), (0, 200, 200), (90, 9, 9)]
    items = [(_img(c), f"question number {k}?") for k, c in enumerate(colours)]
    calls = []

    def feature_fn(images, texts, layers):
        calls.append(len(images))
        return _features(images, texts, layers)

    res = CR.calibrate_reference(
        items,
        feature_fn,
        lambda ts: np.asarray([_text_vec(t) for t in ts]),
        ["vision", "text", "both"],
        n_runs=3,
        n_samples=4,
        seed=1,
    )
    # the layer carrying both modalities balances Q_vis and Q_lang; the single-modality
    # layers have one of them at the global minimum (score 0)
    assert res.layer == "both"
    rows = {r["layer"]: r for r in res.layer_table}
    assert rows["vision"]["q_vis"] > rows["vision"]["q_lang"]
    assert rows["text"]["q_lang"] > rows["text"]["q_vis"]
    # 3 layer runs + 3 w runs, each n x n = 16 pairs plus 4 x 6 augmented copies
    assert calls == [16 + 24] * 6
    assert [r["w"] for r in res.w_table] == list(CR.REFERENCE_W_GRID)
    assert res.w in CR.REFERENCE_W_GRID and res.bootstrap == 3 and res.shift == "global"
    # the chosen w has the best mean harmonic
    best = max(res.w_table, key=lambda r: r["harmonic"])
    assert res.w == best["w"]
    again = CR.calibrate_reference(
        items, _features, lambda ts: np.asarray([_text_vec(t) for t in ts]),
        ["vision", "text", "both"], n_runs=3, n_samples=4, seed=1,
    )  # fmt: skip
    assert again.w == res.w and again.layer_table == res.layer_table  # seeded


def test_calibrate_reference_rejects_bad_input() -> None:
    from reasonedit_cli.errors import ReasonEditError, UsageError

    items = [(_img((1, 2, 3)), "only one?")]
    with pytest.raises(ReasonEditError, match="2 distinct"):
        CR.calibrate_reference(items, _features, lambda ts: np.zeros((len(ts), 2)), ["vision"])
    with pytest.raises(UsageError):
        CR.calibrate_reference(items, _features, lambda ts: ts, [], n_runs=1)


# --------------------------------------------------------------------------- sigma, tau, hits

# three keys on a line at 0, 1 and 3: d01 = 1, d02 = 3, d12 = 2
LINE3 = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], dtype=np.float32)


def test_reference_sigma_is_the_lower_median() -> None:
    # neighbours: key 0 -> [1, 3], key 1 -> [1, 2], key 2 -> [2, 3]; lower middle of two
    assert R.reference_sigma(LINE3).tolist() == [1.0, 1.0, 2.0]
    assert R.hubness_sigma(LINE3).tolist() == [2.0, 1.5, 2.5]  # ours: numpy median
    assert np.isnan(R.reference_sigma(LINE3[:1])).all()  # no neighbour: no correction
    # an odd count has one middle value: both agree
    v = np.arange(4, dtype=np.float32)[:, None]
    assert R.reference_sigma(v).tolist() == R.hubness_sigma(v).tolist() == [2.0, 1.0, 1.0, 2.0]


def test_reference_tau_on_a_3_key_codebook() -> None:
    sigma = R.reference_sigma(LINE3)
    eps = R.REFERENCE_EPS
    # pairs a < b divided by sigma_b + eps: (0,1) 1/(1+eps), (0,2) 3/(2+eps), (1,2) 2/(2+eps)
    pairs = sorted([1 / (1 + eps), 3 / (2 + eps), 2 / (2 + eps)])
    # one edit: p = max(1, 100/1) = 100 -> the largest
    assert R.reference_threshold(LINE3, sigma, 1) == pytest.approx(pairs[2], rel=1e-12)
    # three edits: p = 33.3...: linear interpolation at position 2/3 between 1/(1+eps)
    # and 2/(2+eps)
    expect = pairs[0] + (2 / 3) * (pairs[1] - pairs[0])
    assert R.reference_threshold(LINE3, sigma, 3) == pytest.approx(expect, rel=1e-12)
    # many edits: p = 1 -> position 0.02
    expect = pairs[0] + 0.02 * (pairs[1] - pairs[0])
    assert R.reference_threshold(LINE3, sigma, 1000) == pytest.approx(expect, rel=1e-12)
    # another key order changes which sigma divides a pair: (2, 1, 0) gives
    # (2,1) 2/(1+eps), (2,0) 3/(1+eps), (1,0) 1/(1+eps)
    rev = R.reference_threshold(LINE3, sigma, 1, order=np.array([2, 1, 0]))
    assert rev == pytest.approx(3 / (1 + eps), rel=1e-12)
    assert R.reference_threshold(LINE3[:1], sigma[:1], 1) is None
    assert R.reference_percentile(1.0, 4) == 25.0 and R.reference_percentile(1.0, 500) == 1.0


def test_reference_hits_rule() -> None:
    assert R.reference_hits([0.5, 2.0, 3.0], 1.0, k=2) == [0, 1]  # no tau filter after the first
    assert R.reference_hits([1.5, 2.0], 1.0) == []
    assert R.reference_hits([9.0, 10.0], None, k=5) == [0, 1]  # no tau: open gate
    assert R.reference_hits([], 1.0) == []


def test_codebook_with_the_reference_tau_rule(tmp_path) -> None:
    from reasonedit_cli.store import Codebook, EditRecord, KeyRecord

    cb = Codebook.open(tmp_path / "cb", create=True)
    edits, keys = [], []
    for i, vec in enumerate(LINE3):
        sha = hashlib.sha256(f"img{i}".encode()).hexdigest()
        edits.append(EditRecord(f"e{i}", sha, f"q{i}", f"a{i}", [f"fact {i}."], None, "t"))
        keys.append(KeyRecord(f"e{i}", "sentence", f"fact {i}.", f"fact {i}.", sha, None, vec))
    with cb.writer() as w:
        w.set_config(tau_rule="reference", hits_rule="reference", percentile=1.0, dim=2)
        w.add(edits, keys)
    cb = Codebook.open(tmp_path / "cb")
    eps = R.REFERENCE_EPS
    assert cb.tau_rule == "reference"
    assert cb.sigma() == pytest.approx([1 + eps, 1 + eps, 2 + eps])
    pairs = sorted([1 / (1 + eps), 3 / (2 + eps), 2 / (2 + eps)])
    assert cb.tau == pytest.approx(pairs[0] + (2 / 3) * (pairs[1] - pairs[0]), rel=1e-9)
    # p = 90: position 0.9 * 2 = 1.8, between the 2nd and the 3rd value
    assert cb.tau_for(90) == pytest.approx(pairs[1] + 0.8 * (pairs[2] - pairs[1]), rel=1e-9)
    # a query at 0.9: corrected distances 0.9/1 (key 0), 0.1/1 (key 1), 2.1/2 (key 2)
    r = R.retrieve(cb, np.array([0.9, 0.0]), k=5)
    assert not r.rejected and [h.edit_id for h in r.hits] == ["e1", "e0", "e2"]
    assert r.facts == ["fact 1.", "fact 0.", "fact 2."]  # nearest first, no tau filter
    ours = R.retrieve(cb, np.array([0.9, 0.0]), k=5, hit_rule="tau")
    assert [h.edit_id for h in ours.hits] == ["e1", "e0"]  # 2.1/2 > tau: filtered
    assert R.retrieve(cb, np.array([40.0, 0.0]), k=5).rejected


def test_reference_merge_rule_discs_and_first_touching_key():
    """REFERENCE row 14: 2-D disc intersection over each disc's area > 0.9, first
    touching key in row order (ours: overlap along the line, nearest of 8)."""
    import math

    import numpy as np

    from reasonedit_cli.merging import (
        circle_intersection,
        may_merge,
        may_merge_reference,
        plan_merges,
    )

    assert circle_intersection(2.0, 1.0, 1.0) == 0.0
    assert circle_intersection(0.0, 1.0, 1.0) == pytest.approx(math.pi)
    assert circle_intersection(0.5, 1.0, 0.5) == pytest.approx(math.pi * 0.25)  # inside
    # lens of two unit discs one radius apart: 2 acos(1/2) - sqrt(3)/2
    assert circle_intersection(1.0, 1.0, 1.0) == pytest.approx(1.2283697, abs=1e-6)
    # equal radii: ours merges below d = 0.2 r, the reference's area rule below ~0.157 r
    assert may_merge_reference(0.15, 1.0, 1.0) and may_merge(0.15, 1.0, 1.0)
    assert not may_merge_reference(0.18, 1.0, 1.0) and may_merge(0.18, 1.0, 1.0)
    assert may_merge_reference(0.05, 1.0, 1.0)  # near-duplicate, d < 0.1 r both
    # both earlier keys can absorb the new one: reference takes row 0, ours the nearest
    vec = np.array([[0.0], [1.0], [1.1]])
    entries = [[("a", "e1")], [("b", "e2")], [("c", "e3")]]
    ref = plan_merges(vec, [10.0, 10.0, 10.0], entries, new_from=2, rule="reference")
    ours = plan_merges(vec, [10.0, 10.0, 10.0], entries, new_from=2)
    assert ref.merged_into == {2: 0} and ref.radius[0] == pytest.approx(11.1)
    assert ours.merged_into == {2: 1}
    with pytest.raises(ValueError):
        plan_merges(vec, [1.0] * 3, entries, rule="nearest")
