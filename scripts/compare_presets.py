"""Both presets on easy-vqa: what `calibrate` chooses, and the evaluation table.

    python scripts/compare_presets.py [--n-edits 100] [--seed 0] [--reference-hook normed]
        [--skip-calibrate] [--skip-evaluate] [--runs 10] --out results.json

Calibration: the easy-vqa edits go into a codebook (no patch search: calibration reads
only the edits' images, questions and reasoning), then `calibrate --dry-run` under each
preset; each choice is reported with its w as a multiple of the layer's auto w (the unit
of `scripts/layer_grid.py`), so it can be placed on the layer x w retrieval grid.
Evaluation: `evaluate` with unedited, reasonedit (default preset) and
reasonedit-reference, with the p sweep of both. `--reference-hook input` runs the
reference preset at the raw block input, for models without `.normed` hook points.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from reasonedit_cli import evaluation as E
from reasonedit_cli.easyvqa import build_easyvqa
from reasonedit_cli.editor import Editor
from reasonedit_cli.embedding import auto_w
from reasonedit_cli.presets import REFERENCE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-edits", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=10, help="reference calibration runs")
    ap.add_argument("--reference-hook", default="normed", choices=("normed", "input"))
    ap.add_argument("--skip-calibrate", action="store_true")
    ap.add_argument("--skip-evaluate", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    ref = dataclasses.replace(REFERENCE, hook=args.reference_hook)
    out: dict = {"args": vars(args) | {"out": str(args.out)}}
    with tempfile.TemporaryDirectory() as tmp:
        editor = Editor(Path(tmp) / "cb", create=True)
        gen = E.Generations(editor.vlm, 16)
        edits, probes, info = build_easyvqa(
            E.easyvqa_asker(gen), n_edits=args.n_edits, seed=args.seed
        )
        out["dataset"] = info
        if not args.skip_calibrate:
            editor.add_edits(edits, patches="none")
            halves = E.HalfCache(
                editor.vlm, editor.text, [li.label for li in editor.vlm.candidate_layers()]
            )
            images = [gen.image(e.image_bytes) for e in edits]
            questions = [e.question for e in edits]
            s = halves.text_half(questions)
            cal = {}
            for name, preset, runs in (("default", None, 5), ("reference", ref, args.runs)):
                ed = Editor(Path(tmp) / "cb", preset=preset, vlm=editor.vlm, text=editor.text)
                t0 = time.perf_counter()
                res, _ = ed.calibrate(bootstrap=runs, seed=args.seed, dry_run=True)
                h = halves.vlm_half(images, questions, res.layer)
                cal[name] = {
                    "layer": res.layer,
                    "w": res.w,
                    "w_over_auto": res.w / auto_w(h, s),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "layer_table": res.layer_table,
                }
                print(name, res.layer, res.w, cal[name]["w_over_auto"], flush=True)
            out["calibrate"] = cal
            args.out.write_text(json.dumps(out, indent=2))
        if not args.skip_evaluate:
            ev_editor = Editor(Path(tmp) / "eval", create=True, vlm=editor.vlm, text=editor.text)
            t0 = time.perf_counter()
            report = E.evaluate(
                ev_editor,
                edits,
                probes,
                methods=("unedited", "reasonedit", "reasonedit-reference"),
                sweep_p=True,
                workdir=Path(tmp) / "variants",
                gen=gen,
                reference_preset=ref,
            )
            report["seconds"] = round(time.perf_counter() - t0, 1)
            out["evaluate"] = report
            print(E.markdown_table(report))
            print(E.sweep_markdown(report))
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
