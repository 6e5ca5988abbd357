#!/usr/bin/env python
"""Write generated scenes (PNG + JSONL of objects and questions) and a contact sheet.

    python scripts/make_scenes.py --n 64 --seed 0 --out runs/scenes   # scenes + sheet.png

Deterministic by seed (reasonedit_cli/scenes.py): the same seed gives the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict
from pathlib import Path

from reasonedit_cli import scenes as S


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=("train", "heldout"), default="train")
    ap.add_argument("--out", type=Path, default=Path("runs/scenes"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    scenes = [S.make_scene(rng) for _ in range(args.n)]
    with open(args.out / "scenes.jsonl", "w") as f:
        for i, sc in enumerate(scenes):
            name = f"scene_{i:05d}.png"
            S.render(sc).save(args.out / name)
            qs = [S.question(sc, fam, rng, args.split) for fam in S.FAMILIES]
            row = {
                "image": name,
                "background": sc.background,
                "objects": [asdict(o) for o in sc.objects],
                "caption": sc.caption(),
                "questions": [
                    {"question": q.text, "family": q.family, "answer": q.answer}
                    for q in qs
                    if q is not None
                ],
            }
            f.write(json.dumps(row) + "\n")
    S.contact_sheet(scenes[:48]).save(args.out / "sheet.png")
    print(f"{len(scenes)} scenes -> {args.out} (sheet.png, scenes.jsonl)")


if __name__ == "__main__":
    main()
