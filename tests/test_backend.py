"""The backend protocols and the editor's seams: a real tiny VLM satisfies them, the fake
does, and an `Editor` built on injected backends never loads a model."""

from __future__ import annotations

import pytest
from fake_backend import FakeText, FakeVLM

from reasonedit_cli.backend import CompletingBackend, KeyEmbedder, TextBackend, VLMBackend
from reasonedit_cli.editor import Editor, KeySpec, check_codebook
from reasonedit_cli.edits import read_edits_jsonl
from reasonedit_cli.errors import ReasonEditError, UsageError

#: what the editor, the evaluation and the patch search call on a VLM
VLM_METHODS = ("candidate_layers", "resolve_layer", "generate", "pooled_inputs")
VLM_METHODS += ("yes_probability", "answer_loss")


def test_a_real_tiny_vlm_and_text_encoder_satisfy_the_protocols(tiny_llava):
    from reasonedit_cli.embedding import DualEmbedder
    from reasonedit_cli.text import TextEncoder
    from reasonedit_cli.vlm import VLM

    vlm = VLM(str(tiny_llava), device="cpu")
    text = TextEncoder()
    assert isinstance(vlm, VLMBackend) and isinstance(vlm, CompletingBackend)
    assert isinstance(text, TextBackend)
    assert isinstance(DualEmbedder(vlm, text), KeyEmbedder)
    assert not isinstance(object(), VLMBackend)


def test_the_ray_engines_remote_vlm_has_every_backend_method():
    from reasonedit_cli.distributed import REMOTE_METHODS, RemoteVLM

    for name in VLM_METHODS:
        assert callable(getattr(RemoteVLM, name, None)), name
    # what it computes remotely is exactly the protocol's batched calls
    assert set(REMOTE_METHODS) == set(VLM_METHODS) - {"candidate_layers", "resolve_layer"}
    assert not callable(getattr(RemoteVLM, "complete", None))  # not a CompletingBackend


def test_the_fake_backend_satisfies_the_protocols():
    vlm, text = FakeVLM(), FakeText()
    assert isinstance(vlm, CompletingBackend) and isinstance(text, TextBackend)
    typed: VLMBackend = vlm  # checked by mypy where tests are type-checked
    assert typed.resolve_layer("language.mid").label == "language.1"
    with pytest.raises(UsageError, match="unknown layer"):
        vlm.resolve_layer("language.9")


@pytest.fixture
def edits(edits_jsonl):
    found, errors = read_edits_jsonl(str(edits_jsonl))
    assert not errors
    return found


def test_an_editor_on_injected_backends_adds_and_asks_without_loading_a_model(tmp_path, edits):
    vlm, text = FakeVLM(), FakeText()
    ed = Editor(tmp_path / "cb", create=True, vlm=vlm, text=text)
    report = ed.add_edits(edits, patches="none")
    assert report.added == ["e1", "e2", "e3"] and report.keys == 10
    assert ed.vlm is vlm and ed.text is text
    assert ed.config["model_revision"] == "fake-rev-1" and ed.config["text_model"] == "fake-text"
    image = edits[0].load_image()
    [answer] = ed.ask([image], ["what shape is in the image?"])
    # the fake answers from the prompt's fact: the edit's answer, retrieved
    assert answer.answer == "circle" and not answer.rejected
    [plain] = ed.ask([image], ["what shape is in the image?"], no_edit=True)
    assert plain.answer == "square" and plain.prompt == "what shape is in the image?"
    assert vlm.calls["generate"] == 2  # one answer each: the fake did the work


def test_another_revision_is_refused_when_injected(tmp_path, edits):
    Editor(tmp_path / "cb", create=True, vlm=FakeVLM(), text=FakeText()).add_edits(
        edits, patches="none"
    )
    with pytest.raises(UsageError, match="revision fake-rev-1"):
        Editor(tmp_path / "cb", vlm=FakeVLM(revision="other"), text=FakeText())


def test_injected_key_specs_replace_the_patch_search(tmp_path, edits):
    calls = []

    def only_answers(batch, images=None, **settings):
        calls.append(settings["patches"])
        return [
            KeySpec(i, "answer", e.question, f"The answer to '{e.question}' is {e.answer}.")
            for i, e in enumerate(batch)
        ]

    ed = Editor(
        tmp_path / "cb", create=True, vlm=FakeVLM(), text=FakeText(), key_specs=only_answers
    )
    report = ed.add_edits(edits, patches="auto")
    assert report.keys == 3 and calls == ["auto"]
    assert ed.vlm.calls.get("yes_probability") is None  # no patch search ran


def test_ask_each_needs_a_completing_backend(tmp_path):
    from PIL import Image

    from reasonedit_cli.editor import Query

    class GreedyOnly(FakeVLM):  # the methods of a RemoteVLM: no complete/decode
        complete = None  # type: ignore[assignment]
        decode = None  # type: ignore[assignment]

    ed = Editor(None, vlm=GreedyOnly(), text=FakeText())
    image = Image.new("RGB", (32, 32), "white")
    with pytest.raises(ReasonEditError, match="cannot sample or stream"):
        ed.ask_each([Query(image, "what?", no_edit=True)])
    [a] = Editor(None, vlm=FakeVLM(), text=FakeText()).ask_each([Query(image, "what?", True)])
    assert a.answer == "no" and a.finished is True


def test_library_errors_name_parameters_and_the_cli_its_flags(tmp_path):
    from typer.testing import CliRunner

    from reasonedit_cli.cli import app

    with pytest.raises(UsageError) as err:
        Editor(None).require_codebook()
    assert "--codebook" not in str(err.value) and "`codebook`" in str(err.value)
    with pytest.raises(UsageError) as err:
        Editor(None).key_specs([], patches="some")
    assert str(err.value).startswith("`patches` must be one of auto, none")
    result = CliRunner().invoke(app, ["add-edit", "--from", "x.jsonl", "--patches", "some"])
    assert result.exit_code == 2
    assert "Error: --patches must be one of auto, none" in result.output


def test_restore_and_check_through_the_core(tmp_path, edits):
    ed = Editor(tmp_path / "cb", create=True, vlm=FakeVLM(), text=FakeText())
    first = ed.add_edits(edits[:1], patches="none").version
    ed.add_edits(edits[1:], patches="none")
    assert check_codebook(tmp_path / "cb").ok
    record = Editor(tmp_path / "cb").restore(first)
    assert record == {"restored": first, "version": first + 2}
    assert Editor(tmp_path / "cb").require_codebook().edit_ids() == {"e1"}
    assert check_codebook(tmp_path / "cb", repair=True).ok
