"""The editor: ReasonEdit's pipeline over a VLM, a text encoder and a codebook.

`Editor` is the library entry point behind every command:

    editor = Editor("my-codebook", create=True)   # the bundled demo VLM by default
    editor.add_edits([edit])                       # split reasoning, build keys, store
    [result] = editor.ask([image], ["what shape is in the image?"])
    result.answer, result.facts

Models load lazily: `ask --no-edit` never touches the text encoder, and opening a
codebook never loads a model. Already loaded models (or stand-ins with the interfaces of
`reasonedit_cli.backend`) are handed in with `Editor(..., vlm=, text=, embedder=)`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from reasonedit_cli.errors import ReasonEditError, UsageError
from reasonedit_cli.retrieval import (
    Retrieval,
    build_prompt,
    retrieve,
)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from reasonedit_cli.backend import KeyEmbedder, TextBackend, VLMBackend
    from reasonedit_cli.edits import Edit
    from reasonedit_cli.presets import Preset
    from reasonedit_cli.store import CheckReport, Codebook, EditRecord, KeyRecord

#: The bundled model is recorded under this name so codebooks move between installs.
BUNDLED_MODEL = "bundled:demo_vlm"
DEFAULT_TOP_K = 5
PATCH_MODES = ("auto", "none")

Progress = Callable[[int], None]


@dataclass
class KeySpec:
    """One key to embed: which image (or crop) and text, and the fact it stores."""

    edit_index: int
    kind: str  # answer | sentence | patch
    key_text: str
    value: str
    box: list[int] | None = None


class KeySpecSource(Protocol):
    """Makes the key specs of a batch of edits: `Editor.key_specs`'s signature. Handed to
    `Editor(key_specs=...)` to reuse specs computed once (the evaluation's variants)."""

    def __call__(
        self,
        edits: Sequence[Edit],
        images: Sequence[Any] | None = None,
        *,
        patches: str = "none",
        top_k_patches: int = 1,
        batch_size: int = 64,
        question_rule: str | None = None,
    ) -> list[KeySpec]: ...


@dataclass
class AddReport:
    """What `add_edits` did, for the CLI's summary and `--json`."""

    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the codebook
    replaced: list[str] = field(default_factory=list)  # stored edits replaced (--replace)
    keys: int = 0
    version: int = 0
    boxes: dict[str, list[list[list[int]]]] = field(
        default_factory=dict
    )  # edit -> sentence -> boxes
    merge: Any = None  # the MergePlan of merge on insert (add_edits(merge=True))
    object_keys: int = 0  # keys written to the object index (reasonedit_cli.objects)
    objects_problem: str | None = None  # the object index could not be written


@dataclass
class Answer:
    """The edited model's answer and how it came about."""

    question: str
    answer: str
    prompt: str
    retrieval: Retrieval | None  # None when asked with no_edit
    # from `ask_each` (the server): answer and prompt tokens, and whether the model ended
    # the answer itself rather than running out of tokens
    tokens: int | None = None
    prompt_tokens: int | None = None
    finished: bool | None = None

    @property
    def facts(self) -> list[str]:
        return self.retrieval.facts if self.retrieval else []

    @property
    def rejected(self) -> bool:
        return self.retrieval.rejected if self.retrieval else True

    def to_dict(self) -> dict[str, Any]:
        r = self.retrieval
        out = self._record(r)
        if r is not None and (r.objects is not None or r.objects_problem):
            # only for a codebook with an object index: others answer byte for byte as before
            o = r.objects
            out["object_index"] = {
                "used": o is not None,
                "problem": r.objects_problem,
                "rejected": o.rejected if o is not None else True,
                "facts": r.object_facts,  # facts in the prompt that only it found
                "edit_ids": o.edit_ids if o is not None else [],
                "nearest_distance": o.nearest if o is not None else None,
                "threshold": o.tau if o is not None else None,
            }
        return out

    def _record(self, r: Retrieval | None) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.answer,
            "facts": self.facts,
            "rejected": self.rejected,
            # edited: facts were prepended to the prompt; searched: the codebook was
            # consulted (false only with no_edit)
            "edited": bool(self.facts) and not self.rejected,
            "searched": r is not None,
            "prompt": self.prompt,
            "nearest_distance": r.nearest if r else None,
            "threshold": r.tau if r else None,
            "retrieved": [
                {
                    "value": h.value,
                    # a merged key holds several facts, each from its edit (own first)
                    "values": h.values,
                    "entries": [{"value": v, "edit_id": e} for v, e in h.entries],
                    "distance": h.distance,
                    "raw_distance": h.raw_distance,
                    "kind": h.kind,
                    "edit_id": h.edit_id,
                    "edit_ids": h.edit_ids,
                    "box": list(h.box) if h.box else None,
                }
                for h in (r.hits if r else [])
            ],
        }


@dataclass
class Query:
    """One question for `Editor.ask_each`, with its own retrieval and generation settings."""

    image: Any  # PIL image
    question: str
    no_edit: bool = False
    k: int | None = None
    percentile: float | None = None
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy, as `ask`
    top_p: float = 1.0


def edit_content(edit: Edit | EditRecord) -> dict[str, Any]:
    """What makes two edits with one id the same edit: image bytes, texts and boxes.

    Works on an input `Edit` and a stored `EditRecord` alike; the source does not count.
    """
    boxes = edit.boxes
    if boxes is not None and all(b is None for b in boxes):
        boxes = None  # no manual box at all: the same keys as no boxes field
    return {
        "image": edit.image_sha256,
        "question": edit.question,
        "answer": edit.answer,
        "reasoning": list(edit.reasoning),
        "boxes": None if boxes is None else [None if b is None else list(b) for b in boxes],
    }


def _stored_edits(cb: Codebook, ids: set[str]) -> dict[str, EditRecord]:
    """The stored records of those `ids` the codebook holds (only those rows are built)."""
    hits = ids & cb.edit_ids()
    return {r.edit_id: r for r in cb.edits(ids=hits)} if hits else {}


def _differing_fields(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in a if a[k] != b[k]]


def answer_value(question: str, answer: str) -> str:
    """The fact stored under the `(image, question)` key (docs/method.md#keys)."""
    return f"The answer to '{question}' is {answer}."


def patch_boxes(
    edits: Sequence[Edit], keys: Sequence[KeyRecord]
) -> dict[str, list[list[list[int]]]]:
    """Per edit and reasoning sentence, the crops its patch keys use ([] = whole image only)."""
    by_edit: dict[str, list[KeyRecord]] = {}
    for k in keys:
        if k.kind == "patch" and k.box is not None:
            by_edit.setdefault(k.edit_id, []).append(k)
    return {
        e.id or "": [
            [
                list(k.box)
                for k in by_edit.get(e.id or "", [])
                if k.key_text == sentence and k.box is not None
            ]
            for sentence in e.reasoning
        ]
        for e in edits
    }


def crop(image: Image.Image, box: Sequence[int]) -> Image.Image:
    """The crop of `box` (in the original image's pixels) from a decoded image."""
    from reasonedit_cli.edits import box_to_decoded

    x0, y0, x1, y1 = box_to_decoded(list(box), image)
    return image.crop((x0, y0, x1, y1))


