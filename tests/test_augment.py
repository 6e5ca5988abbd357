"""Tests of the seeded image and text augmentations.

They feed calibration (docs/method.md#calibration) and the radii (docs/method.md#radii).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from reasonedit_cli.augment import (
    Augmenter,
    augment_image,
    paraphrase_text,
    perturb_text,
)
from reasonedit_cli.errors import ReasonEditError


def _words(text: str) -> list[str]:
    return [w for w in "".join(c if c.isalnum() else " " for c in text.lower()).split()]


@pytest.fixture
def img() -> Image.Image:
    a = np.zeros((48, 64, 3), dtype=np.uint8)
    a[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]
    a[10:30, 20:40] = (20, 200, 60)
    return Image.fromarray(a)


def test_augment_image_is_seeded_and_keeps_size(img: Image.Image) -> None:
    before = np.asarray(img).copy()
    a, b = augment_image(img, 5), augment_image(img, np.random.default_rng(5))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.size == img.size and a.mode == img.mode
    np.testing.assert_array_equal(np.asarray(img), before)  # input untouched
    diff = np.abs(np.asarray(a, float) - before).mean()
    assert 0 < diff < 80  # changed, but the picture is still recognisable
    c = augment_image(img, 6)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_augment_image_other_modes(img: Image.Image, mode: str) -> None:
    out = augment_image(img.convert(mode), 0)
    assert out.size == img.size
    assert out.mode in ("L", "RGB")


SENTENCES = [
    "What shape is in the image?",
    "Is there a red circle?",
    "What colour is the shape?",
    "The circle is blue.",
    "Paris is the capital of France.",
    "How many",
]


@pytest.mark.parametrize("text", SENTENCES)
def test_perturb_text_changes_words_deterministically(text: str) -> None:
    outs = [perturb_text(text, seed) for seed in range(5)]
    assert outs == [perturb_text(text, np.random.default_rng(seed)) for seed in range(5)]
    for out in outs:
        assert out.strip()
        assert _words(out) != _words(text)
        assert len(out) <= 3 * len(text) + 30  # light: a filler at most


def test_perturb_text_uses_synonyms_and_keeps_case() -> None:
    outs = {perturb_text("What colour is the image?", seed) for seed in range(20)}
    assert any(o.startswith("Which") or "Which" in o or "which" in o for o in outs)
    assert any("color" in o for o in outs)
    assert any("picture" in o for o in outs)
    # Proper nouns are not lowercased when a filler is put in front.
    for seed in range(10):
        assert "Paris" in perturb_text("Paris is the capital of France.", seed)


def test_perturb_text_rejects_empty() -> None:
    with pytest.raises(ReasonEditError):
        perturb_text("  ", 0)


def test_paraphrase_text_uses_good_paraphrases_only() -> None:
    text = "What shape is in the image?"
    assert paraphrase_text(text, 0, lambda t: '"Which figure appears here?"\nmore') == (
        "Which figure appears here?"
    )
    fallback = perturb_text(text, 0)
    for junk in ("", "   ", text, text.upper(), "x " * 100):
        assert paraphrase_text(text, 0, lambda t, j=junk: j) == fallback
    assert paraphrase_text(text, 0, lambda t: None) == fallback  # type: ignore[arg-type]
    assert paraphrase_text(text, 0) == fallback


def test_augmenter() -> None:
    rng = np.random.default_rng(0)
    assert Augmenter().text("What shape?", rng) != "What shape?"
    aug = Augmenter.with_paraphraser(lambda t: "Which figure is it?")
    assert aug.text("What shape?", np.random.default_rng(0)) == "Which figure is it?"
    assert Augmenter.with_paraphraser(None) == Augmenter()
