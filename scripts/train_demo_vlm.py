#!/usr/bin/env python
"""Train reasonedit's bundled demo VLM (a tiny LLaVA) on easy-VQA, on CPU.

The result is a plain transformers model directory (``LlavaForConditionalGeneration``
+ ``LlavaProcessor`` with ``CLIPImageProcessorPil`` and a byte-level BPE tokenizer),
loadable with ``AutoProcessor`` / ``AutoModelForImageTextToText`` without
``trust_remote_code`` or torchvision.

Besides answering easy-VQA questions from the image, the model is taught the skill
ReasonEdit relies on: when reasoning facts are prepended to the question
(``<facts joined by spaces> <question>``), a relevant fact decides the answer -- even
when it contradicts the image -- while irrelevant facts are ignored.  Small shares of
the mixture teach the two prompts used by the visual-evidence patch search:
``Does the image show <statement>?`` -> yes/no and ``Describe this image.`` -> sentence.

Usage (the committed model's command lines -- two stages from scratch, then two yes/no and
patch-search fine-tunes of the language model -- are in docs/demo_vlm.md; the defaults give
the older single-stage recipe):

    python scripts/train_demo_vlm.py --out reasonedit_cli/models/demo_vlm

The fact / question templates are defined here and imported by
``scripts/eval_demo_vlm.py``; ``HELDOUT`` templates are never used for training.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import sys
import time

# --------------------------------------------------------------------------------------
# Vocabulary of the world
# --------------------------------------------------------------------------------------
COLOURS = ["red", "green", "blue", "black", "gray", "teal", "yellow", "brown"]
SHAPES = ["circle", "rectangle", "triangle"]
ANSWER_WORDS = COLOURS + SHAPES + ["yes", "no"]  # each one token with its leading space
PALETTE = {  # easy-VQA's drawing colours (used to read the colour off the pixels)
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "yellow": (255, 255, 0),
    "brown": (139, 69, 19),
}
CORNERS = {"circle": "no", "rectangle": "four", "triangle": "three"}
SIDES = {"circle": "no straight", "rectangle": "four straight", "triangle": "three straight"}

IMAGE_SIZE = 64
PATCH_SIZE = 16
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS is dropped ("default" strategy)

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role']=='user' %}USER: {% for c in m['content'] %}"
    "{% if c['type']=='image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def prompt_string(prompt: str) -> str:
    """What ``apply_chat_template(add_generation_prompt=True)`` yields for one image+text turn."""
    return f"USER: <image>\n{prompt} ASSISTANT:"


# --------------------------------------------------------------------------------------
# Fact templates.  TRAIN is used for training; HELDOUT only for evaluation.
# --------------------------------------------------------------------------------------
def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# things of a known colour: (noun phrase, verb) per colour
COLOUR_THINGS = {
    "train": {
        "red": ["a tomato", "blood", "a fire truck", "a ripe cherry"],
        "green": ["grass", "a leaf", "a frog", "a pea"],
        "blue": ["the clear sky", "a sapphire", "a blue jay", "denim"],
        "black": ["coal", "the night sky", "ink", "a crow"],
        "gray": ["an elephant", "ash", "concrete", "a rain cloud"],
        "teal": [
            "a turquoise gem",
            "a teal duck's wing",
            "tropical lagoon water",
            "a peacock's neck",
        ],
        "yellow": ["a banana", "the sun", "a canary", "butter"],
        "brown": ["chocolate", "a tree trunk", "soil", "coffee"],
    },
    "heldout": {
        "red": ["a strawberry", "a stop sign"],
        "green": ["a lime", "an emerald"],
        "blue": ["a blueberry", "the deep ocean"],
        "black": ["charcoal", "a panther"],
        "gray": ["a pebble", "a mouse"],
        "teal": ["a jade bracelet", "the Caribbean sea"],
        "yellow": ["a lemon", "a school bus"],
        "brown": ["a walnut", "a bear"],
    },
}
SHAPE_THINGS = {
    "train": {
        "circle": ["a coin", "a wheel", "a plate", "a clock face"],
        "triangle": ["a slice of pizza", "a yield sign", "a pyramid side", "a sandwich half"],
        "rectangle": ["a door", "a book", "a brick", "a sheet of paper"],
    },
    "heldout": {
        "circle": ["a full moon", "a button"],
        "triangle": ["a mountain peak", "a sail"],
        "rectangle": ["an envelope", "a smartphone screen"],
    },
}


def colour_chain(c: str, rng: random.Random, split: str = "train") -> list[str]:
    """One relevant fact or reasoning chain that implies the shape's colour is ``c``."""
    co = rng.choice(["colour", "color"])
    if split == "heldout":
        thing = rng.choice(COLOUR_THINGS["heldout"][c])
        k = rng.randrange(4)
        if k == 0:
            return [
                f"The figure is painted in the hue of {thing}.",
                f"{_cap(thing)} has a {c} hue.",
            ]
        if k == 1:
            return [f"The figure is painted {c}."]
        if k == 2:
            return [f"Whoever drew it used {c} paint for the figure."]
        return [f"The drawn object matches {thing} in {co}.", f"{_cap(thing)} is typically {c}."]
    k = rng.randrange(9)
    if k == 0:
        return [f"The shape is {c}."]
    if k == 1:
        return [f"The {co} of the shape is {c}."]
    if k == 2:
        return [
            rng.choice(
                [
                    f"The shape in the image is {c}.",
                    f"It is a {c} shape.",
                    f"The object is coloured {c}.",
                    f"The shape is coloured {c}.",
                ]
            )
        ]
    thing = rng.choice(COLOUR_THINGS["train"][c])
    if k in (3, 4, 5):
        return [f"The shape is the {co} of {thing}.", f"{_cap(thing)} is {c}."]
    if k == 6:
        return [f"The shape has the same {co} as {thing}.", f"{_cap(thing)} is {c}."]
    if k == 7:
        return [f"{_cap(thing)} is {c}.", f"The shape is the {co} of {thing}."]
    other = rng.choice([x for x in COLOURS if x != c])
    return [f"The shape is not {other}.", f"The shape is {c}."]


def shape_chain(s: str, rng: random.Random, split: str = "train") -> list[str]:
    """One relevant fact or reasoning chain that implies the shape is ``s``."""
    if split == "heldout":
        k = rng.randrange(4)
        if k == 0:
            n = {"circle": "no", "rectangle": "four", "triangle": "three"}[s]
            return [
                f"The figure's outline has {n} vertices.",
                f"Any figure with {n} vertices is a {s}.",
            ]
        if k == 1:
            thing = rng.choice(SHAPE_THINGS["heldout"][s])
            return [f"The drawn object resembles {thing}.", f"{_cap(thing)} has the form of a {s}."]
        if k == 2:
            return [f"The figure drawn here is a {s}."]
        n = {"circle": "zero", "rectangle": "4", "triangle": "3"}[s]
        return [f"Counting its angles gives {n}.", f"A figure with {n} angles is a {s}."]
    k = rng.randrange(9)
    if k == 0:
        return [f"The shape is a {s}."]
    if k == 1:
        return [
            rng.choice(
                [
                    f"The image contains a {s}.",
                    f"There is a {s} in the image.",
                    f"The object is a {s}.",
                    f"The shape in the image is a {s}.",
                ]
            )
        ]
    if k in (2, 3):
        n = CORNERS[s]
        return [f"The shape has {n} corners.", f"A shape with {n} corners is a {s}."]
    if k == 4:
        n = SIDES[s]
        return [f"The shape has {n} sides.", f"A shape with {n} sides is a {s}."]
    if k == 5 and s == "circle":
        return [
            rng.choice(["The shape is perfectly round.", "The shape is round."]),
            "A round shape is a circle.",
        ]
    if k in (5, 6, 7):
        thing = rng.choice(SHAPE_THINGS["train"][s])
        return [f"The shape looks like {thing}.", f"{_cap(thing)} is shaped like a {s}."]
    other = rng.choice([x for x in SHAPES if x != s])
    return [f"The shape is not a {other}.", f"The shape is a {s}."]


