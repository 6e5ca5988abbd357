"""The evaluation protocol (docs/method.md#evaluation): edit, then probe reliability, generality,
locality.

Input is an edit JSONL and a probe JSONL. Each probe is `{image, question, answer, kind,
edit_id?}` with kind one of `t_gen`, `i_gen`, `r_gen`, `coe_gen` (tied to an edit by
`edit_id`), `loc` (unrelated) or `hard_loc` (an edited image asked about something
none of its edits touch, e.g. another object of the scene or the other attribute of an
easy-vqa shape; its unedited answer must stay). The edited samples themselves are the
`acc` probes. A probe may carry `choices` (multiple choice).

Metrics are exact-match accuracies after normalisation (lower case, no punctuation or
articles). Gen-mean is the arithmetic mean of T/I/R-Gen, Gen-hmean their harmonic mean
(the paper's aggregate). Where probes have choices, `MC-<metric>` scores the choice of
highest likelihood (lowest mean answer-token loss), compared with `strip().lower()` as
the reference does. Retrieval diagnostics: for generality probes, the share that
retrieved a fact of their own edit (recall); for locality probes (`loc`, `hard_loc`),
the share that retrieved nothing.
"""

from __future__ import annotations

import functools
import re
import string
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reasonedit_cli.errors import InputError, UsageError

