#!/usr/bin/env python
"""Train the scenes demo VLM (a tiny LLaVA that sees multi-object scenes), on CPU.

Two stages, one script, fixed seed (docs/scenes_vlm.md has the committed command):

1. **Vision pretraining**: the vision tower learns, CLIP-style, to match each scene's
   mean-pooled patch features (exactly what reasonedit's `projector` key pools) with an
   embedding of its generated caption (a bag of its `<colour> <shape>` objects), so two
   scenes holding the same object come closer; a per-quadrant attribute loss (colour,
   shape, size or empty) keeps each object readable by the language model.
2. **LLaVA stage**: vision frozen (features cached once), the language model learns the
   five question families with the fact-in-context mixture of `train_demo_vlm.py`: plain
   questions, relevant true facts/chains, contradicting facts (the answer follows the
   fact), irrelevant facts (other objects' chains and answer sentences, world facts;
   the answer stays the image's), plus a small share of patch-search verification prompts.

The tokenizer/processor/model builders, the batch encoder and the prompt format are
shared with `train_demo_vlm.py` (same 64x64 input, 16 image tokens, chat template).

    python scripts/train_scenes_vlm.py --threads 1 --vision_steps 800 --vision_batch 96 \
        --minutes 35 --eval_every 200 --out reasonedit_cli/models/scenes_vlm --workdir runs/s3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_demo_vlm import (  # noqa: E402
    N_IMAGE_TOKENS,
    build_model,
    build_processor,
    encode_batch,
    pixel_bank,
    prompt_string,
)

from reasonedit_cli import scenes as S  # noqa: E402
from reasonedit_cli.patches import sentence_question  # noqa: E402

CONDS = ("plain", "true", "contra", "irrelevant", "heldout", "heldout_contra", "heldout_q")
FAMILY_P = {"color": 0.26, "shape": 0.26, "exist": 0.2, "count": 0.1, "spatial": 0.18}

# ---------------------------------------------------------------- fact wordings
WORLD_FACTS = (
    "Grass is green.",
    "The sky is blue.",
    "Bananas are yellow.",
    "A triangle has three corners.",
    "A star has five points.",
    "Carrots are orange.",
    "A cross has four arms.",
    "Coal is black.",
)


def answer_sentence(q: str, a: str, rng: random.Random, split: str = "train") -> str:
    if split == "heldout":
        return rng.choice(
            [f"For the question '{q}', the correct answer is {a}.", f"Asked '{q}', reply {a}."]
        )
    if rng.random() < 0.85:
        return f"The answer to '{q}' is {a}."  # the exact ReasonEdit codebook format
    return f"The correct answer to '{q}' is {a}."


def shape_facts(o: S.SceneObject, s: str, rng: random.Random, split: str) -> list[str]:
    """Facts implying that `o` (named by colour) is a `s`."""
    if split == "heldout":
        # held-out wording (never trained on): the model card's heldout* rows
        return [
            f"Look closely at the {o.color} figure in the {o.region}: it {S.SHAPE_PROPERTY[s]}.",
            f"Every figure that {S.SHAPE_PROPERTY[s]} is a {s}.",
        ]
    k = rng.randrange(6)
    if k < 3:
        return S.shape_chain(o, s)
    if k == 3:
        return S.shape_chain(o, s)[::-1]
    if k == 4:
        return [f"The {o.color} object is a {s}."]
    return [f"The {o.color} object {S.SHAPE_PROPERTY[s]}.", S.SHAPE_RULE[s]]


def color_facts(o: S.SceneObject, c: str, rng: random.Random, split: str) -> list[str]:
    """Facts implying that `o` (named by shape) is `c`."""
    thing, rule = S.COLOR_THING[c]
    if split == "heldout":
        return [
            f"The {o.shape} drawn in the {o.region} shares the hue of {thing}.",
            f"The colour of {thing} is always {c}.",
        ]
    k = rng.randrange(6)
    if k < 3:
        return S.color_chain(o, c)
    if k == 3:
        return S.color_chain(o, c)[::-1]
    if k == 4:
        return [f"The {o.shape} is {c}."]
    return [f"The {o.shape} is the colour of {thing}.", rule]


def value_facts(
    scene: S.Scene, q: S.Question, value: str, rng: random.Random, split: str
) -> list[str]:
    """Relevant facts implying that the answer to `q` on `scene` is `value`."""
    facts: list[str]
    if q.family == "color":
        facts = color_facts(q.target, value, rng, split)
    elif q.family == "shape":
        facts = shape_facts(q.target, value, rng, split)
    elif q.family == "count":
        n = value
        facts = [
            rng.choice(
                [
                    f"There {'is' if n == 'one' else 'are'} {n} "
                    f"object{'' if n == 'one' else 's'} in the image.",
                    f"The image shows {n} shape{'' if n == 'one' else 's'}.",
                ]
            )
        ]
    elif q.family == "spatial":
        a, b, rel = _spatial_parts(q)
        phrase = S.RELATIONS[rel]
        facts = [
            f"The {a} is {phrase} the {b}."
            if value == "yes"
            else f"The {a} is not {phrase} the {b}."
        ]
    else:  # exist: "is there a <c> <s>?"
        c, s = _exist_parts(q)
        by_c, by_s = scene.by_color(c), scene.by_shape(s)
        chains = []
        if value == "yes":
            if by_c is not None:
                chains.append(shape_facts(by_c, s, rng, split))
            if by_s is not None:
                chains.append(color_facts(by_s, c, rng, split))
            chains.append([f"There is a {c} {s} in the image."])
        else:  # a true fact names the object's real attribute, a false one another
            truthful = value == q.answer
            if by_c is not None:
                other = rng.choice([x for x in S.SHAPES if x != s])
                other = by_c.shape if truthful else other
                chains.append(shape_facts(by_c, other, rng, split))
            if by_s is not None:
                other = rng.choice([x for x in S.COLORS if x != c])
                other = by_s.color if truthful else other
                chains.append(color_facts(by_s, other, rng, split))
            chains.append([f"There is no {c} {s} in the image."])
        facts = rng.choice(chains)
    if q.family in ("color", "shape") and rng.random() < 0.5:
        # the ReasonEdit codebook value: the answer sentence (same or another wording)
        asked = q.text
        if rng.random() < 0.5:
            asked = S.question(scene, q.family, rng, "train", target=q.target).text
        facts = [answer_sentence(asked, value, rng, split), *facts]
    elif rng.random() < 0.25:
        facts = [answer_sentence(q.text, value, rng, split), *facts]
    return facts


def _exist_parts(q: S.Question) -> tuple[str, str]:
    words = q.text.rstrip("?.").split()
    c = next(w for w in words if w in S.COLORS)
    s = next(w for w in words if w in S.SHAPES)
    return c, s


def _spatial_parts(q: S.Question) -> tuple[str, str, str]:
    shapes = [w for w in q.text.rstrip("?.").replace(",", "").split() if w in S.SHAPES]
    rel = next(r for r, p in S.RELATIONS.items() if f" {p} " in f" {q.text} ")
    return shapes[0], shapes[1], rel


def contra_value(scene: S.Scene, q: S.Question, rng: random.Random) -> str:
    if q.family == "color":
        return rng.choice([c for c in S.COLORS if c != q.answer])
    if q.family == "shape":
        return rng.choice([s for s in S.SHAPES if s != q.answer])
    if q.family == "count":
        return rng.choice([n for n in S.COUNT_WORDS if n != q.answer])
    return "no" if q.answer == "yes" else "yes"


def irrelevant_facts(scene: S.Scene, q: S.Question, rng: random.Random) -> list[str]:
    """Facts that say nothing about the answer to `q`: chains and answer sentences of
    the scene's other objects (never naming the asked colour/shape), world and image facts."""
    named = set(q.text.rstrip("?.").replace(",", "").split())
    others = [
        o
        for o in scene.objects
        if o is not q.target and o.shape not in named and o.color not in named
    ]
    k = rng.random()
    if others and k < 0.6 and q.family in ("color", "shape", "exist", "spatial"):
        o = rng.choice(others)
        if rng.random() < 0.5:
            cs = [c for c in S.COLORS if c not in named]
            c = o.color if rng.random() < 0.7 else rng.choice(cs)
            facts = S.color_chain(o, c) if rng.random() < 0.7 else color_facts(o, c, rng, "train")
            asked = S.question(scene, "color", rng, "train", target=o).text
        else:
            ss = [s for s in S.SHAPES if s not in named]
            s = o.shape if rng.random() < 0.7 else rng.choice(ss)
            facts = S.shape_chain(o, s) if rng.random() < 0.7 else shape_facts(o, s, rng, "train")
            asked = S.question(scene, "shape", rng, "train", target=o).text
            c = s
        if rng.random() < 0.6:
            facts = [answer_sentence(asked, c, rng), *facts]
        return facts
    if q.family == "count" and k < 0.6:
        o = rng.choice(scene.objects)
        return S.color_chain(o) if rng.random() < 0.5 else S.shape_chain(o)
    if k < 0.8:
        return [
            rng.choice(
                [f for f in WORLD_FACTS if not named & set(f.lower().rstrip(".").split())]
                or ["Grass is green."]
            )
        ]
    return [
        rng.choice(
            [
                f"The background is {scene.background}.",
                "The image is a simple drawing.",
                "The objects are drawn with a flat fill.",
                "The image is 64 pixels wide.",
            ]
        )
    ]