def answer_sentence(q: str, a: str, rng: random.Random, split: str = "train") -> str:
    if split == "heldout":
        return rng.choice(
            [
                f"For the question '{q}', the correct answer is {a}.",
                f"Asked '{q}', one should reply {a}.",
            ]
        )
    if rng.random() < 0.8:
        return f"The answer to '{q}' is {a}."  # the exact ReasonEdit codebook value format
    return rng.choice(
        [f"The answer to the question '{q}' is {a}.", f"The correct answer to '{q}' is {a}."]
    )


WORLD_FACTS = [  # general facts that say nothing about the image
    "Grass is green.",
    "The sky is blue.",
    "Bananas are yellow.",
    "Coal is black.",
    "A triangle has three corners.",
    "A rectangle has four corners.",
    "A circle has no corners.",
    "Wheels are round.",
    "Doors are rectangles.",
    "Tomatoes are red.",
]
IMAGE_FACTS = [  # facts about other image properties
    "The background is almost white.",
    "The image is 64 pixels wide.",
    "There is exactly one shape in the image.",
    "The image is a simple drawing.",
    "The background has a light tint.",
    "The shape is drawn with a flat fill.",
    "The image is square.",
    "The shape does not touch the border.",
]

# --------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------
GEN_COLOUR_Q = [
    "what color is the shape?",
    "what colour is the shape?",
    "what is the colour of the shape?",
    "which color is the shape?",
    "what color is the {s}?",
    "what is the color of the {s}?",
    "what colour is the object?",
]
GEN_SHAPE_Q = [
    "what is the shape?",
    "what shape is this?",
    "which shape is shown?",
    "what shape is in the image?",
    "what is the {c} shape?",
    "what shape is the object?",
    "what shape does the image contain?",
]


class Q:
    """A question with its structure: type colour/shape/yn; yn has attr, value, neg."""

    __slots__ = ("text", "type", "attr", "value", "neg")

    def __init__(self, text, type_, attr=None, value=None, neg=False):
        self.text, self.type, self.attr, self.value, self.neg = text, type_, attr, value, neg

    def answer(self, c: str, s: str) -> str:
        if self.type == "colour":
            return c
        if self.type == "shape":
            return s
        has = (c if self.attr == "colour" else s) == self.value
        return "yes" if has != self.neg else "no"


_WORD = re.compile(r"\b(" + "|".join(COLOURS + SHAPES) + r")\b")


def parse_question(text: str) -> Q:
    t = text.lower()
    m = _WORD.findall(t)
    if t.startswith("what") or t.startswith("which"):
        if "color" in t or "colour" in t:
            return Q(text, "colour")
        return Q(text, "shape")
    neg = (" not " in t) or t.startswith("is no ")
    v = m[-1]
    return Q(text, "yn", "colour" if v in COLOURS else "shape", v, neg)


def gen_question(kind: str, c: str, s: str, rng: random.Random) -> Q:
    if kind == "colour":
        return Q(rng.choice(GEN_COLOUR_Q).format(s=s), "colour")
    if kind == "shape":
        return Q(rng.choice(GEN_SHAPE_Q).format(c=c), "shape")
    attr = rng.choice(["colour", "shape"])
    v = rng.choice(COLOURS if attr == "colour" else SHAPES)
    neg = rng.random() < 0.5
    if attr == "colour":
        t = rng.choice(
            [
                "is there a {v} shape?",
                "is there not a {v} shape?" if neg else "is the shape {v}?",
                "does the image contain a {v} shape?"
                if not neg
                else "does the image not contain a {v} shape?",
            ]
        )
    else:
        t = rng.choice(
            [
                "is there a {v}?",
                "is there not a {v}?" if neg else "is the shape a {v}?",
                "does the image contain a {v}?" if not neg else "does the image not contain a {v}?",
            ]
        )
    neg = " not " in t
    return Q(t.format(v=v), "yn", attr, v, neg)


# --------------------------------------------------------------------------------------
# Fact-bearing prompts
# --------------------------------------------------------------------------------------
def relevant_facts(q: Q, c: str, s: str, rng: random.Random, split: str = "train") -> list[str]:
    """Facts implying attributes (c, s) relevant to question ``q`` (c/s may contradict
    the image)."""
    attr = q.attr if q.type == "yn" else q.type
    r = rng.random()
    if r < 0.3:  # answer sentence
        if q.type == "yn" and rng.random() < 0.5:
            return [answer_sentence(q.text, q.answer(c, s), rng, split)]
        pq = gen_question(attr, c, s, rng) if rng.random() < 0.5 or q.type == "yn" else q
        return [answer_sentence(pq.text, pq.answer(c, s), rng, split)]
    return colour_chain(c, rng, split) if attr == "colour" else shape_chain(s, rng, split)


def irrelevant_facts(q: Q, c: str, s: str, rng: random.Random) -> list[str]:
    """Facts that must not change the answer to ``q`` (about the other attribute, or generic)."""
    attr = q.attr if q.type == "yn" else q.type
    r = rng.random()
    if r < 0.2:
        return [rng.choice(IMAGE_FACTS)]
    if r < 0.28:
        return [rng.choice(WORLD_FACTS)]
    # a (possibly false) fact about the *other* attribute
    if attr == "colour":
        s2 = rng.choice(SHAPES)
        if rng.random() < 0.3:
            oq = gen_question("shape", c, s2, rng)
            return [answer_sentence(oq.text, s2, rng)]
        return shape_chain(s2, rng)
    c2 = rng.choice(COLOURS)
    if rng.random() < 0.3:
        oq = gen_question("colour", c2, s, rng)
        return [answer_sentence(oq.text, c2, rng)]
    return colour_chain(c2, rng)


def contradicting_attrs(q: Q, c: str, s: str, rng: random.Random) -> tuple[str, str]:
    """Attributes differing from the image on the asked attribute, chosen so the answer changes."""
    attr = q.attr if q.type == "yn" else q.type
    if q.type == "yn":
        cur = c if attr == "colour" else s
        pool = COLOURS if attr == "colour" else SHAPES
        new = q.value if cur != q.value else rng.choice([x for x in pool if x != cur])
    else:
        pool = COLOURS if attr == "colour" else SHAPES
        new = rng.choice([x for x in pool if x != (c if attr == "colour" else s)])
    return (new, s) if attr == "colour" else (c, new)


def join(facts: list[str], q: Q) -> str:
    return " ".join(facts + [q.text])


