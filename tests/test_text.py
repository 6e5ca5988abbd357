"""The text encoder: the light transformers path equals sentence-transformers exactly."""

from __future__ import annotations

import numpy as np

from reasonedit_cli.text import TextEncoder, default_text_model_path


def test_default_encoder_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    texts = ["The shape has three corners.", "what color is the shape?", "Grass is green."]
    enc = TextEncoder()
    assert enc.dim == 384
    ours = enc.encode(texts)
    ref = SentenceTransformer(str(default_text_model_path()), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_related_sentences_are_closer():
    enc = TextEncoder()
    a, b, c = enc.encode(
        ["A triangle has three corners.", "Triangles have 3 corners.", "I like tea."]
    )
    assert np.dot(a, b) > np.dot(a, c)
