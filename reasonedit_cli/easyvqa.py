"""Build an evaluation set (edits + probes) from the easy-vqa test split
(docs/method.md#evaluation).

The edit set is the shape and colour questions the *unedited* model gets wrong (a seeded
subsample of `n_edits`). Each edit's reasoning comes from the ground truth by the
templates below (documented in docs/evaluation.md). Probes per edit, at most one of each:

* T-Gen: the same image, another question template asking the same thing;
* I-Gen: another image with the same shape (colour), asked the edit's question;
* R-Gen: a yes/no question whose answer follows from the reasoning
  (`is there a triangle?` -> yes for a corrected shape);
* CoE-Gen: another image where the unedited model makes the same mistake (same truth,
  same wrong answer) in another context (other colour for a shape, other shape for a
  colour), asked its own question.

Loc: `n_edits` samples on images no edit or probe uses that the unedited model answers
correctly. Hard-Loc: each edited image asked about its other attribute (a colour question
on a shape-edited image, a shape question on a colour-edited one), kept where the
unedited model answers it correctly: the edit must not change it. easy-vqa gives no
per-image metadata, so each image's shape and colour are read off its own question/answer
pairs.

Unedited answers go through `ask(images, questions)`, which the caller caches, so a
sample is never asked twice within a run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "black", "gray", "brown", "teal")

SHAPE_REASONING = {
    "triangle": "The shape has three corners. A shape with three corners is a triangle.",
    "rectangle": "The shape has four corners. A shape with four corners is a rectangle.",
    "circle": "The shape has no corners. A shape with no corners is a circle.",
}
COLOR_REASONING = {
    "red": "The shape is the colour of a stop sign. Stop signs are red.",
    "green": "The shape is the colour of grass. Grass is green.",
    "blue": "The shape is the colour of the sky. The sky is blue.",
    "yellow": "The shape is the colour of a banana. Bananas are yellow.",
    "black": "The shape is the colour of coal. Coal is black.",
    "gray": "The shape is the colour of an elephant. Elephants are gray.",
    "brown": "The shape is the colour of chocolate. Chocolate is brown.",
    "teal": "The shape is the colour of a peacock's feathers. Peacock feathers are teal.",
}
SHAPE_QUESTIONS = (
    "what shape is in the image?",
    "what shape is present?",
    "what shape does the image contain?",
)
COLOR_QUESTIONS = (
    "what color is the shape?",
    "what is the color of the shape?",
    "what color is the {shape}?",
    "what is the color of the {shape}?",
)
SHAPE_YES = ("is there a {shape}?", "does the image contain a {shape}?", "is a {shape} present?")
COLOR_YES = (
    "is there a {color} shape?",
    "does the image contain a {color} shape?",
    "is a {color} shape present?",
)
_NEG = re.compile(r"\b(not|no)\b")


@dataclass
class Sample:
    index: int  # position in the test split
    image_id: int
    question: str
    answer: str
    kind: str  # shape | color | yesno


def question_kind(question: str, answer: str) -> str:
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    return "yesno"


def image_attributes(questions, answers, image_ids) -> dict[int, dict[str, str]]:
    """Per image its shape and colour, read off the split's own question/answer pairs."""
    attrs: dict[int, dict[str, str]] = {}
    for q, a, img in zip(questions, answers, image_ids):
        d = attrs.setdefault(int(img), {})
        if a in SHAPES:
            d["shape"] = a
        elif a in COLORS:
            d["color"] = a
        elif a in ("yes", "no"):
            positive = (a == "yes") != bool(_NEG.search(q))
            if positive:
                for s in SHAPES:
                    if re.search(rf"\b{s}\b", q):
                        d["shape"] = s
                for c in COLORS:
                    if re.search(rf"\b{c}\b", q):
                        d["color"] = c
    return attrs


def reasoning_for(kind: str, answer: str) -> str:
    return SHAPE_REASONING[answer] if kind == "shape" else COLOR_REASONING[answer]


