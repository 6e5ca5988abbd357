"""add-edit throughput: the Ray engine on a local instance against the local engine.

    python benchmarks/bench_ray.py [--n 500] [--workers 2] [--batch-size 16] [--model DIR]
                                   [--one-thread]

Builds `--n` edits from easy-vqa test images (a shape or a colour question per image, its
ground-truth answer and the reasoning templates of `reasonedit_cli.easyvqa`), then times
the full command a user runs, in a fresh process each, on an empty codebook:

    reasonedit add-edit --from edits.jsonl                                   # local
    reasonedit add-edit --from edits.jsonl --engine ray --workers N          # Ray

Wall time includes process start-up, model loading and, for Ray, starting the local
instance and its workers: that is what a user waits for. Prints edits/s for both and the
ratio, and checks that both codebooks hold the same keys. `--one-thread` adds the local
engine with torch on one thread (OMP_NUM_THREADS=1), to tell the gain of running two
workers from that of not oversubscribing a loaded machine. Needs the `ray` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_edits(n: int, seed: int, path: Path) -> None:
    """`n` edits on distinct easy-vqa test images, as edit JSONL with absolute paths."""
    from easy_vqa import get_test_image_paths, get_test_questions

    from reasonedit_cli.easyvqa import (
        COLOR_QUESTIONS,
        SHAPE_QUESTIONS,
        image_attributes,
        reasoning_for,
    )

    questions, answers, image_ids = get_test_questions()
    attrs = image_attributes(questions, answers, image_ids)
    paths = get_test_image_paths()
    ids = sorted(i for i, a in attrs.items() if "shape" in a and "color" in a)
    if len(ids) < n:
        raise SystemExit(f"easy-vqa has {len(ids)} usable test images, fewer than --n {n}")
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in rng.sample(ids, n):
            kind = rng.choice(("shape", "color"))
            a = attrs[i][kind]
            template = rng.choice(SHAPE_QUESTIONS if kind == "shape" else COLOR_QUESTIONS)
            record = {
                "id": f"bench-{i}",
                "image": str(Path(paths[i]).resolve()),
                "question": template.format(**attrs[i]),
                "answer": a,
                "reasoning": reasoning_for(kind, a),
            }
            f.write(json.dumps(record) + "\n")


def run(args: list[str], env: dict[str, str]) -> tuple[float, dict]:
    """Wall time of one `reasonedit` command in a fresh process, and its --json output."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "reasonedit_cli", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"command failed ({out.returncode}): reasonedit {' '.join(args)}")
    return wall, json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="edits to add")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default=None, help="default: the bundled demo VLM")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one-thread", action="store_true", help="also: local, torch on 1 thread")
    opts = ap.parse_args()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="reasonedit-bench-ray-") as tmp:
        d = Path(tmp)
        make_edits(opts.n, opts.seed, d / "edits.jsonl")
        common = [
            "add-edit",
            "--from",
            str(d / "edits.jsonl"),
            "--batch-size",
            str(opts.batch_size),
        ]
        if opts.model:
            common += ["--model", opts.model]
        load = os.getloadavg()[0]
        print(f"{opts.n} edits, batch {opts.batch_size}, {os.cpu_count()} CPUs, load {load:.1f}")
        t_local, rep_local = run([*common, "-c", str(d / "local")], env)
        n = len(rep_local["added"])
        show("local engine", n, t_local)
        ray_args = ["--engine", "ray", "--workers", str(opts.workers)]
        t_ray, rep_ray = run([*common, "-c", str(d / "ray"), *ray_args], env)
        assert len(rep_ray["added"]) == n, "both engines must add every edit"
        show(f"ray, {opts.workers} local workers", n, t_ray)
        print(f"{'ratio ray / local':28s}: {t_local / t_ray:6.2f}x", flush=True)
        from reasonedit_cli.store import Codebook

        same = (
            Codebook.open(d / "local").keys_table().column("key_id").to_pylist()
            == Codebook.open(d / "ray").keys_table().column("key_id").to_pylist()
        )
        print(f"same keys ({rep_local['keys']}) in both codebooks: {same}", flush=True)
        if opts.one_thread:
            one = dict(env, OMP_NUM_THREADS="1")
            t_one, _ = run([*common, "-c", str(d / "one")], one)
            show("local engine, 1 thread", n, t_one)
            print(f"{'ratio ray / local 1 thread':28s}: {t_one / t_ray:6.2f}x", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def show(label: str, n: int, seconds: float) -> None:
    print(f"{label:28s}: {seconds:8.1f} s  {n / seconds:6.2f} edits/s", flush=True)


if __name__ == "__main__":
    main()