# --------------------------------------------------------------------------------------
# Patch-search probes
# --------------------------------------------------------------------------------------
def statement(kind: str, c: str, s: str, rng: random.Random) -> str:
    co = rng.choice(["colour", "color"])
    if kind == "colour":
        return rng.choice(
            [
                f"a {c} shape",
                f"something {c}",
                f"a shape that is {c}",
                f"a shape the {co} of {rng.choice(COLOUR_THINGS['train'][c])}",
                f"that the shape is {c}",
            ]
        )
    if kind == "shape":
        return rng.choice(
            [
                f"a {s}",
                f"a shape with {CORNERS[s]} corners",
                f"a shape with {SIDES[s]} sides",
                f"that the shape has {CORNERS[s]} corners",
                f"that the shape is a {s}",
                f"something shaped like {rng.choice(SHAPE_THINGS['train'][s])}",
            ]
            + (["a round shape"] if s == "circle" else [])
        )
    return f"a {c} {s}"


def probe_sample(c: str, s: str, present: str, rng: random.Random) -> tuple[str, str]:
    """present: 'full' (whole shape visible), 'part' (some of it), 'none' (blank crop)."""
    if rng.random() < 0.35:
        if present == "none":
            return "Describe this image.", rng.choice(
                ["An empty background.", "There is no shape."]
            )
        opts = [
            f"The shape is {c}.",
            f"The shape is the colour of {rng.choice(COLOUR_THINGS['train'][c])}.",
        ]
        if present == "full":
            opts += [
                f"A {c} {s}.",
                f"The shape is a {s}.",
                f"The shape has {CORNERS[s]} corners.",
                f"A {c} {s} on a light background.",
            ]
        return "Describe this image.", rng.choice(opts)
    kinds = ["colour", "shape", "both"] if present == "full" else ["colour"]
    kind = rng.choice(kinds)
    if rng.random() < 0.5:  # true statement
        st, ans = statement(kind, c, s, rng), "yes"
    else:
        c2 = rng.choice([x for x in COLOURS if x != c])
        s2 = rng.choice([x for x in SHAPES if x != s])
        if kind == "both":
            c2, s2 = rng.choice([(c2, s), (c, s2), (c2, s2)])
        st, ans = statement(kind, c2, s2, rng), "no"
    if present == "none":
        ans = "no"
    return f"Does the image show {st}?", ans


DESCRIBE = "Describe this image."


def _stating_sentences(kind: str, c: str, s: str, rng: random.Random, split: str) -> list[str]:
    """Reasoning sentences that each state colour ``c`` (kind colour), shape ``s`` (shape)
    or both: the sentences of a chain (negated ones dropped), or one ``A red triangle.``"""
    if kind == "both":
        return [
            rng.choice(
                [
                    f"A {c} {s}.",
                    f"The shape is a {c} {s}.",
                    f"There is a {c} {s}.",
                    f"The image contains a {c} {s}.",
                ]
            )
        ]
    chain = colour_chain(c, rng, split) if kind == "colour" else shape_chain(s, rng, split)
    return [x for x in chain if " not " not in x]


def patch_probe(
    c: str, s: str, present: str, rng: random.Random, split: str = "train"
) -> tuple[str, str]:
    """A prompt of reasonedit's patch search (docs/method.md#patches), worded exactly as it asks it.

    Verification: ``patches.sentence_question(sentence)``, i.e. ``Does the image show
    <reasoning sentence as a question>?`` for one sentence of a reasoning chain; ``yes`` when
    the crop shows what the sentence states (colour sentences: any visible part of the shape;
    shape sentences: the whole shape), ``no`` for a false sentence or a crop of empty
    background.  Scoring: ``Describe this image.`` -> a sentence true of the crop.
    ``present`` is ``full`` / ``part`` / ``none`` as returned by ``random_crop``.
    """
    from reasonedit_cli.patches import sentence_question

    if rng.random() < 0.25:
        if present == "none":
            return DESCRIBE, rng.choice(["An empty background.", "There is no shape."])
        kind = rng.choice(["colour", "shape", "both"] if present == "full" else ["colour"])
        return DESCRIBE, rng.choice(_stating_sentences(kind, c, s, rng, split))
    kind = rng.choice(["colour", "shape", "both"] if present != "part" else ["colour"])
    true = rng.random() < 0.5
    cc, ss = c, s
    if not true:
        c2 = rng.choice([x for x in COLOURS if x != c])
        s2 = rng.choice([x for x in SHAPES if x != s])
        cc, ss = {"colour": (c2, s), "shape": (c, s2)}.get(kind) or rng.choice(
            [(c2, s), (c, s2), (c2, s2)]
        )
    sentence = rng.choice(_stating_sentences(kind, cc, ss, rng, split))
    answer = "yes" if true and present != "none" else "no"
    return sentence_question(sentence), answer


def composite(img, rng: random.Random, aligned: bool | None = None):
    """``img`` (64x64) pasted into a 3x3-cell canvas (192x192) of its own background colour:
    the shape sits in one part of a larger image, as in the patch search's use case.
    ``aligned``: paste exactly into a random grid cell (else at a random offset)."""
    import numpy as np
    from PIL import Image

    w, h = img.size
    bg = tuple(int(v) for v in np.median(np.asarray(img).reshape(-1, 3), axis=0))
    canvas = Image.new("RGB", (3 * w, 3 * h), bg)
    if aligned is None:
        aligned = rng.random() < 0.5
    if aligned:
        x, y = rng.randrange(3) * w, rng.randrange(3) * h
    else:
        x, y = rng.randrange(2 * w + 1), rng.randrange(2 * h + 1)
    canvas.paste(img, (x, y))
    return canvas


# --------------------------------------------------------------------------------------
# Data: image attributes and pixel tensors
# --------------------------------------------------------------------------------------
def image_attributes(questions, answers, image_ids, paths):
    """(colour, shape) per image id, read from the questions (colour also from pixels)."""
    import numpy as np
    from PIL import Image

    col, shp = {}, {}
    for t, a, i in zip(questions, answers, image_ids):
        q = parse_question(t)
        if q.type == "colour":
            col[i] = a
        elif q.type == "shape":
            shp[i] = a
        else:
            pos = (a == "yes") != q.neg
            if pos:
                (col if q.attr == "colour" else shp)[i] = q.value
    attrs = {}
    for i, p in paths.items():
        arr = np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3).astype(np.int32)
        bg = np.median(arr, axis=0)
        mask = np.abs(arr - bg).sum(1) > 120
        if i not in col and mask.any():
            mc = arr[mask].mean(0)
            col[i] = min(PALETTE, key=lambda k: ((np.array(PALETTE[k]) - mc) ** 2).sum())
        if i not in shp and mask.any():  # fill ratio of the bounding box: ~0.55 / ~0.81 / ~1.0
            side = int(round(len(arr) ** 0.5))
            m2 = mask.reshape(side, -1)
            ys, xs = np.nonzero(m2)
            fill = m2.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            shp[i] = "triangle" if fill < 0.72 else ("circle" if fill < 0.94 else "rectangle")
        attrs[i] = (col.get(i), shp.get(i))
    return attrs


