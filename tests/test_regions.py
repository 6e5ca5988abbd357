"""Region keys (reasonedit_cli/regions.py): windows, named regions, token grids, retrieval."""

from __future__ import annotations

import numpy as np
import pytest

from reasonedit_cli import regions as R


def test_windows_tile_the_grid_at_half_stride():
    wins = R.windows(4)
    assert len(wins) == 9  # 2x2 windows at stride 1 on a 4x4 grid
    assert wins[0].tokens == (0, 1, 4, 5) and wins[0].box == (0.0, 0.0, 0.5, 0.5)
    assert wins[8].tokens == (10, 11, 14, 15) and wins[8].box == (0.5, 0.5, 1.0, 1.0)
    assert wins[4].box == (0.25, 0.25, 0.75, 0.75)
    assert [len(w.tokens) for w in R.windows(2)] == [1, 1, 1, 1]
    assert len(R.windows(8)) == 9 and len(R.windows(8)[0].tokens) == 16  # side 4, stride 2


@pytest.mark.parametrize(
    ("sentence", "box"),
    [
        ("The star in the top left is the colour of a stop sign.", (0.0, 0.0, 0.5, 0.5)),
        ("The red object in the bottom right has five points.", (0.5, 0.5, 1.0, 1.0)),
        ("The cup on the left is empty.", (0.0, 0.0, 0.5, 1.0)),
        ("A bird at the top of the tree.", (0.0, 0.0, 1.0, 0.5)),
        ("The ball in the upper-right corner.", (0.5, 0.0, 1.0, 0.5)),
        ("The dog in the centre sleeps.", (0.25, 0.25, 0.75, 0.75)),
        ("An object with five points is a star.", None),
        ("The star is to the left of the circle.", None),  # a relation, not a region
    ],
)
def test_named_box(sentence, box):
    assert R.named_box(sentence) == box


def test_window_for_snaps_pixel_boxes():
    wins = R.windows(4)
    assert R.window_for([0, 0, 32, 32], (64, 64), wins) == 0
    assert R.window_for([40, 36, 64, 64], (64, 64), wins) == 8
    # a 3x3-grid cell of the patch search (21 px) in the top right
    assert wins[R.window_for([43, 0, 64, 21], (64, 64), wins)].box == (0.5, 0.0, 1.0, 0.5)
    assert R.iou((0, 0, 1, 1), (0, 0, 0.5, 0.5)) == pytest.approx(0.25)


def test_region_box_prefers_the_named_region_then_the_patch_crop():
    from reasonedit_cli.editor import KeySpec

    specs = [
        KeySpec(0, "answer", "q", "v"),
        KeySpec(0, "patch", "s", "s", box=[0, 43, 21, 64]),
        KeySpec(1, "patch", "s", "s", box=[43, 43, 64, 64]),
    ]
    chain = ["The star in the top right is the colour of grass.", "Grass is green."]
    assert R.region_box(specs, 0, chain, (64, 64)) == [32, 0, 64, 32]
    assert R.region_box(specs, 0, chain, (64, 64), source="patches") == [0, 43, 21, 64]
    assert R.region_box(specs, 1, ["Grass is green."], (64, 64)) == [43, 43, 64, 64]
    assert R.region_box(specs[:1], 0, ["Grass is green."], (64, 64)) is None
    # the object index keys only named objects: no patch-crop fallback
    assert R.region_box(specs, 1, ["Grass is green."], (64, 64), "named-only") is None
    assert R.region_box(specs, 0, chain, (64, 64), "named-only") == [32, 0, 64, 32]


@pytest.fixture(scope="module")
def editor(tiny_llava, tmp_path_factory):
    from reasonedit_cli.editor import Editor

    return Editor(
        tmp_path_factory.mktemp("cb") / "cb", model=str(tiny_llava), device="cpu", create=True
    )


def test_token_grid_pools_to_the_whole_image_key(editor, images):
    from PIL import Image

    imgs = [Image.open(images[k]).convert("RGB") for k in ("red_circle", "blue_triangle")]
    t = R.token_states(editor.vlm, imgs, "projector")
    assert t.shape[:2] == (2, 16)  # 32x32 px, patch 8: a 4x4 grid, CLS dropped
    pooled = editor.vlm.pooled_inputs(imgs, ["x", "x"], ["projector"])["projector"]
    np.testing.assert_allclose(t.mean(1), pooled, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="vision-side layer"):
        R.token_states(editor.vlm, imgs, "language.0")


