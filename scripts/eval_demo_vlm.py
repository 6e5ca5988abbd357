#!/usr/bin/env python
"""Measure the bundled demo VLM on the easy-VQA test split, by question type.

Conditions (prompt = ``<facts joined by spaces> <question>``, as the reasonedit backend builds it):

  plain           the question alone
  true            a relevant true fact / reasoning chain (training templates) is prepended
  contra          a relevant fact that CONTRADICTS the image is prepended;
                  correct = follows the fact
  irrelevant      a fact about another property (or a generic one) is prepended;
                  correct = image answer
  heldout         like ``true`` but with fact wordings never used in training
  heldout_contra  like ``contra`` but with held-out wordings
  probe           ``Does the image show <statement>?`` on whole test images (short statements
                  such as ``a red shape``)
  probe_sq        the patch search's exact verification prompt on whole test images:
                  ``Does the image show <reasoning sentence as a question>?``
                  (``reasonedit_cli.patches.sentence_question``), half of them true
  probe_crop      the same on 3x3-grid crops of test images and of composites (the test image
                  pasted into one cell or anywhere on a 3x3-cell canvas of its background, and
                  that canvas whole); a crop of empty background -> ``no``

Generation: processor.apply_chat_template -> processor(images, text) with left padding ->
greedy ``generate(max_new_tokens=8)`` -> decode(skip_special_tokens) -> strip -> lower.
Deterministic (fixed seeds, fixed subset).

    python scripts/eval_demo_vlm.py                  # committed model, fixed 1000-question subset
    python scripts/eval_demo_vlm.py --n 1000 --json      # quick, machine-readable
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_demo_vlm import (  # noqa: E402
    COLOURS,
    DESCRIBE,
    SHAPES,
    composite,
    image_attributes,
    load_split,
    make_eval_prompt,
    parse_question,
    patch_probe,
    random_crop,
    statement,
)

CONDS = [
    "plain",
    "true",
    "contra",
    "irrelevant",
    "heldout",
    "heldout_contra",
    "probe",
    "probe_sq",
    "probe_crop",
]
PROBES = ("probe", "probe_sq", "probe_crop")
TYPE_NAMES = {"colour": "colour", "shape": "shape", "yn": "yes/no"}
TARGETS = {
    "plain": "0.70-0.92",
    "true": ">=0.95",
    "contra": ">=0.90",
    "irrelevant": "plain +-0.02",
    "heldout": ">=0.85",
    "heldout_contra": ">=0.85",
    "probe": "-",
    "probe_sq": "-",
    "probe_crop": "-",
}


def probe_prompt(c, s, rng):
    kind = rng.choice(["colour", "shape", "both"])
    if rng.random() < 0.5:
        return f"Does the image show {statement(kind, c, s, rng)}?", "yes"
    c2 = rng.choice([x for x in COLOURS if x != c])
    s2 = rng.choice([x for x in SHAPES if x != s])
    if kind == "both":
        c2, s2 = rng.choice([(c2, s), (c, s2), (c2, s2)])
    return f"Does the image show {statement(kind, c2, s2, rng)}?", "no"


def verification_prompt(c, s, present, rng):
    """A ``Does the image show <sentence>?`` prompt of the patch search (not ``Describe``)."""
    while True:
        p, g = patch_probe(c, s, present, rng)
        if p != DESCRIBE:
            return p, g


def crop_probe(img, c, s, rng):
    """(image, prompt, gold) on a grid crop of the image or of a composite of it."""
    r = rng.random()
    if r < 0.4:
        crop, present = random_crop(img, rng)
    elif r < 0.85:
        crop, present = random_crop(composite(img, rng), rng)
    else:
        crop, present = composite(img, rng), "full"
    return (crop, *verification_prompt(c, s, present, rng))


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        default=os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            "reasonedit_cli",
            "models",
            "demo_vlm",
        ),
    )
    ap.add_argument(
        "--n",
        type=int,
        default=1000,
        help="test questions per condition, a fixed random subset "
        "(0 = all 9673; slow on 2 CPU cores)",
    )
    ap.add_argument("--conds", default=",".join(CONDS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    proc = AutoProcessor.from_pretrained(args.model)
    proc.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()

    q, a, ids, paths = load_split("test")
    attrs = image_attributes(q, a, ids, paths)
    items = list(zip(q, a, ids))
    if args.n and args.n < len(items):
        items = random.Random(1234).sample(items, args.n)
    images = {i: Image.open(p).convert("RGB") for i, p in paths.items()}

    results = {}
    for cond in args.conds.split(","):
        rng = random.Random(f"eval-{cond}")
        rows = []  # (image, prompt, gold, type)
        for t, gold, i in items:
            c, s = attrs[i]
            qq = parse_question(t)
            img = images[i]
            if cond == "probe":
                p, g = probe_prompt(c, s, rng)
            elif cond == "probe_sq":
                p, g = verification_prompt(c, s, "full", rng)
            elif cond == "probe_crop":
                img, p, g = crop_probe(img, c, s, rng)
            else:
                p, g = make_eval_prompt(qq, c, s, cond, rng)
                if cond == "plain":
                    g = gold
            rows.append((img, p, g, qq.type))
        preds = []
        for k in range(0, len(rows), args.batch):
            b = rows[k : k + args.batch]
            texts = [
                proc.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                    add_generation_prompt=True,
                )
                for _, p, _, _ in b
            ]
            enc = proc(
                images=[img for img, _, _, _ in b],
                text=texts,
                padding=True,
                return_tensors="pt",
            )
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=8, do_sample=False)
            dec = proc.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            preds += [d.strip().lower() for d in dec]
        by = {}
        for (_i, _p, g, ty), pr in zip(rows, preds):
            key = ty if cond not in PROBES else "yn"
            by.setdefault(key, []).append(pr == g)
            by.setdefault("all", []).append(pr == g)
        results[cond] = {
            TYPE_NAMES.get(k, k): {"acc": sum(v) / len(v), "n": len(v)} for k, v in by.items()
        }
        if not args.json:
            print(
                f"  [{cond}] done, {time.time() - t0:.0f}s; e.g. {rows[0][1]!r} -> {preds[0]!r} "
                f"(gold {rows[0][2]!r})",
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.time() - t0

    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "n_questions": len(items),
                    "elapsed_s": round(elapsed, 1),
                    "results": results,
                },
                indent=1,
            )
        )
        return
    cols = ["colour", "shape", "yes/no", "all"]
    print(f"model {args.model}; {len(items)} test questions per condition; {elapsed:.0f}s")
    print(f"| condition | {' | '.join(cols)} | target |")
    print("|---|" + "---|" * len(cols) + "---|")
    for cond, r in results.items():
        cells = [f"{r[c]['acc']:.3f}" if c in r else "-" for c in cols]
        print(f"| {cond} | {' | '.join(cells)} | {TARGETS.get(cond, '')} |")
    if "plain" in results and "irrelevant" in results:
        d = results["irrelevant"]["all"]["acc"] - results["plain"]["all"]["acc"]
        print(f"irrelevant - plain = {d:+.3f}")


if __name__ == "__main__":
    sys.exit(main())
