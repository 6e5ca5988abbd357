"""Pure retrieval functions: exact kNN, sigma (incremental == scratch), tau, prompts."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from reasonedit_cli import retrieval as R
from reasonedit_cli.store import Codebook, EditRecord, KeyRecord
from reasonedit_cli.store.index import neighbours as NB


def _naive_knn(v: np.ndarray, k: int) -> np.ndarray:
    d = np.linalg.norm(v[:, None, :].astype(np.float64) - v[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k]


def test_brute_force_knn_matches_naive():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(50, 8)).astype(np.float32)
    idx, dist = R.knn_lists(v, 5)
    assert np.allclose(dist, _naive_knn(v, 5))
    assert (idx != np.arange(50)[:, None]).all()  # never itself


def test_knn_pads_small_sets():
    v = np.eye(3, dtype=np.float32)
    idx, dist = R.knn_lists(v, 30)
    assert idx.shape == (3, 30)
    assert (idx[:, 2:] == -1).all() and np.isinf(dist[:, 2:]).all()
    assert np.allclose(R.sigma_from_knn(dist), np.sqrt(2))


def test_sigma_definition():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(80, 6)).astype(np.float32)
    expected = np.median(_naive_knn(v, 30), axis=1)
    assert np.allclose(R.hubness_sigma(v, 30), expected)
    # fewer than 31 keys: min(30, n-1) neighbours
    small = v[:10]
    assert np.allclose(R.hubness_sigma(small, 30), np.median(_naive_knn(small, 9), axis=1))


def test_single_key_sigma_is_one():
    assert R.hubness_sigma(np.ones((1, 4), np.float32)).tolist() == [1.0]


def test_duplicate_keys_keep_sigma_positive():
    v = np.zeros((5, 3), np.float32)
    s = R.hubness_sigma(v)
    assert (s > 0).all() and np.isfinite(s).all()


@pytest.mark.parametrize("n_old,n_new", [(0, 10), (5, 3), (20, 20), (100, 7), (40, 1)])
def test_incremental_knn_equals_scratch(n_old, n_new):
    rng = np.random.default_rng(n_old * 100 + n_new)
    v = rng.normal(size=(n_old + n_new, 12)).astype(np.float32)
    oi, od = R.knn_lists(v[:n_old], 30)
    ni, nd = NB.update_knn_lists(v[:n_old], oi, od, v[n_old:], 30)
    si, sd = R.knn_lists(v, 30)
    assert np.allclose(nd, sd)
    assert np.allclose(R.sigma_from_knn(nd), R.sigma_from_knn(sd))


def test_incremental_removal_equals_scratch():
    rng = np.random.default_rng(5)
    v = rng.normal(size=(120, 10)).astype(np.float32)
    idx, dist = R.knn_lists(v, 30)
    keep = np.ones(120, bool)
    keep[rng.choice(120, 25, replace=False)] = False
    ni, nd = NB.remove_from_knn_lists(v[keep], idx, dist, keep, 30)
    si, sd = R.knn_lists(v[keep], 30)
    assert np.allclose(nd, sd)
    assert (ni >= 0).all() and ni.max() < keep.sum()


def test_tau_is_percentile_of_corrected_pairs():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(40, 5)).astype(np.float32)
    sigma = R.hubness_sigma(v)
    d = np.linalg.norm(v[:, None, :].astype(np.float64) - v[None, :, :], axis=-1) / sigma[:, None]
    pairs = d[~np.eye(40, dtype=bool)]
    assert R.rejection_threshold(v, sigma, 25, n_edits=100) == pytest.approx(
        np.percentile(pairs, 25)
    )
    # few edits: p becomes max(p, 100 / n_edits)
    assert R.effective_percentile(25, 2) == 50
    assert R.rejection_threshold(v, sigma, 25, n_edits=2) == pytest.approx(np.percentile(pairs, 50))
    assert R.rejection_threshold(v[:1], sigma[:1], 25, 1) is None


def test_tau_sample_is_seeded_for_large_sets():
    rng = np.random.default_rng(4)
    v = rng.normal(size=(2500, 4)).astype(np.float32)
    sigma = np.ones(2500)
    a = R.corrected_pair_sample(v, sigma, seed=7, n_pairs=20000)
    b = R.corrected_pair_sample(v, sigma, seed=7, n_pairs=20000)
    assert len(a) == 20000 and np.array_equal(a, b)
    exact = R.corrected_pair_sample(v[:300], sigma[:300])
    assert len(exact) == 300 * 299


def test_build_prompt():
    assert R.build_prompt([], "What colour?") == "What colour?"
    assert R.build_prompt(["A is red.", "B is blue."], "What?") == "A is red. B is blue. What?"


def test_distinct_values_keep_order():
    hits = [R.Hit(v, 0, 0, "sentence", "e", "k", None) for v in ["b", "a", "b", "c"]]
    assert R.distinct_values(hits) == ["b", "a", "c"]


def _clustered_codebook(tmp_path, n_edits=12, dim=16):
    """Each edit's keys sit in a tight cluster around its own centre."""
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(n_edits, dim)) * 10
    edits, keys = [], []
    for i in range(n_edits):
        sha = hashlib.sha256(f"img{i}".encode()).hexdigest()
        edits.append(EditRecord(f"e{i}", sha, f"q{i}", f"a{i}", [f"fact {i}."], None, "t"))
        for j in range(3):
            vec = (centres[i] + rng.normal(size=dim) * 0.1).astype(np.float32)
            keys.append(
                KeyRecord(f"e{i}", "sentence", f"fact {i}.{j % 2}", f"t{j}", sha, None, vec)
            )
    cb = Codebook.open(tmp_path / "cb", create=True)
    with cb.writer() as w:
        w.add(edits, keys)
    return cb, centres


