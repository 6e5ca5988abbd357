#!/usr/bin/env python
"""Break the scenes VLM's irrelevant-fact and held-out-wording gaps down (issue #18).

Draws the model card's rows (`eval_scenes_vlm.py --unpaired`, same seed), records the
facts `irrelevant_facts` produced for each irrelevant row, and asks every irrelevant
row's question again alone (same scene), so each kind of fact's effect is a paired
difference. For the plain and held-out-wording rows it asks the same question in every
training and held-out wording. docs/scenes_vlm.md ("The irrelevant-fact and
held-out-wording gaps: diagnosis") holds its output for the weights of 2026-12-02.

    python scripts/diagnose_scenes_vlm.py --n 40
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_scenes_vlm as T  # noqa: E402

from reasonedit_cli import scenes as S  # noqa: E402
from reasonedit_cli.evaluation import exact_match  # noqa: E402


class Row(NamedTuple):
    scene: int
    prompt: str
    gold: str
    fam: str
    cond: str
    q: S.Question
    facts: list[list[str]]


def fact_kind(facts: list[str]) -> str:
    j = " ".join(facts)
    if j in T.WORLD_FACTS:
        return "world fact"
    if j.startswith(("The background", "The image is", "The objects are")):
        return "image fact"
    ans = " + answer sentence" if "answer to" in j else ""
    if "is the colour of" in j or any(f"The {s} is " in j for s in S.SHAPES):
        return "other object's colour" + ans
    return "other object's shape" + ans


def words_of(facts: list[list[str]]) -> set[str]:
    text = " ".join(" ".join(f) for f in facts).lower()
    return set(text.replace(".", " ").replace("'", " ").replace("?", " ").split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join("reasonedit_cli", "models", "scenes_vlm"))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    from reasonedit_cli.vlm import VLM

    torch.set_num_threads(args.threads)
    # the card's unpaired rows, recording the facts and the question of each
    seen_facts: list[list[str]] = []
    seen_q: list[S.Question] = []
    irr, question = T.irrelevant_facts, S.question

    def rec_irr(scene, q, rng):
        seen_facts.append(irr(scene, q, rng))
        return seen_facts[-1]

    def rec_q(*a, **k):
        q = question(*a, **k)
        if q is not None:
            seen_q.append(q)
        return q

    T.irrelevant_facts, S.question = rec_irr, rec_q
    rng = random.Random(S.hash_parts(args.seed, 99))
    scenes = [S.make_scene(random.Random(S.hash_parts(args.seed, k))) for k in range(500)]
    rows = []
    try:
        for cond in T.CONDS:
            for fam in T.FAMILY_P:
                for _ in range(args.n):
                    i = rng.randrange(len(scenes))
                    while fam == "spatial" and len(scenes[i].objects) < 2:
                        i = rng.randrange(len(scenes))
                    seen_facts.clear()
                    seen_q.clear()
                    r = T.sample(scenes[i], i, cond, rng, family=fam)
                    rows.append(Row(i, r[1], r[2], fam, cond, seen_q[0], list(seen_facts)))
    finally:
        T.irrelevant_facts, S.question = irr, question
    asks = []  # (row, tag, prompt)
    for k, r in enumerate(rows):
        asks.append((k, "row", r.prompt))
        if r.cond == "irrelevant":
            asks.append((k, "alone", r.q.text))
        if r.cond in ("plain", "heldout_q"):
            for split in ("train", "heldout"):
                for w in range(len(S.QUESTIONS[r.fam][split])):
                    asks.append((k, f"{split}:{w}", T.reword(r.q, split, rng, wording=w)))
    vlm = VLM(args.model, device="cpu")
    images = {r.scene: S.render(scenes[r.scene]) for r in rows}
    answers = vlm.generate(
        [images[rows[k].scene] for k, _, _ in asks], [a[2] for a in asks], batch_size=50
    )
    ok = collections.defaultdict(dict)
    for (k, tag, _), a in zip(asks, answers):
        ok[k][tag] = (int(exact_match(a, rows[k].gold)), a.strip())
    print(f"model {args.model}; test seed {args.seed}; {args.n} per cell")
    print("\n| facts prepended | rows | alone | with the facts | gap (points) |")
    print("|---|---|---|---|---|")
    cells = collections.defaultdict(lambda: [0, 0, 0])
    for k, r in enumerate(rows):
        if r.cond != "irrelevant":
            continue
        fam, facts = r.fam, r.facts
        keys = ["all", f"family {fam}"]
        keys.append("one group: " + fact_kind(facts[0]) if len(facts) == 1 else "two groups")
        if fam in ("color", "shape"):
            pool = S.COLORS if fam == "color" else S.SHAPES
            names = any(w in words_of(facts) for w in pool)
            keys.append(f"{fam} questions, the facts {'name a' if names else 'name no'} {fam}")
        for key in keys:
            cells[key][0] += ok[k]["alone"][0]
            cells[key][1] += ok[k]["row"][0]
            cells[key][2] += 1
    for key, (a, b, n) in sorted(cells.items()):
        print(f"| {key} | {n} | {a / n:.3f} | {b / n:.3f} | {100 * (b - a) / n:+.1f} |")
    copied = flipped = 0
    for k, r in enumerate(rows):
        if r.cond == "irrelevant" and r.fam in ("color", "shape"):
            if ok[k]["alone"][0] and not ok[k]["row"][0]:
                flipped += 1
                copied += ok[k]["row"][1].lower().rstrip(".") in words_of(r.facts)
    print(f"\ncolour/shape rows right alone, wrong with the facts: {flipped}; ", end="")
    print(f"answered with a value the facts name: {copied}")
    print("\n| family | wording | accuracy | most common answers |\n|---|---|---|---|")
    for fam in T.FAMILY_P:
        for split in ("train", "heldout"):
            for w, t in enumerate(S.QUESTIONS[fam][split]):
                res = [
                    ok[k][f"{split}:{w}"]
                    for k in ok
                    if f"{split}:{w}" in ok[k] and rows[k].fam == fam
                ]
                top = collections.Counter(a for _, a in res).most_common(3)
                acc = sum(x for x, _ in res) / max(1, len(res))
                print(f"| {fam} | {split}: `{t}` | {acc:.3f} | {top} |")


if __name__ == "__main__":
    main()
