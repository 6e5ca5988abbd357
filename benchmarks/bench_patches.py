"""Benchmark the visual evidence patch search: batched vs the literal (naive) algorithm.

    python benchmarks/bench_patches.py [--model DIR] [--edits N] [--json]

Edits are easy-vqa test images with 2-3 reasoning sentences about the shape's colour
and corners. For every edit both searches run on their own; the script reports per-edit
VLM forward calls (`VLM.forward_calls`) and wall time, their medians, the ratio naive /
batched, whether both chose the same boxes, and one extra batched call over ALL edits at
once (edits share batches, so forward calls per edit drop further). The target of
docs/method.md#patches is >= 10x fewer forward calls.

`--tiny` runs on the tiny random LLaVA of the test-suite (tests/conftest.py) instead, to
check the script where the bundled demo model is not built yet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

COLOURS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
CORNERS = {"circle": "no", "triangle": "three", "rectangle": "four"}


def easy_vqa_edits(n: int) -> list[tuple[str, list[str]]]:
    """(image path, reasoning sentences) for the first `n` test images with known
    colour and shape; alternately 2 and 3 sentences."""
    from easy_vqa import get_test_image_paths, get_test_questions

    questions, answers, image_ids = get_test_questions()
    paths = get_test_image_paths()
    colour: dict[int, str] = {}
    shape: dict[int, str] = {}
    for q, a, i in zip(questions, answers, image_ids):
        if a in COLOURS and ("color" in q or "colour" in q):
            colour.setdefault(i, a)
        elif a in CORNERS:
            shape.setdefault(i, a)
    edits: list[tuple[str, list[str]]] = []
    for i in sorted(paths):
        if i in colour and i in shape:
            corners = CORNERS[shape[i]]
            sentences = [
                f"The shape is {colour[i]}.",
                f"The shape has {corners} corners.",
                f"A shape with {corners} corners is a {shape[i]}.",
            ]
            edits.append((paths[i], sentences[: 3 - len(edits) % 2]))
        if len(edits) == n:
            break
    return edits


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time both searches per edit and once batched over all edits."""
    import torch
    from PIL import Image

    from reasonedit_cli.patches import search_patches, search_patches_naive
    from reasonedit_cli.vlm import VLM

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    tmp = None
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_tiny_llava

        tmp = tempfile.TemporaryDirectory()
        model = str(build_tiny_llava(Path(tmp.name) / "tiny-llava"))
    elif not (Path(model) / "config.json").is_file():
        raise SystemExit(f"no model at {model} (not built yet?); pass --model DIR or --tiny")
    vlm = VLM(model, device=args.device)
    edits = easy_vqa_edits(args.edits)
    items = [(Image.open(p).convert("RGB"), s) for p, s in edits]
    vlm.yes_probability([items[0][0]], ["Is this a warm-up?"])  # lazy init off the clock

    rows: list[dict[str, Any]] = []
    for (path, sentences), item in zip(edits, items):
        row: dict[str, Any] = {"image": Path(path).name, "sentences": len(sentences)}
        for name, fn, kw in (
            ("batched", search_patches, {"batch_size": args.batch_size}),
            ("naive", search_patches_naive, {}),
        ):
            vlm.forward_calls = 0
            t0 = time.perf_counter()
            boxes = fn(vlm, [item], top_k=args.top_k, threshold=args.threshold, **kw)[0]
            row[f"{name}_s"] = time.perf_counter() - t0
            row[f"{name}_calls"] = vlm.forward_calls
            row[f"{name}_boxes"] = boxes
        row["same_boxes"] = row["batched_boxes"] == row["naive_boxes"]
        row["n_boxes"] = sum(len(b) for b in row["batched_boxes"])
        rows.append(row)

    vlm.forward_calls = 0
    t0 = time.perf_counter()
    together = search_patches(
        vlm, items, top_k=args.top_k, batch_size=args.batch_size, threshold=args.threshold
    )
    all_s = time.perf_counter() - t0
    all_calls = vlm.forward_calls
    if tmp is not None:
        tmp.cleanup()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    return {
        "model": "tiny-llava (tests/conftest.py)" if args.tiny else model,
        "device": vlm.device,
        "threads": torch.get_num_threads(),
        "edits": len(rows),
        "batch_size": args.batch_size,
        "top_k": args.top_k,
        "threshold": args.threshold,
        "median_batched_calls": med("batched_calls"),
        "median_naive_calls": med("naive_calls"),
        "call_ratio": med("naive_calls") / med("batched_calls"),
        "median_batched_s": med("batched_s"),
        "median_naive_s": med("naive_s"),
        "time_ratio": med("naive_s") / med("batched_s"),
        "all_same_boxes": all(r["same_boxes"] for r in rows),
        "all_edits_one_call": {
            "calls": all_calls,
            "calls_per_edit": all_calls / len(rows),
            "seconds_per_edit": all_s / len(rows),
            "same_boxes": together == [r["batched_boxes"] for r in rows],
        },
        "per_edit": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    from reasonedit_cli.vlm import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="VLM directory (default: bundled)")
    ap.add_argument("--tiny", action="store_true", help="use the tests' tiny random LLaVA")
    ap.add_argument("--edits", type=int, default=5, help="number of easy-vqa edits")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="p_yes pass threshold (0.5 by design; 0 scores every pair: the worst case)",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = ap.parse_args(argv)
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"model {res['model']} on {res['device']} ({res['threads']} threads)")
    print(f"{'image':>10} {'sent':>4} {'batched':>16} {'naive':>17} {'boxes':>5} same")
    for r in res["per_edit"]:
        print(
            f"{r['image']:>10} {r['sentences']:>4} "
            f"{r['batched_calls']:>4} calls {r['batched_s']:5.2f}s "
            f"{r['naive_calls']:>4} calls {r['naive_s']:6.2f}s {r['n_boxes']:>5} "
            f"{'yes' if r['same_boxes'] else 'NO'}"
        )
    print(
        f"median forward calls per edit: batched {res['median_batched_calls']:g}, "
        f"naive {res['median_naive_calls']:g} -> {res['call_ratio']:.1f}x fewer"
    )
    print(
        f"median wall time per edit: batched {res['median_batched_s']:.2f}s, "
        f"naive {res['median_naive_s']:.2f}s -> {res['time_ratio']:.1f}x faster"
    )
    one = res["all_edits_one_call"]
    print(
        f"all {res['edits']} edits in one call: {one['calls']} forward calls "
        f"({one['calls_per_edit']:.2f} per edit), {one['seconds_per_edit']:.2f}s per edit"
    )
    print(f"same boxes batched vs naive: {'yes' if res['all_same_boxes'] else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
