"""What the editor needs from its models: the interfaces `Editor` is built on.

`Editor` (and the evaluation, the patch search, the dual embedding and calibration) use a
vision-language model only through `VLMBackend`, a sentence encoder only through
`TextBackend` and a key embedder only through `KeyEmbedder`. Any object with these
members can be handed to `Editor(vlm=..., text=..., embedder=...)`:

* `reasonedit_cli.vlm.VLM`: a Hugging Face model loaded in this process;
* `reasonedit_cli.distributed.RemoteVLM`: the same calls run by a pool of Ray workers
  (`evaluate --engine ray`);
* a stand-in for tests (`tests/fake_backend.py`) that answers from the prompt's facts.

The protocols are `runtime_checkable`, so `isinstance(obj, VLMBackend)` says whether an
object has every member (names only; mypy checks the signatures where one is assigned).
This module imports nothing heavy: it is read by `reasonedit --help`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from reasonedit_cli.vlm import Completion, LayerInfo


@runtime_checkable
class VLMBackend(Protocol):
    """A vision-language model as the editor uses it: batched calls over aligned lists.

    Images are decoded PIL images; each prompt is the user text of one turn about its
    image (the backend applies its own chat template). Every call splits its inputs into
    batches of `batch_size`, and a row's result must not depend on the other rows of its
    batch: that is what makes a batched `ask` equal to one question at a time.
    """

    #: the model as asked for (a directory, a hub id or a bundled name)
    name: str
    #: identity of the weights (keys made by other weights would not match)
    revision: str
    #: the architecture (`config.model_type`, e.g. `llava`), recorded in the manifest
    family: str

    def candidate_layers(self) -> list[LayerInfo]:
        """Every hook point a key can be taken from, in model order."""
        ...

    def resolve_layer(self, layer: str) -> LayerInfo:
        """The hook point a label (`language.2`, `projector.normed`, `language.mid`)
        denotes; `UsageError` for a name the model does not offer."""
        ...

    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 16,
        batch_size: int = 16,
    ) -> list[str]:
        """Greedy answers, one per (image, prompt)."""
        ...

    def pooled_inputs(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        layers: Sequence[str],
        *,
        batch_size: int = 16,
    ) -> dict[str, np.ndarray]:
        """Per layer label, the mean-pooled activation of each (image, prompt): float32
        of shape (n, d). The VLM half of every key and query."""
        ...

    def yes_probability(
        self, images: Sequence[Any], prompts: Sequence[str], *, batch_size: int = 16
    ) -> np.ndarray:
        """P(yes) / (P(yes) + P(no)) of the first answer token (the patch search's
        verification question)."""
        ...

    def answer_loss(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        answers: Sequence[str],
        *,
        batch_size: int = 16,
    ) -> np.ndarray:
        """Mean cross-entropy of each answer's tokens (the patch search's ranking and
        multiple-choice scoring); lower is more likely."""
        ...


@runtime_checkable
class CompletingBackend(VLMBackend, Protocol):
    """A `VLMBackend` that also samples, streams and counts tokens: what `Editor.ask_each`
    (the server) needs. `VLM` has it; the Ray engine's `RemoteVLM` does not."""

    def complete(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        *,
        max_new_tokens: int | Sequence[int] = 16,
        batch_size: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[Completion]:
        """Answers with their token counts; `on_tokens(row, ids)` after every step."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Generated token ids as answer text."""
        ...


@runtime_checkable
class TextBackend(Protocol):
    """The sentence encoder S(t) of the text half of a key (`text.TextEncoder`)."""

    #: the model name recorded in the manifest
    name: str
    #: the embedding width
    dim: int

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Unit-norm float32 rows, one per text."""
        ...


@runtime_checkable
class KeyEmbedder(Protocol):
    """Turns (image, text) pairs into keys and queries: `embedding.DualEmbedder`, or the
    evaluation's `CachedEmbedder` that shares cached halves between variants."""

    #: the VLM layer label of the image half
    layer: str
    #: the text half's weight; None until the first batch fixes it (auto)
    w: float | None

    def embed(self, images: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        """float32 (n, dim) vectors for aligned images and texts."""
        ...


if TYPE_CHECKING:  # pragma: no cover
    from reasonedit_cli.distributed import RemoteVLM
    from reasonedit_cli.embedding import DualEmbedder
    from reasonedit_cli.evaluation import CachedEmbedder
    from reasonedit_cli.text import TextEncoder
    from reasonedit_cli.vlm import VLM

    def _implementations(
        vlm: VLM, remote: RemoteVLM, text: TextEncoder, dual: DualEmbedder, cached: CachedEmbedder
    ) -> None:
        """Never run: the type checker proves here that the real classes satisfy the
        protocols (a missing method or a changed signature fails `mypy reasonedit_cli`)."""
        completing: CompletingBackend = vlm
        remote_backend: VLMBackend = remote
        encoder: TextBackend = text
        embedders: list[KeyEmbedder] = [dual, cached]
        del completing, remote_backend, encoder, embedders


__all__ = ["CompletingBackend", "KeyEmbedder", "TextBackend", "VLMBackend"]
