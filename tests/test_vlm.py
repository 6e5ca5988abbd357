"""The VLM backend on a tiny random-weight LLaVA: layers, hooks, yes/no, loss, generate."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from reasonedit_cli.errors import ReasonEditError, UsageError
from reasonedit_cli.vlm import VLM


@pytest.fixture(scope="module")
def vlm(tiny_llava):
    return VLM(str(tiny_llava), device="cpu")


def _imgs():
    return [Image.new("RGB", (48, 40), c) for c in ("red", "blue", "green")]


def test_loading_freezes_the_model_and_leaves_grad_mode_alone(vlm):
    """A VLM is frozen on its own weights; the process's grad mode is the caller's (a
    training script or GRACE's value optimisation runs autograd in the same process)."""
    import torch

    assert torch.is_grad_enabled()
    assert not any(p.requires_grad for p in vlm.model.parameters())
    vlm.pooled_inputs(_imgs()[:1], ["a"], ["language.1"])  # a forward builds no graph
    x = torch.ones(2, requires_grad=True)
    (x * 3).sum().backward()
    assert x.grad is not None and x.grad.tolist() == [3.0, 3.0]


def test_candidate_layers_cover_all_roles(vlm):
    layers = vlm.candidate_layers()
    labels = [li.label for li in layers]
    raw = ["vision.0", "vision.1", "projector", "language.0", "language.1"]
    assert labels == [x for name in raw for x in (name, name + ".normed")]
    assert vlm.resolve_layer("language.mid").label == "language.1"
    assert vlm.resolve_layer("language.mid.normed").label == "language.1.normed"
    assert vlm.resolve_layer("model.language_model.layers.0").label == "language.0"
    # the normed point: the input of the MLP's first Linear, after the block's norm
    hooks = {li.label: li.module for li in layers if li.normed}
    assert hooks == {
        "vision.0.normed": "model.vision_tower.encoder.layers.0.mlp.fc1",
        "vision.1.normed": "model.vision_tower.encoder.layers.1.mlp.fc1",
        "projector.normed": "model.multi_modal_projector.linear_1",
        "language.0.normed": "model.language_model.layers.0.mlp.gate_proj",
        "language.1.normed": "model.language_model.layers.1.mlp.gate_proj",
    }
    assert vlm.resolve_layer(hooks["language.0.normed"]).label == "language.0.normed"
    with pytest.raises(UsageError, match="this model has"):
        vlm.resolve_layer("language.9")


def test_pooled_inputs_one_forward_for_all_layers(vlm):
    before = vlm.forward_calls
    out = vlm.pooled_inputs(
        _imgs(),
        ["a", "what shape is in the image?", "b c"],
        ["vision.0", "projector", "language.1"],
    )
    assert vlm.forward_calls - before == 1
    assert out["vision.0"].shape == (3, 32)
    assert out["projector"].shape == (3, 32)
    assert out["language.1"].shape == (3, 32)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())


def test_pooled_inputs_batched_equals_single(vlm):
    imgs = _imgs()
    texts = ["short", "a much longer prompt about the shape in the image", "mid size text"]
    batched = vlm.pooled_inputs(imgs, texts, ["language.0"])["language.0"]
    single = np.concatenate(
        [vlm.pooled_inputs([i], [t], ["language.0"])["language.0"] for i, t in zip(imgs, texts)]
    )
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_yes_probability_is_a_probability_and_batch_invariant(vlm):
    imgs = _imgs()
    prompts = ["Does the image show a red shape?", "Does the image show a sky?", "x?"]
    p = vlm.yes_probability(imgs, prompts)
    assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
    single = [vlm.yes_probability([i], [q])[0] for i, q in zip(imgs, prompts)]
    np.testing.assert_allclose(p, single, atol=1e-5)


def test_answer_loss_batched_equals_single(vlm):
    imgs = _imgs()
    prompts = ["Describe this image."] * 3
    answers = ["The shape is red.", "A shape with three corners is a triangle.", "yes"]
    loss = vlm.answer_loss(imgs, prompts, answers)
    assert loss.shape == (3,) and (loss > 0).all()
    single = [vlm.answer_loss([i], [p], [a])[0] for i, p, a in zip(imgs, prompts, answers)]
    np.testing.assert_allclose(loss, single, rtol=1e-4)


