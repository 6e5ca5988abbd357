"""Every supported VLM family on a tiny random-weight model built from its config.

Table-driven over the registry (`reasonedit_cli.families.FAMILIES`): a new family's
record without a tiny model in `tests/tiny_models.py` (`BUILDERS`) and its expected
normed hook points here (`NORMED_HOOKS`) fails loudly. For each family: generation,
hooked layer embeddings (vision, projector, language), P(yes), answer loss, the patch
search and one add-edit/ask round trip through the CLI.
Nothing here checks answer quality (the weights are random); it checks that each
family's processor, prompt, extra tensors and layer shapes go through the backend, and
that batching never changes a result.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_models import BUILDERS
from typer.testing import CliRunner

from reasonedit_cli.cli import app
from reasonedit_cli.errors import ReasonEditError
from reasonedit_cli.families import FAMILIES as REGISTRY
from reasonedit_cli.vlm import SUPPORTED_FAMILIES, VLM

#: tiny models beyond one per family -> their family (config `model_type`)
VARIANTS = {"instructblip_t5": "instructblip"}  # an encoder-decoder language model
#: every family of the registry, then the variants
FAMILIES = [*REGISTRY, *VARIANTS]
#: the CLI round trip; LLaVA's runs in tests/test_cli.py (the default test model)
CLI_FAMILIES = [f for f in FAMILIES if f != "llava"]
RAW = ["vision.0", "vision.1", "projector", "language.0", "language.1"]
#: T5: encoder blocks are language.0-1, decoder blocks language.2-3
RAW_T5 = [*RAW, "language.2", "language.3"]
LAYERS = ["vision.0", "projector", "language.1"]
LAYERS += [name + ".normed" for name in LAYERS]

# The normed point of each role (#17 item 3): the module whose input is captured (output
# for Gemma 3's projector norm), as a suffix of its path. Knowledge checked here, found
# by vlm.py from the module tree.
_LLAMA = {"vision": "mlp.fc1", "projector": "multi_modal_projector.linear_1"}
NORMED_HOOKS = {
    "llava": _LLAMA,
    "qwen2_vl": {"vision": "mlp.fc1", "projector": "visual.merger.mlp.0"},
    "qwen2_5_vl": {"vision": "mlp.gate_proj", "projector": "visual.merger.mlp.0"},
    "qwen3_vl": {"vision": "mlp.linear_fc1", "projector": "visual.merger.linear_fc1"},
    "idefics3": {"vision": "mlp.fc1", "projector": "connector.modality_projection.proj"},
    "smolvlm": {"vision": "mlp.fc1", "projector": "connector.modality_projection.proj"},
    "llava_next": _LLAMA,
    "llava_onevision": _LLAMA,
    "instructblip": {"vision": "mlp.fc1", "projector": "language_projection"},
    "instructblip_t5": {"vision": "mlp.fc1", "projector": "language_projection"},
    "gemma3": {"vision": "mlp.fc1", "projector": "multi_modal_projector.mm_soft_emb_norm"},
    "paligemma": {"vision": "mlp.fc1", "projector": "multi_modal_projector.linear"},
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """Model directories built on first use, shared by every test of this module."""
    root = tmp_path_factory.mktemp("families")
    built: dict = {}

    def get(family: str):
        if family not in built:
            built[family] = BUILDERS[family](root / family)
        return built[family]

    return get


@pytest.fixture(scope="module")
def vlms(family_dirs):
    loaded: dict = {}

    def get(family: str) -> VLM:
        if family not in loaded:
            loaded[family] = VLM(str(family_dirs(family)), device="cpu")
        return loaded[family]

    return get


def _imgs():
    # Different sizes and aspect ratios: Qwen2-VL gets different patch counts per image,
    # LLaVA-NeXT a different number of crops.
    return [
        Image.new("RGB", (48, 40), "red"),
        Image.new("RGB", (40, 64), "blue"),
        Image.new("RGB", (64, 32), "green"),
    ]


def test_every_family_has_a_tiny_model_and_a_well_formed_record():
    """A record added to the registry without its test parts fails here, by name."""
    import importlib.util

    import transformers

    for name in REGISTRY:
        assert name in BUILDERS, f"family {name}: add a tiny model to tests/tiny_models.py"
        assert name in NORMED_HOOKS, f"family {name}: add its normed hooks to NORMED_HOOKS"
    for name, spec in REGISTRY.items():
        assert spec.name and SUPPORTED_FAMILIES[name] == spec.name
        assert "{prompt}" in spec.prompt, name
        assert "Q?" in spec.fallback_prompt("Q?", "<image>"), name
        if spec.images_only_processor is not None:
            assert hasattr(transformers, spec.images_only_processor), name
        for package in spec.requires:  # dependencies of reasonedit (pyproject.toml)
            assert importlib.util.find_spec(package) is not None, (name, package)
        for _, pattern in spec.roles.patterns:
            assert pattern.pattern.startswith("^") and pattern.pattern.endswith("$"), name


def test_a_missing_processor_package_is_one_line():
    """A record's `requires` (SmolVLM2: num2words) is checked before anything loads."""
    import dataclasses

    from reasonedit_cli.vlm import _check_requirements

    spec = dataclasses.replace(REGISTRY["smolvlm"], requires=("reasonedit_no_such_package",))
    with pytest.raises(ReasonEditError, match=r"SmolVLM processor needs the Python package"):
        _check_requirements("some/model", spec)
    _check_requirements("some/model", REGISTRY["smolvlm"])  # num2words is installed