def hard_irrelevant_facts(scene: S.Scene, q: S.Question, rng: random.Random) -> list[str]:
    """Training-only hard negatives for colour/shape questions (the `irrelevant_hard`
    mix condition; the model card's `irrelevant` row is unchanged): the answer sentence
    of another object of the scene in the *same* wording as `q` (true or false of that
    object), or a world fact naming a value of the asked kind. Measured on the committed
    model: an irrelevant answer sentence cost 44 points and a lone world fact 17,
    because the model copies the colour or shape a fact names."""
    others = [o for o in scene.objects if o is not q.target]
    if q.family not in ("color", "shape") or not others or rng.random() < 0.25:
        worlds = [f for f in WORLD_FACTS if not set(q.text.split()) & set(f.lower().split())]
        return [rng.choice(worlds or list(WORLD_FACTS))]
    o = rng.choice(others)
    oq = S.question(scene, q.family, rng, "train", target=o, wording=q.wording)
    assert oq is not None
    pool = S.COLORS if q.family == "color" else S.SHAPES
    v = oq.answer if rng.random() < 0.6 else rng.choice([x for x in pool if x != oq.answer])
    facts = [answer_sentence(oq.text, v, rng)]
    if rng.random() < 0.4:
        chain = S.color_chain(o, v) if q.family == "color" else S.shape_chain(o, v)
        facts += chain
    return facts


def reword(q: S.Question, split: str, rng: random.Random, wording: int | None = None) -> str:
    """`q` in a random wording of `split` (or wording number `wording`), with the same
    colour / shape / relation slots (the model card pairs its held-out-wording row with
    its plain row this way)."""
    pool = S.QUESTIONS[q.family][split]
    t = rng.choice(pool) if wording is None else pool[wording]
    if q.family == "color":
        return t.format(shape=q.target.shape)
    if q.family == "shape":
        return t.format(color=q.target.color)
    if q.family == "exist":
        c, s = _exist_parts(q)
        return t.format(color=c, shape=s)
    if q.family == "count":
        return t
    a, b, rel = _spatial_parts(q)
    return t.format(a=a, b=b, rel=S.RELATIONS[rel])


