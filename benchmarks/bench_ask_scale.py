"""Cold `ask` with a small vs a large codebook (issue 22): does start-up grow with it?

Every measurement is a fresh `reasonedit ask` process (OS file cache warm), the
commands interleaved round robin, medians of `--runs`. Measured in the same run:

- `ask --no-edit`: the model's own loading and answering, no codebook;
- `ask -c SMALL`: a 100-key codebook (below the engine threshold: the Parquet path);
- `ask -c LARGE`: an N-key codebook (the engine's mapped files).

Ratios: large / small (target <= 1.3) and the cost above `--no-edit`, large vs small.

    python benchmarks/bench_ask_scale.py --n 1000000 --work /tmp/askscale [--runs 5]
    python benchmarks/bench_ask_scale.py --small DIR --large DIR [--runs 5]

Without --small/--large it builds them under --work: a real codebook from
sample_edits/ (`add-edit` with --model), then `scripts/make_synthetic_codebook.py`
with `--config-from` it at 100 and --n keys (its real keys first, so `ask` on the
sample image retrieves its facts among the synthetic ones; kept for reruns).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    res = subprocess.run(cmd, check=True, capture_output=True, env=env, text=True)
    return time.perf_counter() - start, res.stdout


def build(work: Path, n: int, model: str, env: dict[str, str]) -> tuple[Path, Path]:
    """The real codebook (sample edits), then the synthetic small and large ones."""
    real, small, large = work / "real", work / "small-100", work / f"large-{n}"
    exe = [sys.executable, "-m", "reasonedit_cli"]
    if not real.exists():
        edits = ROOT / "sample_edits" / "edits.jsonl"
        subprocess.run(
            [*exe, "add-edit", "-c", str(real), "--from", str(edits), "--model", model]
            + ["--device", "cpu"],
            check=True,
            capture_output=True,
            env=env,
        )
    script = ROOT / "scripts" / "make_synthetic_codebook.py"
    for path, keys in ((small, 100), (large, n)):
        if not path.exists():
            subprocess.run(
                [sys.executable, str(script), "--n", str(keys), "--config-from", str(real)]
                + ["--dir", str(path)],
                check=True,
                env=env,
            )
    return small, large


def main() -> None:
    from reasonedit_cli.vlm import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--n", type=int, default=1_000_000, help="keys of the large codebook")
    ap.add_argument("--work", default="/tmp/reasonedit-askscale", help="where to build")
    ap.add_argument("--small", help="an existing small codebook (skips the build)")
    ap.add_argument("--large", help="an existing large codebook (skips the build)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.small and args.large:
        small, large = Path(args.small), Path(args.large)
    else:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        small, large = build(work, args.n, args.model, env)
    first = json.loads((ROOT / "sample_edits" / "edits.jsonl").read_text().splitlines()[0])
    image = str(ROOT / "sample_edits" / first["image"])
    ask = [sys.executable, "-m", "reasonedit_cli", "ask", "--model", args.model]
    ask += ["--device", "cpu", "--image", image, "--question", first["question"], "--json"]
    cmds = {
        "ask_no_edit": [*ask, "--no-edit"],
        "ask_small": [*ask, "--codebook", str(small)],
        "ask_large": [*ask, "--codebook", str(large)],
    }
    outputs: dict[str, str] = {}
    for name, cmd in cmds.items():  # warm the OS file cache once; keep the answers
        outputs[name] = timed(cmd, env)[1]
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.runs):
        for name, cmd in cmds.items():
            times[name].append(timed(cmd, env)[0])
    med = {name: statistics.median(t) for name, t in times.items()}
    above = {name: med[name] - med["ask_no_edit"] for name in ("ask_small", "ask_large")}

    def keys(path: Path) -> int:
        return int(json.loads((path / "manifest.json").read_text())["derived"]["keys"])

    def hits(name: str) -> list:
        return [r["edit_id"] for r in json.loads(outputs[name]).get("retrieved") or []]

    out = {
        "median_seconds": med,
        "keys": {"small": keys(small), "large": keys(large)},
        "ratio_large_small": med["ask_large"] / med["ask_small"],
        "above_no_edit_seconds": above,
        "retrieved": {"small": hits("ask_small"), "large": hits("ask_large")},
        "target_met": med["ask_large"] / med["ask_small"] <= 1.3,
        "runs": args.runs,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"cold ask, median of {args.runs} fresh processes (s)")
    for name, value in med.items():
        print(f"  {name:14s} {value:7.3f}")
    print(f"  large / small  {out['ratio_large_small']:7.2f}x  (target <= 1.3)")
    print(f"  above --no-edit: small {above['ask_small']:.3f} s, large {above['ask_large']:.3f} s")
    print(f"  retrieved: small {out['retrieved']['small']}, large {out['retrieved']['large']}")


if __name__ == "__main__":
    main()
