#!/usr/bin/env python
"""Diagnostics of region keys on the scenes world (issue #18, docs/scenes_vlm.md).

    python scripts/scenes_regions.py boxes    --seed 1 --n-edits 30  # patch crop on the object?
    python scripts/scenes_regions.py frontier --seed 1 --n-edits 30  # retrieval vs tau x m
    python scripts/scenes_regions.py wsweep   --seed 1 --n-edits 40  # retrieval vs w

`boxes`: does the patch search's first crop sit in the edited object's quadrant (the one
its reasoning names)? `frontier`: for every probe the best corrected distance to its own
edit's keys (over the whole image and every window) and to any key; the share retrieved
(T/I/CoE-Gen) and rejected (Loc, Hard-Loc) at tau x 1 ... 2.5. `wsweep`: own-edit
retrieval / rejection of `best_retrieval` at the codebook's tau for w = 0 ... 10x auto.
No answers are generated (retrieval only). Prints one JSON object per row.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("boxes", "frontier", "wsweep", "taus", "evaluate"))
    ap.add_argument("--percentile", type=float, default=None, help="evaluate: tau's p")
    ap.add_argument("--methods", default="unedited,reasonedit,reasonedit-regions")
    ap.add_argument("--out", default=None, help="evaluate: write the report JSON here")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n-edits", type=int, default=30)
    ap.add_argument("--model", default="scenes")
    ap.add_argument("--normalize", action="store_true", help="unit-length image halves")
    ap.add_argument("--w-factor", type=float, default=None, help="frontier: w = this x auto")
    ap.add_argument("--text", default="mean", help="evaluate: text half pooling (mean, idf0, mix0)")
    ap.add_argument("--tau-rule", default=None, help="evaluate: the codebooks' tau_rule")
    ap.add_argument("--dataset", default="scenes")
    ap.add_argument(
        "--settings",
        default=None,
        help="evaluate: several settings on the same edits, TEXT:WFACTOR:P,... (e.g. "
        "mean:1:25,idf0:3:25); the text half is fitted on the first 32 edits' key texts",
    )
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from reasonedit_cli import regions as R
    from reasonedit_cli.editor import Editor
    from reasonedit_cli.evaluation import Evaluation, Generations, build_dataset

    tmp = Path(tempfile.mkdtemp(prefix="scenes-regions-"))
    ed = Editor(tmp / "cb", model=args.model or None, create=True)
    if args.tau_rule:
        from dataclasses import replace

        ed.preset = replace(ed.preset, tau_rule=args.tau_rule)
    gen = Generations(ed.vlm, 16)
    edits, probes, _ = build_dataset(args.dataset, gen, n_edits=args.n_edits, seed=args.seed)
    ev = Evaluation(
        ed,
        edits,
        probes,
        workdir=tmp / "w",
        gen=gen,
        patch_search=args.what in ("boxes", "evaluate"),
    )

    if args.what == "boxes":
        specs, hit = ev.specs(), 0
        for e in edits:
            box = next((s.box for s in specs[e.id] if s.kind == "patch" and s.box), None)
            m = re.search(r"in the (top|bottom) (left|right)", e.reasoning[0])
            assert m
            if box:
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                hit += (cx < 32) == (m.group(2) == "left") and (cy < 32) == (m.group(1) == "top")
        print(json.dumps({"edits": len(edits), "patch_crop_on_object_quadrant": hit}))
        return

    if args.text != "mean":
        # the text half pooled with idf weights fitted on the codebook's key texts
        from reasonedit_cli.textkeys import IdfText

        texts = [s.key_text for e in edits for s in ev.specs()[e.id]]
        ev.halves.text_half = IdfText.fit(ed.text, texts, args.text).encode
    if args.what == "evaluate" and args.settings:
        from reasonedit_cli.evaluation import CachedEmbedder, markdown_table, summarize
        from reasonedit_cli.textkeys import IdfText

        mean_half = ev.halves.text_half
        first = [s.key_text for e in edits[:32] for s in ev.specs()[e.id]]
        methods = [m.strip() for m in args.methods.split(",")]
        reports = []
        for i, setting in enumerate(args.settings.split(",")):
            text, wf, p = setting.split(":")
            ev.halves.text_half = (
                mean_half if text == "mean" else IdfText.fit(ed.text, first, text).encode
            )
            ev.embedder = CachedEmbedder(ev.halves, ev.embedder.layer, None)
            # the plain auto w of the first batch (32 edits, as `build` inserts them), not
            # the codebook's first-batch rule, so that W_FACTOR multiplies the auto w
            from reasonedit_cli.editor import crop
            from reasonedit_cli.embedding import auto_w, sibling_w

            rows = [(e, sp) for e in edits[:32] for sp in ev.specs()[e.id]]
            kimgs = [
                crop(gen.image(e.image_bytes), sp.box) if sp.box else gen.image(e.image_bytes)
                for e, sp in rows
            ]
            ktexts = [sp.key_text for _, sp in rows]
            h = ev.halves.vlm_half(kimgs, ktexts, ev.embedder.layer)
            s_half = ev.halves.text_half(ktexts)
            auto = auto_w(h, s_half)
            if wf == "sib":  # the first-batch rule (embedding.first_batch_w), first 32 edits
                ev.embedder.w = sibling_w(
                    h,
                    s_half,
                    [e.image_sha256 for e, _ in rows],
                    [e.id for e, _ in rows],
                    auto,
                )
            else:
                ev.embedder.w = auto * float(wf)
            ev.workdir = tmp / f"s{i}"
            ev.forget_codebooks()
            ev.percentile = float(p)
            # the object index at OBJECT_W_FACTOR x the AUTO w, whatever this setting's w
            ow = auto * R.OBJECT_W_FACTOR
            report = summarize(
                ev.probes,
                {
                    m: R.object_outcomes(ev, w=ow) if m == "reasonedit-objects" else ev.run(m)
                    for m in methods
                },
            )
            report["settings"] = {
                "text": text,
                "w_factor": wf,
                "w": ev.embedder.w,
                "object_w": ow,
                "percentile": float(p),
                "seed": args.seed,
                "dataset": args.dataset,
                "tau_rule": ed.preset.tau_rule,
            }
            print(json.dumps(report["settings"]))
            print(markdown_table(report), flush=True)
            reports.append(report)
        if args.out:
            Path(args.out).write_text(json.dumps(reports, indent=1))
        return
    if args.what in ("taus", "evaluate"):
        ev.percentile = args.percentile
        if args.w_factor is not None:
            ev.embedder.embed(
                [gen.image(e.image_bytes) for e in edits], [e.question for e in edits]
            )
            ev.embedder.w = float(ev.embedder.w or 0.0) * args.w_factor
        if args.what == "taus":
            cb, rk = R.region_codebook(ev, "reasonedit-regions", w=ev.embedder.w)
            for p in (25, 30, 40, 50, 60, 70, 80):
                print(json.dumps({"w": round(rk.w, 3), "p": p, "tau": round(cb.tau_for(p), 4)}))
            return
        from reasonedit_cli.evaluation import markdown_table, summarize

        methods = [m.strip() for m in args.methods.split(",")]
        report = summarize(ev.probes, {m: ev.run(m) for m in methods})
        report["settings"] = {
            "w": ev.embedder.w,
            "percentile": args.percentile,
            "seed": args.seed,
            "text": args.text,
            "tau_rule": ed.preset.tau_rule,
        }
        print(markdown_table(report))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
        return

    if args.what == "frontier":
        w = None
        if args.w_factor is not None:
            ev.embedder.embed(
                [gen.image(e.image_bytes) for e in edits], [e.question for e in edits]
            )
            w = float(ev.embedder.w or 0.0) * args.w_factor
        cb, rk = R.region_codebook(ev, "reasonedit-regions", normalize=args.normalize, w=w)
        vecs = rk.query_vectors(ev.probe_images(), [p.question for p in ev.probes])
        edit_ids = cb.keys_table().column("edit_id").to_pylist()
        own: dict[str, list[float]] = {}
        near: dict[str, list[float]] = {}
        for pr, q in zip(ev.probes, vecs):
            bo, ba = np.inf, np.inf
            for v in q:
                for row, _raw, corr in cb.search(v[None].astype(np.float32), k=30)[0]:
                    ba = min(ba, corr)
                    if edit_ids[row] == pr.edit_id:
                        bo = min(bo, corr)
            own.setdefault(pr.kind, []).append(bo)
            near.setdefault(pr.kind, []).append(ba)
        for m in (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0):
            t = cb.tau * m
            row = {"tau_x": m, "tau": round(t, 3), "w": round(rk.w, 3)}
            row |= {
                k: round(float(np.mean(np.array(own[k]) <= t)), 3)
                for k in ("t_gen", "i_gen", "coe_gen")
                if k in own
            }
            row |= {
                f"{k}_rejected": round(float(np.mean(np.array(near[k]) > t)), 3)
                for k in ("loc", "hard_loc")
                if k in near
            }
            print(json.dumps(row), flush=True)
        return

    ev.embedder.embed([gen.image(e.image_bytes) for e in edits], [e.question for e in edits])
    w0 = float(ev.embedder.w or 0.0)
    for f in (0.0, 0.3, 1.0, 3.0, 10.0):
        ev.workdir = tmp / f"w{f}"  # a fresh sub-codebook per w
        cb, rk = R.region_codebook(ev, "reasonedit-regions", normalize=args.normalize, w=w0 * f)
        vecs = rk.query_vectors(ev.probe_images(), [p.question for p in ev.probes])
        res: dict[str, list[bool]] = {}
        for pr, q in zip(ev.probes, vecs):
            r = R.best_retrieval(cb, q, k=5)
            ok = r.rejected if pr.kind in ("loc", "hard_loc") else pr.edit_id in r.edit_ids
            res.setdefault(pr.kind, []).append(ok)
        row = {"w_factor": f, "w": round(w0 * f, 3), "tau": round(cb.tau, 3)}
        row |= {k: round(float(np.mean(v)), 3) for k, v in res.items()}
        row["n"] = {k: len(v) for k, v in res.items()}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
