#!/usr/bin/env python
"""`reasonedit-objects` as the product has it after a codebook calibrated itself (#18 item 5).

    python scripts/self_calibration_objects.py --dataset scenes --seed 3 --n-edits 40 \
        --codebook OUT/first-24

`calibrate` re-embeds the main keys but leaves the object index at the layer and w its
first `add-edit` gave it (the link in the codebook's config). `evaluate -c CB` instead
builds the object index of `reasonedit-objects` at CB's (calibrated) key layer. This
builds the same evaluation (`EvaluationRun` inputs, `Evaluation.editor_for`, the
product's `Editor.add_edits` / `Editor.retrievals`) with the main keys at CB's layer and
w and the object index at the layer and w CB's link records (`regions.object_outcomes`
with those settings: `evaluate`'s own `reasonedit-objects` code), and prints the
summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="scenes")
    ap.add_argument("--model", default=None, help="default: scenes for --dataset scenes")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--n-edits", type=int, default=40)
    ap.add_argument("--codebook", type=Path, required=True, help="the calibrated codebook")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from reasonedit_cli import objects as O
    from reasonedit_cli.editor import Editor
    from reasonedit_cli.evaluation import (
        Evaluation,
        EvaluationInputs,
        EvaluationRun,
        summarize,
    )
    from reasonedit_cli.regions import object_outcomes

    model = args.model or ("scenes" if args.dataset == "scenes" else None)
    cb = Editor(args.codebook, model=model).require_codebook()
    link = O.link_of(cb)
    if link is None:
        sys.exit(f"{args.codebook} has no object index")
    inputs = EvaluationInputs(dataset=args.dataset, n_edits=args.n_edits, seed=args.seed)
    run = EvaluationRun(
        lambda p: Editor(p, model=model, create=True),
        inputs,
        methods=["reasonedit"],
        codebook=args.codebook,
        sweep_p=False,
    )
    with run, tempfile.TemporaryDirectory() as tmp:
        run.load()
        ev = Evaluation(
            run.editor, run.edits, run.probes, workdir=Path(tmp), gen=run.gen, choices=run.choices
        )
        layer = str(link["layer"])
        outs = object_outcomes(
            ev, w=float(link["w"]), tau_x=float(link.get("tau_x") or O.OBJECT_TAU_X), layer=layer
        )
        report = summarize(ev.probes, {"objects-as-product": outs})
        report["settings"] = {
            "layer": ev.embedder.layer,
            "w": ev.embedder.w,
            "object_layer": layer,
            "object_w": float(link["w"]),
        }
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
