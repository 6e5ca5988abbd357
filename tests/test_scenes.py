"""The scene generator (issue #18): deterministic, exact ground truth, the protocol's probes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from reasonedit_cli import scenes as S


def test_world_has_the_required_variety():
    assert len(S.SHAPES) >= 6 and len(S.COLORS) >= 8 and len(S.SIZES) == 2
    assert set(S.BACKGROUNDS) == {"plain", "gradient", "texture", "noise"}
    for fam in ("color", "shape", "exist", "count", "spatial"):
        train, held = S.QUESTIONS[fam]["train"], S.QUESTIONS[fam]["heldout"]
        assert len(set(train)) >= 10 and len(set(held)) >= 4
        assert not set(train) & set(held), fam
    for s in S.SHAPES:
        assert s in S.SHAPE_RULE[s] and S.SHAPE_PROPERTY[s]
    for c in S.COLORS:
        assert c in S.COLOR_THING[c][1]


def test_scenes_are_deterministic_by_seed():
    a = [S.make_scene(random.Random(7)) for _ in range(3)]
    b = [S.make_scene(random.Random(7)) for _ in range(3)]
    assert a == b
    assert np.array_equal(np.asarray(S.render(a[0])), np.asarray(S.render(b[0])))
    assert S.png_bytes(S.render(a[0])) == S.png_bytes(S.render(b[0]))
    assert S.make_scene(random.Random(8)) != a[0]


def test_scene_contents_vary_and_stay_distinct_within_a_scene():
    rng = random.Random(0)
    scenes = [S.make_scene(rng) for _ in range(300)]
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4}
    assert {s.background for s in scenes} == set(S.BACKGROUNDS)
    assert {o.size for s in scenes for o in s.objects} == set(S.SIZES)
    assert {o.shape for s in scenes for o in s.objects} == set(S.SHAPES)
    assert {o.color for s in scenes for o in s.objects} == set(S.COLORS)
    for s in scenes:
        assert len({o.shape for o in s.objects}) == len(s.objects)
        assert len({o.color for o in s.objects}) == len(s.objects)
        assert len({o.region for o in s.objects}) == len(s.objects)
    fixed = S.make_scene(random.Random(3), fixed=(("star", "red"),))
    assert fixed.has("red", "star")


def test_rendered_object_has_its_colour_in_its_quadrant():
    sc = S.Scene(
        (S.SceneObject("square", "blue", "large", "top left", 16.0, 16.0),),
        "plain",
        1,
        (230, 230, 230),
    )
    px = np.asarray(S.render(sc)).astype(int)
    assert px.shape == (64, 64, 3)
    assert np.abs(px[16, 16] - np.array(S.RGB["blue"])).max() < 10  # object centre
    assert np.abs(px[48, 48] - np.array([230, 230, 230])).max() < 10  # empty quadrant


def test_questions_have_exact_answers():
    sc = S.Scene(
        (
            S.SceneObject("star", "red", "small", "top left", 16.0, 16.0),
            S.SceneObject("circle", "green", "large", "bottom right", 48.0, 48.0),
        ),
        "noise",
        2,
    )
    rng = random.Random(0)
    star = sc.by_shape("star")
    assert S.question(sc, "color", rng, target=star).answer == "red"
    assert S.question(sc, "shape", rng, target=star).answer == "star"
    assert S.question(sc, "exist", rng, target=star).answer == "yes"
    assert S.question(sc, "count", rng).answer == "two"
    for _ in range(20):
        q = S.question(sc, "spatial", rng)
        a_is_star = q.text.index("star") < q.text.index("circle")
        below_or_right = "below" in q.text or "right" in q.text
        assert q.answer == ("yes" if a_is_star != below_or_right else "no"), q.text
    one = S.Scene((star,), "plain", 3)
    assert S.question(one, "spatial", rng) is None
    held = S.question(sc, "color", rng, "heldout", target=star)
    assert held.text in {t.format(shape="star") for t in S.QUESTIONS["color"]["heldout"]}


def test_reasoning_chains_name_the_region_and_a_rule():
    o = S.SceneObject("star", "red", "small", "top left", 16.0, 16.0)
    assert S.shape_chain(o) == [
        "The red object in the top left has five points.",
        "An object with five points is a star.",
    ]
    assert S.color_chain(o) == [
        "The star in the top left is the colour of a stop sign.",
        "Stop signs are red.",
    ]


def test_build_scenes_probes_follow_the_protocol():
    """Plumbing with a scripted unedited model: every colour answer is wrong (`none`),
    every other answer is right (it reads the answer off the builder's own scenes)."""
    truth: dict[tuple[bytes, str], str] = {}
    real_question = S.question

    def spy(scene, family, rng, split="train", **kw):
        q = real_question(scene, family, rng, split, **kw)
        if q is not None:
            truth[(S.png_bytes(S.render(scene)), q.text)] = q.answer
        return q

    def ask(images, questions):
        out = []
        for b, q in zip(images, questions):
            a = truth.get((b, q), "none")
            out.append("none" if any(w in q for w in ("color", "colour")) else a)
        return out

    S.question = spy
    try:
        edits, probes, info = S.build_scenes(ask, n_edits=6, seed=5, batch_size=8)
    finally:
        S.question = real_question
    assert len(edits) == 6 and info["mistakes_found"] == 6
    assert all("col" in e.question for e in edits)
    kinds = [p.kind for p in probes]
    for k in ("t_gen", "i_gen", "r_gen", "coe_gen"):
        assert kinds.count(k) == 6, k
    assert kinds.count("loc") == 6 and kinds.count("hard_loc") >= 1
    ids = {e.id for e in edits}
    for p in probes:
        assert (p.edit_id in ids) if p.kind not in ("loc", "hard_loc") else p.edit_id is None
    by_id = {e.id: e for e in edits}
    for p in probes:
        if p.kind == "t_gen":
            assert p.image_bytes == by_id[p.edit_id].image_bytes
            assert p.question != by_id[p.edit_id].question
        if p.kind in ("i_gen", "coe_gen"):
            assert p.image_bytes != by_id[p.edit_id].image_bytes
            assert p.question == by_id[p.edit_id].question
            assert p.answer == by_id[p.edit_id].answer
        if p.kind == "r_gen":
            assert p.answer == "yes"
    again = S.build_scenes(ask, n_edits=6, seed=5, batch_size=8)
    assert [e.id for e in again[0]] == [e.id for e in edits]


@pytest.mark.parametrize("family", ["color", "shape", "exist", "count", "spatial"])
def test_every_family_poses_questions(family):
    rng = random.Random(1)
    got = [S.question(S.make_scene(rng, n_objects=3), family, rng) for _ in range(10)]
    assert all(q is not None and q.answer for q in got)


def test_hard_locality_is_scored_like_locality():
    from reasonedit_cli.evaluation import METRIC_NAMES, Outcome, Probe, summarize

    probes = [Probe(b"", "q1", "red", "hard_loc"), Probe(b"", "q2", "blue", "hard_loc")]
    outs = [Outcome("red", [], True), Outcome("green", ["e1"], False)]
    rep = summarize(probes, {"reasonedit": outs})
    assert rep["methods"]["reasonedit"][METRIC_NAMES["hard_loc"]] == 0.5
    assert rep["retrieval"]["hard_loc"] == 0.5  # share that retrieved nothing


def test_bundled_short_names_resolve_to_packaged_directories():
    from pathlib import Path

    from reasonedit_cli.vlm import DEFAULT_MODEL, bundled_name, model_path

    assert bundled_name("scenes") == "bundled:scenes_vlm"
    assert bundled_name("demo") == "bundled:demo_vlm"
    assert bundled_name("org/model") == "org/model"
    assert model_path("bundled:demo_vlm") == DEFAULT_MODEL
    assert Path(model_path("bundled:scenes_vlm")).name == "scenes_vlm"
    assert model_path("/some/dir") == "/some/dir"


def test_evaluate_scenes_end_to_end_on_the_bundled_scenes_model(tmp_path):
    """The CLI on the real scenes VLM: mistakes become edits with every probe kind."""
    import json

    from typer.testing import CliRunner

    from reasonedit_cli.cli import app

    args = ["evaluate", "--dataset", "scenes", "--model", "scenes", "--n-edits", "2"]
    args += ["--methods", "unedited,reasonedit", "--no-sweep-p", "--json"]
    result = CliRunner().invoke(app, [*args, "--codebook", str(tmp_path / "cb")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"]["acc"] == 2 and report["counts"]["loc"] == 2
    assert report["dataset"]["dataset"] == "scenes"
    assert report["methods"]["unedited"]["Acc"] == 0.0  # edits are the model's mistakes
    assert report["methods"]["reasonedit"]["Loc"] is not None
    for kind in ("t_gen", "i_gen", "r_gen"):
        assert report["counts"][kind] == 2


def test_unknown_dataset_is_a_usage_error():
    from typer.testing import CliRunner

    from reasonedit_cli.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--dataset", "nope"])
    assert result.exit_code == 2
    assert "supported: easy-vqa, scenes" in result.output