def paired_rows(scene: S.Scene, idx: int, fam: str, rng: random.Random) -> list[tuple]:
    """One plain question with its `irrelevant` and `heldout_q` variants on the same
    scene and question, so the two gaps the model card targets are measured on paired
    samples (unpaired 40-question cells differ by about 11 points by chance alone)."""
    q = None
    while q is None:
        q = S.question(scene, fam, rng, "train")
        if q is None:
            fam = rng.choice(["color", "shape", "exist", "count"])
    facts = irrelevant_facts(scene, q, rng)
    if rng.random() < 0.3:
        facts += irrelevant_facts(scene, q, rng)
    return [
        (idx, q.text, q.answer, fam, "plain"),
        (idx, " ".join(facts) + " " + q.text, q.answer, fam, "irrelevant"),
        (idx, reword(q, "heldout", rng), q.answer, fam, "heldout_q"),
    ]


def probe_sample(scene: S.Scene, rng: random.Random) -> tuple[str, str]:
    """The patch search's verification prompt on a whole scene: a chain sentence, true or not."""
    o = rng.choice(scene.objects)
    truth = rng.random() < 0.5
    if rng.random() < 0.5:
        s = o.shape if truth else rng.choice([x for x in S.SHAPES if x != o.shape])
        sent = S.shape_chain(o, s)[0]
    else:
        c = o.color if truth else rng.choice([x for x in S.COLORS if x != o.color])
        sent = S.color_chain(o, c)[0]
    return sentence_question(sent), "yes" if truth else "no"


def crop_boxes(scene: S.Scene, rng: random.Random, n: int = 2) -> list[tuple[int, ...]]:
    """`n` of the patch search's candidate crops (`patches.grid_candidates`) of a scene:
    the first holds one of its objects' centres, the others are drawn at random."""
    from reasonedit_cli.patches import grid_candidates

    cands = [c.box for c in grid_candidates(S.IMAGE_SIZE, S.IMAGE_SIZE)]
    o = rng.choice(scene.objects)
    holding = [b for b in cands if _holds(b, o) and (b[2] - b[0]) < S.IMAGE_SIZE]
    out = [rng.choice(holding or cands)]
    return out + [rng.choice(cands) for _ in range(n - 1)]


def _holds(box: tuple[int, ...], o: S.SceneObject) -> bool:
    return box[0] <= o.x < box[2] and box[1] <= o.y < box[3]


def crop_probe_sample(scene: S.Scene, box: tuple[int, ...], rng: random.Random) -> tuple[str, str]:
    """The patch search's verification prompt on a crop: yes only when the crop holds
    the object the chain sentence names and the sentence is true of it (the search keeps
    the crops that pass, so a crop without the object must fail)."""
    inside = [o for o in scene.objects if _holds(box, o)]
    o = rng.choice(inside) if inside and rng.random() < 0.65 else rng.choice(scene.objects)
    truth = rng.random() < 0.6
    if rng.random() < 0.5:
        sh = o.shape if truth else rng.choice([x for x in S.SHAPES if x != o.shape])
        sent = S.shape_chain(o, sh)[0]
    else:
        c = o.color if truth else rng.choice([x for x in S.COLORS if x != o.color])
        sent = S.color_chain(o, c)[0]
    return sentence_question(sent), "yes" if truth and _holds(box, o) else "no"


def sample(scene: S.Scene, idx: int, cond: str, rng: random.Random, family: str | None = None):
    """-> (bank index, prompt, answer, family, cond) for one training/eval sample."""
    if cond == "probe":
        p, a = probe_sample(scene, rng)
        return idx, p, a, "probe", cond
    fam = family or rng.choices(list(FAMILY_P), weights=list(FAMILY_P.values()))[0]
    split = "heldout" if cond == "heldout_q" else "train"
    q = None
    while q is None:
        q = S.question(scene, fam, rng, split)
        if q is None:
            fam = rng.choice(["color", "shape", "exist", "count"])
    fsplit = "heldout" if cond in ("heldout", "heldout_contra") else "train"
    if cond in ("plain", "heldout_q"):
        return idx, q.text, q.answer, fam, cond
    if cond == "irrelevant_hard":
        facts = hard_irrelevant_facts(scene, q, rng)
        if rng.random() < 0.3:
            facts += irrelevant_facts(scene, q, rng)
        if rng.random() < 0.2:
            rng.shuffle(facts)
        return idx, " ".join(facts) + " " + q.text, q.answer, fam, "irrelevant"
    if cond == "irrelevant":
        facts = irrelevant_facts(scene, q, rng)
        if rng.random() < 0.3:
            facts += irrelevant_facts(scene, q, rng)
        return idx, " ".join(facts) + " " + q.text, q.answer, fam, cond
    value = q.answer if cond in ("true", "heldout") else contra_value(scene, q, rng)
    facts = value_facts(scene, q, value, rng, fsplit)
    if cond in ("true", "contra") and rng.random() < 0.4:
        extra = irrelevant_facts(scene, q, rng)
        facts = extra + facts if rng.random() < 0.5 else facts + extra
    return idx, " ".join(facts) + " " + q.text, value, fam, cond


