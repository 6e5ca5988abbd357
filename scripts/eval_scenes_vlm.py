#!/usr/bin/env python
"""Measure the scenes demo VLM on held-out scenes, per question family and condition.

The model card's table (docs/scenes_vlm.md). Test scenes are drawn from their own seed
(`--seed`, default 123: not the training seed 0 nor the validation scenes of the
training script), answered through reasonedit's own inference path
(`reasonedit_cli.vlm.VLM.generate`: chat template, greedy decoding).

Conditions (prompt = `<facts joined by spaces> <question>`, as reasonedit builds it):
  plain           the question alone (training wordings)
  heldout_q       the question alone, in a held-out wording (never trained on)
  true            a relevant true fact or reasoning chain prepended
  contra          a relevant fact contradicting the image; correct = what the fact implies
  irrelevant      facts about other objects of the scene, world or image facts
                  (`irrelevant_facts`, the training mixture's own distribution)
  heldout         like true, with fact wordings never trained on
  heldout_contra  like contra, with held-out fact wordings

The `plain`, `irrelevant` and `heldout_q` rows are paired (`paired_rows`): each plain
question is asked again, on the same scene, after irrelevant facts and in a held-out
wording, so the two gaps the card targets (within 2 and 5 points of plain) are measured
on the same questions. Unpaired, two 40-question cells differ by about 11 points by
chance alone; `--unpaired` draws them independently, as the card did before 2026-12-02.

    python scripts/eval_scenes_vlm.py                 # 100 questions per family and condition
    python scripts/eval_scenes_vlm.py --n 40 --json   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_scenes_vlm import CONDS, FAMILY_P, paired_rows, sample  # noqa: E402

from reasonedit_cli import scenes as S  # noqa: E402
from reasonedit_cli.evaluation import exact_match  # noqa: E402

TARGETS = {
    "plain": "0.70-0.90",
    "heldout_q": "plain +-0.05",
    "true": ">=0.95",
    "contra": ">=0.90",
    "irrelevant": "plain +-0.02",
    "heldout": ">=0.85",
    "heldout_contra": ">=0.85",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join("reasonedit_cli", "models", "scenes_vlm"))
    ap.add_argument("--n", type=int, default=100, help="questions per family and condition")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--unpaired",
        action="store_true",
        help="draw the irrelevant and held-out-question rows independently of the plain "
        "rows (the card's design before 2026-12-02)",
    )
    args = ap.parse_args()
    import torch

    from reasonedit_cli.vlm import VLM

    torch.set_num_threads(args.threads)
    t0 = time.time()
    vlm = VLM(args.model, device="cpu")
    rng = random.Random(S.hash_parts(args.seed, 99))
    scenes = [S.make_scene(random.Random(S.hash_parts(args.seed, k))) for k in range(500)]
    images = {}
    rows = []
    for cond in CONDS:
        if not args.unpaired and cond in ("irrelevant", "heldout_q"):
            continue  # drawn with the plain rows
        for fam in FAMILY_P:
            for _ in range(args.n):
                i = rng.randrange(len(scenes))
                while fam == "spatial" and len(scenes[i].objects) < 2:
                    i = rng.randrange(len(scenes))
                if not args.unpaired and cond == "plain":
                    rows += [(i, *r[1:]) for r in paired_rows(scenes[i], i, fam, rng)]
                else:
                    rows.append((i, *sample(scenes[i], i, cond, rng, family=fam)[1:]))
    for i, *_ in rows:
        if i not in images:
            images[i] = S.render(scenes[i])
    answers = vlm.generate([images[r[0]] for r in rows], [r[1] for r in rows], batch_size=50)
    acc: dict[str, dict[str, list[int]]] = {}
    for (_, _, gold, fam, cond), a in zip(rows, answers):
        cell = acc.setdefault(cond, {}).setdefault(fam, [0, 0])
        cell[0] += exact_match(a, gold)
        cell[1] += 1
    table = {c: {f: round(v[0] / v[1], 3) for f, v in fams.items()} for c, fams in acc.items()}
    for c in table:
        table[c]["all"] = round(
            sum(acc[c][f][0] for f in acc[c]) / sum(acc[c][f][1] for f in acc[c]), 3
        )
    out = {
        "model": args.model,
        "seed": args.seed,
        "n": args.n,
        "paired": not args.unpaired,
        "seconds": round(time.time() - t0),
        "table": table,
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return
    fams = list(FAMILY_P) + ["all"]
    print(
        f"model {args.model}; test seed {args.seed}; {args.n} questions per cell; "
        f"{'unpaired' if args.unpaired else 'paired'}; {out['seconds']}s"
    )
    print("| condition | " + " | ".join(fams) + " | target |")
    print("|---" * (len(fams) + 2) + "|")
    for c in CONDS:
        print(f"| {c} | " + " | ".join(f"{table[c][f]:.3f}" for f in fams) + f" | {TARGETS[c]} |")
    gap = {f: round(table["irrelevant"][f] - table["plain"][f], 3) for f in fams}
    hq = {f: round(table["heldout_q"][f] - table["plain"][f], 3) for f in fams}
    print(f"irrelevant - plain: {gap}")
    print(f"heldout_q - plain: {hq}")


if __name__ == "__main__":
    main()
