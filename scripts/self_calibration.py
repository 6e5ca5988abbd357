#!/usr/bin/env python
"""Would a codebook gain by calibrating itself after its first batch of edits? (#18 item 5)

    python scripts/self_calibration.py --dataset scenes --model scenes --seed 3 \
        --n-edits 40 --first 24 --out /tmp/selfcal/scenes-s3

The whole protocol, end to end through the CLI (`python -m reasonedit_cli`, this tree's
code), so the numbers are `evaluate`'s:

1. `evaluate --dataset D --seed S --n-edits N --methods M --no-sweep-p -c OUT/full
   --json`: the default (no calibration); the run's reasonedit codebook is kept in
   OUT/full.
2. `export` OUT/full; its first `--first` edits (the order `evaluate` added them: the
   edits table is append-only) are added with `add-edit --from` to a fresh codebook
   OUT/first-K with the same model, and `calibrate` (its defaults: `--select checked`)
   runs on it, timed.
3. `evaluate` the same dataset, seed and methods with `-c OUT/first-K`: an existing
   codebook lends its layer and w to every method codebook the run builds (all N edits;
   `EvaluationRun` / `Evaluation.embedder`), and is not changed.

A refused calibration (no candidate passes the self-check) is reported and step 3 is
skipped for it. `--first 20,24,30` repeats steps 2-3 per size on one default run.
Writes every command's JSON under OUT and prints a summary (JSON; `--markdown`: the
table rows). Set OMP_NUM_THREADS to limit torch's threads; every child inherits it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEEP = ("Acc", "T-Gen", "I-Gen", "R-Gen", "CoE-Gen", "Gen-mean", "Loc", "Hard-Loc")


def cli(args: list[str], out: Path) -> tuple[dict[str, Any], float]:
    """Run `python -m reasonedit_cli ARGS --json` from this tree; its JSON (also written
    to `out`) and wall time. A failing command stops the protocol with its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "reasonedit_cli", *args, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    (out.parent / (out.stem + ".stderr")).write_text(p.stderr)
    try:
        data = json.loads(p.stdout) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {"stdout": p.stdout}
    data = {"rc": p.returncode, **data} if isinstance(data, dict) else {"rc": p.returncode}
    out.write_text(json.dumps(data, indent=1, default=str))
    return data, wall


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    """Per method: the metrics kept, and retrieval recall per probe kind."""
    out: dict[str, Any] = {}
    for m, row in report.get("methods", {}).items():
        out[m] = {k: row.get(k) for k in KEEP}
        stats = (report.get("retrieval_by_method") or {}).get(m) or {}
        out[m]["retrieval"] = {k: (v or {}).get("recall") for k, v in stats.items() if v}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="scenes")
    ap.add_argument("--model", default=None, help="default: scenes for --dataset scenes")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--n-edits", type=int, default=40)
    ap.add_argument("--first", default="24", help="comma list of first-batch sizes")
    ap.add_argument("--methods", default="unedited,reasonedit,reasonedit-objects")
    ap.add_argument("--out", type=Path, required=True, help="an absent or empty folder")
    ap.add_argument("--markdown", action="store_true", help="print table rows too")
    args = ap.parse_args()
    model = args.model or ("scenes" if args.dataset == "scenes" else None)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = ["--dataset", args.dataset, "--seed", str(args.seed), "--n-edits", str(args.n_edits)]
    base += ["--methods", args.methods, "--no-sweep-p"]
    mflag = ["--model", model] if model else []

    full = out / "full"
    if not (out / "default.json").exists():
        rep, wall = cli(["evaluate", *base, *mflag, "-c", str(full)], out / "default.json")
        if rep["rc"] != 0:
            sys.exit(f"default evaluate failed; see {out / 'default.stderr'}")
    else:  # resume: the default run is kept
        rep, wall = json.loads((out / "default.json").read_text()), None
    settings = rep.get("settings", {})
    summary: dict[str, Any] = {
        "dataset": args.dataset,
        "seed": args.seed,
        "n_edits": args.n_edits,
        "default": {
            "layer": settings.get("layer"),
            "w": settings.get("w"),
            "wall_s": wall,
            "metrics": metrics(rep),
        },
        "self_calibrated": {},
    }
    if (out / "summary.json").exists():  # resume: keep the sizes measured before
        before = json.loads((out / "summary.json").read_text())
        summary["self_calibrated"] = before.get("self_calibrated", {})
    export = out / "export"
    if not export.exists():
        e, _ = cli(["export", "-c", str(full), str(export)], out / "export.json")
        if e["rc"] != 0:
            sys.exit(f"export failed; see {out / 'export.stderr'}")
    lines = (export / "edits.jsonl").read_text(encoding="utf-8").splitlines()
    for k in [int(x) for x in args.first.split(",")]:
        tag = f"first-{k}"
        (export / f"{tag}.jsonl").write_text("".join(x + "\n" for x in lines[:k]), "utf-8")
        cb = out / tag
        add, add_s = cli(
            ["add-edit", "-c", str(cb), *mflag, "--from", str(export / f"{tag}.jsonl")],
            out / f"{tag}-add.json",
        )
        if add["rc"] != 0:
            sys.exit(f"add-edit failed; see {out / (tag + '-add.stderr')}")
        cal, cal_s = cli(["calibrate", "-c", str(cb)], out / f"{tag}-calibrate.json")
        sel = cal.get("selection") or {}
        row: dict[str, Any] = {
            "add_edit_s": round(add_s, 1),
            "calibrate_s": round(cal_s, 1),
            "committed": bool(cal.get("committed")),
            "layer": cal.get("layer"),
            "w": cal.get("w"),
            "check": cal.get("check"),
            "paper": sel.get("paper"),
            "n_checks": sel.get("n_checks"),
        }
        if row["committed"]:
            ev, ev_s = cli(["evaluate", *base, *mflag, "-c", str(cb)], out / f"{tag}-eval.json")
            s = ev.get("settings", {})
            row |= {"eval_layer": s.get("layer"), "eval_w": s.get("w"), "wall_s": ev_s}
            row["metrics"] = metrics(ev)
        summary["self_calibrated"][tag] = row
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))
    if args.markdown:
        print(markdown(summary))


def markdown(summary: dict[str, Any]) -> str:
    """One row per setting and method: layer, w, Gen-mean, Loc, Hard-Loc, T-Gen, I-Gen."""

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    world = f"{summary['dataset']} s{summary['seed']}"
    rows = []
    settings = [("default", summary["default"])] + [
        (f"self-calibrated ({tag})", r) for tag, r in summary["self_calibrated"].items()
    ]
    for name, r in settings:
        for m, x in (r.get("metrics") or {}).items():
            if m == "unedited" and name != "default":
                continue
            cells = [x.get(k) for k in ("Gen-mean", "Loc", "Hard-Loc", "T-Gen", "I-Gen")]
            layer = r.get("eval_layer") or r.get("layer")
            w = r.get("eval_w") or r.get("w")
            rows.append(
                f"| {world} | {name} | {m} | {layer} | {f(w)} | "
                + " | ".join(f(c) for c in cells)
                + f" | {f(r.get('calibrate_s'))} |"
            )
        if not r.get("metrics"):
            rows.append(f"| {world} | {name} | refused | {r.get('layer')} | {f(r.get('w'))} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