@pytest.mark.parametrize("family", FAMILIES)
def test_family_backend(vlms, family):
    vlm = vlms(family)
    assert vlm.family == VARIANTS.get(family, family)
    assert vlm.spec is REGISTRY[vlm.family]
    # a processor with a video processor is exactly what the record says
    carries_video = "video_processor" in type(vlm.processor).get_attributes()
    assert carries_video == (vlm.spec.images_only_processor is not None), family
    if carries_video:
        assert type(vlm.processor).__name__ == vlm.spec.images_only_processor
    layers = vlm.candidate_layers()
    raw = RAW_T5 if family == "instructblip_t5" else RAW
    assert [li.label for li in layers] == [x for name in raw for x in (name, name + ".normed")]
    hooks = NORMED_HOOKS[family]
    for li in layers:
        if li.normed and li.role in hooks:
            assert li.module.endswith(hooks[li.role]), (li.label, li.module)
        elif li.normed:  # language blocks: the MLP's first Linear, after the norm
            t5 = "DenseReluDense.wi_0" if family == "instructblip_t5" else None
            assert li.module.endswith(t5 or "mlp.gate_proj"), (li.label, li.module)
    if family == "instructblip_t5":  # decoder blocks continue the encoder's numbering
        assert vlm.resolve_layer("language.2").name.endswith("decoder.block.0")
        assert vlm.resolve_layer("language.1").name.endswith("encoder.block.1")
    imgs = _imgs()
    prompts = ["what shape is in the image?", "what color?", "is there a red shape? yes or no"]

    # hooked embeddings: one forward for all layers, batched == single
    before = vlm.forward_calls
    pooled = vlm.pooled_inputs(imgs, prompts, LAYERS)
    assert vlm.forward_calls - before == 1
    for name in LAYERS:
        v = pooled[name]
        assert v.ndim == 2 and v.shape[0] == 3 and v.dtype == np.float32
        assert np.isfinite(v).all()
    single = [vlm.pooled_inputs([i], [p], LAYERS) for i, p in zip(imgs, prompts)]
    for name in LAYERS:
        np.testing.assert_allclose(
            pooled[name], np.concatenate([s[name] for s in single]), atol=1e-4, rtol=1e-4
        )
    # the three images differ, so their vision keys must too (no mixing across samples)
    assert not np.allclose(pooled["vision.0"][0], pooled["vision.0"][1])

    # P(yes) in [0, 1], batch invariant
    p = vlm.yes_probability(imgs, prompts)
    assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
    np.testing.assert_allclose(
        p, [vlm.yes_probability([i], [q])[0] for i, q in zip(imgs, prompts)], atol=1e-4
    )

    # answer loss > 0, batch invariant
    answers = ["The shape is red.", "blue", "A shape with three corners is a triangle."]
    loss = vlm.answer_loss(imgs, prompts, answers)
    assert loss.shape == (3,) and (loss > 0).all()
    single_loss = [vlm.answer_loss([i], [q], [a])[0] for i, q, a in zip(imgs, prompts, answers)]
    np.testing.assert_allclose(loss, single_loss, rtol=1e-4)

    # generation
    out = vlm.generate(imgs, prompts, max_new_tokens=3)
    assert len(out) == 3 and all(isinstance(a, str) for a in out)
    assert vlm.generate(imgs[:1], prompts[:1], max_new_tokens=3) == out[:1]

    # the patch search runs (random weights: nothing needs to pass)
    from reasonedit_cli.patches import search_patches

    boxes = search_patches(vlm, [(Image.new("RGB", (48, 48), "red"), ["The shape is red."])])
    assert len(boxes) == 1 and len(boxes[0]) == 1


