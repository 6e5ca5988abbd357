"""idf-pooled text halves (reasonedit_cli/textkeys.py), on the real MiniLM encoder."""

from __future__ import annotations

import math

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
