"""The editor: ReasonEdit's pipeline over a VLM, a text encoder and a codebook.

`Editor` is the library entry point behind every command:

    editor = Editor("my-codebook")            # the bundled demo VLM by default
    editor.add_edits([edit])                   # split reasoning, build keys, store
    result = editor.ask(image, "what shape is in the image?")
    result.answer, result.facts

Models load lazily: `ask --no-edit` never touches the text encoder, and opening a
codebook never loads a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reasonedit_cli.codebook import Codebook, EditRecord, KeyRecord
from reasonedit_cli.errors import ReasonEditError, UsageError
from reasonedit_cli.retrieval import Retrieval, build_prompt, retrieve

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from reasonedit_cli.edits import Edit
    from reasonedit_cli.embedding import DualEmbedder
    from reasonedit_cli.text import TextEncoder
    from reasonedit_cli.vlm import VLM

#: The bundled model is recorded under this name so codebooks move between installs.
BUNDLED_MODEL = "bundled:demo_vlm"
DEFAULT_PERCENTILE = 25.0
DEFAULT_TOP_K = 5

Progress = Callable[[int], None]


@dataclass
class KeySpec:
    """One key to embed: which image (or crop) and text, and the fact it stores."""

    edit_index: int
    kind: str  # answer | sentence | patch
    key_text: str
    value: str
    box: list[int] | None = None


@dataclass
class AddReport:
    """What `add_edits` did, for the CLI's summary and `--json`."""

    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the codebook
    keys: int = 0
    version: int = 0
    boxes: dict[str, list[list[int] | None]] = field(default_factory=dict)


@dataclass
class Answer:
    """The edited model's answer and how it came about."""

    question: str
    answer: str
    prompt: str
    retrieval: Retrieval | None  # None when asked with no_edit

    @property
    def facts(self) -> list[str]:
        return self.retrieval.facts if self.retrieval else []

    @property
    def rejected(self) -> bool:
        return self.retrieval.rejected if self.retrieval else True

    def to_dict(self) -> dict[str, Any]:
        r = self.retrieval
        return {
            "question": self.question,
            "answer": self.answer,
            "facts": self.facts,
            "rejected": self.rejected,
            "edited": r is not None,
            "prompt": self.prompt,
            "nearest_distance": r.nearest if r else None,
            "threshold": r.tau if r else None,
            "retrieved": [
                {
                    "value": h.value,
                    "distance": h.distance,
                    "raw_distance": h.raw_distance,
                    "kind": h.kind,
                    "edit_id": h.edit_id,
                    "box": list(h.box) if h.box else None,
                }
                for h in (r.hits if r else [])
            ],
        }


def answer_value(question: str, answer: str) -> str:
    """The fact stored under the `(image, question)` key (DESIGN 1.3)."""
    return f"The answer to '{question}' is {answer}."


def crop(image: Image.Image, box: Sequence[int]) -> Image.Image:
    return image.crop(tuple(box))