class Editor:
    """ReasonEdit over one codebook directory.

    `model`, `text_model`, `device`, `dtype` and `trust_remote_code` say which models to
    load when they are first needed. `vlm`, `text` and `embedder` hand in models that are
    already loaded instead (shared between editors, or stand-ins for tests; see
    `reasonedit_cli.backend`); `key_specs` replaces how the keys of an edit are chosen
    (`KeySpecSource`, e.g. specs computed once and reused). `preset` is a preset name or a
    `presets.Preset`.
    """

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
        preset: str | Preset | None = None,
        vlm: VLMBackend | None = None,
        text: TextBackend | None = None,
        embedder: KeyEmbedder | None = None,
        key_specs: KeySpecSource | None = None,
        objects: bool = True,
    ) -> None:
        # codebook=None: no codebook at all (`ask --no-edit` without one)
        self.codebook_path = Path(codebook) if codebook is not None else None
        self.codebook: Codebook | None = None
        if self.codebook_path is not None:
            # imported here: `ask --no-edit` without a codebook never loads pyarrow/hnswlib
            from reasonedit_cli.store import Codebook

            self.codebook = Codebook.open(self.codebook_path, create=create)
        cfg = self.codebook.config if self.codebook else {}
        from reasonedit_cli.vlm import bundled_name

        self.model_name = bundled_name(model or cfg.get("model") or BUNDLED_MODEL)
        self.text_model_name = text_model or cfg.get("text_model")
        if (
            text_model
            and cfg.get("text_model")
            and text_model != cfg["text_model"]
            and self.codebook_has_keys
        ):
            raise UsageError(
                f"codebook {codebook} was built with text model {cfg['text_model']}; "
                f"recalibrate to change it (got `text_model` {text_model})"
            )
        from reasonedit_cli.presets import Preset, get_preset, preset_of

        # the preset asked for, else the one the codebook was written with (default for
        # codebooks from before presets)
        if isinstance(preset, Preset):
            self.preset = preset
        else:
            self.preset = get_preset(preset) if preset is not None else preset_of(cfg)
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.lock_timeout = lock_timeout
        self._vlm: VLMBackend | None = None
        self._text: TextBackend | None = text
        self._embedder: KeyEmbedder | None = embedder
        self._key_specs = key_specs
        self.objects = objects
        # evaluation overrides of the object index's w, gate and layer (None: defaults)
        self.object_settings: dict[str, float | str | None] = {}
        # the object index the open version links, opened on first use (objects.open_index)
        self._object_index: tuple[Any, Any, str | None] | None = None
        if vlm is not None:
            self.attach_vlm(vlm)

    # ----------------------------------------------------------- lazy parts
    @property
    def codebook_has_keys(self) -> bool:
        return self.codebook is not None and self.codebook.n_keys > 0

    @property
    def config(self) -> dict[str, Any]:
        return self.codebook.config if self.codebook else {}

    def require_codebook(self) -> Codebook:
        """The open codebook; a `UsageError` for an editor made without one."""
        if self.codebook is None:
            raise UsageError("this needs a codebook (`codebook` DIR)")
        return self.codebook

    @property
    def vlm(self) -> VLMBackend:
        if self._vlm is None:
            from reasonedit_cli.vlm import VLM, model_path

            path = model_path(self.model_name)
            self._vlm = VLM(
                path, device=self.device, dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
            self.check_model_revision(self._vlm.revision)
        return self._vlm

    def check_model_revision(self, revision: str) -> None:
        """Refuse weights other than those the codebook's keys were embedded with."""
        stored = self.config.get("model_revision")
        if stored and self.codebook_has_keys and stored != revision:
            raise UsageError(
                f"codebook {self.codebook_path} was built with model "
                f"{self.config.get('model')} (revision {stored}), but "
                f"{self.model_name} has revision {revision}; its keys would not match"
            )

    def attach_vlm(self, vlm: VLMBackend) -> None:
        """Use an already loaded VLM, or another `VLMBackend` (Ray workers, tests)."""
        self.check_model_revision(vlm.revision)
        self._vlm = vlm

    @property
    def text(self) -> TextBackend:
        if self._text is None:
            from reasonedit_cli.text import TextEncoder

            self._text = TextEncoder(self.text_model_name)
        return self._text

    @property
    def embedder(self) -> KeyEmbedder:
        if self._embedder is None:
            from reasonedit_cli.embedding import DEFAULT_LAYER, DualEmbedder

            cfg = self.config
            w = cfg.get("w")
            embedder = DualEmbedder(
                self.vlm,
                self.text,
                layer=cfg.get("layer") or DEFAULT_LAYER,
                w=w if w is not None else self.preset.uncalibrated_w,
            )
            if not cfg.get("layer"):
                # a stored layer is the hook point the keys were made at; a new codebook
                # takes the default layer at the preset's hook point
                embedder.layer = self.hook_label(embedder.layer)
            self._embedder = embedder
        return self._embedder

    @property
    def stored_preset(self) -> str:
        """The preset the codebook was written with ("default" when it records none)."""
        from reasonedit_cli.presets import preset_of

        return preset_of(self.config).name

    def hook_label(self, layer: str) -> str:
        """`layer` as this editor's preset hooks it (`X.normed` under `reference`)."""
        from reasonedit_cli.presets import check_hook

        return check_hook(self.vlm, layer, self.preset)

    def model_facts(self) -> dict[str, Any]:
        """What keys are embedded with: model revision and family, text model, layer, w.

        Split from `config_for_manifest` so that a distributed add-edit can take these from
        its workers, and the committing process never loads the VLM.
        """
        emb = self.embedder
        return {
            "model_revision": self.vlm.revision,
            "model_family": self.vlm.family,
            "text_model": self.text.name,
            "layer": emb.layer,
            "w": emb.w,
        }

    def config_for_manifest(self, model_facts: dict[str, Any] | None = None) -> dict[str, Any]:
        """The model and embedding settings every key of the codebook was made with."""
        preset = self.preset
        if self.stored_preset == preset.name:
            # a codebook that already has keys without a rule predates it: keep "nearest"
            rule = self.config.get("tau_rule") or (
                "nearest" if self.codebook_has_keys else preset.tau_rule
            )
            percentile = self.config.get("percentile", preset.percentile)
        else:  # switching preset (calibrate --preset): its retrieval settings
            rule, percentile = preset.tau_rule, preset.percentile
        return {
            "model": self.model_name,
            **(self.model_facts() if model_facts is None else model_facts),
            **preset.to_config(),
            "percentile": percentile,
            "tau_rule": rule,
            "top_k": self.config.get("top_k", DEFAULT_TOP_K),
            "calibrated": self.config.get("calibrated", False),
        }

    # ------------------------------------------------------------- add edits
    def key_specs(
        self,
        edits: Sequence[Edit],
        images: Sequence[Any] | None = None,
        *,
        patches: str = "none",
        top_k_patches: int = 1,
        batch_size: int = 64,
        question_rule: str | None = None,
    ) -> list[KeySpec]:
        """The keys of each edit (docs/method.md#keys): answer, sentences, and sentence patches.

        A sentence with a manual box gets that crop; with `patches="auto"` every other
        sentence gets the crops chosen by the patch search (docs/method.md#patches), batched over
        all edits of the call. `question_rule` (default: the preset's) is the
        verification prompt of the search (patches.QUESTION_RULES). An editor made with
        `key_specs=` asks that source instead.
        """
        if patches not in PATCH_MODES:
            raise UsageError(f"`patches` must be one of {', '.join(PATCH_MODES)}")
        if self._key_specs is not None:
            return self._key_specs(
                edits,
                images,
                patches=patches,
                top_k_patches=top_k_patches,
                batch_size=batch_size,
                question_rule=question_rule,
            )
        found: dict[tuple[int, int], list[list[int]]] = {}
        if patches == "auto" and images is not None:
            from reasonedit_cli.edits import box_to_original
            from reasonedit_cli.patches import search_patches

            want = [
                [j for j in range(len(e.reasoning)) if not (e.boxes and e.boxes[j] is not None)]
                for e in edits
            ]
            results = search_patches(
                self.vlm,
                [(images[i], [e.reasoning[j] for j in want[i]]) for i, e in enumerate(edits)],
                top_k=top_k_patches,
                batch_size=batch_size,
                question_rule=question_rule or self.preset.question_rule,
            )
            for i, (js, per_sentence) in enumerate(zip(want, results)):
                for j, boxes in zip(js, per_sentence):
                    # found in the decoded pixels; boxes are stored in the original's
                    found[(i, j)] = [box_to_original(b, images[i]) for b in boxes]
        specs: list[KeySpec] = []
        for i, edit in enumerate(edits):
            specs.append(
                KeySpec(i, "answer", edit.question, answer_value(edit.question, edit.answer))
            )
            for j, sentence in enumerate(edit.reasoning):
                specs.append(KeySpec(i, "sentence", sentence, sentence))
                manual = edit.boxes[j] if edit.boxes else None
                for box in [manual] if manual is not None else found.get((i, j), []):
                    specs.append(KeySpec(i, "patch", sentence, sentence, box=list(box)))
        return specs

    def embed_specs(
        self, edits: Sequence[Edit], specs: Sequence[KeySpec], images: Sequence[Any]
    ) -> tuple[Any, Any]:
        """Key vectors and their deferral radii (docs/method.md#radii) for the specs of `edits`."""
        imgs = [crop(images[s.edit_index], s.box) if s.box else images[s.edit_index] for s in specs]
        texts = [s.key_text for s in specs]
        seeds = [_seed(edits[s.edit_index].id or "", s.kind, s.key_text, s.box) for s in specs]
        fix_w = getattr(self.embedder, "fix_w", None)
        if fix_w is not None and getattr(self.embedder, "w", 0.0) is None:
            # a new codebook's w, from its first batch (embedding.first_batch_w)
            codes = [edits[s.edit_index] for s in specs]
            fix_w(
                imgs,
                texts,
                [e.image_sha256 for e in codes],
                [e.id or str(s.edit_index) for e, s in zip(codes, specs)],
                self.preset.percentile,
            )
        return self.embed_with_radii(imgs, texts, seeds)

    def embed_with_radii(
        self,
        images: Sequence[Any],
        texts: Sequence[str],
        seeds: Sequence[int],
        embedder: KeyEmbedder | None = None,
    ) -> tuple[Any, Any]:
        """Embed keys and one augmented copy of each; the radius is their distance.

        The augmentation (small rotation, colour jitter, crop/pad; a light rewording) is
        seeded by the key's content, so the same key always gets the same radius.
        `embedder` defaults to the codebook's own.
        """
        import numpy as np

        from reasonedit_cli.augment import augment_image, perturb_text

        emb = embedder if embedder is not None else self.embedder
        vectors = emb.embed(images, texts)
        aug_imgs = [augment_image(img, np.random.default_rng(sd)) for img, sd in zip(images, seeds)]
        aug_texts = [perturb_text(t, np.random.default_rng(sd)) for t, sd in zip(texts, seeds)]
        augmented = emb.embed(aug_imgs, aug_texts)
        radii = np.linalg.norm(vectors - augmented, axis=1)
        return vectors, radii

    def add_edits(
        self,
        edits: Sequence[Edit],
        *,
        batch_size: int = 32,
        progress: Progress | None = None,
        patches: str = "auto",
        top_k_patches: int = 1,
        merge: bool | None = None,
        replace: bool = False,
    ) -> AddReport:
        """Embed and store edits; edits already in the codebook are skipped (idempotent).

        `merge` None follows the preset (merge on insert under `reference`). An id
        already stored with other content is an error unless `replace`, which swaps the
        stored edit for the new one in the same single version (`plan_add`).

        All batches are committed as ONE new codebook version at the end, so an
        interrupted run leaves the codebook exactly as it was (`merge`: see
        `commit_records`). The Ray engine
        (`reasonedit_cli.distributed`) runs the same three steps: `plan_add` here,
        `edit_records` on its workers, `commit_records` here.
        """
        if merge is None:
            merge = self.preset.merge_on_insert
        report, todo = self.plan_add(edits, progress, replace=replace)
        if not todo:
            return report
        edit_records: list[EditRecord] = []
        key_records: list[KeyRecord] = []
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            er, kr = self.edit_records(chunk, patches=patches, top_k_patches=top_k_patches)
            edit_records += er
            key_records += kr
            if progress:
                progress(len(chunk))
        # how keys were made, so `doctor --repair` can make lost keys again the same way
        config = {**self.config_for_manifest(), "patches": patches, "top_k_patches": top_k_patches}
        objs = self.object_records(todo, key_records, batch_size) if self.objects else None
        return self.commit_records(
            todo, edit_records, key_records, config, report, merge=merge, objects=objs
        )

    # ---------------------------------------------------------- object index
    def object_w(self, key_records: Sequence[KeyRecord] = ()) -> float:
        """The object index's w: the one its link records, else `OBJECT_W_FACTOR` x the
        plain auto w of the keys of the codebook's first `OBJECT_W_EDITS` edits (stored
        ones first, then `key_records`: on a new codebook its first batch)."""
        import numpy as np

        from reasonedit_cli import objects as O

        link = O.link_of(self.codebook) if self.codebook is not None else None
        if link is not None and link.get("w"):
            return float(link["w"])
        w = self.object_settings.get("w")
        if w:
            return float(w)
        vecs: list[Any] = []
        texts: list[str] = []
        seen: list[str] = []
        if self.codebook_has_keys:
            cb = self.require_codebook()
            t = cb.keys_table()
            ids = t.column("edit_id").to_pylist()
            kt = t.column("key_text").to_pylist()
            v = cb.vectors()
            for j, (e, text) in enumerate(zip(ids, kt)):
                if e not in seen:
                    if len(seen) == O.OBJECT_W_EDITS:
                        break
                    seen.append(e)
                vecs.append(v[j])
                texts.append(text)
        for k in key_records:
            if k.edit_id not in seen:
                if len(seen) >= O.OBJECT_W_EDITS:
                    continue
                seen.append(k.edit_id)
            vecs.append(k.vector)
            texts.append(k.key_text)
        s = self.text.encode(texts)
        return O.OBJECT_W_FACTOR * O.plain_auto_w(np.stack(vecs), s)

    def object_layer(self) -> str | None:
        """The layer the object index cuts its windows from: its link's, else the key
        layer when that is vision-side (None: no object index for this codebook)."""
        from reasonedit_cli import objects as O

        link = O.link_of(self.codebook) if self.codebook is not None else None
        if link is not None and link.get("layer"):
            return str(link["layer"])
        if self.object_settings.get("layer"):
            return str(self.object_settings["layer"])
        layer = self.embedder.layer
        return layer if O.object_layer_ok(self.vlm, layer) else None

    def object_records(
        self, edits: Sequence[Edit], key_records: Sequence[KeyRecord], batch_size: int = 32
    ) -> tuple[list[KeyRecord], float, str] | None:
        """The object keys of `edits` (`objects.object_keys`), the object index's w and
        layer; None when no edit's reasoning names a region (nothing is written then) or
        the key layer has no token grid."""
        from reasonedit_cli import objects as O

        named = [e for e in edits if O.names_a_region(e.reasoning)]
        if not named:
            return None
        layer = self.object_layer()
        if layer is None:
            return None
        w = self.object_w(key_records)
        rk = O.region_embedder(self.vlm, self.text.encode, layer, w)
        keys: list[KeyRecord] = []
        for start in range(0, len(named), batch_size):
            chunk = named[start : start + batch_size]
            keys += O.object_keys(rk, chunk, [e.load_image() for e in chunk])
        return keys, w, layer

    def plan_add(
        self, edits: Sequence[Edit], progress: Progress | None = None, *, replace: bool = False
    ) -> tuple[AddReport, list[Edit]]:
        """The edits to compute: those not yet stored, each once (idempotence).

        An edit whose id is stored (or given earlier in `edits`) with the same content is
        skipped. With other content it is an `InputError` naming the id and both
        sources, so no edit is ever dropped silently: two records of one input always
        are; a stored edit is replaced instead when `replace` (listed in
        `report.replaced`). Returns the report so far and the edits to add.
        """
        from reasonedit_cli.errors import InputError

        codebook = self.require_codebook()
        if self.codebook_has_keys and self.stored_preset != self.preset.name:
            raise UsageError(
                f"codebook {self.codebook_path} was built with `preset` {self.stored_preset}; "
                f"add to it with that preset, or calibrate it with `preset` {self.preset.name} "
                "first to switch it"
            )
        report = AddReport(version=codebook.version)
        seen: dict[str, Edit] = {}
        stored = _stored_edits(codebook, {e.ensure_id() for e in edits})
        versions: dict[str, int] | None = None
        todo = []
        for e in edits:
            eid = e.ensure_id()
            first = seen.get(eid)
            if first is not None:
                if edit_content(first) != edit_content(e):
                    raise InputError(
                        f"edit id {eid!r} is given twice with different content: "
                        f"{first.where or 'first record'} and {e.where or 'a later record'}"
                    )
                report.skipped.append(eid)
            elif eid in stored and edit_content(stored[eid]) == edit_content(e):
                report.skipped.append(eid)
            elif eid in stored and not replace:
                versions = codebook.edit_versions() if versions is None else versions
                rec = stored[eid]
                differs = _differing_fields(edit_content(rec), edit_content(e))
                raise InputError(
                    f"edit id {eid!r} already exists in {codebook.path} with other content "
                    f"(added in version {versions.get(eid, '?')} from {rec.source or 'unknown'}); "
                    f"the new one ({e.where or 'input'}) differs in {', '.join(differs)}; "
                    "use `replace` to replace it"
                )
            else:
                if eid in stored:
                    report.replaced.append(eid)
                seen[eid] = e
                todo.append(e)
                continue
            seen.setdefault(eid, e)
            if progress:
                progress(1)
        return report, todo

    def edit_records(
        self, chunk: Sequence[Edit], *, patches: str = "auto", top_k_patches: int = 1
    ) -> tuple[list[EditRecord], list[KeyRecord]]:
        """The compute of add-edit for one batch: key specs (patch search), vectors, radii.

        Touches no codebook, so Ray workers run exactly this on their batches.
        """
        from reasonedit_cli.store import EditRecord, KeyRecord

        images = [e.load_image() for e in chunk]
        specs = self.key_specs(chunk, images, patches=patches, top_k_patches=top_k_patches)
        vectors, radii = self.embed_specs(chunk, specs, images)
        keys = [
            KeyRecord(
                edit_id=chunk[spec.edit_index].id or "",
                kind=spec.kind,
                value=spec.value,
                key_text=spec.key_text,
                image_sha256=chunk[spec.edit_index].image_sha256,
                box=_box4(spec.box),
                vector=vec,
                radius=float(radius),
            )
            for spec, vec, radius in zip(specs, vectors, radii)
        ]
        records = [
            EditRecord(
                edit_id=e.id or "",
                image_sha256=e.image_sha256,
                question=e.question,
                answer=e.answer,
                reasoning=list(e.reasoning),
                boxes=e.boxes,
                source=e.source,
            )
            for e in chunk
        ]
        return records, keys

    def commit_records(
        self,
        todo: Sequence[Edit],
        edit_records: Sequence[EditRecord],
        key_records: Sequence[KeyRecord],
        config: dict[str, Any],
        report: AddReport,
        *,
        merge: bool = False,
        objects: tuple[list[KeyRecord], float, str] | None = None,
    ) -> AddReport:
        """Store the images of `todo` and the computed records as ONE new version.

        The single commit point of add-edit, whichever engine computed the records;
        `config` is `config_for_manifest()` (with the workers' model facts for Ray).
        With `merge`, the new keys then merge into existing ones (docs/method.md#merging, merge on
        insert) as a second version under the same lock, reported in `report.merge`.
        Only the new keys are merge candidates, so this costs O(new keys x all keys),
        not the O(n^2) of a full `merge_keys`.

        `objects` (`object_records`): the object keys, w and layer of the object index;
        it is committed first, and this version's manifest links it (`objects.change`).
        Replaced edits leave the object index too, with or without new object keys.
        """
        codebook = self.require_codebook()
        with codebook.writer(lock_timeout=self.lock_timeout) as w:
            for e in todo:
                w.store_image(e.image_bytes, e.image_ext)
            if objects is not None or report.replaced:
                self._commit_objects(codebook, w, todo, edit_records, objects, report)
            w.set_config(**config, dim=int(key_records[0].vector.shape[0]))
            if report.replaced:
                w.replace_edits(edit_records, key_records)
            else:
                w.add(edit_records, key_records)
            report.version = w.commit()
            if merge:
                # the new keys are the last rows (a replacement renumbers the others)
                new_from = codebook.n_keys - len({k.key_id for k in key_records})
                report.merge, report.version = _merge_in(w, new_from=new_from)
        report.added = [e.id or "" for e in todo]
        report.keys = len(key_records)
        report.boxes.update(patch_boxes(todo, key_records))
        return report

    def _commit_objects(
        self,
        codebook: Codebook,
        w: Any,
        todo: Sequence[Edit],
        edit_records: Sequence[EditRecord],
        objects: tuple[list[KeyRecord], float, str] | None,
        report: AddReport,
    ) -> None:
        """The object index's part of an add, before the main commit (which links it)."""
        from reasonedit_cli import objects as O

        keys, ow, layer = objects if objects is not None else ([], 0.0, "")
        tau_x = float(self.object_settings.get("tau_x") or O.OBJECT_TAU_X)
        config = (
            O.nested_config(
                self.config_for_manifest(), w=ow, layer=layer, main_version=0, tau_x=tau_x
            )
            if objects is not None
            else {}
        )
        if config:
            config["main_version"] = codebook.version + 1
        images = {e.image_sha256: (e.image_bytes, e.image_ext) for e in todo}
        step = O.add_step(edit_records, keys, images, config, report.replaced)
        try:
            link = O.change(
                codebook, w, step, lock_timeout=self.lock_timeout, create=objects is not None
            )
        except O.ObjectIndexUnusable as e:
            O.mark_unusable(w, str(e))
            report.objects_problem = f"{e}; `reasonedit doctor --repair` rebuilds it"
            return
        if link is not None:
            report.object_keys = len(keys)

    def use_embedding(self, layer: str, w: float | None) -> None:
        """Embed with this layer and w (None = auto: fixed by the first batch embedded).

        What a codebook's config does for an editor opened on it; Ray workers have no
        codebook and get the driver's settings through this.
        """
        from reasonedit_cli.embedding import DualEmbedder

        self._embedder = DualEmbedder(self.vlm, self.text, layer=layer, w=w)

    # ------------------------------------------------------------ live edits
    def with_codebook(self, codebook: Codebook) -> Editor:
        """A sibling editor on another snapshot of this codebook, sharing the loaded models.

        What a long-running reader (`reasonedit serve`) switches to when a new version is
        committed; this editor keeps its snapshot, so work in flight finishes on it. The
        embedder is rebuilt only when the layer or w changed (calibrate). Refuses a
        version whose keys were made with other model weights or another text model.
        """
        from reasonedit_cli.presets import preset_of

        new = copy.copy(self)
        new.codebook = codebook
        cfg = codebook.config
        old_cfg = self.config
        if self.preset.name == self.stored_preset:  # following the codebook's preset
            new.preset = preset_of(cfg)
        if (cfg.get("layer"), cfg.get("w"), new.preset) != (
            old_cfg.get("layer"),
            old_cfg.get("w"),
            self.preset,
        ):
            new._embedder = None
        text_model = cfg.get("text_model")
        if text_model and self._text is not None and text_model != self._text.name:
            raise UsageError(
                f"codebook version {codebook.version} was built with text model {text_model}, "
                f"not {self._text.name}"
            )
        if self._vlm is not None:
            new.check_model_revision(self._vlm.revision)
        return new

    def reload_if_changed(self) -> Editor | None:
        """An editor on the newest committed version, loaded and verified, when it is not
        this editor's; None when nothing changed.

        Raises CodebookError (damaged version) or UsageError (other model) and leaves this
        editor as it was, so a server refuses the version and keeps serving this one.
        """
        newer = self.require_codebook().newer()
        if newer is None:
            return None
        return self.with_codebook(newer.load())

    @property
    def version(self) -> int | None:
        """The codebook version this editor answers with (None without a codebook)."""
        return self.codebook.version if self.codebook is not None else None

    # ------------------------------------------- see and manage (no model loads)
    def list_edits(
        self,
        *,
        question: str | None = None,
        answer: str | None = None,
        edit_id: str | None = None,
        image: str | None = None,
    ) -> list[dict[str, Any]]:
        """The live edits (id, question, answer, image, keys, version), filtered by
        case-insensitive substrings; see `catalog.list_edits`."""
        from reasonedit_cli.catalog import list_edits

        return list_edits(
            self.require_codebook(), question=question, answer=answer, edit_id=edit_id, image=image
        )

    def show_edit(self, edit_id: str, *, image_out: str | Path | None = None) -> dict[str, Any]:
        """One edit, its facts and its keys (kind, box, radius); with `image_out`, also
        write its image with the boxes drawn (the path is in the result's `image_out`)."""
        from reasonedit_cli.catalog import draw_edit_boxes, show_edit

        cb = self.require_codebook()
        info = show_edit(cb, edit_id)
        if image_out is not None:
            path, boxes = draw_edit_boxes(cb, edit_id, image_out)
            info["image_out"], info["image_boxes"] = str(path), boxes
        return info

    def export(self, out_dir: str | Path, *, edit_ids: Sequence[str] | None = None) -> dict:
        """Write the edits as `add-edit --from` JSONL plus their images (`catalog`)."""
        from reasonedit_cli.catalog import export_codebook

        return export_codebook(self.require_codebook(), out_dir, edit_ids=edit_ids)

    def remove_edits(self, edit_ids: Sequence[str]) -> dict[str, Any]:
        """Tombstone edits in one new version: {removed, version, previous}.

        Unknown ids are an `InputError` before anything is written.
        """
        from reasonedit_cli.errors import InputError

        cb = self.require_codebook()
        unknown = sorted(set(edit_ids) - cb.edit_ids())
        if unknown:
            raise InputError(f"no such edit in {cb.path}: {', '.join(unknown)}")
        previous = cb.version
        from reasonedit_cli import objects as O

        problem = None
        with cb.writer(lock_timeout=self.lock_timeout) as w:
            # the object index first; this version's manifest links its new version
            try:
                O.change(cb, w, O.remove_step(edit_ids), lock_timeout=self.lock_timeout)
            except O.ObjectIndexUnusable as e:
                O.mark_unusable(w, str(e))
                problem = f"{e}; `reasonedit doctor --repair` rebuilds it"
            version = w.remove_edits(edit_ids)
        out = {"removed": sorted(set(edit_ids)), "version": version, "previous": previous}
        if problem:
            out["objects_problem"] = problem
        return out

    def restore(self, version: int) -> dict[str, Any]:
        """Make kept version `version` current again, as a new version: {restored,
        version}. Nothing is lost; the version it replaced stays kept too."""
        cb = self.require_codebook()
        with cb.writer(lock_timeout=self.lock_timeout) as w:
            new = w.restore(version)
        return {"restored": version, "version": new}

    def history(self) -> list[dict[str, Any]]:
        """Every kept version, oldest first, with `action`: what that version did."""
        from reasonedit_cli.catalog import version_actions
        from reasonedit_cli.store import history

        cb = self.require_codebook()
        actions = version_actions(cb)
        rows = history(cb.path)
        for r in rows:
            if r.get("version") is not None:
                r["action"] = actions.get(r["version"], "?")
        return rows

    # ------------------------------------------------------------------- ask
    def _retrievals(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        ks: Sequence[int | None],
        percentiles: Sequence[float | None],
        batch_size: int,
    ) -> list[Retrieval]:
        """Retrieval for each (image, question), the query embeddings batched."""
        if not self.codebook_has_keys:
            return [Retrieval(rejected=True) for _ in questions]
        default_k = int(self.config.get("top_k", DEFAULT_TOP_K))
        out: list[Retrieval] = []
        for start in range(0, len(questions), batch_size):
            q = self.embedder.embed(
                images[start : start + batch_size], questions[start : start + batch_size]
            )
            for i, vec in enumerate(q, start):
                out.append(retrieve(self.codebook, vec, k=ks[i] or default_k, p=percentiles[i]))
        if self.objects:
            out = self._with_objects(
                out, images, questions, [k or default_k for k in ks], batch_size
            )
        return out

    def retrievals(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        *,
        k: int | None = None,
        percentile: float | None = None,
        batch_size: int = 16,
    ) -> list[Retrieval]:
        """What `ask` retrieves for each (image, question), without answering: the main
        index's retrieval united with the object index's (when the codebook has one)."""
        n = len(questions)
        return self._retrievals(images, questions, [k] * n, [percentile] * n, batch_size)

    def object_index(self) -> tuple[Any, str | None]:
        """The object index this snapshot links (`objects.open_index`) and its problem;
        opened once per codebook version."""
        from reasonedit_cli import objects as O

        cb = self.require_codebook()
        stamp = f"{cb.version}:{cb.manifest.get('checksum')}"
        if self._object_index is None or self._object_index[0] != stamp:
            index, problem = O.open_index(cb)
            self._object_index = (stamp, index, problem)
        return self._object_index[1], self._object_index[2]

    def _with_objects(
        self,
        found: list[Retrieval],
        images: Sequence[Image.Image],
        questions: Sequence[str],
        ks: Sequence[int],
        batch_size: int,
    ) -> list[Retrieval]:
        """Each retrieval united with the object index's (`regions.union_retrieval`), the
        object index's part recorded in `Retrieval.objects`. A damaged object index is
        skipped with the problem recorded (`objects_problem`): the main index answers."""
        from dataclasses import replace

        from reasonedit_cli import objects as O
        from reasonedit_cli.errors import CodebookError

        index, problem = self.object_index()
        if index is None and problem is None:
            return found
        if index is None:
            return [replace(r, objects_problem=problem) for r in found]
        rk = O.region_embedder(self.vlm, self.text.encode, index.layer, index.w)
        extra: dict[int, Retrieval] = {}
        try:
            if not index.codebook.n_keys:
                return found
            for start in range(0, len(questions), batch_size):
                stop = min(start + batch_size, len(questions))
                for k in sorted(set(ks[start:stop])):
                    rows = [i for i in range(start, stop) if ks[i] == k]
                    got = O.lookup(
                        index, rk, [images[i] for i in rows], [questions[i] for i in rows], k
                    )
                    extra.update(zip(rows, got))
        except CodebookError as e:
            # a damaged object segment: answer from the main index, say why
            stamp = self._object_index[0] if self._object_index else ""
            self._object_index = (stamp, None, str(e))
            return [replace(r, objects_problem=str(e)) for r in found]
        return [O.combine(r, extra[i]) for i, r in enumerate(found)]

    def ask_each(
        self,
        queries: Sequence[Query],
        *,
        batch_size: int = 16,
        on_tokens: Callable[[int, str], None] | None = None,
    ) -> list[Answer]:
        """Answer queries that each carry their own settings, in as few VLM calls as the
        settings allow: the server's batched ask.

        Retrieval embeds all edited queries together; generation runs one batched call per
        sampling setting (greedy queries together), each row with its own token budget.
        With the same settings an answer equals `ask`'s. `on_tokens(i, text)` gets query
        i's answer text so far after every decoding step (streaming).
        """
        edited = [i for i, q in enumerate(queries) if not q.no_edit]
        found = self._retrievals(
            [queries[i].image for i in edited],
            [queries[i].question for i in edited],
            [queries[i].k for i in edited],
            [queries[i].percentile for i in edited],
            batch_size,
        )
        retrievals: list[Retrieval | None] = [None] * len(queries)
        for i, r in zip(edited, found):
            retrievals[i] = r
        prompts = [
            build_prompt(r.facts if r else [], q.question) for r, q in zip(retrievals, queries)
        ]
        groups: dict[tuple[float, float], list[int]] = {}
        for i, q in enumerate(queries):
            key = (float(q.temperature), float(q.top_p)) if q.temperature > 0 else (0.0, 1.0)
            groups.setdefault(key, []).append(i)
        done: dict[int, Any] = {}
        from reasonedit_cli.backend import CompletingBackend

        vlm = self.vlm
        if not isinstance(vlm, CompletingBackend):
            raise ReasonEditError(
                f"{type(vlm).__name__} cannot sample or stream answers (no complete/decode)"
            )
        for (temperature, top_p), rows in groups.items():
            step = None
            if on_tokens is not None:

                def step(j: int, ids: list[int], rows: list[int] = rows) -> None:
                    on_tokens(rows[j], vlm.decode(ids))

            completions = vlm.complete(
                [queries[i].image for i in rows],
                [prompts[i] for i in rows],
                max_new_tokens=[queries[i].max_new_tokens for i in rows],
                batch_size=batch_size,
                temperature=temperature,
                top_p=top_p,
                on_tokens=step,
            )
            done.update(zip(rows, completions))
        return [
            Answer(
                question=q.question,
                answer=done[i].text,
                prompt=prompts[i],
                retrieval=retrievals[i],
                tokens=done[i].tokens,
                prompt_tokens=done[i].prompt_tokens,
                finished=done[i].finished,
            )
            for i, q in enumerate(queries)
        ]

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
        if not no_edit:
            n = len(questions)
            retrievals = list(
                self._retrievals(images, questions, [k] * n, [percentile] * n, batch_size)
            )
        prompts = [build_prompt(r.facts if r else [], qu) for r, qu in zip(retrievals, questions)]
        answers = self.vlm.generate(
            images, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        return [
            Answer(question=qu, answer=a, prompt=p, retrieval=r)
            for qu, a, p, r in zip(questions, answers, prompts, retrievals)
        ]

    # ------------------------------------------------------------ merge-keys
    def merge_keys(self, *, dry_run: bool = False) -> tuple[Any, int]:
        """Merge overlapping keys (docs/method.md#merging) into a new version; returns (plan,
        version).

        Keys with different values merge too: the survivor collects every value with
        the edit it came from. The plan is made under the writer lock, on the newest
        version, so keys another writer added meanwhile are neither lost nor misnumbered.
        """
        cb = self.require_codebook()
        if dry_run:
            return _plan(cb), cb.version
        with cb.writer(lock_timeout=self.lock_timeout) as w:
            return _merge_in(w)

    # ------------------------------------------------------------- calibrate
    def calibration_items(
        self, pairs_file: str | None, *, questions_only: bool = False
    ) -> list[tuple[Image.Image, str]]:
        """Anchor (image, text) items: from a JSONL of {image, text} or the codebook's edits
        (each edit's question and, unless `questions_only` as the reference samples
        dataset questions, its reasoning sentences)."""
        if pairs_file:
            from reasonedit_cli.datasets import read_calibration_items

            return read_calibration_items(pairs_file)
        from reasonedit_cli.edits import decode_image

        items: list[tuple[Image.Image, str]] = []
        cb = self.require_codebook()
        for rec in cb.edits():
            img = decode_image(cb.read_image_bytes(rec.image_sha256), f"edit {rec.edit_id}")
            items.append((img, rec.question))
            if not questions_only:
                items.extend((img, s) for s in rec.reasoning)
        if not items:
            raise UsageError(
                "nothing to calibrate on: the codebook has no edits; add edits or give "
                "calibration pairs (`pairs_file` FILE)"
            )
        return items

    def calibrate(
        self,
        pairs_file: str | None = None,
        *,
        rule: str = "bimodal",
        layers: Sequence[str] | None = None,
        max_pairs: int | None = 400,
        bootstrap: int = 5,
        knn: int | None = None,
        seed: int = 0,
        progress: Callable[[str, int], None] | None = None,
        dry_run: bool = False,
        force: bool = False,
        select: str = "checked",
        max_checks: int | None = None,
    ) -> tuple[Any, int]:
        """Choose layer and w (docs/method.md#calibration), check them, store them, and re-embed
        every key.

        Returns the CalibrationResult and the new codebook version (the old version when
        `dry_run`). The new keys and settings are committed as one version, so readers
        see either the old codebook or the fully re-embedded one.

        Before committing, a codebook with keys asks its own edits back (as is, rephrased,
        on a perturbed image; `selfcheck`) under the old and the new settings; the counts
        are in `result.extra["check"]`. A choice that retrieves fewer of any kind raises
        `CalibrationRefused` and writes nothing, unless `force`.

        `select` "checked" (the default, for a codebook with keys and the default preset)
        makes that check part of the choice: of the candidates the balance score ranks,
        the first whose check passes (`calibration.calibrate`, at most `max_checks`
        candidates); "balance" takes the balance score's choice alone, as the paper does,
        and only refuses it. The reference preset always selects as "balance".
        """
        from reasonedit_cli.calibration import (
            DEFAULT_MAX_CHECKS,
            SELECTIONS,
            build_pairs,
            calibrate,
        )

        if select not in SELECTIONS:
            raise UsageError(f"select must be one of {', '.join(SELECTIONS)}, got {select!r}")

        cb = self.require_codebook()
        reference = self.preset.calibration == "reference"
        items = self.calibration_items(pairs_file, questions_only=reference)
        names = list(layers) if layers else [li.label for li in self.vlm.candidate_layers()]
        if reference:
            # the reference hooks every candidate at its normed point (REFERENCE row 3)
            names = list(dict.fromkeys(self.hook_label(n) for n in names))
        names = [self.vlm.resolve_layer(n).label for n in names]
        features = lambda imgs, texts, ls: self.vlm.pooled_inputs(imgs, texts, ls)  # noqa: E731
        if reference:
            from reasonedit_cli.calibration_reference import calibrate_reference

            result = calibrate_reference(
                items,
                features,
                self.text.encode,
                names,
                n_runs=bootstrap or 1,
                seed=seed,
                progress=progress,
            )
        else:
            checked = select == "checked" and self.codebook_has_keys
            result = calibrate(
                build_pairs(items, max_pairs=max_pairs, seed=seed),
                features,
                self.text.encode,
                names,
                rule=rule,
                bootstrap=bootstrap,
                knn=knn,
                seed=seed,
                progress=progress,
                check=self.candidate_check(self.embedder, names) if checked else None,
                max_checks=DEFAULT_MAX_CHECKS if max_checks is None else max_checks,
            )
        from reasonedit_cli.embedding import DualEmbedder

        keys: list[KeyRecord] = []
        if self.codebook_has_keys:
            old_embedder = self.embedder
            self._embedder = DualEmbedder(self.vlm, self.text, layer=result.layer, w=result.w)
            keys = self.reembed_keys()
            check = self.check_settings(old_embedder, self._embedder, keys)
            result.extra["check"] = check.to_dict()
            if dry_run or (check.loses_retrieval and not force):
                self._embedder = old_embedder
                if not dry_run:
                    from reasonedit_cli.selfcheck import CalibrationRefused

                    raise CalibrationRefused(result, check)
        if dry_run:
            return result, cb.version
        self._embedder = DualEmbedder(self.vlm, self.text, layer=result.layer, w=result.w)
        summary = result.to_dict()
        config = {
            **self.config_for_manifest(),
            "layer": result.layer,
            "w": float(result.w),
            "calibrated": True,
            "calibration": {
                k: summary[k] for k in ("rule", "n_pairs", "bootstrap", "seed") if k in summary
            }
            | {"chosen": _chosen_row(summary, result.layer)},
        }
        with cb.writer(lock_timeout=self.lock_timeout) as w:
            if keys:
                w.set_config(**config, dim=int(keys[0].vector.shape[0]))
                w.replace_all_keys(keys)
            else:
                w.set_config(**config)
            version = w.commit()
        return result, version

    def check_settings(
        self,
        old: KeyEmbedder,
        new: KeyEmbedder,
        new_keys: Sequence[KeyRecord],
        baseline: tuple[Sequence[Any], dict[str, int]] | None = None,
    ) -> Any:
        """Retrieval of the codebook's own edits under its current keys (embedded by
        `old`) and under `new_keys` (embedded by `new`): a `selfcheck.RetrievalCheck`.

        The new keys go into a scratch codebook with this one's edits and tau rule, so
        sigma, tau and search are exactly those the committed version would have.
        `baseline`: the probes and their counts under `old` (`check_baseline`), when
        several settings are checked against the same old ones.
        """
        import tempfile

        from reasonedit_cli.selfcheck import RetrievalCheck, count_retrieved, totals
        from reasonedit_cli.store import Codebook

        cb = self.require_codebook()
        k = int(self.config.get("top_k", DEFAULT_TOP_K))
        probes, before = baseline if baseline is not None else self.check_baseline(old)
        with tempfile.TemporaryDirectory(prefix="reasonedit-check-") as tmp:
            scratch = Codebook.open(Path(tmp) / "cb", create=True)
            with scratch.writer() as w:
                dim = int(new_keys[0].vector.shape[0])
                w.set_config(**{**self.config, "layer": new.layer, "w": _fixed_w(new), "dim": dim})
                w.add(cb.edits(), list(new_keys))
            after = count_retrieved(scratch, new.embed, probes, k=k)
        return RetrievalCheck(
            total=totals(list(probes)),
            old=before,
            new=after,
            old_settings={"layer": old.layer, "w": _fixed_w(old)},
            new_settings={"layer": new.layer, "w": _fixed_w(new)},
        )

    def check_baseline(self, old: KeyEmbedder) -> tuple[list[Any], dict[str, int]]:
        """The self-check's probes of this codebook and their counts under `old`."""
        from reasonedit_cli.selfcheck import check_probes, count_retrieved

        cb = self.require_codebook()
        probes = check_probes(cb)
        k = int(self.config.get("top_k", DEFAULT_TOP_K))
        return probes, count_retrieved(cb, old.embed, probes, k=k)

    def candidate_check(self, old: KeyEmbedder, layers: Sequence[str]) -> Callable[..., Any]:
        """`check(layer, w)` for calibrate's checked selection: the kinds of own-edit probes
        that keys at (layer, w) retrieve fewer of than `old` (`check_settings`).

        The VLM halves of every key, its augmented copy and every probe are taken once
        for all `layers` (`evaluation.HalfCache`), so each candidate costs a scratch
        codebook and the probes' searches, not another pass of the model.
        """
        from reasonedit_cli.evaluation import CachedEmbedder, HalfCache

        halves = HalfCache(self.vlm, self.text, layers)
        baseline = self.check_baseline(old)

        def check(layer: str, w: float) -> list[str]:
            emb = CachedEmbedder(halves, layer, float(w))
            keys = self.reembed_keys(embedder=emb)
            return list(self.check_settings(old, emb, keys, baseline=baseline).lost)

        return check

    def reembed_keys(
        self, batch_size: int = 64, embedder: KeyEmbedder | None = None
    ) -> list[KeyRecord]:
        """Every live key embedded again from its stored image and text (same ids/values),
        by `embedder` (default: the codebook's own)."""
        from reasonedit_cli.edits import decode_image

        cb = self.require_codebook()
        rows = cb.keys_table().to_pylist()
        cache: dict[str, Image.Image] = {}
        out: list[KeyRecord] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            imgs = []
            for r in chunk:
                sha = r["image_sha256"]
                if sha not in cache:
                    cache[sha] = decode_image(cb.read_image_bytes(sha), f"image {sha[:12]}")
                imgs.append(crop(cache[sha], r["box"]) if r["box"] else cache[sha])
            seeds = [_seed(r["edit_id"], r["kind"], r["key_text"], r["box"]) for r in chunk]
            vectors, radii = self.embed_with_radii(
                imgs, [r["key_text"] for r in chunk], seeds, embedder
            )
            for r, radius in zip(chunk, radii):
                r["radius"] = float(radius)
            out.extend(_records_from_rows(chunk, vectors))
        return out


def check_codebook(
    path: str | Path, *, repair: bool = False, lock_timeout: float = 10.0
) -> CheckReport:
    """Verify a codebook's files and checksums (`reasonedit doctor`); with `repair`,
    rebuild what the surviving files allow first (`repair.repair_codebook`).

    A function, not an `Editor` method: repair must work on a codebook whose manifest is
    too damaged to open.
    """
    from reasonedit_cli import objects as O
    from reasonedit_cli.errors import CodebookError
    from reasonedit_cli.store import Codebook

    if repair:
        from reasonedit_cli.repair import repair_codebook

        report = repair_codebook(path, lock_timeout=lock_timeout)
    else:
        report = Codebook.open(path).check(lock_timeout=lock_timeout)
    # the object index (reasonedit_cli.objects): derived, rebuilt from the edits
    try:
        main = Codebook.open(path)
    except CodebookError:
        return report
    problems, notes = O.check(main)
    if problems and repair:
        report.repaired += [f"damaged: {p}" for p in problems]
        report.repaired += O.rebuild(main.path, lock_timeout=lock_timeout)
        problems, notes = O.check(Codebook.open(path))
    report.problems += problems
    report.notes += notes
    return report


def _box4(box: Sequence[int] | None) -> tuple[int, int, int, int] | None:
    """A KeySpec's box as a KeyRecord stores it (None: the whole image)."""
    if not box:
        return None
    x0, y0, x1, y1 = box
    return (int(x0), int(y0), int(x1), int(y1))


def _fixed_w(embedder: KeyEmbedder) -> float:
    """The embedder's w, fixed by the keys it has embedded (auto w is set by the first)."""
    if embedder.w is None:
        raise ReasonEditError("the key weight w is not fixed yet: embed keys first")
    return float(embedder.w)


def _seed(edit_id: str, kind: str, key_text: str, box: Any) -> int:
    """A deterministic augmentation seed from a key's identity."""
    import hashlib

    h = hashlib.sha256(f"{edit_id}\x00{kind}\x00{key_text}\x00{box}".encode())
    return int.from_bytes(h.digest()[:8], "little")


def _chosen_row(summary: dict[str, Any], layer: str) -> dict[str, Any]:
    """The layer-table row of the chosen layer: its three modularities, for the manifest."""
    for row in summary.get("layer_table", []):
        if row.get("layer") == layer:
            return {k: row[k] for k in ("q_vis", "q_lang", "q_bi") if k in row}
    return {}


def _records_from_rows(rows: list[dict[str, Any]], vectors: Any) -> list[KeyRecord]:
    """KeyRecords from `keys_table().to_pylist()` rows and their (new) vectors."""
    from reasonedit_cli.store import key_records

    return key_records(rows, vectors)


def _key_rows(cb: Codebook) -> list[dict[str, Any]]:
    """The live keys as dicts, without the (large) vector column."""
    return cb.keys_table().drop_columns(["vector"]).to_pylist()


def _plan(cb: Codebook, new_from: int = 0, rows: list[dict[str, Any]] | None = None) -> Any:
    """The merge plan (docs/method.md#merging) of a codebook's live keys."""
    from reasonedit_cli.merging import plan_merges
    from reasonedit_cli.store import key_entries

    rows = _key_rows(cb) if rows is None else rows
    plan = plan_merges(
        cb.vectors(),
        [r["radius"] for r in rows],
        [key_entries(r) for r in rows],
        new_from=new_from,
        rule=cb.config.get("merge_rule") or "ours",
    )
    plan.key_ids = [r["key_id"] for r in rows]
    return plan


def _merge_in(w: Any, new_from: int = 0) -> tuple[Any, int]:
    """Plan and commit key merging with a held writer; returns (plan, version)."""
    import numpy as np

    cb = w.cb
    rows = _key_rows(cb)
    plan = _plan(cb, new_from, rows)
    if not plan.merged_into:
        return plan, cb.version
    keep = np.ones(len(rows), dtype=bool)
    keep[list(plan.merged_into)] = False
    kept = []
    for i in map(int, np.flatnonzero(keep)):
        r = rows[i]
        if i in plan.entries:  # a survivor: grown ball, collected values
            merged = [{"value": v, "edit_id": e} for v, e in plan.entries[i][1:]]
            r = {**r, "radius": plan.radius[i], "merged": merged}
        kept.append(r)
    records = _records_from_rows(kept, cb.vectors()[keep])
    # stored key ids stay: a key keeps its identity when it absorbs others
    return plan, w.rewrite_keys([(r["key_id"], k) for r, k in zip(kept, records)], keep)