@pytest.mark.parametrize("family", CLI_FAMILIES)
def test_family_cli_round_trip(family_dirs, family, tmp_path):
    from conftest import shape_image

    model = str(family_dirs(family))
    image = shape_image(tmp_path / "red_circle.png", "circle", "red")
    cb = str(tmp_path / "cb")
    common = ["--codebook", cb, "--model", model, "--device", "cpu", "--json"]
    runner = CliRunner()
    added = runner.invoke(
        app,
        [
            "add-edit",
            *common,
            "--image",
            str(image),
            "--question",
            "what shape is in the image?",
            "--answer",
            "circle",
            "--reason",
            "The shape has no corners. A shape with no corners is a circle.",
            "--patches",
            "none",
        ],
    )
    assert added.exit_code == 0, added.output
    assert len(json.loads(added.stdout)["added"]) == 1
    asked = runner.invoke(
        app, ["ask", *common, "--image", str(image), "--question", "what shape is in the image?"]
    )
    assert asked.exit_code == 0, asked.output
    record = json.loads(asked.stdout)
    assert record["rejected"] is False
    assert record["facts"][-1] == "The answer to 'what shape is in the image?' is circle."


def test_unsupported_models_are_refused_with_the_supported_list(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
        )
    ).save_pretrained(text_only)
    with pytest.raises(ReasonEditError) as err:
        VLM(str(text_only), device="cpu")
    msg = str(err.value)
    assert f"model {text_only} (llama) is not a supported image-text-to-text model" in msg
    assert "supported: " + ", ".join(SUPPORTED_FAMILIES) in msg

    unknown = tmp_path / "mystery"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "mystery_vlm"}))
    with pytest.raises(ReasonEditError, match=r"\(mystery_vlm\) is not a supported"):
        VLM(str(unknown), device="cpu")

    result = CliRunner().invoke(
        app,
        [
            "ask",
            "--codebook",
            str(tmp_path / "cb"),
            "--model",
            str(text_only),
            "--device",
            "cpu",
            "--image",
            "x.png",
            "--question",
            "q?",
            "--no-edit",
        ],
    )
    assert result.exit_code != 0


def test_images_only_processor_seam(vlms):
    """The one private transformers seam (`vlm.processor_type_checks_allowing`) is still
    needed and still the hook ProcessorMixin calls: this fails loudly if transformers
    changes either, instead of the families breaking somewhere else."""
    import inspect

    from transformers.processing_utils import ProcessorMixin
    from transformers.utils import is_torchvision_available

    from reasonedit_cli.vlm import no_video_processor_class

    params = list(inspect.signature(ProcessorMixin.check_argument_for_proper_class).parameters)
    assert params == ["self", "argument_name", "argument"]
    assert "self.check_argument_for_proper_class(" in inspect.getsource(ProcessorMixin.__init__)
    vlm = vlms("qwen3_vl")
    processor = vlm.processor
    assert isinstance(processor.video_processor, no_video_processor_class())
    with pytest.raises(ReasonEditError, match="images only"):
        processor.video_processor([np.zeros((2, 8, 8, 3), dtype=np.uint8)])
    if not is_torchvision_available():
        # without the seam transformers refuses the stand-in: the seam is still needed
        from transformers import Qwen3VLProcessor

        with pytest.raises((TypeError, ValueError, AttributeError)):
            Qwen3VLProcessor(
                image_processor=processor.image_processor,
                tokenizer=processor.tokenizer,
                video_processor=no_video_processor_class()(),
            )


def test_broken_family_checkpoints_fail_in_one_line(family_dirs, tmp_path):
    """A damaged checkpoint of a new family: one line naming the model and what to do,
    exit 1, no traceback, from add-edit, ask and calibrate."""
    import shutil

    broken = tmp_path / "gemma3-broken"
    shutil.copytree(family_dirs("gemma3"), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    no_tokenizer = tmp_path / "smolvlm-no-tokenizer"
    shutil.copytree(family_dirs("smolvlm"), no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    (no_tokenizer / "tokenizer_config.json").unlink()
    from conftest import shape_image

    image = str(shape_image(tmp_path / "red_circle.png", "circle", "red"))
    runner = CliRunner()
    for model in (broken, no_tokenizer):
        common = ["--codebook", str(tmp_path / "cb"), "--model", str(model), "--device", "cpu"]
        for args in (
            ["add-edit", *common, "--image", image, "--question", "q?", "--answer", "a"]
            + ["--reason", "The shape is round."],
            ["ask", *common, "--image", image, "--question", "q?", "--no-edit"],
            ["calibrate", *common],
        ):
            result = runner.invoke(app, args)
            assert result.exit_code == 1, result.output
            lines = [ln for ln in result.output.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
            assert str(model) in lines[0] and "Traceback" not in result.output
            assert "transformers>=" in lines[0] or "report" in lines[0]