def test_region_queries_and_best_retrieval(editor, images, tmp_path):
    from PIL import Image

    from reasonedit_cli.edits import edit_from_record

    img = Image.open(images["red_circle"]).convert("RGB")
    other = Image.open(images["green_rect"]).convert("RGB")
    e = edit_from_record(
        {
            "image": str(images["red_circle"]),
            "question": "what color is it?",
            "answer": "red",
            "reasoning": ["It is red."],
        },
        tmp_path,
        "test",
        "test",
    )
    e2 = edit_from_record(
        {
            "image": str(images["blue_triangle"]),
            "question": "what shape is it?",
            "answer": "x",
            "reasoning": ["It is x."],
        },
        tmp_path,
        "test",
        "test",
    )
    editor.add_edits([e, e2], patches="none")
    rk = R.RegionEmbedder(editor.vlm, "projector", editor.text.encode, editor.embedder.w)
    q = rk.query_vectors([img, other], ["what color is it?", "what shape is it?"])
    assert q.shape == (2, 10, editor.embedder.dim)
    # the whole-image row is the ordinary dual key of the query
    np.testing.assert_allclose(
        q[0, 0], editor.embedder.embed([img], ["what color is it?"])[0], rtol=1e-4, atol=1e-4
    )
    far = np.full_like(q[0, 0], 1e4)
    hit = R.best_retrieval(editor.codebook, np.stack([far, q[0, 0]]), k=5)
    assert not hit.rejected and hit.edit_ids[0] == e.ensure_id()
    assert R.best_retrieval(editor.codebook, np.stack([far, far]), k=5).rejected
    keys, boxes = rk.key_vectors([img], ["what color is it?"], [[0, 0, 20, 20]])
    assert boxes == [[0, 0, img.width // 2, img.height // 2]] and keys.shape == (
        1,
        editor.embedder.dim,
    )
    np.testing.assert_allclose(keys[0], q[0, 1], rtol=1e-5, atol=1e-5)  # window 0


def test_object_index_unions_with_reasonedit_on_the_scenes_model(tmp_path):
    """`reasonedit-objects` on the real scenes VLM: one region key per edit in a separate
    index, a wider gate than its own tau, and every probe keeps `reasonedit`'s edits."""
    from reasonedit_cli import evaluation as E
    from reasonedit_cli import objects as O
    from reasonedit_cli.editor import Editor
    from reasonedit_cli.retrieval import retrieve
    from reasonedit_cli.store import Codebook

    ed = Editor(tmp_path / "cb", model="scenes", create=True)
    gen = E.Generations(ed.vlm, 16)
    edits, probes, _ = E.build_dataset("scenes", gen, n_edits=2, seed=1)
    ev = E.Evaluation(ed, edits, probes, workdir=tmp_path / "w", gen=gen, patch_search=False)
    plain = ev.run("reasonedit")
    objs = R.object_outcomes(ev)
    assert len(objs) == len(ev.probes)
    for a, b in zip(plain, objs):
        assert set(a.edit_ids) <= set(b.edit_ids)
        assert b.rejected <= a.rejected  # the union rejects only what both reject

    # the object index that run wrote (reasonedit_cli.objects), as `ask` opens it
    index, problem = O.open_index(Codebook.open(tmp_path / "w" / "reasonedit-objects"))
    assert problem is None and index is not None
    ocb = index.codebook
    kinds = ocb.keys_table().column("kind").to_pylist()
    assert ocb.n_keys == len(edits) and set(kinds) == {"answer"}  # a named region each
    gate = R.ScaledTau(ocb, 1.5)
    assert gate.tau == pytest.approx(1.5 * ocb.tau) and gate.config == dict(ocb.config)
    assert gate.tau_for(50) == pytest.approx(1.5 * ocb.tau_for(50))
    # a query between tau and 1.5 tau from a key: the plain gate rejects, the wide admits
    v = ocb.vectors()[0]
    d = np.random.default_rng(0).normal(size=v.shape)
    found = False
    for s in np.geomspace(1e-3, 1e4, 3000):
        x = (v + s * d / np.linalg.norm(d)).astype(np.float32)
        c = ocb.search(x[None], k=1)[0][0][2]
        if ocb.tau * 1.05 < c <= 1.4 * ocb.tau:
            assert retrieve(ocb, x, k=5).rejected and not retrieve(gate, x, k=5).rejected
            found = True
            break
    assert found


def test_union_retrieval_keeps_the_main_facts_last():
    from reasonedit_cli.retrieval import Retrieval

    main = Retrieval(rejected=False, facts=["a", "b"])
    extra = Retrieval(rejected=False, facts=["c", "b"])
    assert R.union_retrieval(main, extra).facts == ["c", "a", "b"]
    assert R.union_retrieval(main, Retrieval(rejected=True)) is main
    assert R.union_retrieval(Retrieval(rejected=True), extra) is extra
