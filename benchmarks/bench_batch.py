"""Batch throughput of `ask` and `add-edit` through the Python API (no process start-up).

Models are loaded once (warm-up) and excluded; each measurement is a median over
`--runs` runs, batched (`--batch-size`, default 16) against one at a time (batch 1),
measured in the same run:

    python benchmarks/bench_batch.py [--model DIR] [--n-ask 32] [--n-edits 16] [--runs 3]

Edits are the bundled sample_edits/ cycled to the requested count under fresh ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from reasonedit_cli.editor import Editor
    from reasonedit_cli.edits import read_edits_jsonl
    from reasonedit_cli.vlm import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--edits", default=str(ROOT / "sample_edits" / "edits.jsonl"))
    ap.add_argument("--n-ask", type=int, default=32)
    ap.add_argument("--n-edits", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    base, _ = read_edits_jsonl(args.edits)

    def edits_for(run: int, n: int) -> list:
        out = []
        for i in range(n):
            e = base[i % len(base)]
            out.append(dataclasses.replace(e, id=f"bench-{run}-{i}"))
        return out

    with tempfile.TemporaryDirectory() as tmp:
        # one editor (models loaded once) over a codebook holding the sample edits
        ed = Editor(Path(tmp) / "cb", model=args.model, device="cpu", create=True)
        ed.add_edits(base, batch_size=args.batch_size)  # warm-up: loads both models
        images = [base[i % len(base)].load_image() for i in range(args.n_ask)]
        questions = [base[i % len(base)].question for i in range(args.n_ask)]
        ed.ask(images[:2], questions[:2], batch_size=2)  # warm-up

        def time_ask(bs: int, no_edit: bool) -> float:
            t = time.perf_counter()
            ed.ask(images, questions, batch_size=bs, no_edit=no_edit)
            return time.perf_counter() - t

        def time_add(bs: int, run: int) -> float:
            # the warm editor's models (and its w, fixed by the warm-up) on a new codebook
            sub = Editor(
                Path(tmp) / f"add-{bs}-{run}",
                model=args.model,
                device="cpu",
                create=True,
                vlm=ed.vlm,
                text=ed.text,
                embedder=ed.embedder,
            )
            todo = edits_for(run, args.n_edits)
            t = time.perf_counter()
            sub.add_edits(todo, batch_size=bs)
            return time.perf_counter() - t

        res: dict[str, float] = {}
        bs = args.batch_size
        for name, fn in [
            (f"ask edited, batch {bs}", lambda r: time_ask(bs, False)),
            ("ask edited, batch 1", lambda r: time_ask(1, False)),
            (f"ask --no-edit, batch {bs}", lambda r: time_ask(bs, True)),
            ("ask --no-edit, batch 1", lambda r: time_ask(1, True)),
            (f"add-edit, batch {bs}", lambda r: time_add(bs, r)),
            ("add-edit, batch 1", lambda r: time_add(1, r)),
        ]:
            res[name] = statistics.median(fn(r) for r in range(args.runs))
    n_of = {"ask": args.n_ask, "add": args.n_edits}
    rows = {
        k: {"seconds": v, "per_item_s": v / n_of[k.split()[0].split("-")[0]]}
        for k, v in res.items()
    }
    speedups = {
        "ask edited": res["ask edited, batch 1"] / res[f"ask edited, batch {bs}"],
        "ask --no-edit": res["ask --no-edit, batch 1"] / res[f"ask --no-edit, batch {bs}"],
        "add-edit": res["add-edit, batch 1"] / res[f"add-edit, batch {bs}"],
    }
    if args.json:
        print(
            json.dumps(
                {
                    "median": rows,
                    f"speedup batch {bs} vs 1": speedups,
                    "n_ask": args.n_ask,
                    "n_edits": args.n_edits,
                    "runs": args.runs,
                },
                indent=2,
            )
        )
        return
    print(f"median of {args.runs} runs; {args.n_ask} questions, {args.n_edits} edits")
    for k, r in rows.items():
        print(f"  {k:28s} {r['seconds']:8.2f} s  {r['per_item_s'] * 1e3:8.1f} ms/item")
    for k, v in speedups.items():
        print(f"  speedup {k:20s} {v:6.2f}x (batch {bs} vs 1)")


if __name__ == "__main__":
    main()