def test_generate_batched_equals_single(vlm):
    imgs = _imgs()
    prompts = ["what shape is in the image?", "what color?", "The sky is blue. what color?"]
    batched = vlm.generate(imgs, prompts, max_new_tokens=4)
    single = [vlm.generate([i], [p], max_new_tokens=4)[0] for i, p in zip(imgs, prompts)]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


def test_chat_text_uses_the_model_template(vlm):
    assert vlm.chat_text("hi?") == "USER: <image>\nhi? ASSISTANT:"


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        VLM(str(tmp_path / "nope"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReasonEditError, match="cannot load model"):
        VLM(str(tmp_path / "empty"), device="cpu")


def test_unknown_device_and_dtype(tiny_llava):
    with pytest.raises(UsageError, match="unknown device"):
        VLM(str(tiny_llava), device="tpu")
    with pytest.raises(UsageError, match="unknown dtype"):
        VLM(str(tiny_llava), device="cpu", dtype="int3")


def test_normed_points_are_the_norm_outputs_and_share_the_forward(vlm):
    """`language.N.normed` is what the block's post-attention norm hands its MLP and
    `vision.N.normed` what the CLIP block's second norm hands `mlp.fc1`: checked against
    forward hooks on the norms themselves, pooled the same way."""
    import torch

    imgs = _imgs()
    texts = ["short", "a much longer prompt about the shape in the image", "mid size text"]
    names = ["language.1", "language.1.normed", "vision.0", "vision.0.normed"]
    before = vlm.forward_calls
    out = vlm.pooled_inputs(imgs, texts, names)
    assert vlm.forward_calls - before == 1
    norms = {
        "language.1.normed": vlm.model.model.language_model.layers[1].post_attention_layernorm,
        "vision.0.normed": vlm.model.model.vision_tower.encoder.layers[0].layer_norm2,
    }
    seen: dict = {}
    handles = [
        m.register_forward_hook(lambda _m, _a, o, k=k: seen.__setitem__(k, o))
        for k, m in norms.items()
    ]
    try:
        batch = vlm.processor(
            images=imgs,
            text=[vlm.chat_text(t) for t in texts],
            padding=True,
            return_tensors="pt",
        )
        vlm.model(**batch)
    finally:
        for h in handles:
            h.remove()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    lang = (seen["language.1.normed"] * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(out["language.1.normed"], lang.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        out["vision.0.normed"], seen["vision.0.normed"].mean(1).numpy(), atol=1e-5
    )
    # the raw residual stream is a different tensor
    assert not np.allclose(out["language.1"], out["language.1.normed"], atol=1e-3)
    single = [vlm.pooled_inputs([i], [t], names) for i, t in zip(imgs, texts)]
    for name in names:
        np.testing.assert_allclose(out[name], np.concatenate([s[name] for s in single]), atol=1e-5)
    # frozen weights: the forward recorded no graph although grad mode is on
    assert torch.is_grad_enabled() and not seen["language.1.normed"].requires_grad


def test_pool_reads_the_text_mask_for_language_layers_only():
    """Language layers mean over real prompt tokens; a vision-side tensor means over all
    of its rows even when its token count happens to equal the prompt's length."""
    import torch

    from reasonedit_cli.vlm import _pool

    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    text = _pool(hidden, mask, 2, text=True)
    np.testing.assert_array_equal(text, np.stack([hidden[0].mean(0), hidden[1, 0]]))
    vision = _pool(hidden, mask, 2, text=False)
    np.testing.assert_array_equal(vision, hidden.mean(1).numpy())
    # an encoder-decoder's decoder state (one start token) is not the prompt's length
    decoder = _pool(hidden[:, :1], mask, 2, text=True)
    np.testing.assert_array_equal(decoder, hidden[:, 0].numpy())
    # flattened patches (Qwen2-VL): split per image by the family's rule
    patches = torch.arange(5 * 2, dtype=torch.float32).reshape(5, 2)
    split = _pool(patches, mask, 2, [2, 3], text=False)
    np.testing.assert_array_equal(split, np.stack([patches[:2].mean(0), patches[2:].mean(0)]))
    with pytest.raises(ReasonEditError, match="cannot pool"):
        _pool(patches, mask, 2, text=False)