def tokenizer_corpus(scenes: list[S.Scene], rng: random.Random, heldout: bool = True) -> list[str]:
    """The BPE tokenizer's training texts. `heldout=False` leaves out the held-out
    question and fact wordings: with them in, every held-out word became one token that
    the language model never saw (575 of the committed vocabulary's 730 tokens never
    occur in a training prompt), so a held-out wording fed it untrained embeddings."""
    corpus = []
    conds = ("plain", "true", "contra", "irrelevant", "probe")
    if heldout:
        conds = ("plain", "true", "contra", "irrelevant", "heldout", "heldout_contra")
        conds += ("heldout_q", "probe")
    for sc in scenes:
        for cond in conds:
            corpus.append(sample(sc, 0, cond, rng)[1])
    for fam in S.QUESTIONS.values():
        corpus += list(fam["train"]) + (list(fam["heldout"]) if heldout else [])
    corpus += [prompt_string("x") + " yes</s>"] * 200
    corpus += [" " + w for w in S.ANSWER_WORDS] * 300
    return corpus


# ---------------------------------------------------------------- evaluation
def first_token_eval(model, tok, feats_or_bank, rows, bs=100, cached=None):
    """Accuracy per (cond, family) by first-token argmax; answers are single tokens."""
    import torch

    model.eval()
    res: dict[str, list[int]] = {}
    for k in range(0, len(rows), bs):
        b = rows[k : k + bs]
        prompts = [prompt_string(x[1]).replace("<image>", "<image>" * N_IMAGE_TOKENS) for x in b]
        enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            if cached is not None:
                hid = cached(model, enc["input_ids"], enc["attention_mask"], b)
                logits = model.lm_head(hid[:, -1])
            else:
                logits = model(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    pixel_values=feats_or_bank[[x[0] for x in b]],
                    logits_to_keep=1,
                ).logits[:, -1]
        pred = logits.argmax(-1).tolist()
        for pr, x in zip(pred, b):
            ok = int(pr == tok(" " + x[2], add_special_tokens=False)["input_ids"][0])
            for key in (f"{x[4]}_{x[3]}", x[4]):
                res.setdefault(key, [0, 0])
                res[key][0] += ok
                res[key][1] += 1
    model.train()
    return {k: round(a / n, 4) for k, (a, n) in sorted(res.items())}


def eval_rows(scenes, offset, seed, per=60, paired=False):
    """Validation rows, `per` per family and condition; `paired`: the plain, irrelevant
    and held-out-question rows share their scenes and questions (`paired_rows`)."""
    rng = random.Random(seed)
    rows = []
    for cond in CONDS:
        if paired and cond in ("irrelevant", "heldout_q"):
            continue
        for fam in FAMILY_P:
            for _ in range(per):
                i = rng.randrange(len(scenes))
                while fam == "spatial" and len(scenes[i].objects) < 2:
                    i = rng.randrange(len(scenes))
                if paired and cond == "plain":
                    rows += paired_rows(scenes[i], offset + i, fam, rng)
                else:
                    rows.append(sample(scenes[i], offset + i, cond, rng, family=fam))
    return rows


def split_encode(tok, prompt: str, p: float, rng: random.Random) -> list[int]:
    """The prompt's token ids with each word, with probability `p`, cut at a random
    character and its two pieces tokenized apart (a seeded, word-level BPE dropout).
    With p = 0 this equals the canonical tokenization. An unseen word is tokenized into
    pieces of trained words; the cuts are what show the language model those pieces."""

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    head, _, rest = prompt_string(prompt).partition("<image>\n")
    body, _, _ = rest.rpartition(" ASSISTANT:")
    ids = enc(head + "<image>" * N_IMAGE_TOKENS + "\n")
    for k, w in enumerate(body.split(" ")):
        w = w if k == 0 else " " + w
        core = w.strip()
        if len(core) > 2 and rng.random() < p:
            cut = len(w) - len(core) + rng.randrange(1, len(core))
            ids += enc(w[:cut]) + enc(w[cut:])
        else:
            ids += enc(w)
    return ids + enc(" ASSISTANT:")