PROBE_KINDS = ("acc", "t_gen", "i_gen", "r_gen", "coe_gen", "loc", "hard_loc")
LOC_KINDS = ("loc", "hard_loc")  # probes tied to no edit: the answer must not change
METRIC_NAMES = {
    "acc": "Acc",
    "t_gen": "T-Gen",
    "i_gen": "I-Gen",
    "r_gen": "R-Gen",
    "coe_gen": "CoE-Gen",
    "loc": "Loc",
    "hard_loc": "Hard-Loc",  # an edited image asked about something its edits do not touch
}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, squeeze spaces (VQA-style matching)."""
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


@dataclass
class Probe:
    """One question to ask after editing, with its expected answer."""

    image_bytes: bytes
    question: str
    answer: str
    kind: str
    edit_id: str | None = None
    where: str = ""
    choices: list[str] | None = None  # answer options, for multiple-choice scoring


def read_probes(path: str) -> list[Probe]:
    """Probes from JSONL; `kind` must be one of the protocol's probe kinds."""
    from reasonedit_cli.datasets import read_questions

    probes = []
    for item in read_questions(path):
        where = item["where"]
        kind = item.get("kind")
        if kind not in PROBE_KINDS:
            raise InputError(
                f"{where}: 'kind' must be one of {', '.join(PROBE_KINDS)}, got {kind!r}"
            )
        if not isinstance(item.get("answer"), str) or not item["answer"].strip():
            raise InputError(f"{where}: a probe needs a non-empty string 'answer'")
        edit_id = item.get("edit_id")
        if kind not in LOC_KINDS and not isinstance(edit_id, str):
            raise InputError(f"{where}: a {kind} probe needs the 'edit_id' of its edit")
        choices = item.get("choices")
        if choices is not None and (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise InputError(f"{where}: 'choices' must be a list of at least two strings")
        probes.append(
            Probe(
                item["image_bytes"],
                item["question"],
                item["answer"],
                kind,
                edit_id if isinstance(edit_id, str) else None,
                where,
                choices,
            )
        )
    return probes


METHODS = (
    "unedited",
    "reasonedit",
    "reasonedit-reference",
    "ike",
    "ike-reference",
    "grace",
    "answer-lookup",
    "vision-only",
    "text-only",
    "no-patches",
    "reasonedit-regions",
    "vision-regions",
    "reasonedit-objects",
)
#: p of the rejection sweep; 1 is the reference's default (REFERENCE row 12)
SWEEP_P = (1, 5, *range(10, 100, 10))
SWEEP_W_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
IKE_K = 3


@dataclass
class Outcome:
    """One probe's answer under one method, and which edits its retrieval touched."""

    answer: str
    edit_ids: list[str]
    rejected: bool
    prompt: str | None = None  # the prompt asked (multiple-choice scoring re-uses it)
    choice: str | None = None  # the highest-likelihood choice, where the probe has choices


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class Generations:
    """The VLM's greedy answers cached by (image bytes, prompt): nothing is asked twice."""

    def __init__(self, vlm: Any, batch_size: int = 16) -> None:
        self.vlm = vlm
        self.batch_size = batch_size
        self.cache: dict[tuple[str, str], str] = {}
        self.images: dict[str, Any] = {}
        self.calls = 0
        #: called with the number of questions answered, batch by batch (progress bars)
        self.on_answers: Callable[[int], None] | None = None

    def image(self, data: bytes) -> Any:
        from reasonedit_cli.edits import decode_image

        key = _digest(data)
        if key not in self.images:
            self.images[key] = decode_image(data, "image")
        return self.images[key]

    def note_answers(self, n: int) -> None:
        """Count `n` answers made outside this cache (GRACE's own adapted generation)."""
        if self.on_answers:
            self.on_answers(n)

    def answer(self, image_bytes: Sequence[bytes], prompts: Sequence[str]) -> list[str]:
        keys = [(_digest(b), p) for b, p in zip(image_bytes, prompts)]
        todo: dict[tuple[str, str], bytes] = {}
        for k, b in zip(keys, image_bytes):
            if k not in self.cache:
                todo.setdefault(k, b)
        if self.on_answers and len(keys) > len(todo):
            self.on_answers(len(keys) - len(todo))  # answered from the cache
        items = list(todo.items())
        for start in range(0, len(items), self.batch_size):  # the batches generate() makes
            chunk = items[start : start + self.batch_size]
            out = self.vlm.generate(
                [self.image(b) for _, b in chunk],
                [k[1] for k, _ in chunk],
                batch_size=self.batch_size,
            )
            self.calls += len(chunk)
            for (k, _), a in zip(chunk, out):
                self.cache[k] = a
            if self.on_answers:
                self.on_answers(len(chunk))
        return [self.cache[k] for k in keys]


class HalfCache:
    """Pooled VLM activations (several layers in one forward) and S(t), cached.

    Embedding variants (dual, vision-only, text-only, other w) share these halves, so a
    w sweep or a second key layout never runs the VLM again on the same input.
    """

    def __init__(self, vlm: Any, text: Any, layers: Sequence[str], batch_size: int = 16):
        self.vlm = vlm
        self.text = text
        self.layers = list(dict.fromkeys(vlm.resolve_layer(name).label for name in layers))
        self.batch_size = batch_size
        self.h: dict[tuple[str, str, str], np.ndarray] = {}
        self.s: dict[str, np.ndarray] = {}

    def add_layer(self, layer: str) -> None:
        """Also capture `layer` from now on (inputs seen before are run again for it)."""
        label = self.vlm.resolve_layer(layer).label
        if label not in self.layers:
            self.layers.append(label)
            self.h.clear()

    @staticmethod
    def image_key(img: Any) -> str:
        """The cache key of an image: its pixels, so a re-decoded image hits the cache."""
        import hashlib

        return hashlib.sha256(f"{img.mode}{img.size}".encode() + img.tobytes()).hexdigest()

    def vlm_half(self, images: Sequence[Any], texts: Sequence[str], layer: str) -> np.ndarray:
        keys = [(self.image_key(i), t) for i, t in zip(images, texts)]
        todo: dict[tuple[str, str], int] = {}
        for j, k in enumerate(keys):
            if (k[0], k[1], layer) not in self.h:
                todo.setdefault(k, j)
        if todo:
            idx = list(todo.values())
            out = self.vlm.pooled_inputs(
                [images[j] for j in idx],
                [texts[j] for j in idx],
                self.layers,
                batch_size=self.batch_size,
            )
            for n, j in enumerate(idx):
                for name in self.layers:
                    self.h[(keys[j][0], keys[j][1], name)] = out[name][n]
        return np.stack([self.h[(k[0], k[1], layer)] for k in keys]).astype(np.float32)

    def text_half(self, texts: Sequence[str]) -> np.ndarray:
        todo = sorted({t for t in texts if t not in self.s})
        if todo:
            for t, v in zip(todo, self.text.encode(todo)):
                self.s[t] = v
        return np.stack([self.s[t] for t in texts]).astype(np.float32)


@dataclass
class CachedEmbedder:
    """A DualEmbedder look-alike over a HalfCache: mode dual, vision (h only) or text (S only)."""

    cache: HalfCache
    layer: str
    w: float | None = None
    mode: str = "dual"

    def fix_w(
        self,
        images: Sequence[Any],
        texts: Sequence[str],
        image_codes: Sequence[Any],
        edit_codes: Sequence[Any],
        p: float = 25.0,
    ) -> None:
        """DualEmbedder.fix_w: the same first-batch w as add-edit (embedding.first_batch_w)."""
        if self.w is None and self.mode == "dual" and texts:
            from reasonedit_cli.embedding import first_batch_w

            h = self.cache.vlm_half(images, texts, self.layer)
            self.w = first_batch_w(h, self.cache.text_half(texts), image_codes, edit_codes, p)

    def embed(self, images: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        from reasonedit_cli.calibration import dual_concat

        if self.mode == "text":
            return self.cache.text_half(texts)
        h = self.cache.vlm_half(images, texts, self.layer)
        if self.mode == "vision":
            return h
        if self.w is None:
            from reasonedit_cli.embedding import auto_w

            # the same auto rule as DualEmbedder, so evaluate measures what add-edit builds
            self.w = auto_w(h, self.cache.text_half(texts))
        return dual_concat(h, self.cache.text_half(texts), self.w)


def last_vision_layer(vlm: Any) -> str:
    layers = [li.label for li in vlm.candidate_layers() if li.role == "vision" and not li.normed]
    if not layers:
        raise InputError("the model has no vision-encoder blocks for the vision-only baseline")
    return layers[-1]


class Evaluation:
    """Everything one `evaluate` run shares: models, caches, the edits and the probes."""

    def __init__(
        self,
        editor: Any,
        edits: Sequence[Any],
        probes: Sequence[Probe],
        *,
        workdir: Path,
        batch_size: int = 16,
        top_k: int | None = None,
        percentile: float | None = None,
        gen: Generations | None = None,
        choices: dict[str, list[str]] | None = None,
        patch_search: bool = True,
    ) -> None:
        self.editor = editor
        self.patch_search = patch_search  # False: no patch keys at all (grids, quick runs)
        self.choices = dict(choices or {})  # edit id -> answer options of its acc probe
        self._loss_cache: dict[tuple[str, str, str], float] = {}
        self._grace_choices: list[str | None] = []
        self.grace_log: list[Any] = []
        self.edits = list(edits)
        for e in self.edits:
            e.ensure_id()
        self.probes = [
            Probe(e.image_bytes, e.question, e.answer, "acc", e.id, e.where) for e in self.edits
        ] + list(probes)
        self.workdir = workdir
        self.batch_size = batch_size
        self.gen = gen or Generations(editor.vlm, batch_size)
        base = editor.embedder
        self.halves = HalfCache(
            editor.vlm, editor.text, [base.layer, last_vision_layer(editor.vlm)], batch_size
        )
        self.embedder = CachedEmbedder(self.halves, base.layer, base.w)
        self.top_k = top_k or int(editor.config.get("top_k", 5))
        self.percentile = percentile
        self._specs: dict[str, dict[str, list[Any]]] = {}
        self._codebooks: dict[str, tuple[Any, np.ndarray]] = {}
        from reasonedit_cli.presets import REFERENCE

        #: the preset of the `reasonedit-reference` method (a library caller may swap it)
        self.reference_preset = REFERENCE

    # -------------------------------------------------------------- pieces
    def probe_images(self) -> list[Any]:
        return [self.gen.image(p.image_bytes) for p in self.probes]

    def specs(self, question_rule: str | None = None) -> dict[str, list[Any]]:
        """Key specs per edit id, patch search included, computed once for every variant
        (once per verification prompt rule; default: the editor's preset's)."""
        rule = question_rule or self.editor.preset.question_rule
        if rule not in self._specs:
            out: dict[str, list[Any]] = {}
            for start in range(0, len(self.edits), self.batch_size):
                chunk = self.edits[start : start + self.batch_size]
                imgs = [self.gen.image(e.image_bytes) for e in chunk]
                mode = "auto" if self.patch_search else "none"
                for spec in self.editor.key_specs(chunk, imgs, patches=mode, question_rule=rule):
                    out.setdefault(chunk[spec.edit_index].id, []).append(spec)
            self._specs[rule] = out
        return self._specs[rule]

    def use_specs(self, specs: dict[str, list[Any]], question_rule: str | None = None) -> None:
        """Take key specs computed before (a diagnostic script's cache) instead of running the
        patch search again: `specs(question_rule)` returns them from now on."""
        self._specs[question_rule or self.editor.preset.question_rule] = dict(specs)

    def forget_codebooks(self) -> None:
        """Drop the codebooks `build` made, so the next `build` uses the embedder as it is
        now (a sweep that changes `embedder.w` or `workdir` between settings)."""
        self._codebooks.clear()

    def editor_for(
        self,
        name: str,
        embedder: Any,
        *,
        patches: bool = True,
        preset: Any = None,
        objects: bool = False,
    ) -> Any:
        """An Editor on a fresh codebook that shares the models and the cached key specs.

        `preset` (a presets.Preset; default the editor's) sets the sub-codebook's
        retrieval settings and the verification prompt of its patch search. `objects`:
        the codebook gets an object index (`reasonedit-objects`); every other method's
        has none.
        """
        from dataclasses import replace

        from reasonedit_cli.editor import Editor

        preset = preset or self.editor.preset
        specs = self.specs(preset.question_rule)

        def key_specs(
            edits: Sequence[Any], images: Sequence[Any] | None = None, **_: Any
        ) -> list[Any]:
            return [
                replace(s, edit_index=i)
                for i, e in enumerate(edits)
                for s in specs[e.id]
                if patches or s.kind != "patch"
            ]

        return Editor(
            self.workdir / name,
            model=self.editor.model_name,
            text_model=self.editor.text_model_name,
            create=True,
            preset=preset,
            vlm=self.editor.vlm,
            text=self.editor.text,
            embedder=embedder,
            key_specs=key_specs,
            objects=objects,
        )

    def build(
        self, name: str, embedder: Any, *, patches: bool = True, preset: Any = None
    ) -> tuple[Any, np.ndarray]:
        """A codebook of all edits under `embedder`, and the query embedding of every probe."""
        if name in self._codebooks:
            return self._codebooks[name]
        ed = self.editor_for(name, embedder, patches=patches, preset=preset)
        ed.add_edits(self.edits, batch_size=max(self.batch_size, 32), patches="none")
        vecs = embedder.embed(self.probe_images(), [p.question for p in self.probes])
        self._codebooks[name] = (ed.codebook, vecs)
        return self._codebooks[name]

    def sequential(
        self, eval_every: int, progress: Callable[[int], None] | None = None
    ) -> list[dict[str, Any]]:
        """Add the edits one at a time (one commit each); every `eval_every` edits, measure
        reasonedit on the probes of the edits added so far plus every locality probe."""
        from reasonedit_cli.retrieval import build_prompt, retrieve

        ed = self.editor_for("sequential", self.embedder)
        vecs = self.embedder.embed(self.probe_images(), [p.question for p in self.probes])
        rows: list[dict[str, Any]] = []
        done: set[str] = set()
        for i, edit in enumerate(self.edits, start=1):
            ed.add_edits([edit], patches="none")
            done.add(edit.id)
            if i % eval_every and i != len(self.edits):
                continue
            idx = [j for j, p in enumerate(self.probes) if p.kind in LOC_KINDS or p.edit_id in done]
            rs = [retrieve(ed.codebook, vecs[j], k=self.top_k, p=self.percentile) for j in idx]
            now = [self.probes[j] for j in idx]
            answers = self.gen.answer(
                [p.image_bytes for p in now],
                [build_prompt(r.facts, p.question) for r, p in zip(rs, now)],
            )
            outcomes = [Outcome(a, r.edit_ids, r.rejected) for a, r in zip(answers, rs)]
            summary = summarize(now, {"reasonedit": outcomes})
            rows.append(
                {"edits": i, "keys": ed.codebook.n_keys, **summary["methods"]["reasonedit"]}
            )
            if progress:
                progress(1)
        return rows

    def prompts_with_facts(
        self, facts: Sequence[Sequence[str]], prefix: str = "", sep: str = " "
    ) -> list[str]:
        """Per probe, its question after `prefix + facts joined by sep` (none: the question)."""
        from reasonedit_cli.retrieval import build_prompt

        return [
            build_prompt([prefix + sep.join(f)] if f and prefix else list(f), p.question)
            for f, p in zip(facts, self.probes)
        ]

    def answer_with_facts(self, facts: Sequence[Sequence[str]], prefix: str = "") -> list[str]:
        prompts = self.prompts_with_facts(facts, prefix)
        return self.gen.answer([p.image_bytes for p in self.probes], prompts)

    def retrieval_method(self, codebook: Any, vecs: np.ndarray, p: float | None) -> list[Outcome]:
        from reasonedit_cli.retrieval import retrieve

        pp = self.percentile if p is None else p
        rs = [retrieve(codebook, v, k=self.top_k, p=pp) for v in vecs]
        prompts = self.prompts_with_facts([r.facts for r in rs])
        answers = self.gen.answer([p.image_bytes for p in self.probes], prompts)
        return [
            Outcome(a, r.edit_ids, r.rejected, prompt) for a, r, prompt in zip(answers, rs, prompts)
        ]

    # ------------------------------------------------------------- methods
    def run(self, method: str) -> list[Outcome]:
        """One method's outcome per probe, with its multiple-choice pick where choices exist."""
        outcomes = self._run(method)
        if any(self.choices_of(p) for p in self.probes):
            self.score_choices(method, outcomes)
        return outcomes

    def _run(self, method: str) -> list[Outcome]:
        if method == "unedited":
            prompts = [p.question for p in self.probes]
            answers = self.gen.answer([p.image_bytes for p in self.probes], prompts)
            return [Outcome(a, [], True, q) for a, q in zip(answers, prompts)]
        if method == "reasonedit":
            return self.retrieval_method(*self.build("reasonedit", self.embedder), None)
        if method == "reasonedit-reference":
            return self.retrieval_method(*self.build_reference(), None)
        if method == "no-patches":
            return self.retrieval_method(
                *self.build("no-patches", self.embedder, patches=False), None
            )
        if method == "vision-only":
            emb = CachedEmbedder(self.halves, last_vision_layer(self.editor.vlm), 0.0, "vision")
            return self.retrieval_method(*self.build("vision-only", emb), None)
        if method == "text-only":
            emb = CachedEmbedder(self.halves, self.embedder.layer, 1.0, "text")
            return self.retrieval_method(*self.build("text-only", emb), None)
        if method in ("reasonedit-regions", "vision-regions"):
            from reasonedit_cli.regions import region_outcomes

            return region_outcomes(self, method)
        if method == "reasonedit-objects":
            from reasonedit_cli.regions import object_outcomes

            return object_outcomes(self)
        if method == "ike":
            return self.ike()
        if method == "ike-reference":
            return self.ike_reference()
        if method == "grace":
            return self.grace()
        if method == "answer-lookup":
            return self.answer_lookup()
        raise InputError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")

    def ike(self) -> list[Outcome]:
        """IKE: the 3 nearest edits by S(question) alone, always prepended as `New Fact:`."""
        from reasonedit_cli.editor import answer_value

        keys = self.halves.text_half([e.question for e in self.edits])
        queries = self.halves.text_half([p.question for p in self.probes])
        sims = queries @ keys.T
        facts, ids = [], []
        for row in sims:
            top = np.argsort(-row, kind="stable")[:IKE_K]
            chosen = [self.edits[j] for j in top]
            ids.append([e.id for e in chosen])
            facts.append(
                [" ".join([answer_value(e.question, e.answer), *e.reasoning]) for e in chosen]
            )
        prompts = self.prompts_with_facts(facts, prefix="New Fact: ")
        answers = self.gen.answer([p.image_bytes for p in self.probes], prompts)
        return [Outcome(a, i, False, q) for a, i, q in zip(answers, ids, prompts)]

    def ike_reference(self) -> list[Outcome]:
        """IKE as the authors' code runs it (`revlm/editors/ike.py`): each edit is stored
        as `<normalised prompt> <target>` (no reasoning), the query is the full prompt,
        the 3 nearest by MiniLM are always prepended as `New Fact: ` joined by newlines.

        The reference normalises the stored prompt by asking a small LLM to simplify it;
        that is not reproducible offline, so here the normalisation is deterministic:
        whitespace squeezed and the text stripped. The prompt is the question (reasonedit
        sends the question alone inside the model's chat template)."""
        stored = [f"{' '.join(e.question.split())} {e.answer.strip()}" for e in self.edits]
        keys = self.halves.text_half(stored)
        queries = self.halves.text_half([p.question for p in self.probes])
        sims = queries @ keys.T
        facts, ids = [], []
        for row in sims:
            top = np.argsort(-row, kind="stable")[:IKE_K]
            ids.append([self.edits[j].id for j in top])
            facts.append([stored[j] for j in top])
        # the reference builds "New Fact: " + "\n".join(facts) + "\n" + prompt
        prompts = [f"New Fact: {chr(10).join(f)}\n{p.question}" for f, p in zip(facts, self.probes)]
        answers = self.gen.answer([p.image_bytes for p in self.probes], prompts)
        return [Outcome(a, i, False, q) for a, i, q in zip(answers, ids, prompts)]

    def grace(self) -> list[Outcome]:
        """GRACE as published: a trained key-value adaptor at one language layer
        (`reasonedit_cli.baselines.grace`), edits inserted one at a time."""
        adaptor = self.grace_adaptor()
        images = self.probe_images()
        try:
            answers, hits = adaptor.generate(
                images, [p.question for p in self.probes], batch_size=self.batch_size
            )
            self.gen.note_answers(len(answers))
            outcomes = [
                Outcome(
                    a,
                    list(adaptor.entries[h].edit_ids) if h >= 0 else [],
                    h < 0,
                    p.question,
                )
                for a, h, p in zip(answers, hits, self.probes)
            ]
            if any(self.choices_of(p) for p in self.probes):
                self._grace_choices = self._choices_by(adaptor.answer_loss, outcomes)
        finally:
            adaptor.close()
        return outcomes

    def grace_adaptor(self) -> Any:
        """A GRACE adaptor holding every edit, added in order (its own eps calibration)."""
        from reasonedit_cli.baselines.grace import GraceAdaptor

        vlm = self.editor.vlm
        adaptor = GraceAdaptor(vlm)
        images = [self.gen.image(e.image_bytes) for e in self.edits]
        adaptor.calibrate_eps(images[:32], [e.question for e in self.edits[:32]])
        for e, img in zip(self.edits, images):
            adaptor.add_edit(img, e.question, e.answer, e.id or "")
        self.grace_log = adaptor.log
        return adaptor

    def answer_lookup(self) -> list[Outcome]:
        """Answer lookup (called "GRACE-style" before 0.2): nearest answer key by the dual
        embedding; inside its radius the stored answer replaces the model's (no reasoning,
        no model change), else the unedited answer."""
        from reasonedit_cli.retrieval import pairwise_l2

        codebook, vecs = self.build("reasonedit", self.embedder)
        table = codebook.keys_table()
        kinds = table.column("kind").to_pylist()
        rows = [i for i, k in enumerate(kinds) if k == "answer"]
        keys = codebook.vectors()[rows]
        radii = np.array([table.column("radius")[i].as_py() or 0.0 for i in rows])
        edit_of = [table.column("edit_id")[i].as_py() for i in rows]
        answer_of = {e.id: e.answer for e in self.edits}
        unedited = self._run("unedited")
        d = pairwise_l2(vecs, keys)
        out = []
        for i, row in enumerate(d):
            j = int(np.argmin(row))
            if row[j] <= radii[j]:
                out.append(Outcome(answer_of[edit_of[j]], [edit_of[j]], False))
            else:
                out.append(Outcome(unedited[i].answer, [], True, unedited[i].prompt))
        return out

    def reference_embedder(self) -> CachedEmbedder:
        """The dual embedder of `reasonedit-reference`: the editor's layer at the
        reference preset's hook point, with the editor's w when its codebook was
        calibrated under that preset, else the preset's text scaler (w = 30)."""
        from reasonedit_cli.presets import check_hook

        preset = self.reference_preset
        if self.editor.preset.name == preset.name:
            return self.embedder
        layer = check_hook(self.editor.vlm, self.embedder.layer, preset)
        if layer not in self.halves.layers:
            self.halves.add_layer(layer)
        return CachedEmbedder(self.halves, layer, preset.uncalibrated_w)

    def build_reference(self) -> tuple[Any, np.ndarray]:
        """The codebook and probe queries of `reasonedit-reference` (the reference preset:
        its hook point, w, verification prompt, merge on insert, tau and hits rules)."""
        preset = self.reference_preset
        if self.editor.preset.name == preset.name:
            return self.build("reasonedit", self.embedder)
        return self.build("reasonedit-reference", self.reference_embedder(), preset=preset)

    # ------------------------------------------------------ multiple choice
    def choices_of(self, probe: Probe) -> list[str] | None:
        """A probe's answer options: its own, else (acc probes) its edit's."""
        if probe.choices:
            return probe.choices
        if probe.kind == "acc" and probe.edit_id:
            return self.choices.get(probe.edit_id)
        return None

    def _choices_by(
        self,
        loss: Callable[[Sequence[Any], Sequence[str], Sequence[str]], np.ndarray],
        outcomes: Sequence[Outcome],
    ) -> list[str | None]:
        """Per probe with choices, the choice of lowest mean answer-token loss under
        `loss(images, prompts, answers)` (ties: the first listed), else None."""
        rows: list[tuple[int, int]] = []
        images, prompts, answers = [], [], []
        for i, (p, o) in enumerate(zip(self.probes, outcomes)):
            ch = self.choices_of(p)
            if not ch or o.prompt is None:
                continue
            for c in ch:
                rows.append((i, len(rows)))
                images.append(self.gen.image(p.image_bytes))
                prompts.append(o.prompt)
                answers.append(c)
        losses = loss(images, prompts, answers) if answers else np.zeros(0)
        picks: list[str | None] = [None] * len(self.probes)
        best: dict[int, float] = {}
        for (i, n), c in zip(rows, answers):
            if i not in best or losses[n] < best[i]:
                best[i], picks[i] = float(losses[n]), c
        return picks

    def score_choices(self, method: str, outcomes: list[Outcome]) -> None:
        """Fill `Outcome.choice` for every probe with choices (the reference's metric)."""
        if method == "grace":  # scored with the adaptor on, while it existed
            picks = self._grace_choices
        else:
            picks = self._choices_by(self.choice_loss, outcomes)
            if method == "answer-lookup":  # a hit's stored answer, else the unedited pick
                for i, o in enumerate(outcomes):
                    ch = self.choices_of(self.probes[i])
                    if ch and o.prompt is None:
                        hit = [c for c in ch if c.strip().lower() == o.answer.strip().lower()]
                        picks[i] = hit[0] if hit else None
        for o, c in zip(outcomes, picks):
            o.choice = c

    def choice_loss(
        self, images: Sequence[Any], prompts: Sequence[str], answers: Sequence[str]
    ) -> np.ndarray:
        """Answer-token losses, cached by (image, prompt, answer) across methods."""
        keys = [(self.halves.image_key(i), p, a) for i, p, a in zip(images, prompts, answers)]
        todo = {k: j for j, k in enumerate(keys) if k not in self._loss_cache}
        if todo:
            idx = list(todo.values())
            out = self.editor.vlm.answer_loss(
                [images[j] for j in idx],
                [prompts[j] for j in idx],
                [answers[j] for j in idx],
                batch_size=self.batch_size,
            )
            for j, v in zip(idx, out):
                self._loss_cache[keys[j]] = float(v)
        return np.asarray([self._loss_cache[k] for k in keys], dtype=np.float32)

    # -------------------------------------------------------------- sweeps
    def sweep_p(
        self, ps: Sequence[float] = SWEEP_P, *, reference: bool = False
    ) -> list[dict[str, Any]]:
        """Gen-mean / Loc per rejection percentile p for `reasonedit` (or, with
        `reference`, for `reasonedit-reference`), tau by the codebook's own rule."""
        codebook, vecs = (
            self.build_reference() if reference else self.build("reasonedit", self.embedder)
        )
        rows = []
        for p in ps:
            m = summarize(self.probes, {"r": self.retrieval_method(codebook, vecs, float(p))})
            rows.append({"p": p, "tau": codebook.tau_for(float(p)), **_sweep_row(m)})
        return rows

    def sweep_w(self, factors: Sequence[float] = SWEEP_W_FACTORS) -> list[dict[str, Any]]:
        self.build("reasonedit", self.embedder)  # fixes w when it was auto
        base_w = float(self.embedder.w or 1.0)
        rows = []
        for f in factors:
            w = base_w * f
            emb = CachedEmbedder(self.halves, self.embedder.layer, w)
            codebook, vecs = self.build(f"w-{f:g}", emb)
            m = summarize(self.probes, {"r": self.retrieval_method(codebook, vecs, None)})
            rows.append({"w": w, "factor": f, **_sweep_row(m)})
        return rows


def planned_answers(
    n_edits: int,
    probes: Sequence[Probe],
    edit_ids: Sequence[str],
    methods: Sequence[str],
    *,
    sweep_p: bool = False,
    sweep_w: bool = False,
    eval_every: int | None = None,
    reference_sweep: bool = False,
) -> int:
    """How many questions `evaluate` will put to `Generations.answer` (cached ones too),
    the total of its progress bar: every method asks the edits and the probes once (GRACE
    asks for its fallback, the unedited answer), every sweep point once more
    (`reference_sweep`: the p sweep of `reasonedit-reference` too)."""
    asked = n_edits + len(probes)
    total = asked * len(methods)
    total += asked * len(SWEEP_P) * (int(sweep_p) + int(reference_sweep))
    total += asked * len(SWEEP_W_FACTORS) * sweep_w
    if eval_every:
        loc = sum(p.kind == "loc" for p in probes)
        for i in range(1, n_edits + 1):
            if i % eval_every == 0 or i == n_edits:
                done = set(edit_ids[:i])
                total += i + loc + sum(p.kind != "loc" and p.edit_id in done for p in probes)
    return total


def _sweep_row(m: dict[str, Any]) -> dict[str, Any]:
    r = m["methods"]["r"]
    ret = m["retrieval_by_method"]["r"]
    return {
        "Acc": r["Acc"],
        "Gen-mean": r["Gen-mean"],
        "Loc": r["Loc"],
        "loc_rejected": (ret.get("loc") or {}).get("recall"),
    }


def evaluate(
    editor: Any,
    edits: Sequence[Any],
    probes: Sequence[Probe],
    *,
    methods: Sequence[str] = ("unedited", "reasonedit"),
    batch_size: int = 16,
    sweep_p: bool = False,
    sweep_w: bool = False,
    percentile: float | None = None,
    workdir: Path | None = None,
    gen: Generations | None = None,
    progress: Callable[[int], None] | None = None,
    eval_every: int | None = None,
    choices: dict[str, list[str]] | None = None,
    reference_preset: Any = None,
) -> dict[str, Any]:
    """Run `methods` (and the sweeps) on the same edits and probes; one report dict.

    `reasonedit` runs under the editor's preset, `reasonedit-reference` under
    `reference_preset` (default presets.REFERENCE; a library caller may pass a variant).
    `choices` (edit id -> answer options) adds multiple-choice scoring of the edited
    samples; probes carry their own.

    With `eval_every`, also the sequential run (`report["sequential"]`): edits added one
    at a time, reasonedit measured after every `eval_every` edits, so drift is visible.

    Returns `{"methods": {name: {metric: value}}, "retrieval": {kind: recall of
    reasonedit}, "retrieval_by_method": {...}, "counts": {...}, "sweep_p": [...],
    "sweep_w": [...], "runtime_s": {...}}`.
    """
    import tempfile
    import time

    for m in methods:
        if m not in METHODS:
            raise InputError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if not edits:
        raise InputError("nothing to evaluate: no edits")
    with tempfile.TemporaryDirectory(prefix="reasonedit-eval-") as tmp:
        ev = Evaluation(
            editor,
            edits,
            probes,
            workdir=workdir or Path(tmp),
            batch_size=batch_size,
            percentile=percentile,
            gen=gen,
            choices=choices,
        )
        if reference_preset is not None:
            ev.reference_preset = reference_preset
        results: dict[str, list[Outcome]] = {}
        runtime: dict[str, float] = {}

        def timed(name: str, step: Callable[[], Any], tick: bool = True) -> Any:
            """Run one step, record its wall time, advance the progress bar."""
            t0 = time.perf_counter()
            out = step()
            runtime[name] = round(time.perf_counter() - t0, 3)
            if tick and progress:
                progress(1)
            return out

        for m in methods:
            results[m] = timed(m, functools.partial(ev.run, m))
        report = summarize(ev.probes, results)
        if sweep_p:
            report["sweep_p"] = timed("sweep_p", ev.sweep_p)
            if "reasonedit-reference" in methods and editor.preset.name != "reference":
                report["sweep_p_reference"] = timed(
                    "sweep_p_reference", lambda: ev.sweep_p(reference=True)
                )
        if sweep_w:
            report["sweep_w"] = timed("sweep_w", ev.sweep_w)
        if eval_every:
            # the sequential run advances the bar once per checkpoint itself
            report["sequential"] = timed(
                "sequential", lambda: ev.sequential(eval_every, progress), tick=False
            )
        report["runtime_s"] = runtime
        if ev.grace_log:
            report["grace"] = grace_summary(ev.grace_log)
        report["settings"] = {
            "layer": ev.embedder.layer,
            "w": ev.embedder.w,
            "vision_layer": last_vision_layer(editor.vlm),
            "top_k": ev.top_k,
            "preset": editor.preset.name,
            "percentile": percentile if percentile is not None else editor.preset.percentile,
            "tau_rule": editor.preset.tau_rule,
            "n_edits": len(ev.edits),
            "vlm_answers": ev.gen.calls,
        }
    return report


def parse_methods(text: str) -> list[str]:
    """`all`, or a comma list of METHODS, in the order given."""
    if text.strip() == "all":
        return list(METHODS)
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad or not chosen:
        raise UsageError(
            f"`methods`: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}"
        )
    return chosen


@dataclass
class EvaluationInputs:
    """Where an evaluation takes its edits and probes from: a built-in dataset (built
    from the unedited model's mistakes) or files (edits, optional probes)."""

    dataset: str | None = None  # easy-vqa | scenes
    edits: str | None = None  # an edit file: JSONL, or --format aokvqa / rationalevqa
    probes: str | None = None  # a probe JSONL
    fmt: str = "jsonl"
    images_root: Path | None = None
    n_edits: int = 100  # edits to build from `dataset`
    seed: int = 0

    def check(self) -> None:
        """Usage errors, before any model loads."""
        if (self.dataset is None) == (self.edits is None):
            raise UsageError("give either `dataset` NAME or `edits` FILE [`probes` FILE]")
        if self.dataset is not None and self.dataset not in DATASETS:
            raise UsageError(
                f"unknown `dataset` {self.dataset!r}; supported: {', '.join(DATASETS)}"
            )

    def load(
        self, gen: Generations
    ) -> tuple[list[Any], list[Probe], dict[str, list[str]], dict[str, Any]]:
        """(edits, probes, choices per edit id, dataset info), asking the unedited model
        through `gen` where the edits are its mistakes (datasets, A-OKVQA)."""
        info: dict[str, Any] = {}
        choices: dict[str, list[str]] = {}
        if self.dataset is not None:
            edits, probes, info = build_dataset(
                self.dataset, gen, n_edits=self.n_edits, seed=self.seed
            )
        elif self.fmt == "aokvqa":
            from reasonedit_cli.fileprobes import build_aokvqa

            # edits = the unedited model's mistakes; probes and locality from the file
            edits, probes, choices, info = build_aokvqa(
                str(self.edits), self.images_root, gen.answer
            )
            probes += read_probes(self.probes) if self.probes else []
        else:
            from reasonedit_cli.datasets import read_edits

            edits, _ = read_edits(str(self.edits), self.fmt, images_root=self.images_root)
            probes = read_probes(self.probes) if self.probes else []
            if self.fmt == "rationalevqa":
                from reasonedit_cli.fileprobes import rationalevqa_choices

                choices = rationalevqa_choices(str(self.edits), edits)
        for e in edits:
            e.ensure_id()
        if not info:
            info = {"edits": self.edits, "probes": self.probes, "format": self.fmt}
        return edits, probes, choices, info


class EvaluationRun:
    """One `reasonedit evaluate`: the editor and its scratch codebooks, the inputs, the
    methods, and where the run's reasonedit codebook is kept.

        run = EvaluationRun(lambda path: Editor(path, create=True), inputs, methods=[...])
        with run:                      # the scratch folder (and the Ray workers)
            run.load()                 # edits and probes
            report = run.run(progress=bar)   # `planned_answers()` calls of bar in all

    `open_editor(path)` makes the editor that evaluates, on `path`: the given `codebook`
    when it exists (its model and settings lend themselves; it is not changed), else a
    scratch codebook; a `codebook` that does not exist receives the run's reasonedit
    codebook once the run succeeded. `ray` (distributed.RayOptions) puts every VLM call on
    Ray workers. The constructor raises the usage errors, before any model loads.
    """

    def __init__(
        self,
        open_editor: Callable[[Path], Any],
        inputs: EvaluationInputs,
        *,
        methods: Sequence[str],
        codebook: Path | None = None,
        batch_size: int = 16,
        sweep_p: bool = True,
        sweep_w: bool = False,
        percentile: float | None = None,
        eval_every: int | None = None,
        ray: Any = None,
    ) -> None:
        inputs.check()
        for m in methods:
            if m not in METHODS:
                raise UsageError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        self.keep_to = None if codebook is None or Path(codebook).exists() else Path(codebook)
        if self.keep_to is not None and not (
            "reasonedit" in methods or "grace" in methods or sweep_p or sweep_w
        ):
            raise UsageError("`codebook` keeps the reasonedit codebook; add it to `methods`")
        self.open_editor = open_editor
        self.inputs = inputs
        self.methods = list(methods)
        self.codebook = codebook
        self.batch_size = batch_size
        self.sweep_p = sweep_p
        self.sweep_w = sweep_w
        self.percentile = percentile
        self.eval_every = eval_every
        self.ray = ray
        self.edits: list[Any] = []
        self.probes: list[Probe] = []
        self.choices: dict[str, list[str]] = {}
        self.info: dict[str, Any] = {}
        self._stack: Any = None
        self._tmp: Path | None = None

    def __enter__(self) -> EvaluationRun:
        import contextlib
        import tempfile
        import time

        self._t0 = time.perf_counter()
        stack = contextlib.ExitStack()
        try:
            self._tmp = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="reasonedit-eval-"))
            )
            given = self.codebook if self.keep_to is None else None
            self.editor = self.open_editor(Path(given) if given is not None else self._tmp / "cb")
            if self.ray is not None:
                from reasonedit_cli.distributed import remote_vlm

                # every VLM call (answers, probe and key embeddings, patch search) on workers
                stack.enter_context(remote_vlm(self.editor, self.ray))
            self.gen = Generations(self.editor.vlm, self.batch_size)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def load(self) -> None:
        """Read or build the edits and probes (a dataset asks the unedited model)."""
        self.edits, self.probes, self.choices, self.info = self.inputs.load(self.gen)

    def planned_answers(self) -> int:
        """The questions `run` will put to the model (cached ones too): its progress total."""
        return planned_answers(
            len(self.edits),
            self.probes,
            [e.id or "" for e in self.edits],
            self.methods,
            sweep_p=self.sweep_p,
            sweep_w=self.sweep_w,
            eval_every=self.eval_every,
            reference_sweep=self.sweep_p
            and "reasonedit-reference" in self.methods
            and self.editor.preset.name != "reference",
        )

    def run(self, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """`evaluate` on the loaded inputs; the report, with `dataset`, `seed` and the
        total runtime. `progress(n)`: n more questions answered."""
        import time

        assert self._tmp is not None, "EvaluationRun.run outside `with run:`"
        self.gen.on_answers = progress
        try:
            report = evaluate(
                self.editor,
                self.edits,
                self.probes,
                methods=self.methods,
                batch_size=self.batch_size,
                sweep_p=self.sweep_p,
                sweep_w=self.sweep_w,
                percentile=self.percentile,
                workdir=self._tmp / "variants",
                gen=self.gen,
                eval_every=self.eval_every,
                choices=self.choices,
            )
        finally:
            self.gen.on_answers = None
        if self.keep_to is not None:
            import shutil

            shutil.copytree(self._tmp / "variants" / "reasonedit", self.keep_to)
        report["dataset"] = self.info
        report["seed"] = self.inputs.seed
        report["runtime_s"]["total"] = round(time.perf_counter() - self._t0, 3)
        return report


def summarize(probes: Sequence[Probe], results: dict[str, list[Any]]) -> dict[str, Any]:
    """Per-method accuracies by probe kind, and retrieval precision/recall per kind.

    Results are `Outcome`s (or the editor's `Answer`s). Retrieval per method and kind:
    `recall` = share of probes whose retrieval touched their own edit (for `loc`: share
    that retrieved nothing); `precision` = among probes that retrieved anything, the mean
    share of retrieved edits that are the probe's own (none for `loc`).
    """
    counts: dict[str, int] = defaultdict(int)
    for p in probes:
        counts[p.kind] += 1
    methods: dict[str, dict[str, float | None]] = {}
    by_method: dict[str, dict[str, dict[str, float | None] | None]] = {}
    for method, answers in results.items():
        outcomes = [_as_outcome(a) for a in answers]
        correct: dict[str, int] = defaultdict(int)
        mc_right: dict[str, int] = defaultdict(int)
        mc_total: dict[str, int] = defaultdict(int)
        for p, a in zip(probes, outcomes):
            correct[p.kind] += exact_match(a.answer, p.answer)
            if a.choice is not None:
                mc_total[p.kind] += 1
                mc_right[p.kind] += choice_match(a.choice, p.answer)
        methods[method] = {
            METRIC_NAMES[k]: (correct[k] / counts[k] if counts.get(k) else None)
            for k in PROBE_KINDS
        }
        gen = [methods[method][METRIC_NAMES[k]] for k in GEN_KINDS]
        methods[method]["Gen-mean"] = gen_mean(gen)
        methods[method]["Gen-hmean"] = gen_hmean(gen)
        for k in PROBE_KINDS:
            if mc_total.get(k):
                methods[method]["MC-" + METRIC_NAMES[k]] = mc_right[k] / mc_total[k]
        by_method[method] = {k: _retrieval_stats(probes, outcomes, k) for k in PROBE_KINDS}
    retrieval: dict[str, float | None] = {}
    main = "reasonedit" if "reasonedit" in by_method else next(iter(by_method), None)
    for kind in PROBE_KINDS:
        stats = by_method[main][kind] if main else None
        retrieval[kind] = stats["recall"] if stats else None
    return {
        "methods": methods,
        "retrieval": retrieval,
        "retrieval_by_method": by_method,
        "counts": dict(counts),
    }


GEN_KINDS = ("t_gen", "i_gen", "r_gen")  # Gen-mean: mean of T/I/R-Gen


def gen_mean(values: Sequence[float | None]) -> float | None:
    """Arithmetic mean of the generality scores that exist (a kind without probes is
    left out; None when none exists)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def gen_hmean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of T/I/R-Gen, the paper's generality aggregate.

    0 when any present score is 0 (as the reference: one kind never generalised is a
    failed generality); a kind without probes is left out, None when none exists. (The
    reference's non-harmonic option is `0.5 x` the sum of the three, which is not a
    mean; reasonedit's Gen-mean divides by the count.)
    """
    present = [v for v in values if v is not None]
    if not present:
        return None
    if any(v == 0 for v in present):
        return 0.0
    return len(present) / sum(1.0 / v for v in present)


def choice_match(choice: str, answer: str) -> bool:
    """The reference's multiple-choice comparison: `strip().lower()` on both sides."""
    return choice.strip().lower() == answer.strip().lower()


def grace_summary(log: Sequence[Any]) -> dict[str, Any]:
    """Codebook actions and training effort of the GRACE run (for the report)."""
    actions: defaultdict[str, int] = defaultdict(int)
    for entry in log:
        actions[entry.action] += 1
    return {
        "edits": len(log),
        "actions": dict(actions),
        "solved": sum(e.solved for e in log) / len(log) if log else None,
        "mean_steps": float(np.mean([e.steps for e in log])) if log else None,
    }


def _as_outcome(a: Any) -> Outcome:
    if isinstance(a, Outcome):
        return a
    r = getattr(a, "retrieval", None)
    return Outcome(a.answer, r.edit_ids if r else [], a.rejected)


def _retrieval_stats(
    probes: Sequence[Probe], outcomes: Sequence[Outcome], kind: str
) -> dict[str, float | None] | None:
    pairs = [(p, o) for p, o in zip(probes, outcomes) if p.kind == kind]
    if not pairs:
        return None
    if kind in LOC_KINDS:
        return {"recall": sum(not o.edit_ids for _, o in pairs) / len(pairs), "precision": None}
    recall = sum(p.edit_id in o.edit_ids for p, o in pairs) / len(pairs)
    shares = [
        sum(e == p.edit_id for e in set(o.edit_ids)) / len(set(o.edit_ids))
        for p, o in pairs
        if o.edit_ids
    ]
    return {"recall": recall, "precision": sum(shares) / len(shares) if shares else None}


def markdown_table(report: dict[str, Any]) -> str:
    """The metrics table as Markdown (README, --report)."""
    cols = [METRIC_NAMES[k] for k in PROBE_KINDS] + ["Gen-mean", "Gen-hmean"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, metrics in report["methods"].items():
        cells = [_cell(metrics.get(c)) for c in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    mc = [c for c in ("MC-" + METRIC_NAMES[k] for k in PROBE_KINDS) if _any_has(report, c)]
    if mc:
        lines += ["", "Multiple choice (highest-likelihood choice, `strip().lower()` match)", ""]
        lines.append("| method | " + " | ".join(mc) + " |")
        lines.append("|---" * (len(mc) + 1) + "|")
        for method, metrics in report["methods"].items():
            lines.append(f"| {method} | " + " | ".join(_cell(metrics.get(c)) for c in mc) + " |")
    by = report.get("retrieval_by_method") or {}
    if any(m != "unedited" for m in by):
        kinds = [k for k in PROBE_KINDS if report["counts"].get(k)]
        lines += [
            "",
            "Retrieval recall / precision per probe kind (Loc, Hard-Loc: share retrieving nothing)",
            "",
        ]
        lines.append("| method | " + " | ".join(METRIC_NAMES[k] for k in kinds) + " |")
        lines.append("|---" * (len(kinds) + 1) + "|")
        for method, stats in by.items():
            if method == "unedited":
                continue
            cells = []
            for k in kinds:
                st = stats.get(k) or {}
                cells.append(
                    _cell(st.get("recall"))
                    + ("" if st.get("precision") is None else " / " + _cell(st["precision"]))
                )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _any_has(report: dict[str, Any], column: str) -> bool:
    return any(m.get(column) is not None for m in report["methods"].values())


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def sweep_markdown(report: dict[str, Any]) -> str:
    """The p and w sweeps (generality vs locality) and the sequential run as Markdown."""
    out = []
    titles = {
        "sweep_p": "rejection percentile p",
        "sweep_p_reference": "rejection percentile p, reasonedit-reference",
        "sweep_w": "key weight w",
    }
    for key, label in (("sweep_p", "p"), ("sweep_p_reference", "p"), ("sweep_w", "w")):
        rows = report.get(key)
        if not rows:
            continue
        cols = [label, "Acc", "Gen-mean", "Loc", "loc_rejected"]
        if key.startswith("sweep_p"):
            cols.insert(1, "tau")
        out.append(f"### {titles[key]}\n")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|---" * len(cols) + "|")
        for r in rows:
            cells = [f"{r[label]:g}"] + [_cell(r.get(c)) for c in cols[1:]]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    rows = report.get("sequential")
    if rows:
        cols = ["edits", "keys", "Acc", "T-Gen", "I-Gen", "R-Gen", "Gen-mean", "Loc"]
        out.append("### sequential editing\n")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|---" * len(cols) + "|")
        for r in rows:
            out.append(
                "| "
                + " | ".join(
                    [str(r["edits"]), str(r["keys"])] + [_cell(r.get(c)) for c in cols[2:]]
                )
                + " |"
            )
        out.append("")
    return "\n".join(out)


def plot_sweeps(report: dict[str, Any], path: Path) -> Path | None:
    """The sweeps as a PNG: generality vs locality of every method (with the ends of each
    sweep), and beside it Acc, Gen-mean and Loc against p (and w), where no label can
    pile up. Written whenever there is a sweep (metrics without probes are left out)."""
    sweeps = [
        (key, field, name, marker, report[key])
        for key, field, name, marker in (
            ("sweep_p", "p", "p", "o-"),
            ("sweep_p_reference", "p", "p (reference)", "^:"),
            ("sweep_w", "w", "w", "s--"),
        )
        if report.get(key)
    ]
    if not sweeps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, 1 + len(sweeps), figsize=(6.5 + 4 * len(sweeps), 4.8), squeeze=False
    )
    ax = axes[0][0]
    labels: list[tuple[float, float, str, str]] = []  # x, y, text, colour
    for _key, field, name, marker, rows in sweeps:
        rows = [r for r in rows if r.get("Loc") is not None and r.get("Gen-mean") is not None]
        if not rows:
            continue
        (line,) = ax.plot(
            [r["Loc"] for r in rows], [r["Gen-mean"] for r in rows], marker, label=f"sweep {name}"
        )
        labels += [
            (r["Loc"], r["Gen-mean"], f"{field}={r[field]:.3g}", line.get_color())
            for r in (rows[0], rows[-1])
        ]
    for method, m in report["methods"].items():
        if m.get("Loc") is not None and m.get("Gen-mean") is not None:
            ax.scatter([m["Loc"]], [m["Gen-mean"]], marker="x", color="black", zorder=3)
            labels.append((m["Loc"], m["Gen-mean"], method, "black"))
    ax.set_xlabel("Loc")
    ax.set_ylabel("Gen-mean (T/I/R-Gen)")
    ax.set_title("generality vs locality")
    if labels:
        _annotate_spread(ax, labels)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no generality and locality probes", ha="center", transform=ax.transAxes)
    for sub, (key, field, name, _marker, rows) in zip(axes[0][1:], sweeps):
        xs = [r[field] for r in rows]
        for metric, style in (("Acc", ":^"), ("Gen-mean", "o-"), ("Loc", "s--")):
            if all(r.get(metric) is not None for r in rows):
                sub.plot(xs, [r[metric] for r in rows], style, label=metric)
        if key == "sweep_w":
            sub.set_xscale("log")
        sub.set_xlabel("rejection percentile p" if field == "p" else "key weight w")
        sub.set_ylim(-0.02, 1.02)
        sub.set_title(
            "reasonedit-reference, sweep p"
            if key == "sweep_p_reference"
            else f"reasonedit, sweep {name}"
        )
        sub.grid(alpha=0.3)
        sub.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def label_positions(ys: Sequence[float], min_gap: float) -> list[float]:
    """Label heights for points at `ys`, as near them as possible but `min_gap` apart
    (in the same order), so that labels of points that share an x do not pile up."""
    if not ys:
        return []
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [float(ys[i]) for i in order]
    for i in range(1, len(placed)):  # push each label up past the one below it
        placed[i] = max(placed[i], placed[i - 1] + min_gap)
    mean_shift = sum(p - float(ys[i]) for p, i in zip(placed, order)) / len(placed)
    out = [0.0] * len(ys)
    for i, y in zip(order, placed):
        out[i] = y - mean_shift  # centre the stack on its points
    return out


def _annotate_spread(ax: Any, labels: Sequence[tuple[float, float, str, str]]) -> None:
    """Label points; points at (almost) the same Loc get a stacked column of labels
    beside them, each joined to its point by a thin line, so none overlap."""
    xs = [x for x, *_ in labels]
    x_lo, x_hi = min(xs), max(xs)
    span = max(x_hi - x_lo, 0.05)
    ax.set_xlim(x_lo - 0.3 * span, min(x_hi + 0.3 * span, 1.0 + 0.05 * span))
    y_lo, y_hi = ax.get_ylim()
    ax.set_ylim(y_lo - 0.08 * (y_hi - y_lo), y_hi + 0.08 * (y_hi - y_lo))
    y_lo, y_hi = ax.get_ylim()
    groups: list[list[tuple[float, float, str, str]]] = []
    for item in sorted(labels, key=lambda t: t[0]):  # runs of points close in Loc
        if groups and item[0] - groups[-1][0][0] <= 0.05 * span:
            groups[-1].append(item)
        else:
            groups.append([item])
    for members in groups:
        ys = label_positions([y for _, y, _, _ in members], 0.045 * (y_hi - y_lo))
        top, bottom = y_hi - 0.03 * (y_hi - y_lo), y_lo + 0.03 * (y_hi - y_lo)
        shift = min(0.0, top - max(ys)) or max(0.0, bottom - min(ys))
        ys = [y + shift for y in ys]  # keep the column inside the axes
        right_side = members[0][0] < x_lo + 0.6 * span
        dx = (0.06 if right_side else -0.12) * span
        for (x, y, text, color), ty in zip(members, ys):
            ax.annotate(
                text,
                (x, y),
                xytext=(x + dx, ty),
                ha="left" if right_side else "right",
                va="center",
                fontsize=7,
                color=color,
                arrowprops={"arrowstyle": "-", "lw": 0.5, "color": color, "alpha": 0.5},
            )


def write_report(report: dict[str, Any], directory: Path) -> list[Path]:
    """metrics.json, metrics.md, and with sweeps sweep.md and sweep.png, in `directory`."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    out = [directory / "metrics.json", directory / "metrics.md"]
    out[0].write_text(json.dumps(report, indent=2) + "\n")
    out[1].write_text(
        "# reasonedit evaluation\n\n## Accuracy per method\n\n"
        + markdown_table(report).replace(
            "\nRetrieval recall / precision", "\n## Retrieval\n\nRetrieval recall / precision"
        )
    )
    sweeps = sweep_markdown(report)
    if sweeps:
        (directory / "sweep.md").write_text("# reasonedit evaluation: sweeps\n\n" + sweeps)
        out.append(directory / "sweep.md")
        png = plot_sweeps(report, directory / "sweep.png")
        if png:
            out.append(png)
    return out


def bytes_asker(gen: Generations) -> Callable[[Sequence[bytes], Sequence[str]], list[str]]:
    """The unedited `ask` for the scenes builder (images as PNG bytes), through the cache."""

    def ask(images: Sequence[bytes], questions: Sequence[str]) -> list[str]:
        return gen.answer(list(images), list(questions))

    return ask


def easyvqa_asker(gen: Generations) -> Callable[[Sequence[Path], Sequence[str]], list[str]]:
    """The unedited `ask` for the easy-vqa builder, through the run's answer cache."""

    def ask(paths: Sequence[Path], questions: Sequence[str]) -> list[str]:
        return gen.answer([Path(p).read_bytes() for p in paths], list(questions))

    return ask


DATASETS = ("easy-vqa", "scenes")


def build_dataset(
    name: str, gen: Generations, *, n_edits: int, seed: int
) -> tuple[list[Any], list[Probe], dict[str, Any]]:
    """(edits, probes, info) of a built-in dataset, asking the unedited model via `gen`."""
    if name == "easy-vqa":
        from reasonedit_cli.easyvqa import build_easyvqa

        return build_easyvqa(easyvqa_asker(gen), n_edits=n_edits, seed=seed)
    if name == "scenes":
        from reasonedit_cli.scenes import build_scenes

        return build_scenes(bytes_asker(gen), n_edits=n_edits, seed=seed)
    raise InputError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
