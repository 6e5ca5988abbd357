"""GRACE as published: a trained key-value adaptor at one language layer, model frozen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reasonedit_cli.baselines.grace import GraceAdaptor

SAMPLE = Path(__file__).resolve().parent.parent / "sample_edits"
QUESTION = "what shape is in the image?"
UNRELATED = "Describe this image. The sign is red. Grass is green."


@pytest.fixture(scope="module")
def demo_vlm():
    from reasonedit_cli.vlm import VLM

    return VLM(device="cpu")


def test_grace_on_the_demo_vlm_fixes_edits_and_keeps_unrelated_answers(demo_vlm):
    from reasonedit_cli.datasets import read_edits
    from reasonedit_cli.edits import decode_image
    from reasonedit_cli.evaluation import exact_match, read_probes

    edits, _ = read_edits(str(SAMPLE / "edits.jsonl"))
    edits = edits[1:4]  # two shape edits and a colour edit
    images = [e.load_image() for e in edits]
    questions = [e.question for e in edits]
    # unrelated: a question no edit asks, on other images and on the edited ones (the
    # same questions on other images can fall inside a radius: GRACE's locality cost,
    # measured by `evaluate`)
    loc = [p for p in read_probes(str(SAMPLE / "probes.jsonl")) if p.kind == "loc"]
    loc_images = [decode_image(p.image_bytes, p.where) for p in loc] + images
    loc_questions = ["is there a red shape?"] * len(loc_images)
    before = demo_vlm.generate(images, questions)
    loc_before = demo_vlm.generate(loc_images, loc_questions)
    assert not any(exact_match(a, e.answer) for a, e in zip(before, edits))  # all wrong

    grace = GraceAdaptor(demo_vlm)
    try:
        eps = grace.calibrate_eps(images, questions)
        assert eps > 1.0  # hidden states of norm ~140: the published 1.0 would be tiny
        for e, img in zip(edits, images):
            log = grace.add_edit(img, e.question, e.answer, e.id or "")
            assert log.solved
        after, hits = grace.generate(images, questions)
        assert [exact_match(a, e.answer) for a, e in zip(after, edits)] == [True] * len(edits)
        assert all(h >= 0 for h in hits)
        loc_after, loc_hits = grace.generate(loc_images, loc_questions)
        assert loc_after == loc_before and loc_hits == [-1] * len(loc_images)
    finally:
        grace.close()
    # the hook is gone: the model is exactly the unedited one again
    assert demo_vlm.generate(images, questions) == before


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from tiny_models import BUILDERS

    from reasonedit_cli.vlm import VLM

    path = BUILDERS["qwen2_vl"](tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")
    return VLM(str(path), device="cpu")


@pytest.fixture
def two_images(images):
    return [Image.open(images[n]).convert("RGB") for n in ("red_circle", "blue_triangle")]


@pytest.fixture(scope="module")
def tiny_paligemma(tmp_path_factory):
    from tiny_models import BUILDERS

    from reasonedit_cli.vlm import VLM

    path = BUILDERS["paligemma"](tmp_path_factory.mktemp("models") / "tiny-paligemma")
    return VLM(str(path), device="cpu")


@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma"])
def test_grace_on_tiny_architectures(family, request, two_images):
    vlm = request.getfixturevalue("tiny_qwen" if family == "qwen2_vl" else "tiny_paligemma")
    img, other = two_images
    before = vlm.generate([img, other], [QUESTION, UNRELATED])
    grace = GraceAdaptor(vlm)
    try:
        k = grace.keys_of([img, img], [QUESTION, UNRELATED])
        grace.eps_init = 0.1 * float(np.linalg.norm(k[0] - k[1]))
        log = grace.add_edit(img, QUESTION, "triangle", "e1")
        assert log.action == "add" and log.solved
        after, hits = grace.generate([img, other], [QUESTION, UNRELATED])
        assert after[0].startswith("triangle") and not before[0].startswith("triangle")
        assert after[1] == before[1] and hits == [0, -1]
        # multiple-choice scoring with the adaptor on prefers the edited answer
        losses = grace.answer_loss([img, img], [QUESTION] * 2, ["triangle", "circle"])
        assert losses[0] < losses[1]
    finally:
        grace.close()
    assert vlm.generate([img, other], [QUESTION, UNRELATED]) == before


def test_grace_codebook_rules_expand_and_split(tiny_qwen, two_images):
    img, other = two_images
    grace = GraceAdaptor(tiny_qwen)
    try:
        k = grace.keys_of([img, other], [QUESTION, QUESTION])
        d = float(np.linalg.norm(k[0] - k[1]))
        grace.eps_init = d  # the second image is within eps + eps_init of the first key
        assert grace.add_edit(img, QUESTION, "triangle", "a").action == "add"
        log = grace.add_edit(other, QUESTION, "Triangle", "b")  # same answer: expand
        assert log.action == "expand" and len(grace.entries) == 1
        assert grace.entries[0].eps == pytest.approx(max(d, log.distance or 0.0))
        assert grace.entries[0].edit_ids == ["a", "b"]
        log = grace.add_edit(other, QUESTION, "circle", "c")  # another answer: split
        assert log.action == "split" and len(grace.entries) == 2
        half = (log.distance or 0.0) / 2
        assert [e.eps for e in grace.entries] == pytest.approx([half, half])
        assert [e.label for e in grace.entries] == ["triangle", "circle"]
    finally:
        grace.close()


def test_grace_refuses_a_non_language_layer(tiny_qwen):
    from reasonedit_cli.errors import UsageError

    with pytest.raises(UsageError):
        GraceAdaptor(tiny_qwen, "vision.0")