def encode_batch_split(tok, batch, max_len: int, p: float, rng: random.Random):
    """`encode_batch` with `split_encode` prompts (answers are never split)."""
    import torch

    seqs = []
    for x in batch:
        pi = split_encode(tok, x[1], p, rng)
        ai = tok(" " + x[2] + "</s>", add_special_tokens=False)["input_ids"]
        seqs.append(((pi + ai)[:max_len], len(pi)))
    L = max(len(q) for q, _ in seqs)
    ids = torch.full((len(seqs), L), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    lab = torch.full((len(seqs), L), -100, dtype=torch.long)
    for k, (sq, n_p) in enumerate(seqs):
        ids[k, : len(sq)] = torch.tensor(sq)
        att[k, : len(sq)] = 1
        lab[k, n_p : len(sq)] = torch.tensor(sq[n_p:])
    return ids, att, lab


def selection_score(h: dict, lo: float, hi: float) -> float:
    """Fact-following summed over families, minus the irrelevant-fact gap, with a
    penalty for plain accuracy outside [lo, hi] (the model must make mistakes)."""
    tot = 0.0
    for f in FAMILY_P:

        def g(c: str, f: str = f) -> float:
            return h.get(f"{c}_{f}", 0.0)

        tot += g("true") + g("contra") + g("heldout") + g("heldout_contra") + g("plain")
        tot -= 2 * abs(g("irrelevant") - g("plain")) + abs(g("heldout_q") - g("plain"))
        if f in ("color", "shape"):
            tot -= 10 * max(0.0, lo - g("plain"), g("plain") - hi)
    return tot


# ---------------------------------------------------------------- vision: object level
def quadrant_tokens(grid: int) -> list[list[int]]:
    """Token positions of each quadrant (S.REGIONS order): the corner windows of
    `regions.windows` on the grid, i.e. the window a region key of that object pools."""
    quads = []
    for reg in S.REGIONS:
        r0 = 0 if "top" in reg else grid // 2
        c0 = 0 if "left" in reg else grid // 2
        quads.append(
            [r * grid + c for r in range(r0, r0 + grid // 2) for c in range(c0, c0 + grid // 2)]
        )
    return quads


def object_loss(hq, lab, cap, temp: float, hard: float):
    """Object-level contrast on the raw quadrant features `hq` (B, 4, D): the mean of the
    quadrant's patch tokens, exactly the window a region key pools. `lab` (B, 4, 3):
    colour / shape / size index (colour == len(COLORS): empty quadrant). `cap`: the
    caption embedder (`<size> <colour> <shape>` -> D, a sum of attribute embeddings).

    Two terms, both on squared L2 distances divided by the batch's mean pairwise squared
    distance (detached: the loss does not reward inflating the features), because L2 on
    these raw features is what the codebook measures:
    * region vs caption: each object's feature against all 96 captions (the same colour
      with another shape and the same shape with another colour are among them);
    * region vs region (supervised contrastive): objects of the same colour and shape in
      other scenes are positives; negatives sharing colour or shape (the hard ones) get
      their logits raised by `hard` (a log-weight), so they count more in the softmax.
    """
    import torch

    nc = len(S.COLORS)
    keep = lab[:, :, 0] < nc
    r = hq[keep]  # (N, D)
    y = lab[keep]  # (N, 3)
    if r.shape[0] < 4:
        return hq.sum() * 0.0
    d2 = torch.cdist(r, r).pow(2)
    scale = d2.detach().sum() / max(1, r.shape[0] * (r.shape[0] - 1))
    c_all, s_all, z_all = torch.meshgrid(
        torch.arange(nc), torch.arange(len(S.SHAPES)), torch.arange(len(S.SIZES)), indexing="ij"
    )
    protos = cap(c_all.reshape(-1), s_all.reshape(-1), z_all.reshape(-1))  # (96, D)
    tgt = (y[:, 0] * len(S.SHAPES) + y[:, 1]) * len(S.SIZES) + y[:, 2]
    l_cap = torch.nn.functional.cross_entropy(-torch.cdist(r, protos).pow(2) / (temp * scale), tgt)
    same_c = y[:, 0:1] == y[:, 0][None]
    same_s = y[:, 1:2] == y[:, 1][None]
    pos = same_c & same_s
    eye = torch.eye(r.shape[0], dtype=torch.bool)
    pos = pos & ~eye
    logits = -d2 / (temp * scale) + hard * ((same_c ^ same_s).float())
    logits = logits.masked_fill(eye, -1e9)
    has = pos.any(1)
    if not has.any():
        return l_cap
    logp = logits.log_softmax(1)
    l_sup = -(logp * pos.float()).sum(1)[has] / pos.float().sum(1)[has]
    return l_cap + l_sup.mean()


class CaptionEmbed:
    """`<size> <colour> <shape>` -> a D-vector: the sum of three attribute embeddings."""

    def __init__(self, d: int) -> None:
        import torch

        self.c = torch.nn.Embedding(len(S.COLORS), d)
        self.s = torch.nn.Embedding(len(S.SHAPES), d)
        self.z = torch.nn.Embedding(len(S.SIZES), d)
        for e in (self.c, self.s, self.z):
            torch.nn.init.normal_(e.weight, std=0.5)

    def __call__(self, c, s, z):
        return self.c(c) + self.s(s) + self.z(z)

    def parameters(self):
        return [*self.c.parameters(), *self.s.parameters(), *self.z.parameters()]


def pair_metric(vt, proc, n_scenes: int = 1500, n_anchors: int = 600, seed: int = 70_000) -> dict:
    """How well the raw quadrant-window features (what `regions.py` pools for a region
    key, layer `projector`) pick out an object across scenes, on held-out scenes.

    For an anchor object, a positive is the same colour and shape in another scene (the
    I-Gen case); confusers are the same colour with another shape, and the same shape
    with another colour, each in another scene. Reported: the share of triples whose
    positive is nearer (L2) than the confuser, and a nearest-centroid shape / colour
    accuracy per object (centroids from the other half of the scenes)."""
    import numpy as np
    import torch

    scenes = [S.make_scene(random.Random(seed + k)) for k in range(n_scenes)]
    bank = pixel_bank(proc, [S.render(s) for s in scenes])
    with torch.no_grad():
        hs = torch.cat(
            [
                vt(bank[k : k + 250], output_hidden_states=True).hidden_states[-1][:, 1:]
                for k in range(0, len(bank), 250)
            ]
        )
    grid = int(hs.shape[1] ** 0.5)
    quads = quadrant_tokens(grid)
    feats, meta = [], []
    for i, sc in enumerate(scenes):
        for o in sc.objects:
            feats.append(hs[i, quads[S.REGIONS.index(o.region)]].mean(0).numpy())
            meta.append((i, o.color, o.shape))
    f = np.stack(feats)
    by: dict[tuple[str, str], list[int]] = {}
    for j, (_, c, s) in enumerate(meta):
        by.setdefault((c, s), []).append(j)
    rng = random.Random(seed)
    wins = {"other_shape": [], "other_colour": []}
    for _ in range(n_anchors):
        a = rng.randrange(len(meta))
        i, c, s = meta[a]
        pos = [j for j in by[(c, s)] if meta[j][0] != i]
        n1 = [j for x in S.SHAPES if x != s for j in by.get((c, x), []) if meta[j][0] != i]
        n2 = [j for x in S.COLORS if x != c for j in by.get((x, s), []) if meta[j][0] != i]
        if not (pos and n1 and n2):
            continue
        p, q1, q2 = rng.choice(pos), rng.choice(n1), rng.choice(n2)
        dp = np.linalg.norm(f[a] - f[p])
        wins["other_shape"].append(dp < np.linalg.norm(f[a] - f[q1]))
        wins["other_colour"].append(dp < np.linalg.norm(f[a] - f[q2]))
    half = np.array([m[0] < n_scenes // 2 for m in meta])
    out = {k: round(float(np.mean(v)), 3) for k, v in wins.items()}
    out["triples"] = len(wins["other_shape"])
    for name, k, vals in (("shape", 2, S.SHAPES), ("colour", 1, S.COLORS)):
        lab = np.array([vals.index(m[k]) for m in meta])
        cen = np.stack([f[half & (lab == v)].mean(0) for v in range(len(vals))])
        pred = ((f[~half][:, None] - cen[None]) ** 2).sum(-1).argmin(1)
        out[f"centroid_{name}_acc"] = round(float((pred == lab[~half]).mean()), 3)
    return out


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reasonedit_cli/models/scenes_vlm")
    ap.add_argument("--workdir", default="runs/scenes_vlm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n_train", type=int, default=6000)
    ap.add_argument("--n_val", type=int, default=400)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--v_dim", type=int, default=128)
    ap.add_argument("--v_layers", type=int, default=3)
    ap.add_argument("--v_heads", type=int, default=4)
    ap.add_argument("--t_dim", type=int, default=128)
    ap.add_argument("--t_layers", type=int, default=4)
    ap.add_argument("--t_heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vision_steps", type=int, default=600)
    ap.add_argument("--vision_batch", type=int, default=128)
    ap.add_argument("--clip_weight", type=float, default=1.0)
    ap.add_argument("--temp", type=float, default=0.1)
    ap.add_argument(
        "--obj_weight",
        type=float,
        default=0.0,
        help="weight of the object-level contrast (object_loss); 0: the old recipe",
    )
    ap.add_argument("--obj_temp", type=float, default=0.1, help="object contrast temperature")
    ap.add_argument(
        "--obj_hard",
        type=float,
        default=1.0,
        help="log-weight of hard negatives (same colour or same shape) in the object contrast",
    )
    ap.add_argument("--quad_weight", type=float, default=1.0, help="per-quadrant attribute loss")
    ap.add_argument(
        "--shape_weight", type=float, default=1.0, help="weight of shape in the quadrant loss"
    )
    ap.add_argument(
        "--vision_only", action="store_true", help="stop after the vision stage (measure it)"
    )
    ap.add_argument(
        "--measure_vision",
        default=None,
        help="only print pair_metric for a model directory or ckpt_*.pt, then exit",
    )
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--minutes", type=float, default=30.0, help="LLaVA-stage wall budget")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval_every", type=int, default=250)
    ap.add_argument("--plain_lo", type=float, default=0.70)
    ap.add_argument("--plain_hi", type=float, default=0.90)
    ap.add_argument(
        "--mix",
        default="plain=0.25,true=0.2,contra=0.27,irrelevant=0.23,probe=0.05",
        help="condition shares of the LLaVA stage",
    )
    ap.add_argument(
        "--curriculum",
        default=None,
        help="FRACTION:MIX - the first FRACTION of the LLaVA-stage budget uses MIX "
        "(e.g. 0.3:plain=0.7,true=0.1,contra=0.1,probe=0.1: ground the questions first)",
    )
    ap.add_argument(
        "--train_projector",
        action="store_true",
        help="train the projector in the LLaVA stage (the vision tower stays frozen)",
    )
    ap.add_argument(
        "--crop_probes",
        type=int,
        default=0,
        help="render patch-search crops of the first N training scenes for the mix's "
        "crop_probe condition (verification prompts on crops)",
    )
    ap.add_argument(
        "--tok_train_only",
        action="store_true",
        help="train the BPE tokenizer on training texts only (no held-out question or fact "
        "wordings); pass it to --export too",
    )
    ap.add_argument(
        "--word_split",
        type=float,
        default=0.0,
        help="probability that a prompt word is cut in two and its pieces tokenized apart "
        "(split_encode: seeded word-level BPE dropout)",
    )
    ap.add_argument(
        "--schedule",
        choices=("time", "steps", "first"),
        default="time",
        help="cosine LR and curriculum over the --minutes wall budget (time), over "
        "--steps (steps: the same run on a loaded machine; --minutes stays a hard stop), "
        "or over whichever of the two runs out first (first: --steps on a quiet machine, "
        "a finished schedule on a loaded one)",
    )
    ap.add_argument(
        "--paired_val",
        action="store_true",
        help="validation's irrelevant and held-out-question rows reuse its plain rows' "
        "scenes and questions (paired gaps for the checkpoint choice)",
    )
    ap.add_argument(
        "--init_vision",
        default=None,
        help="load only the vision tower from a ckpt_*.pt (the tokenizer, hence the "
        "language model's shape, may differ)",
    )
    ap.add_argument("--export", default=None, help="only write --out from a ckpt_*.pt")
    ap.add_argument(
        "--init", default=None, help="start from a ckpt_*.pt (with --vision_steps 0: continue)"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps")
    args = ap.parse_args()
    if args.smoke:
        args.n_train, args.n_val, args.vision_steps, args.minutes = 300, 60, 5, 0.3
        args.eval_every = 20

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t_start = time.time()
    os.makedirs(args.workdir, exist_ok=True)

    scene_rng = random.Random(args.seed)
    train = [S.make_scene(scene_rng) for _ in range(args.n_train)]
    val = [S.make_scene(random.Random(10_000 + args.seed + k)) for k in range(args.n_val)]
    corpus = tokenizer_corpus(
        train[:3000], random.Random(args.seed), heldout=not args.tok_train_only
    )
    proc = build_processor(corpus, args.vocab)
    tok = proc.tokenizer
    for w in S.ANSWER_WORDS:
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
    if args.export:
        model = build_model(tok, args)
        model.load_state_dict(torch.load(args.export))
        save(model, proc, args.out)
        print(f"exported {args.export} -> {args.out}")
        return
    if args.measure_vision:
        if os.path.isdir(args.measure_vision):
            from transformers import AutoProcessor, LlavaForConditionalGeneration

            m = LlavaForConditionalGeneration.from_pretrained(args.measure_vision)
            mproc = AutoProcessor.from_pretrained(args.measure_vision)
        else:
            m, mproc = build_model(tok, args), proc
            m.load_state_dict(torch.load(args.measure_vision))
        m.eval()
        res = pair_metric(m.model.vision_tower, mproc)
        print("PAIRS " + json.dumps({"model": args.measure_vision, **res}), flush=True)
        return

    # patch-search crops (--crop_probes): two per scene of the first N training scenes
    crop_rng = random.Random(args.seed + 3)
    crops = [
        (i, b)
        for i in range(min(args.crop_probes, len(train)))
        for b in crop_boxes(train[i], crop_rng)
    ]
    images = [S.render(s) for s in train + val]
    images += [images[i].crop(b) for i, b in crops]
    bank = pixel_bank(proc, images)
    crop_at = len(train) + len(val)
    print(
        f"data: {len(train)} train + {len(val)} val scenes, vocab {len(tok)}, "
        f"{time.time() - t_start:.0f}s",
        flush=True,
    )
    model = build_model(tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}", flush=True)
    if args.init:
        model.load_state_dict(torch.load(args.init))
        print(f"initialised from {args.init}", flush=True)
    if args.init_vision:
        state = torch.load(args.init_vision)
        vis = {k: v for k, v in state.items() if k.startswith("model.vision_tower.")}
        assert vis, f"no vision tower in {args.init_vision}"
        missing = set(model.load_state_dict(vis, strict=False).unexpected_keys)
        assert not missing, missing
        print(f"vision tower ({len(vis)} tensors) from {args.init_vision}", flush=True)

    # ---- stage 1: contrastive + per-quadrant perception pretraining of the vision tower
    vt = model.model.vision_tower
    D = args.v_dim
    pairs = [(c, s) for c in S.COLORS for s in S.SHAPES]
    obj_emb = torch.nn.Embedding(len(pairs), 64)
    img_proj = torch.nn.Linear(D, 64)
    quad_head = torch.nn.Linear(D, (len(S.COLORS) + 1) + (len(S.SHAPES) + 1) + 3)
    grid = int(N_IMAGE_TOKENS**0.5)
    quads = quadrant_tokens(grid)
    cap = CaptionEmbed(D)
    lab = torch.zeros((len(train), 4, 3), dtype=torch.long)
    bag = torch.zeros((len(train), len(pairs)))
    for i, sc in enumerate(train):
        lab[i, :, 0], lab[i, :, 1], lab[i, :, 2] = len(S.COLORS), len(S.SHAPES), 2
        for o in sc.objects:
            q = S.REGIONS.index(o.region)
            lab[i, q] = torch.tensor(
                [S.COLORS.index(o.color), S.SHAPES.index(o.shape), S.SIZES.index(o.size)]
            )
            bag[i, pairs.index((o.color, o.shape))] = 1.0
    params = list(vt.parameters()) + list(obj_emb.parameters()) + list(img_proj.parameters())
    params += list(quad_head.parameters())
    if args.obj_weight:
        params += cap.parameters()
    vopt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    tv = time.time()
    nc, ns = len(S.COLORS) + 1, len(S.SHAPES) + 1
    for step in range(args.vision_steps):
        idx = torch.randint(0, len(train), (args.vision_batch,), generator=g)
        for gg in vopt.param_groups:
            gg["lr"] = (
                1e-3
                * min(1.0, (step + 1) / 50)
                * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(args.vision_steps, 1))))
            )
        hs = vt(bank[idx], output_hidden_states=True).hidden_states[-1][:, 1:]
        zi = torch.nn.functional.normalize(img_proj(hs.mean(1)), dim=-1)
        b = bag[idx]
        zt = torch.nn.functional.normalize((b @ obj_emb.weight) / b.sum(1, keepdim=True), dim=-1)
        logits = zi @ zt.T / args.temp
        same = (b @ b.T == b.sum(1, keepdim=True)) & (b @ b.T == b.sum(1)[None, :])
        tgt = same.float() / same.float().sum(1, keepdim=True)
        l_clip = 0.5 * (
            -(tgt * logits.log_softmax(1)).sum(1).mean()
            - (tgt * logits.log_softmax(0).T).sum(1).mean()
        )
        l_quad = 0.0
        acc = [0.0, 0.0]
        for qi, pos in enumerate(quads):
            z = quad_head(hs[:, pos].mean(1))
            yl = lab[idx, qi]
            l_quad = l_quad + torch.nn.functional.cross_entropy(z[:, :nc], yl[:, 0])
            l_quad = l_quad + args.shape_weight * torch.nn.functional.cross_entropy(
                z[:, nc : nc + ns], yl[:, 1]
            )
            l_quad = l_quad + 0.5 * torch.nn.functional.cross_entropy(z[:, nc + ns :], yl[:, 2])
            acc[0] += (z[:, :nc].argmax(-1) == yl[:, 0]).float().mean().item() / 4
            acc[1] += (z[:, nc : nc + ns].argmax(-1) == yl[:, 1]).float().mean().item() / 4
        loss = args.clip_weight * l_clip + args.quad_weight * l_quad / 4
        l_obj = torch.zeros(())
        if args.obj_weight:
            hq = torch.stack([hs[:, pos].mean(1) for pos in quads], 1)
            l_obj = object_loss(hq, lab[idx], cap, args.obj_temp, args.obj_hard)
            loss = loss + args.obj_weight * l_obj
        vopt.zero_grad(set_to_none=True)
        loss.backward()
        vopt.step()
        if step % 50 == 0 or step == args.vision_steps - 1:
            print(
                f"vision step {step} clip {l_clip.item():.3f} "
                f"quad {float(l_quad.detach()) / 4:.3f} obj {l_obj.item():.3f} "
                f"acc colour {acc[0]:.2f} shape {acc[1]:.2f} {time.time() - tv:.0f}s",
                flush=True,
            )
    torch.save(model.state_dict(), os.path.join(args.workdir, "ckpt_vision.pt"))
    if args.vision_steps:
        vt.eval()
        res = pair_metric(vt, proc)
        vt.train()
        print(f"PAIRS {json.dumps(res)} {time.time() - t_start:.0f}s", flush=True)
        with open(os.path.join(args.workdir, "vision_pairs.json"), "w") as f:
            json.dump(res, f, indent=1)
    if args.vision_only:
        return

    # ---- stage 2: language model on cached image features
    projector = model.model.multi_modal_projector
    frozen = list(vt.parameters())
    if not args.train_projector:
        frozen += list(projector.parameters())
    for p in frozen:
        p.requires_grad_(False)
    vt.eval()
    with torch.no_grad():
        if args.train_projector:
            # cache the projector's input (the vision tower's last block, CLS dropped);
            # the projector then runs, with gradients, on every batch
            feats = torch.cat(
                [
                    vt(bank[k : k + 500], output_hidden_states=True).hidden_states[-1][:, 1:]
                    for k in range(0, len(bank), 500)
                ]
            )
        else:
            feats = torch.cat(
                [
                    torch.stack(
                        model.model.get_image_features(pixel_values=bank[k : k + 500]).pooler_output
                    )
                    for k in range(0, len(bank), 500)
                ]
            )
    image_token = tok.convert_tokens_to_ids("<image>")
    d = args.t_dim

    def cached(m, ids, att, batch):
        emb = m.get_input_embeddings()(ids)
        f = feats[[x[0] for x in batch]]
        if args.train_projector:
            f = projector(f)
        emb = emb.masked_scatter((ids == image_token).unsqueeze(-1), f.reshape(-1, d).to(emb.dtype))
        return m.model.language_model(inputs_embeds=emb, attention_mask=att).last_hidden_state

    def parse_mix(text: str) -> tuple[list[str], list[float]]:
        mix = {k: float(v) for k, v in (kv.split("=") for kv in text.split(","))}
        return list(mix), list(mix.values())

    conds, weights = parse_mix(args.mix)
    cur_frac, cur_mix = 0.0, (conds, weights)
    if args.curriculum:
        frac, _, text = args.curriculum.partition(":")
        cur_frac, cur_mix = float(frac), parse_mix(text)
    rows = eval_rows(val, len(train), args.seed + 7, per=24, paired=args.paired_val)
    split_rng = random.Random(args.seed + 11)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in n or "embed" in n else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    t0 = time.time()

    def progress(step: int) -> float:
        by_time = (time.time() - t0) / (60 * args.minutes)
        if args.schedule == "steps":
            return min(1.0, step / args.steps)
        if args.schedule == "first":  # whichever budget runs out first
            return min(1.0, max(step / args.steps, by_time))
        return min(1.0, by_time)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = progress(step)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))

    history, pool, ema = [], [], None
    model.train()
    for step in range(args.steps):
        done = time.time() - t0 >= 60 * args.minutes or step == args.steps - 1
        if not pool:
            raw = []
            early = progress(step) < cur_frac
            cs, ws = cur_mix if early else (conds, weights)
            for _ in range(args.batch * 8):
                cond = rng.choices(cs, ws)[0]
                if cond == "crop_probe":
                    k = rng.randrange(len(crops))
                    p, a = crop_probe_sample(train[crops[k][0]], crops[k][1], rng)
                    raw.append((crop_at + k, p, a, "probe", cond))
                    continue
                i = rng.randrange(len(train))
                raw.append(sample(train[i], i, cond, rng))
            raw.sort(key=lambda x: len(x[1]))
            pool = [raw[k : k + args.batch] for k in range(0, len(raw), args.batch)]
            rng.shuffle(pool)
        batch = pool.pop()
        if args.word_split:
            ids, att, labels = encode_batch_split(tok, batch, 220, args.word_split, split_rng)
        else:
            ids, att, labels = encode_batch(tok, batch, max_len=220)
        for gg in opt.param_groups:
            gg["lr"] = lr_at(step)
        hid = cached(model, ids, att, batch)
        tgt = labels[:, 1:]
        sel = tgt != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hid[:, :-1][sel]).float(), tgt[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            print(
                f"step {step} loss {ema:.4f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or done:
            res = first_token_eval(model, tok, None, rows, cached=cached)
            res["step"], res["elapsed_s"] = step + 1, round(time.time() - t0)
            res["score"] = round(selection_score(res, args.plain_lo, args.plain_hi), 4)
            history.append(res)
            print("EVAL " + json.dumps(res), flush=True)
            torch.save(model.state_dict(), os.path.join(args.workdir, f"ckpt_{step + 1}.pt"))
            with open(os.path.join(args.workdir, "history.json"), "w") as f:
                json.dump(history, f, indent=1)
        if done:
            break
    best = max(history, key=lambda h: h["score"])
    print(f"selected step {best['step']} (score {best['score']})", flush=True)
    model.load_state_dict(torch.load(os.path.join(args.workdir, f"ckpt_{best['step']}.pt")))
    save(model, proc, args.out)
    meta = {
        "seed": args.seed,
        "params": n_params,
        "total_wall_s": round(time.time() - t_start),
        "selected_step": best["step"],
        "args": vars(args),
        "history": history,
    }
    with open(os.path.join(args.workdir, "train_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"saved {args.out}; total {time.time() - t_start:.0f}s", flush=True)


def save(model, proc, out: str) -> None:
    model.eval()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)


if __name__ == "__main__":
    main()