class Editor:
    """ReasonEdit over one codebook directory."""

    def __init__(
        self,
        codebook: str | Path | None,
        *,
        model: str | None = None,
        text_model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        create: bool = False,
        lock_timeout: float = 10.0,
    ) -> None:
        # codebook=None: no codebook at all (`ask --no-edit` without one)
        self.codebook_path = Path(codebook) if codebook is not None else None
        self.codebook: Codebook | None = (
            Codebook.open(self.codebook_path, create=create) if self.codebook_path else None
        )
        cfg = self.codebook.config if self.codebook else {}
        self.model_name = model or cfg.get("model") or BUNDLED_MODEL
        self.text_model_name = text_model or cfg.get("text_model")
        if (
            text_model
            and cfg.get("text_model")
            and text_model != cfg["text_model"]
            and self.codebook_has_keys
        ):
            raise UsageError(
                f"codebook {codebook} was built with text model {cfg['text_model']}; "
                f"recalibrate to change it (got --text-model {text_model})"
            )
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.lock_timeout = lock_timeout
        self._vlm: VLM | None = None
        self._text: TextEncoder | None = None
        self._embedder: DualEmbedder | None = None

    # ----------------------------------------------------------- lazy parts
    @property
    def codebook_has_keys(self) -> bool:
        return self.codebook is not None and self.codebook.keys_table().num_rows > 0

    @property
    def config(self) -> dict[str, Any]:
        return self.codebook.config if self.codebook else {}

    def _require_codebook(self) -> Codebook:
        if self.codebook is None:
            raise UsageError("this needs a codebook (--codebook DIR)")
        return self.codebook

    @property
    def vlm(self) -> VLM:
        if self._vlm is None:
            from reasonedit_cli.vlm import DEFAULT_MODEL, VLM

            path = DEFAULT_MODEL if self.model_name == BUNDLED_MODEL else self.model_name
            self._vlm = VLM(
                path, device=self.device, dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
            stored = self.config.get("model_revision")
            if stored and self.codebook_has_keys and stored != self._vlm.revision:
                raise UsageError(
                    f"codebook {self.codebook_path} was built with model "
                    f"{self.config.get('model')} (revision {stored}), but "
                    f"{self.model_name} has revision {self._vlm.revision}; its keys would not match"
                )
        return self._vlm

    @property
    def text(self) -> TextEncoder:
        if self._text is None:
            from reasonedit_cli.text import TextEncoder

            self._text = TextEncoder(self.text_model_name)
        return self._text

    @property
    def embedder(self) -> DualEmbedder:
        if self._embedder is None:
            from reasonedit_cli.embedding import DEFAULT_LAYER, DualEmbedder

            cfg = self.config
            self._embedder = DualEmbedder(
                self.vlm, self.text, layer=cfg.get("layer") or DEFAULT_LAYER, w=cfg.get("w")
            )
        return self._embedder

    def config_for_manifest(self) -> dict[str, Any]:
        """The model and embedding settings every key of the codebook was made with."""
        emb = self.embedder
        return {
            "model": self.model_name,
            "model_revision": self.vlm.revision,
            "model_family": self.vlm.family,
            "text_model": self.text.name,
            "layer": emb.layer,
            "w": emb.w,
            "percentile": self.config.get("percentile", DEFAULT_PERCENTILE),
            "top_k": self.config.get("top_k", DEFAULT_TOP_K),
            "calibrated": self.config.get("calibrated", False),
        }

    # ------------------------------------------------------------- add edits
    def key_specs(self, edits: Sequence[Edit]) -> list[KeySpec]:
        """The keys of each edit (DESIGN 1.3): answer, sentences, and sentence patches."""
        specs: list[KeySpec] = []
        for i, edit in enumerate(edits):
            specs.append(
                KeySpec(i, "answer", edit.question, answer_value(edit.question, edit.answer))
            )
            for j, sentence in enumerate(edit.reasoning):
                specs.append(KeySpec(i, "sentence", sentence, sentence))
                box = edit.boxes[j] if edit.boxes else None
                if box is not None:
                    specs.append(KeySpec(i, "patch", sentence, sentence, box=list(box)))
        return specs

    def embed_specs(self, edits: Sequence[Edit], specs: Sequence[KeySpec], images: Sequence[Any]):
        imgs = [crop(images[s.edit_index], s.box) if s.box else images[s.edit_index] for s in specs]
        return self.embedder.embed(imgs, [s.key_text for s in specs])

    def add_edits(
        self,
        edits: Sequence[Edit],
        *,
        batch_size: int = 32,
        progress: Progress | None = None,
    ) -> AddReport:
        """Embed and store edits; edits already in the codebook are skipped (idempotent).

        All batches are committed as ONE new codebook version at the end, so an
        interrupted run leaves the codebook exactly as it was.
        """
        codebook = self._require_codebook()
        report = AddReport()
        seen: set[str] = set()
        existing = codebook.edit_ids()
        todo = []
        for e in edits:
            eid = e.ensure_id()
            if eid in existing or eid in seen:
                report.skipped.append(eid)
                if progress:
                    progress(1)
                continue
            seen.add(eid)
            todo.append(e)
        if not todo:
            report.version = codebook.version
            return report
        edit_records: list[EditRecord] = []
        key_records: list[KeyRecord] = []
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = [e.load_image() for e in chunk]
            specs = self.key_specs(chunk)
            vectors = self.embed_specs(chunk, specs, images)
            for spec, vec in zip(specs, vectors):
                e = chunk[spec.edit_index]
                key_records.append(
                    KeyRecord(
                        edit_id=e.id or "",
                        kind=spec.kind,
                        value=spec.value,
                        key_text=spec.key_text,
                        image_sha256=e.image_sha256,
                        box=tuple(spec.box) if spec.box else None,
                        vector=vec,
                    )
                )
            for i, e in enumerate(chunk):
                edit_records.append(
                    EditRecord(
                        edit_id=e.id or "",
                        image_sha256=e.image_sha256,
                        question=e.question,
                        answer=e.answer,
                        reasoning=list(e.reasoning),
                        boxes=e.boxes,
                        source=e.source,
                    )
                )
                report.boxes[e.id or ""] = [
                    s.box for s in specs if s.edit_index == i and s.kind == "patch"
                ]
            if progress:
                progress(len(chunk))
        config = self.config_for_manifest()
        with codebook.writer(lock_timeout=self.lock_timeout) as w:
            for e in todo:
                w.store_image(e.image_bytes, e.image_ext)
            w.set_config(**config, dim=int(key_records[0].vector.shape[0]))
            w.add(edit_records, key_records)
            report.version = w.commit()
        report.added = [e.id or "" for e in todo]
        report.keys = len(key_records)
        self.codebook = Codebook.open(codebook.path)
        return report

    # ------------------------------------------------------------------- ask
    def ask(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        *,
        no_edit: bool = False,
        k: int | None = None,
        percentile: float | None = None,
        max_new_tokens: int = 16,
        batch_size: int = 16,
    ) -> list[Answer]:
        """Answer each (image, question) with the edited model (or unedited with no_edit)."""
        if len(images) != len(questions):
            raise ReasonEditError("ask needs one image per question")
        retrievals: list[Retrieval | None] = [None] * len(questions)
        if not no_edit and self.codebook_has_keys:
            top_k = k or int(self.config.get("top_k", DEFAULT_TOP_K))
            for start in range(0, len(questions), batch_size):
                q = self.embedder.embed(
                    images[start : start + batch_size], questions[start : start + batch_size]
                )
                for i, vec in enumerate(q):
                    retrievals[start + i] = retrieve(self.codebook, vec, k=top_k, p=percentile)
        elif not no_edit:
            retrievals = [Retrieval(rejected=True) for _ in questions]
        prompts = [build_prompt(r.facts if r else [], qu) for r, qu in zip(retrievals, questions)]
        answers = self.vlm.generate(
            images, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        return [
            Answer(question=qu, answer=a, prompt=p, retrieval=r)
            for qu, a, p, r in zip(questions, answers, prompts, retrievals)
        ]
