"""Start-up benchmark: `reasonedit --help` and cold `ask` against a bare transformers script.

Every measurement is a fresh process (cold start, warm OS file cache), repeated `--runs`
times, interleaved across commands; medians are reported with ratios against the bare
script measured in the same run.

Targets (issue 9): --help < 0.3 s; `ask --no-edit` <= 1.3x bare; edited `ask` <= 2x bare.

    python benchmarks/bench_startup.py [--model DIR] [--runs 5] [--json] [--baseline DIR]

`--baseline DIR` also times `--help` and `ask --no-edit` with the package found in DIR
(e.g. a `git worktree` or `git archive` of an earlier commit, put first on PYTHONPATH),
interleaved with the others, so a change is compared against its parent under the same
machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "what shape is in the image?"


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def medians_interleaved(
    cmds: dict[str, list[str]],
    runs: int,
    env: dict[str, str],
    envs: dict[str, dict[str, str]] | None = None,
) -> dict:
    """Median wall time per command; the runs are interleaved (round robin) so that a
    change in machine load during the benchmark hits every command alike. `envs` gives
    some commands their own environment."""
    envs = envs or {}
    for name, cmd in cmds.items():
        timed(cmd, envs.get(name, env))  # warm the OS file cache once
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(runs):
        for name, cmd in cmds.items():
            times[name].append(timed(cmd, envs.get(name, env)))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    from reasonedit_cli.vlm import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--baseline", help="a folder holding an earlier reasonedit_cli to compare")
    ap.add_argument(
        "--only",
        help="comma list of measurements to run (e.g. help,ask_no_edit); ratios and targets "
        "whose inputs were not run are left out",
    )
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    exe = [sys.executable, "-m", "reasonedit_cli"]
    edits = ROOT / "sample_edits" / "edits.jsonl"
    first = json.loads(edits.read_text().splitlines()[0])
    image = str(edits.parent / first["image"])
    question = first["question"]
    only = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory() as tmp:
        cb = str(Path(tmp) / "cb")
        if only is None or "ask_edited" in only:
            subprocess.run(
                [
                    *exe,
                    "add-edit",
                    "--codebook",
                    cb,
                    "--from",
                    str(edits),
                    "--model",
                    args.model,
                    "--device",
                    "cpu",
                ],
                check=True,
                capture_output=True,
                env=env,
            )
        ask = [
            *exe,
            "ask",
            "--model",
            args.model,
            "--device",
            "cpu",
            "--image",
            image,
            "--question",
            question,
        ]
        cmds = {
            "help": [*exe, "--help"],
            "bare_script": [
                sys.executable,
                str(ROOT / "benchmarks" / "bare_ask.py"),
                args.model,
                image,
                question,
            ],
            "ask_no_edit": [*ask, "--no-edit"],
            "ask_edited": [*ask, "--codebook", cb],
            "import_sentence_transformers": [sys.executable, "-c", "import sentence_transformers"],
            "import_transformers_automodel": [
                sys.executable,
                "-c",
                "from transformers import AutoModel",
            ],
        }
        if only is not None:
            cmds = {name: cmd for name, cmd in cmds.items() if name in only}
        envs = {}
        if args.baseline:
            base_env = {
                **env,
                "PYTHONPATH": os.pathsep.join([args.baseline, env.get("PYTHONPATH", "")]),
            }
            for name in [n for n in ("help", "ask_no_edit") if n in cmds]:
                cmds[f"{name} (baseline)"] = cmds[name]
                envs[f"{name} (baseline)"] = base_env
        results = medians_interleaved(cmds, args.runs, env, envs)
    bare = results.get("bare_script")
    ratios = {
        f"{name} / bare": results[name] / bare
        for name in ("ask_no_edit", "ask_edited")
        if bare and name in results
    }
    changes = {
        f"{name} / {name} (baseline)": results[name] / results[f"{name} (baseline)"]
        for name in ("help", "ask_no_edit")
        if f"{name} (baseline)" in results
    }
    limits = {"ask_no_edit / bare": 1.3, "ask_edited / bare": 2.0}
    targets = {name: value <= limits[name] for name, value in ratios.items()}
    if "help" in results:
        targets["help"] = results["help"] < 0.3
    if args.json:
        print(
            json.dumps(
                {
                    "median_seconds": results,
                    "ratios": ratios,
                    "targets_met": targets,
                    "vs_baseline": changes,
                    "runs": args.runs,
                },
                indent=2,
            )
        )
        return
    print(f"cold start, median of {args.runs} runs (s)")
    for name, value in results.items():
        print(f"  {name:32s} {value:7.3f}")
    for name, value in ratios.items():
        print(f"  {name:32s} {value:7.2f}x  {'ok' if targets[name] else 'MISSED'}")
    if "help" in targets:
        print(f"  {'help < 0.3 s':32s} {'ok' if targets['help'] else 'MISSED'}")
    for name, value in changes.items():
        print(f"  {name:32s} {value:7.2f}x")


if __name__ == "__main__":
    main()
