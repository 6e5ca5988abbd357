"""Retrieval levers of #18: idf-pooled text halves (textkeys.py) and `embedding.sibling_w`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from reasonedit_cli.text import TextEncoder
from reasonedit_cli.textkeys import IdfText

FITTED = [
    "what color is the star?",
    "what color is the circle?",
    "which shape is red?",
    "The star in the top left is the colour of the sky.",
]


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    return TextEncoder()


def test_token_states_pool_to_the_sentence_embedding(enc):
    texts = ["what hue is the star?", "The sky is blue."]
    for (ids, h), ref in zip(enc.token_states(texts), enc.encode(texts)):
        assert len(ids) == len(h) and h.shape[1] == enc.dim
        m = h.mean(0)
        np.testing.assert_allclose(m / np.linalg.norm(m), ref, atol=1e-5)


def test_weights_come_from_the_fitted_texts(enc):
    idf = IdfText.fit(enc, FITTED, "idf0")
    n = len(FITTED)
    [(ids, _)] = enc.token_states(["what color is the star?"])
    cls_token, what = int(ids[0]), int(ids[1])
    assert idf.weight(cls_token) == 0.0  # in every fitted text
    assert idf.weight(what) == pytest.approx(math.log((1 + n) / (1 + 2)))
    [(hue, _)] = enc.token_states(["hue"])
    unseen = int(hue[1])
    assert unseen not in idf.df
    assert idf.weight(unseen) == 0.0  # idf0: a token no key holds weighs nothing
    assert IdfText.fit(enc, FITTED, "idf").weight(unseen) == pytest.approx(math.log(1 + n))


def test_encode_is_unit_length_and_uniform_weights_give_the_mean(enc):
    idf = IdfText.fit(enc, FITTED, "idf0")
    v = idf.encode(["what hue is the star?", "what color is the circle?"])
    assert v.shape == (2, enc.dim)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # one fitted text: every token weighs 0, so the pooling falls back to the plain mean
    one = IdfText.fit(enc, ["what color is the star?"], "idf0")
    np.testing.assert_allclose(
        one.encode(["what color is the star?"]), enc.encode(["what color is the star?"]), atol=1e-5
    )


def test_mean_is_not_an_idf_mode(enc):
    with pytest.raises(ValueError):
        IdfText.fit(enc, FITTED, "mean")


def test_sibling_w_raises_w_only_where_an_image_holds_two_edits():
    from reasonedit_cli import retrieval as R
    from reasonedit_cli.embedding import sibling_w

    rng = np.random.default_rng(0)
    n_img = 12
    img_h = rng.normal(size=(n_img, 8)) * 3.0
    # two edits per image, each with two keys (question, sentence) on that image
    h = np.repeat(img_h, 4, axis=0)
    s = rng.normal(size=(len(h), 6))
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    images = np.repeat(np.arange(n_img), 4)
    edits = np.repeat(np.arange(2 * n_img), 2)
    w0 = 0.5
    w = sibling_w(h, s, images, edits, w0)
    assert w > w0
    kv = np.concatenate([h, w * s], axis=1)
    knn_i, knn_d = R.knn_lists(kv)
    sigma = R.sigma_from_knn(knn_d)
    tau = R.other_image_threshold(knn_i, knn_d, sigma, images, edits, 25.0)
    d = R.pairwise_l2(kv, kv) / sigma[:, None]
    sib = (images[:, None] == images[None, :]) & (edits[:, None] != edits[None, :])
    assert np.percentile(np.where(sib, d, np.inf).min(1), 25) >= tau
    # one edit per image: the auto w stays
    assert sibling_w(h, s, np.arange(len(h)) // 2, np.arange(len(h)) // 2, w0) == w0


def _scene_edits(n_scenes: int, per_scene: int):
    """Edits on generated scenes: `per_scene` colour questions about distinct objects."""
    import random

    from reasonedit_cli import scenes as S
    from reasonedit_cli.edits import Edit

    out = []
    for i in range(n_scenes):
        sc = S.make_scene(random.Random(i), n_objects=max(per_scene, 2))
        data = S.png_bytes(S.render(sc))
        for o in sc.objects[:per_scene]:
            e = Edit(
                image_path=Path(f"s{i}.png"),
                question=f"what color is the {o.shape}?",
                answer=o.color,
                reasoning=S.color_chain(o),
                source="test",
                image_bytes=data,
                image_ext="png",
            )
            e.ensure_id()
            out.append(e)
    return out


@pytest.mark.parametrize("per_scene", [1, 2])
def test_a_new_codebook_takes_the_first_batch_w(tmp_path, per_scene):
    """add-edit's uncalibrated w is `first_batch_w`: the auto w where every image holds
    one edit, raised by `sibling_w` where an image holds two (real scenes VLM, MiniLM)."""
    from reasonedit_cli.editor import Editor, crop
    from reasonedit_cli.embedding import auto_w, first_batch_w

    ed = Editor(tmp_path / "cb", model="scenes", create=True)
    edits = _scene_edits(4, per_scene)
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(e.image_bytes)).convert("RGB") for e in edits]
    ed.add_edits(edits, patches="none")
    specs = ed.key_specs(edits, images, patches="none")
    imgs = [crop(images[s.edit_index], s.box) if s.box else images[s.edit_index] for s in specs]
    texts = [s.key_text for s in specs]
    h = ed.embedder.vlm_half(imgs, texts)
    s = ed.text.encode(texts)
    codes_i = [edits[sp.edit_index].image_sha256 for sp in specs]
    codes_e = [edits[sp.edit_index].id for sp in specs]
    w = ed.config["w"]
    assert w == pytest.approx(first_batch_w(h, s, codes_i, codes_e), rel=1e-5)
    if per_scene == 1:
        assert w == pytest.approx(auto_w(h, s), rel=1e-5)
    else:
        assert w >= auto_w(h, s) * (1 - 1e-6)