def shape_mask(img):
    import numpy as np

    arr = np.asarray(img.convert("RGB")).astype(np.int32)
    bg = np.median(arr.reshape(-1, 3), axis=0)
    return np.abs(arr - bg).sum(-1) > 120


CROP_SIZES = [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 2)]


def random_crop(img, rng, visible: bool = True):
    """A 3x3-grid crop as in the ReasonEdit patch search; returns (crop, presence).

    ``visible``: judge presence on the centre square the image processor keeps of the crop
    (what the model sees); False: on the whole crop box (stages 1-5 of the committed model)."""
    w, h = img.size
    gw, gh = rng.choice(CROP_SIZES)
    x0, y0 = rng.randrange(0, 4 - gw), rng.randrange(0, 4 - gh)
    box = (round(x0 * w / 3), round(y0 * h / 3), round((x0 + gw) * w / 3), round((y0 + gh) * h / 3))
    m = shape_mask(img)
    tot = max(int(m.sum()), 1)
    # what the model sees: the image processor resizes the shorter side and centre-crops,
    # so a 1x2 or 2x3 crop shows only its centre square
    bw, bh = box[2] - box[0], box[3] - box[1]
    if visible:
        side = min(bw, bh)
        vx, vy = box[0] + (bw - side) // 2, box[1] + (bh - side) // 2
        inside = int(m[vy : vy + side, vx : vx + side].sum())
    else:
        inside = int(m[box[1] : box[3], box[0] : box[2]].sum())
    frac = inside / tot
    presence = "full" if frac > 0.97 else ("none" if inside < 8 else "part")
    return img.crop(box), presence


# --------------------------------------------------------------------------------------
# Tokenizer / processor / model
# --------------------------------------------------------------------------------------
def tokenizer_corpus(rng: random.Random, train_questions, answers) -> list[str]:
    corpus = list(train_questions) + list(answers)
    for _ in range(6000):
        c, s = rng.choice(COLOURS), rng.choice(SHAPES)
        for split in ("train", "heldout"):
            corpus += colour_chain(c, rng, split) + shape_chain(s, rng, split)
        q = gen_question(rng.choice(["colour", "shape", "yn"]), c, s, rng)
        corpus.append(answer_sentence(q.text, q.answer(c, s), rng))
        corpus.append(probe_sample(c, s, "full", rng)[0])
        corpus.append(probe_sample(c, s, "full", rng)[1])
    corpus += WORLD_FACTS * 20 + IMAGE_FACTS * 20
    corpus += [prompt_string("x") + " yes</s>"] * 200
    corpus += [" " + w for w in COLOURS + SHAPES + ["yes", "no"]] * 300
    return corpus


def build_processor(corpus, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, tr)
    ft = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    ft.padding_side = "left"  # for batched generation
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=ft,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return proc


def build_model(tokenizer, args):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vc = CLIPVisionConfig(
        hidden_size=args.v_dim,
        intermediate_size=args.v_dim * 2,
        num_hidden_layers=args.v_layers,
        num_attention_heads=args.v_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    tc = LlamaConfig(
        hidden_size=args.t_dim,
        intermediate_size=args.t_dim * 3,
        num_hidden_layers=args.t_layers,
        num_attention_heads=args.t_heads,
        num_key_value_heads=args.t_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def pixel_bank(processor, images):
    import torch

    out = []
    for k in range(0, len(images), 500):
        out.append(
            processor.image_processor(images[k : k + 500], return_tensors="pt")["pixel_values"]
        )
    return torch.cat(out).to(torch.float32)


# --------------------------------------------------------------------------------------
# Sample generation
# --------------------------------------------------------------------------------------
def gen_yn(c: str, s: str, rng: random.Random, neg_p: float, colour_p: float = 0.5) -> Q:
    """A yes/no question whose value matches the image half of the time; negated with prob neg_p.
    easy-VQA's own yes/no questions are balanced so that neither the negation nor the match alone
    predicts the answer (an XOR): a tiny model plateaus there.  Rarely-negated questions give the
    match a direct learning signal first.  ``colour_p``: share of colour questions."""
    if colour_p == 0.5:
        attr = rng.choice(["colour", "shape"])
    else:
        attr = "colour" if rng.random() < colour_p else "shape"
    cur, pool = (c, COLOURS) if attr == "colour" else (s, SHAPES)
    v = cur if rng.random() < 0.5 else rng.choice([x for x in pool if x != cur])
    neg = rng.random() < neg_p
    if attr == "colour":
        t = rng.choice(
            [
                "is there not a {v} shape?",
                "does the image not contain a {v} shape?",
                "is no {v} shape present?",
                "is there not a {v} shape in the image?",
            ]
            if neg
            else [
                "is there a {v} shape?",
                "is the shape {v}?",
                "does the image contain a {v} shape?",
                "is a {v} shape present?",
                "is there a {v} shape in the image?",
            ]
        )
    else:
        t = rng.choice(
            [
                "is there not a {v}?",
                "does the image not contain a {v}?",
                "is no {v} present?",
                "is there not a {v} in the image?",
            ]
            if neg
            else [
                "is there a {v}?",
                "is the shape a {v}?",
                "does the image contain a {v}?",
                "is a {v} present?",
                "is there a {v} in the image?",
            ]
        )
    return Q(t.format(v=v), "yn", attr, v, neg)


class Sampler:
    def __init__(self, items, attrs, crop_items, rng, mix, yn_gen=0.0, neg_p=0.5):
        self.items, self.attrs, self.crop_items, self.rng, self.mix = (
            items,
            attrs,
            crop_items,
            rng,
            mix,
        )
        self.yn_gen, self.neg_p = yn_gen, neg_p

    def sample(self):
        """-> (bank index, prompt, answer, plain question or None)

        The fourth item is the bare question of a sample whose answer must be the one the model
        gives without any fact (plain and irrelevant-only samples), for ``--self_target``."""
        rng = self.rng
        r = rng.random()
        m = self.mix
        if r < m["probe"]:
            if rng.random() < 0.5:
                idx, c, s, presence = rng.choice(self.crop_items)
            else:
                idx, t, a, c, s = rng.choice(self.items)
                presence = "full"
            if rng.random() < m.get("probe_sq", 0.0):  # the patch search's exact wording
                p, a = patch_probe(c, s, presence, rng)
            else:
                p, a = probe_sample(c, s, presence, rng)
            return idx, p, a, None
        r -= m["probe"]
        idx, t, a, c, s = rng.choice(self.items)
        if rng.random() < 0.25:
            q = gen_question(rng.choice(["colour", "shape", "yn"]), c, s, rng)
        else:
            q = parse_question(t)
        if self.yn_gen and q.type == "yn" and rng.random() < self.yn_gen:
            q = gen_yn(c, s, rng, self.neg_p)
        if r >= m["plain"] and rng.random() < m.get("yn_fact", 0.0):
            # yes/no curriculum: this fact-bearing sample asks a (generated) yes/no question
            q = gen_yn(c, s, rng, self.neg_p, m.get("yn_colour", 0.5))
        if r < m["plain"]:
            return idx, q.text, q.answer(c, s), q.text
        r -= m["plain"]
        if r < m["true"] + m["contra"]:
            cc, ss = (c, s) if r < m["true"] else contradicting_attrs(q, c, s, rng)
            facts = relevant_facts(q, cc, ss, rng)
            if rng.random() < m["distract"]:  # add irrelevant facts around the relevant chain
                extra = irrelevant_facts(q, c, s, rng)
                facts = extra + facts if rng.random() < 0.5 else facts + extra
                if rng.random() < 0.3:
                    facts = irrelevant_facts(q, c, s, rng) + facts
            return idx, join(facts, q), q.answer(cc, ss), None
        facts = irrelevant_facts(q, c, s, rng)
        if rng.random() < 0.3:
            facts += irrelevant_facts(q, c, s, rng)
        return idx, join(facts, q), q.answer(c, s), q.text


def encode_batch(tokenizer, batch, max_len=160):
    import torch

    prompts = [prompt_string(x[1]).replace("<image>", "<image>" * N_IMAGE_TOKENS) for x in batch]
    answers = [" " + x[2] + "</s>" for x in batch]
    pi = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    ai = tokenizer(answers, add_special_tokens=False)["input_ids"]
    seqs = [(p + a)[:max_len] for p, a in zip(pi, ai)]
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), tokenizer.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    lab = torch.full((len(seqs), L), -100, dtype=torch.long)
    for k, (p, sq) in enumerate(zip(pi, seqs)):
        ids[k, : len(sq)] = torch.tensor(sq)
        att[k, : len(sq)] = 1
        lab[k, len(p) : len(sq)] = torch.tensor(sq[len(p) :])
    return ids, att, lab


# --------------------------------------------------------------------------------------
# Quick evaluation (first-token argmax; answers are single tokens)
# --------------------------------------------------------------------------------------
def probe_eval(model, tokenizer, bank, rows, bs=100):
    """Accuracy (first-token argmax) on ``(bank index, prompt, yes|no)`` probe rows."""
    import torch

    model.eval()
    ok = 0
    for k in range(0, len(rows), bs):
        b = rows[k : k + bs]
        prompts = [prompt_string(p).replace("<image>", "<image>" * N_IMAGE_TOKENS) for _, p, _ in b]
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                pixel_values=bank[[x[0] for x in b]],
                logits_to_keep=1,
            )
        pred = out.logits[:, -1].argmax(-1).tolist()
        for pr, (_, _, g) in zip(pred, b):
            ok += int(pr == tokenizer(" " + g, add_special_tokens=False)["input_ids"][0])
    model.train()
    return ok / max(len(rows), 1)