def _fill(template: str, attrs: dict[str, str]) -> str | None:
    try:
        return template.format(**attrs)
    except KeyError:
        return None


def build_easyvqa(
    ask: Callable[[Sequence[Path], Sequence[str]], list[str]],
    *,
    n_edits: int = 100,
    seed: int = 0,
    max_asked: int | None = None,
    limit: int | None = None,
    batch_size: int = 64,
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(edits, probes, info) from the easy-vqa test split.

    `ask(image_paths, questions)` returns the unedited model's answers (the caller
    caches them). `limit` restricts the split to its first `limit` samples (tests);
    `max_asked` bounds how many candidate samples are asked while looking for mistakes.
    """
    import random

    import easy_vqa

    from reasonedit_cli.edits import Edit, split_sentences
    from reasonedit_cli.evaluation import Probe, exact_match

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = {int(k): Path(v) for k, v in easy_vqa.get_test_image_paths().items()}
    if limit:
        questions, answers, image_ids = questions[:limit], answers[:limit], image_ids[:limit]
    attrs = image_attributes(questions, answers, image_ids)
    samples = [
        Sample(i, int(img), q, a, question_kind(q, a))
        for i, (q, a, img) in enumerate(zip(questions, answers, image_ids))
    ]
    rng = random.Random(seed)
    candidates = [s for s in samples if s.kind in ("shape", "color") and s.image_id in attrs]
    rng.shuffle(candidates)
    bytes_cache: dict[int, bytes] = {}

    def image_bytes(img: int) -> bytes:
        if img not in bytes_cache:
            bytes_cache[img] = paths[img].read_bytes()
        return bytes_cache[img]

    # 1. ask candidates in batches until enough mistakes (one edit per image)
    predicted: dict[int, str] = {}
    edit_samples: list[Sample] = []
    used_images: set[int] = set()
    budget = max_asked or len(candidates)
    pos = 0
    while len(edit_samples) < n_edits and pos < min(budget, len(candidates)):
        chunk = candidates[pos : min(pos + batch_size, budget)]
        pos += len(chunk)
        preds = ask([paths[s.image_id] for s in chunk], [s.question for s in chunk])
        for s, p in zip(chunk, preds):
            predicted[s.index] = p
            if (
                not exact_match(p, s.answer)
                and s.image_id not in used_images
                and len(edit_samples) < n_edits
            ):
                edit_samples.append(s)
                used_images.add(s.image_id)
    edits: list[Edit] = []
    for s in edit_samples:
        e = Edit(
            image_path=paths[s.image_id],
            question=s.question,
            answer=s.answer,
            reasoning=split_sentences(reasoning_for(s.kind, s.answer)),
            source="easy-vqa",
            image_bytes=image_bytes(s.image_id),
            image_ext="png",
            where=f"easy-vqa test[{s.index}]",
        )
        e.ensure_id()
        edits.append(e)

    # 2. probes tied to each edit
    by_attr: dict[tuple[str, str], list[int]] = {}
    for img, d in sorted(attrs.items()):
        for key in ("shape", "color"):
            if key in d:
                by_attr.setdefault((key, d[key]), []).append(img)
    probes: list[Probe] = []
    probe_images: set[int] = set()

    def add(img: int, q: str, a: str, kind: str, e: Edit, s: Sample) -> None:
        probes.append(
            Probe(
                image_bytes(img), q, a, kind, e.id, f"easy-vqa {kind} image {img} (edit {s.index})"
            )
        )
        probe_images.add(img)

    for e, s in zip(edits, edit_samples):
        own = attrs[s.image_id]
        templates = SHAPE_QUESTIONS if s.kind == "shape" else COLOR_QUESTIONS
        others = [t for t in templates if _fill(t, own) not in (None, s.question)]
        if others:
            add(s.image_id, _fill(rng.choice(others), own) or "", s.answer, "t_gen", e, s)
        pool = [i for i in by_attr.get((s.kind, s.answer), []) if i not in used_images]
        if pool:
            img = rng.choice(pool)
            q = s.question
            if "{shape}" in _generalize(q):
                q = _fill(_generalize(q), attrs[img]) or q
            add(img, q, s.answer, "i_gen", e, s)
        yes = SHAPE_YES if s.kind == "shape" else COLOR_YES
        add(s.image_id, _fill(rng.choice(yes), own) or "", "yes", "r_gen", e, s)
        wrong = predicted.get(s.index, "")
        context = "color" if s.kind == "shape" else "shape"
        same_mistake = [
            c
            for c in candidates[:pos]
            if c.kind == s.kind
            and c.answer == s.answer
            and c.image_id not in used_images
            and exact_match(predicted.get(c.index, ""), wrong)
        ]
        varied = [c for c in same_mistake if attrs[c.image_id].get(context) != own.get(context)]
        pick = varied or same_mistake
        if pick:
            c = pick[0]
            add(c.image_id, c.question, c.answer, "coe_gen", e, s)

    # 3. locality: unrelated samples answered correctly, images untouched by edits/probes
    taken = used_images | probe_images
    loc_pool = [s for s in samples if s.image_id not in taken]
    rng.shuffle(loc_pool)
    loc: list[Sample] = []
    pos_loc = 0
    loc_budget = min(len(loc_pool), max_asked or 10 * n_edits + batch_size)
    while len(loc) < n_edits and pos_loc < loc_budget:
        chunk = loc_pool[pos_loc : min(pos_loc + batch_size, loc_budget)]
        pos_loc += len(chunk)
        preds = ask([paths[s.image_id] for s in chunk], [s.question for s in chunk])
        for s, p in zip(chunk, preds):
            if exact_match(p, s.answer) and len(loc) < n_edits:
                loc.append(s)
    for s in loc:
        probes.append(
            Probe(
                image_bytes(s.image_id),
                s.question,
                s.answer,
                "loc",
                None,
                f"easy-vqa loc {s.index}",
            )
        )
    # 4. hard locality: each edited image asked about its OTHER attribute (a colour
    # question on a shape-edited image and vice versa), kept where the unedited model
    # answers it right; its own rng, so the probes above do not depend on it.
    hard_rng = random.Random(f"{seed}-hard_loc")
    hard: list[tuple[Edit, Sample, str, str]] = []
    for e, s in zip(edits, edit_samples):
        own = attrs[s.image_id]
        other = "color" if s.kind == "shape" else "shape"
        if other not in own:
            continue
        templates = COLOR_QUESTIONS if other == "color" else SHAPE_QUESTIONS
        filled = [q for q in (_fill(t, own) for t in templates) if q]
        hard.append((e, s, hard_rng.choice(filled), own[other]))
    preds = ask([paths[s.image_id] for _, s, _, _ in hard], [q for _, _, q, _ in hard])
    for (e, s, q, a), p in zip(hard, preds):
        if exact_match(p, a):
            probes.append(
                Probe(
                    image_bytes(s.image_id),
                    q,
                    a,
                    "hard_loc",
                    e.id,
                    f"easy-vqa hard_loc image {s.image_id} (edit {s.index})",
                )
            )
    info = {
        "dataset": "easy-vqa",
        "split": "test",
        "seed": seed,
        "asked_for_edits": pos,
        "mistakes_found": len(edit_samples),
        "asked_for_loc": pos_loc,
        "hard_loc": sum(p.kind == "hard_loc" for p in probes),
        "edit_kinds": {k: sum(s.kind == k for s in edit_samples) for k in ("shape", "color")},
    }
    return edits, probes, info


def _generalize(question: str) -> str:
    """`what color is the circle?` -> `what color is the {shape}?` (for I-Gen images)."""
    for s in SHAPES:
        question = re.sub(rf"\b{s}\b", "{shape}", question)
    return question