def test_retrieve_rejects_far_and_accepts_near(tmp_path):
    cb, centres = _clustered_codebook(tmp_path)
    near = centres[4] + 0.05
    r = R.retrieve(cb, near, k=5)
    assert not r.rejected
    assert r.hits[0].edit_id == "e4"
    assert all(h.distance <= r.tau for h in r.hits)
    assert r.facts == R.distinct_values(r.hits)[::-1]  # prompt order: nearest last
    # the nearest-neighbour tau admits only the query's own cluster, nearest first
    assert {h.edit_id for h in r.hits} == {"e4"} and len(r.hits) >= 2
    assert set(r.facts) <= {"fact 4.0", "fact 4.1"}
    far = np.full(16, 500.0)
    r = R.retrieve(cb, far, k=5)
    assert r.rejected and r.hits == [] and r.facts == [] and r.nearest > r.tau
    # a sweep value of p gives another tau
    assert cb.tau_for(90) > cb.tau_for(10)


def test_retrieve_single_key_uses_radius(tmp_path):
    cb = Codebook.open(tmp_path / "one", create=True)
    sha = "0" * 64
    with cb.writer() as w:
        w.add(
            [EditRecord("e", sha, "q", "a", [], None, "t")],
            [
                KeyRecord(
                    "e",
                    "answer",
                    "The answer is a.",
                    "q",
                    sha,
                    None,
                    np.zeros(4, np.float32),
                    radius=1.0,
                )
            ],
        )
    assert cb.tau is None
    assert not R.retrieve(cb, np.full(4, 0.1)).rejected
    assert R.retrieve(cb, np.full(4, 5.0)).rejected


def test_other_edit_threshold_skips_siblings_of_the_same_edit():
    # keys 0, 1 belong to edit A (siblings at distance 1), key 2 to edit B, key 3 to C.
    # Each key's nearest OTHER-edit key: 0 -> 2 at 4, 1 -> 2 at 3, 2 -> 1 at 3, 3 -> 2 at 6.
    vecs = np.array([[0.0], [1.0], [4.0], [10.0]])
    idx, dist = R.knn_lists(vecs, 3)
    sigma = np.ones(4)
    codes = np.array([0, 0, 1, 2])
    tau = R.other_edit_threshold(idx, dist, sigma, codes, p=50, n_edits=3)
    # half the gap to the next edit
    assert tau == pytest.approx(0.5 * np.percentile([4.0, 3.0, 3.0, 6.0], 50))
    # the plain nearest rule would measure the siblings' distance 1 instead
    assert R.nearest_threshold(dist, sigma, 50, 3) == pytest.approx(np.percentile([1, 1, 3, 6], 50))
    # keys with no other-edit neighbour in their list are left out; none at all -> None
    assert R.other_edit_threshold(idx, dist, sigma, np.zeros(4, int), 50, 1) is None
    # sigma divides: doubling every sigma halves tau
    assert R.other_edit_threshold(idx, dist, 2 * sigma, codes, 50, 3) == pytest.approx(tau / 2)