def load_init(path, tokenizer):
    """State dict to start from: a saved ``ckpt_*.pt`` or a model directory (whose tokenizer
    must be the one this script builds, so that token ids mean the same)."""
    import torch

    if not os.path.isdir(path):
        return torch.load(path)
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    saved = AutoTokenizer.from_pretrained(path)
    if saved.get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"{path}: its tokenizer differs from the one this script builds")
    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


def quick_eval(model, tokenizer, bank, test_items, conds, rng_seed=0, n=300, bs=100, sample=True):
    """Overall accuracy per condition, plus ``<cond>_<type>`` per question type
    (colour/shape/yn)."""
    import torch

    items = (
        random.Random(1).sample(test_items, min(n, len(test_items))) if sample else list(test_items)
    )
    res = {}
    model.eval()
    for cond in conds:
        r = random.Random(rng_seed)
        batch, gold, types = [], [], []
        for idx, t, _a, c, s in items:
            q = parse_question(t)
            p, g = make_eval_prompt(q, c, s, cond, r)
            batch.append((idx, p, g))
            gold.append(g)
            types.append(q.type)
        correct = 0
        by_type = {}
        for k in range(0, len(batch), bs):
            b = batch[k : k + bs]
            prompts = [
                prompt_string(p).replace("<image>", "<image>" * N_IMAGE_TOKENS) for _, p, _ in b
            ]
            enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    pixel_values=bank[[x[0] for x in b]],
                    logits_to_keep=1,
                )
            pred = out.logits[:, -1].argmax(-1).tolist()
            for j, (pr, (_, _, g)) in enumerate(zip(pred, b)):
                ok = int(pr == tokenizer(" " + g, add_special_tokens=False)["input_ids"][0])
                correct += ok
                tt = by_type.setdefault(types[k + j], [0, 0])
                tt[0] += ok
                tt[1] += 1
        res[cond] = correct / len(batch)
        for t, (c_, n_) in by_type.items():
            res[f"{cond}_{t}"] = round(c_ / n_, 4)
    model.train()
    return res


def make_eval_prompt(q: Q, c: str, s: str, cond: str, rng: random.Random):
    """cond in plain / true / contra / irrelevant / heldout / heldout_contra -> (prompt, gold)."""
    if cond == "plain":
        return q.text, q.answer(c, s)
    if cond in ("true", "heldout"):
        split = "heldout" if cond == "heldout" else "train"
        return join(relevant_facts(q, c, s, rng, split), q), q.answer(c, s)
    if cond in ("contra", "heldout_contra"):
        split = "heldout" if cond == "heldout_contra" else "train"
        cc, ss = contradicting_attrs(q, c, s, rng)
        return join(relevant_facts(q, cc, ss, rng, split), q), q.answer(cc, ss)
    if cond == "irrelevant":
        return join(irrelevant_facts(q, c, s, rng), q), q.answer(c, s)
    raise ValueError(cond)


def load_split(split):
    import easy_vqa

    if split == "train":
        q, a, i = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        q, a, i = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    return q, a, i, paths


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="reasonedit_cli/models/demo_vlm")
    ap.add_argument("--workdir", default="runs/demo_vlm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--vocab", type=int, default=1200)
    ap.add_argument("--v_dim", type=int, default=128)
    ap.add_argument("--v_layers", type=int, default=3)
    ap.add_argument("--v_heads", type=int, default=4)
    ap.add_argument("--t_dim", type=int, default=128)
    ap.add_argument("--t_layers", type=int, default=5)
    ap.add_argument("--t_heads", type=int, default=4)
    ap.add_argument("--eval_every", type=int, default=300)
    ap.add_argument(
        "--text_warmup", type=int, default=300, help="first steps: fact-heavy curriculum"
    )
    ap.add_argument("--plain_lo", type=float, default=0.74)
    ap.add_argument("--plain_hi", type=float, default=0.90)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--vision_steps",
        type=int,
        default=900,
        help="perception pre-stage (vision tower + projector)",
    )
    ap.add_argument(
        "--aux_weight",
        type=float,
        default=0.5,
        help="auxiliary perception loss weight in main stage",
    )
    ap.add_argument("--quick_n", type=int, default=150)
    ap.add_argument(
        "--minutes",
        type=float,
        default=32.0,
        help="wall-clock budget of the main stage (0 = by steps)",
    )
    ap.add_argument(
        "--init",
        default=None,
        help="start from this state_dict (ckpt_*.pt) or model directory (e.g. the committed "
        "reasonedit_cli/models/demo_vlm) instead of scratch",
    )
    ap.add_argument(
        "--yn_gen", type=float, default=0.0, help="share of yes/no questions replaced by gen_yn()"
    )
    ap.add_argument("--neg_p", type=float, default=0.5, help="negation probability in gen_yn()")
    ap.add_argument(
        "--val_images",
        type=int,
        default=0,
        help="hold out this many train images as a validation set for checkpoint selection "
        "(0 = select on a fixed subset of test questions, the old behaviour)",
    )
    ap.add_argument(
        "--vision_colour_steps",
        type=int,
        default=-1,
        help="apply the colour part of the pre-stage loss only in the first N vision steps "
        "(-1 = all); fewer steps keep colour perception deliberately imperfect",
    )
    ap.add_argument(
        "--aux_colour",
        type=float,
        default=-1,
        help="main-stage aux colour loss weight (-1 = aux_weight)",
    )
    ap.add_argument(
        "--aux_shape",
        type=float,
        default=-1,
        help="main-stage aux shape loss weight (-1 = aux_weight)",
    )
    ap.add_argument(
        "--select",
        default="overall",
        choices=["overall", "per_type", "per_type3", "last"],
        help="checkpoint selection: overall plain window, or colour and shape plain each in "
        "the window (yes/no at half weight), or per_type3: colour, shape and yes/no plain each "
        "in the window, all at full weight, or last: the end of the schedule",
    )
    ap.add_argument(
        "--self_target",
        action="store_true",
        help="plain and irrelevant-only samples are trained towards the answer the --init "
        "model gives to the bare question (a frozen copy of it), not the gold answer: "
        "irrelevant facts learn to change nothing while plain accuracy, mistakes included, "
        "stays where it was (needs --freeze_vision)",
    )
    ap.add_argument(
        "--mix",
        default="",
        help="override mixture shares, e.g. plain=0.25,contra=0.35; also yn_fact (share of "
        "fact-bearing samples that ask a generated yes/no question), yn_colour (share of colour "
        "questions among those) and probe_sq (share of probes worded exactly as the patch "
        "search asks them)",
    )
    ap.add_argument(
        "--warm_mix", default="", help="override the --text_warmup curriculum's mixture shares"
    )
    ap.add_argument(
        "--neg_p_warm",
        type=float,
        default=-1,
        help="gen_yn() negation probability during --text_warmup (-1 = --neg_p)",
    )
    ap.add_argument(
        "--freeze_vision",
        action="store_true",
        help="train the language model only (vision tower and projector frozen): keeps the "
        "committed model's deliberately imperfect perception while the text skills are tuned",
    )
    ap.add_argument(
        "--composites",
        type=int,
        default=0,
        help="train images also pasted into a 3x3-cell canvas of their background (the shape "
        "in one part of a larger image): the canvas and 3 grid crops of it join the probe crops",
    )
    ap.add_argument(
        "--crop_labels",
        default="visible",
        choices=["visible", "box"],
        help="judge a crop's shape presence on the centre square the image processor keeps "
        "(visible) or on the whole crop box (box: how stages 1-5 of the committed model ran)",
    )
    ap.add_argument(
        "--probe_weight",
        type=float,
        default=0.0,
        help="per_type selection: weight of the validation patch-search probe accuracy",
    )
    ap.add_argument("--bench", action="store_true")
    ap.add_argument(
        "--export", default=None, help="only write --out from this saved state_dict (ckpt_*.pt)"
    )
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    np.random.seed(args.seed)
    t_start = time.time()
    os.makedirs(args.workdir, exist_ok=True)

    # ---- data
    tq, ta, ti, tpaths = load_split("train")
    eq, ea, ei, epaths = load_split("test")
    tr_attr = image_attributes(tq, ta, ti, tpaths)
    te_attr = image_attributes(eq, ea, ei, epaths)

    proc = build_processor(
        tokenizer_corpus(random.Random(args.seed), tq, get_answers()), args.vocab
    )
    tok = proc.tokenizer
    for w in COLOURS + SHAPES + ["yes", "no"]:
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
    # the prompt we build by hand must equal the chat template's output
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "what is the shape?"}],
        }
    ]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == prompt_string(
        "what is the shape?"
    )

    if args.export:  # rebuild the (deterministic) processor + model, load weights, save
        model = build_model(tok, args)
        model.load_state_dict(torch.load(args.export))
        model.eval()
        os.makedirs(args.out, exist_ok=True)
        model.save_pretrained(args.out)
        proc.save_pretrained(args.out)
        print(f"exported {args.export} -> {args.out}")
        return

    tr_ids = sorted(tpaths)
    te_ids = sorted(epaths)
    tr_imgs = [Image.open(tpaths[i]).convert("RGB") for i in tr_ids]
    tr_pos_of = {i: k for k, i in enumerate(tr_ids)}
    te_imgs = [Image.open(epaths[i]).convert("RGB") for i in te_ids]
    crop_rng = random.Random(args.seed + 1)
    crops, crop_meta = [], []
    for k, i in enumerate(tr_ids):
        c, s = tr_attr[i]
        if c is None or s is None:
            continue
        for _ in range(2):
            cimg, pres = random_crop(tr_imgs[k], crop_rng, args.crop_labels == "visible")
            crops.append(cimg)
            crop_meta.append((c, s, pres))
    # composites: the shape in one part of a larger canvas, and grid crops of that canvas
    # (a separate rng, so the crops above do not change with --composites)
    comp_rng = random.Random(args.seed + 4)
    comp_src = [i for i in tr_ids if tr_attr[i][0] is not None and tr_attr[i][1] is not None]
    comp_img = []  # source image id of each composite entry
    for i in comp_rng.sample(comp_src, min(args.composites, len(comp_src))):
        c, s = tr_attr[i]
        canvas = composite(tr_imgs[tr_pos_of[i]], comp_rng)
        crops.append(canvas)
        crop_meta.append((c, s, "full"))
        comp_img.append(i)
        for _ in range(3):
            cimg, pres = random_crop(canvas, comp_rng, args.crop_labels == "visible")
            crops.append(cimg)
            crop_meta.append((c, s, pres))
            comp_img.append(i)
    bank = pixel_bank(proc, tr_imgs + te_imgs + crops)
    tr_pos = {i: k for k, i in enumerate(tr_ids)}
    te_pos = {i: len(tr_ids) + k for k, i in enumerate(te_ids)}
    crop_off = len(tr_ids) + len(te_ids)
    items = [
        (tr_pos[i], t, a, *tr_attr[i])
        for t, a, i in zip(tq, ta, ti)
        if tr_attr[i][0] is not None and tr_attr[i][1] is not None
    ]
    crop_items = [(crop_off + k, c, s, p) for k, (c, s, p) in enumerate(crop_meta)]
    val_items = []
    val_pos = set()
    val_crops = []
    if (
        args.val_images
    ):  # held-out train images: validation for checkpoint selection (test split untouched)
        val_ids = set(random.Random(args.seed + 2).sample(tr_ids, args.val_images))
        val_pos = {tr_pos[i] for i in val_ids}
        crop_src = [i for i in tr_ids if tr_attr[i][0] is not None and tr_attr[i][1] is not None]
        n_plain_crops = len(crop_meta) - len(comp_img)
        crop_img = [crop_src[k // 2] for k in range(n_plain_crops)]  # 2 crops per image, in order
        crop_img += comp_img
        val_crops = [x for x, i in zip(crop_items, crop_img) if i in val_ids]
        crop_items = [x for x, i in zip(crop_items, crop_img) if i not in val_ids]
        allv = [x for x in items if x[0] in val_pos]
        items = [x for x in items if x[0] not in val_pos]
        vr = random.Random(args.seed + 3)
        for typ, k in (("colour", 250), ("shape", 250), ("yn", 300)):
            pool_v = [x for x in allv if parse_question(x[1]).type == typ]
            val_items += vr.sample(pool_v, min(k, len(pool_v)))
        print(
            f"validation: {len(val_ids)} held-out train images, {len(val_items)} questions",
            flush=True,
        )
    # validation prompts of the patch search (exact wording): whole held-out images, and
    # grid crops / composites of them
    pr = random.Random(args.seed + 5)
    val_probes = {"probe_whole": [], "probe_crop": []}
    for p in sorted(val_pos):
        c, s = tr_attr[tr_ids[p]]
        val_probes["probe_whole"].append((p, *patch_probe(c, s, "full", pr)))
    for idx, c, s, presence in val_crops:
        val_probes["probe_crop"].append((idx, *patch_probe(c, s, presence, pr)))
    val_probes = {k: [x for x in v if x[1] != DESCRIBE] for k, v in val_probes.items()}
    test_items = [
        (te_pos[i], t, a, *te_attr[i])
        for t, a, i in zip(eq, ea, ei)
        if te_attr[i][0] is not None and te_attr[i][1] is not None
    ]
    # per-image labels for the auxiliary perception loss (-100 = unknown / not applicable)
    lab_c = torch.full((len(bank),), -100, dtype=torch.long)
    lab_s = torch.full((len(bank),), -100, dtype=torch.long)
    for i in tr_ids:
        c, s = tr_attr[i]
        if c is not None:
            lab_c[tr_pos[i]] = COLOURS.index(c)
        if s is not None:
            lab_s[tr_pos[i]] = SHAPES.index(s)
    for idx, c, s, p in crop_items:
        if p != "none":
            lab_c[idx] = COLOURS.index(c)
        if p == "full":
            lab_s[idx] = SHAPES.index(s)
    # sanity: derived attributes reproduce the gold answers
    bad = sum(parse_question(t).answer(c, s) != a for _, t, a, c, s in items)
    print(
        f"train items {len(items)}/{len(tq)} (attr mismatches {bad}), "
        f"test items {len(test_items)}/{len(eq)}, "
        f"crops {len(crop_items)}, vocab {len(tok)}, data prep {time.time() - t_start:.0f}s",
        flush=True,
    )

    model = build_model(tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}", flush=True)

    # Auxiliary perception head (training only, discarded): colour/shape classification from the
    # mean-pooled projector output.  Bootstraps the vision tower, which the LM loss alone
    # trains slowly.
    aux_head = torch.nn.Linear(args.t_dim, len(COLOURS) + len(SHAPES))
    captured = {}
    model.model.multi_modal_projector.register_forward_hook(
        lambda m, i, o: captured.__setitem__("f", o)
    )

    def aux_loss(feats, idx, wc=1.0, ws=1.0):
        z = aux_head(feats.mean(1))
        lc = torch.nn.functional.cross_entropy(z[:, : len(COLOURS)], lab_c[idx], ignore_index=-100)
        ls = torch.nn.functional.cross_entropy(z[:, len(COLOURS) :], lab_s[idx], ignore_index=-100)
        zc, zs = z[:, : len(COLOURS)].argmax(-1), z[:, len(COLOURS) :].argmax(-1)
        mc, ms = lab_c[idx] >= 0, lab_s[idx] >= 0
        acc = (
            (zc[mc] == lab_c[idx][mc]).float().mean().item(),
            (zs[ms] == lab_s[idx][ms]).float().mean().item(),
        )
        return wc * lc + ws * ls, acc

    if args.vision_steps:
        vparams = list(model.model.vision_tower.parameters()) + list(
            model.model.multi_modal_projector.parameters()
        )
        vopt = torch.optim.AdamW(vparams + list(aux_head.parameters()), lr=1e-3, weight_decay=0.01)
        train_idx = torch.tensor(
            [k for k in range(len(tr_ids)) if k not in val_pos] + [x[0] for x in crop_items]
        )
        n_train = len(train_idx)
        g = torch.Generator().manual_seed(args.seed)
        tv = time.time()
        for vs in range(args.vision_steps):
            idx = train_idx[torch.randint(0, n_train, (128,), generator=g)]
            for gg in vopt.param_groups:
                gg["lr"] = 1e-3 * min(1.0, (vs + 1) / 50)
            hs = model.model.vision_tower(bank[idx], output_hidden_states=True).hidden_states[-1][
                :, 1:
            ]
            wc = 1.0 if args.vision_colour_steps < 0 or vs < args.vision_colour_steps else 0.0
            lv, acc = aux_loss(model.model.multi_modal_projector(hs), idx, wc=wc)
            vopt.zero_grad(set_to_none=True)
            lv.backward()
            vopt.step()
            if vs % 50 == 0 or vs == args.vision_steps - 1:
                print(
                    f"vision step {vs} loss {lv.item():.3f} acc colour {acc[0]:.2f} "
                    f"shape {acc[1]:.2f} "
                    f"{time.time() - tv:.0f}s",
                    flush=True,
                )

    mix = dict(
        probe=0.06, plain=0.30, true=0.18, contra=0.24, distract=0.4
    )  # rest: irrelevant only (~22%)
    if args.mix:  # e.g. "plain=0.25,contra=0.35"
        mix.update({k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))})
    print(f"mixture {mix}", flush=True)
    warm_mix = dict(probe=0.0, plain=0.1, true=0.3, contra=0.4, distract=0.3)
    if args.warm_mix:
        warm_mix.update(
            {k: float(v) for k, v in (kv.split("=") for kv in args.warm_mix.split(","))}
        )
    neg_p_warm = args.neg_p if args.neg_p_warm < 0 else args.neg_p_warm
    if args.text_warmup:
        print(f"warm-up mixture {warm_mix}, neg_p {neg_p_warm}", flush=True)
    sampler = Sampler(items, tr_attr, crop_items, rng, mix, yn_gen=args.yn_gen, neg_p=args.neg_p)
    if args.init:  # continue from a saved stage (see docs/demo_vlm.md for the staged recipe)
        model.load_state_dict(load_init(args.init, tok))
        print(f"initialised from {args.init}", flush=True)
    if args.freeze_vision:
        for p in list(model.model.vision_tower.parameters()) + list(
            model.model.multi_modal_projector.parameters()
        ):
            p.requires_grad_(False)
        model.model.vision_tower.eval()  # no dropout there anyway; keeps it explicit
    aux_c = args.aux_weight if args.aux_colour < 0 else args.aux_colour
    aux_s = args.aux_weight if args.aux_shape < 0 else args.aux_shape
    feats = None
    image_token = tok.convert_tokens_to_ids("<image>")
    d = args.t_dim
    if args.freeze_vision and aux_c == 0 and aux_s == 0:
        # the image features never change: compute them once for the whole bank (the
        # language-model-only step is faster; logits are taken at answer positions only)
        with torch.no_grad():
            feats = torch.cat(
                [
                    torch.stack(
                        model.model.get_image_features(pixel_values=bank[k : k + 500]).pooler_output
                    )
                    for k in range(0, len(bank), 500)
                ]
            )
        print(f"cached image features {tuple(feats.shape)}", flush=True)

    def cached_hidden(m, ids, att, batch):
        """Decoder hidden states of ``m`` with the cached image features in place of the
        image tokens (frozen vision: the vision tower never runs again)."""
        emb = m.get_input_embeddings()(ids)
        emb = emb.masked_scatter(
            (ids == image_token).unsqueeze(-1), feats[[x[0] for x in batch]].reshape(-1, d)
        )
        return m.model.language_model(inputs_embeds=emb, attention_mask=att).last_hidden_state

    teacher = None
    if args.self_target:
        if feats is None:
            raise SystemExit("--self_target needs --freeze_vision (and no auxiliary loss)")
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        answer_ids = torch.tensor(
            [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ANSWER_WORDS]
        )

    def self_targets(batch):
        """Replace the targets of plain / irrelevant-only samples by the frozen initial model's
        answer to the bare question (first-token argmax over the answer words)."""
        rows = [k for k, x in enumerate(batch) if x[3] is not None]
        if not rows:
            return batch
        bare = [(batch[k][0], batch[k][3], "yes") for k in rows]
        ids, att, lab = encode_batch(tok, bare)
        with torch.no_grad():
            hid = cached_hidden(teacher, ids, att, bare)
            pos = (lab != -100).int().argmax(1) - 1  # the position that predicts the answer
            h = hid[torch.arange(len(rows)), pos]
            pick = teacher.lm_head(h)[:, answer_ids].argmax(-1).tolist()
        out = list(batch)
        for k, j in zip(rows, pick):
            out[k] = (batch[k][0], batch[k][1], ANSWER_WORDS[j], None)
        return out

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in n or "embed" in n else decay).append(p)
    decay += list(aux_head.parameters())
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )

    def progress(step):
        # fraction of the schedule done: by steps, or by wall-clock when --minutes is set (the
        # machine may be shared, so a time budget keeps the run inside its wall-time limit)
        p = step / args.steps
        if args.minutes:
            p = max(p, (time.time() - t0) / (60 * args.minutes))
        return p

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (progress(step) - args.warmup / args.steps) / (1 - args.warmup / args.steps)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0))))

    conds = ["plain", "true", "contra", "irrelevant", "heldout", "heldout_contra"]
    history = []
    model.train()
    t0 = time.time()
    pool = []
    ema = None
    for step in range(args.steps):
        if progress(step) >= 1.0:
            break
        sampler.mix = warm_mix if step < args.text_warmup else mix
        sampler.neg_p = neg_p_warm if step < args.text_warmup else args.neg_p
        if not pool:  # length bucketing: draw 16 batches, sort by length, split
            raw = [sampler.sample() for _ in range(args.batch * 16)]
            raw.sort(key=lambda x: len(x[1]))
            pool = [raw[k : k + args.batch] for k in range(0, len(raw), args.batch)]
            rng.shuffle(pool)
        batch = pool.pop()
        if teacher is not None:
            batch = self_targets(batch)
        ids, att, lab = encode_batch(tok, batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if feats is not None:  # frozen vision: cached image features, logits at answers only
            hid = cached_hidden(model, ids, att, batch)
            tgt = lab[:, 1:]
            sel = tgt != -100
            logits = model.lm_head(hid[:, :-1][sel]).float()
            loss = torch.nn.functional.cross_entropy(logits, tgt[sel])
        else:
            out = model(input_ids=ids, attention_mask=att, pixel_values=bank[[x[0] for x in batch]])
            logits = out.logits[:, :-1].float()
            tgt = lab[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100
            )
        if aux_c > 0 or aux_s > 0:
            la, _ = aux_loss(captured["f"], torch.tensor([x[0] for x in batch]), wc=aux_c, ws=aux_s)
            loss_total = loss + la
        else:
            loss_total = loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if args.bench and step == 19:
            print(f"bench: {(time.time() - t0) / 20:.3f}s/step", flush=True)
            return
        if step % 50 == 0:
            print(
                f"step {step} loss {ema:.4f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s",
                flush=True,
            )
        last = step + 1 == args.steps or (args.minutes and progress(step + 1) >= 1.0)
        if (step + 1) % args.eval_every == 0 or last:
            if val_items:
                res = quick_eval(model, tok, bank, val_items, conds, sample=False)
            else:
                res = quick_eval(model, tok, bank, test_items, conds, n=args.quick_n)
            for name, rows in val_probes.items():
                if rows:
                    res[name] = round(probe_eval(model, tok, bank, rows), 4)
            res["step"] = step + 1
            res["elapsed_s"] = round(time.time() - t0)
            history.append(res)
            print("EVAL " + json.dumps(res), flush=True)
            torch.save(model.state_dict(), os.path.join(args.workdir, f"ckpt_{step + 1}.pt"))

    train_time = time.time() - t0
    # ---- checkpoint selection: plain accuracy inside the window, best fact-following
    if args.select in ("per_type", "per_type3"):
        # colour and shape (per_type3: and yes/no) plain accuracy each inside the window; score
        # fact-following per type (per_type: yes/no at half weight); checkpoints outside the
        # window are penalised
        window = ("colour", "shape", "yn") if args.select == "per_type3" else ("colour", "shape")
        yn_w = 1.0 if args.select == "per_type3" else 0.5

        def outside(h):
            return sum(
                max(0.0, args.plain_lo - h[f"plain_{t}"], h[f"plain_{t}"] - args.plain_hi)
                for t in window
            )

        def score(h):
            tot = args.probe_weight * (h.get("probe_whole", 0.0) + h.get("probe_crop", 0.0))
            for t, w in (("colour", 1.0), ("shape", 1.0), ("yn", yn_w)):
                tot += w * (
                    h[f"true_{t}"]
                    + h[f"contra_{t}"]
                    + h[f"heldout_{t}"]
                    + h[f"heldout_contra_{t}"]
                    - 2 * abs(h[f"irrelevant_{t}"] - h[f"plain_{t}"])
                )
            return tot - 10 * outside(h)

        pool_h = history
    elif args.select == "last":
        pool_h = history[-1:]

        def score(h):
            return 0.0

    else:
        ok = [h for h in history if args.plain_lo <= h["plain"] <= args.plain_hi]
        pool_h = ok or history

        def score(h):
            return (
                h["contra"]
                + h["true"]
                + h["heldout_contra"]
                + h["heldout"]
                - 2 * abs(h["irrelevant"] - h["plain"])
            )

    best = max(pool_h, key=score)
    print(f"selected checkpoint step {best['step']}: {best}", flush=True)
    model.load_state_dict(torch.load(os.path.join(args.workdir, f"ckpt_{best['step']}.pt")))
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    meta = {
        "seed": args.seed,
        "params": n_params,
        "train_wall_s": round(train_time),
        "total_wall_s": round(time.time() - t_start),
        "selected_step": best["step"],
        "history": history,
        "args": vars(args),
    }
    with open(os.path.join(args.workdir, "train_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(
        f"saved to {args.out}; train {train_time:.0f}s total {time.time() - t_start:.0f}s",
        flush=True,
    )


def get_answers():
    import easy_vqa

    return easy_vqa.get_answers()


if __name__ == "__main__":
    sys.exit(main())