def test_new_codebooks_use_the_images_rule(tmp_path):
    cb = Codebook.open(tmp_path / "cb", create=True)
    assert R.DEFAULT_TAU_RULE == "images" and R.DEFAULT_PERCENTILE == 25.0
    # a codebook without a configured rule predates it and keeps "nearest"
    assert cb.tau_rule == "nearest"


def test_other_image_threshold_groups_edits_on_one_image():
    # image X holds edits A (keys 0, 1) and B (key 2, right on top of A); image Y holds C.
    vecs = np.array([[0.0], [1.0], [1.05], [10.0], [12.0]])
    idx, dist = R.knn_lists(vecs, 4)
    sigma = np.ones(5)
    edits = np.array([0, 0, 1, 2, 2])
    images = np.array([0, 0, 0, 1, 1])
    # nearest key on another image: 0 -> 3 at 10, 1 -> 3 at 9, 2 -> 3 at 8.95, 3 -> 2, 4 -> 2
    gaps = [10.0, 9.0, 8.95, 8.95, 10.95]
    tau = R.other_image_threshold(idx, dist, sigma, images, edits, p=50)
    assert tau == pytest.approx(0.5 * np.percentile(gaps, 50))
    # the "edits" rule is set by the two edits on image X (0.05 apart)
    by_edit = R.other_edit_threshold(idx, dist, sigma, edits, 25, 3)
    assert by_edit < 0.2 * R.other_image_threshold(idx, dist, sigma, images, edits, 25)
    # one image only: no gap between images, the gap between edits is all there is
    one = np.zeros(5, int)
    assert R.other_image_threshold(idx, dist, sigma, one, edits, 50) == pytest.approx(
        R.other_edit_threshold(idx, dist, sigma, edits, 50, 3)
    )
    # the percentile floor counts images: 2 images -> p >= 50
    assert R.other_image_threshold(idx, dist, sigma, images, edits, 10) == pytest.approx(tau)


def _keys_on(image: str, edit_id: str, centre: np.ndarray, rng, n: int, scale: float):
    return [
        KeyRecord(
            edit_id,
            "answer" if j == 0 else "sentence",
            f"fact {edit_id}.{j}",
            f"text {j}",
            image,
            None,
            (centre + rng.normal(scale=scale, size=centre.shape)).astype(np.float32),
        )
        for j in range(n)
    ]


@pytest.mark.parametrize("rule", ["images", "edits"])
def test_a_second_edit_on_an_image_moves_tau_only_under_edits(tmp_path, rule):
    """Issue #19: two edits on one image sit on top of each other; under "edits" that pair
    sets tau for the whole codebook, under "images" (new codebooks) tau barely moves."""
    rng = np.random.default_rng(3)
    cb = Codebook.open(tmp_path / rule, create=True)
    edits, keys, centres = [], [], []
    for i in range(6):  # the demo's shape: 6 edits on 6 images, a handful of keys each
        img = hashlib.sha256(f"img{i}".encode()).hexdigest()
        centres.append(rng.normal(size=8) * 4)
        edits.append(EditRecord(f"e{i}", img, "q?", "a", ["F."], None, "test"))
        keys += _keys_on(img, f"e{i}", centres[-1], rng, 5, 1.0)
    with cb.writer() as w:
        w.set_config(tau_rule=rule)
        w.add(edits, keys)
    before = cb.tau
    img0 = edits[0].image_sha256
    extra = [EditRecord("x0", img0, "q2?", "a2", ["G."], None, "test")]
    # the second edit's keys share image 0's image half: each lies next to one of its keys
    near = [
        KeyRecord(
            "x0",
            k.kind,
            "x" + k.value,
            k.key_text,
            img0,
            None,
            k.vector + rng.normal(scale=0.02, size=8).astype(np.float32),
        )
        for k in keys[:5]
    ]
    with cb.writer() as w:
        w.add(extra, near)
    reopened = Codebook.open(tmp_path / rule)
    assert reopened.tau_rule == rule and reopened.tau == pytest.approx(cb.tau)
    if rule == "images":
        assert reopened.tau == pytest.approx(before, rel=0.15)
    else:  # the old rule, still readable by its name, collapses
        assert reopened.tau < 0.5 * before
