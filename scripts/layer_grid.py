"""Retrieval recall per key layer and w on easy-vqa: where could a dual key generalise?

For every candidate layer of the model, at both hook points (`language.2`: the block's raw
input; `language.2.normed`: the input of its MLP's first Linear, after the norm), and
several multiples of the auto w (0 = the layer alone), builds a codebook of the easy-vqa
edits (patch search once, keys re-embedded per variant) and reports per probe kind the
share of probes that retrieve their own edit (`loc`: the share that retrieve nothing).
`calibrate` chooses among these variants by modularity; this grid shows what retrieval
each variant actually gives.

    python scripts/layer_grid.py [--n-edits 100] [--factors 0,0.3,1,3,10,30]
        [--points input,normed] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from reasonedit_cli import evaluation as E
from reasonedit_cli.easyvqa import build_easyvqa
from reasonedit_cli.editor import Editor
from reasonedit_cli.embedding import auto_w
from reasonedit_cli.retrieval import retrieve

KINDS = ("acc", "t_gen", "i_gen", "r_gen", "coe_gen", "loc")


def recall(ev: E.Evaluation, codebook, vecs) -> dict[str, float]:
    rs = [retrieve(codebook, v, k=ev.top_k) for v in vecs]
    out = {}
    for kind in KINDS:
        idx = [j for j, p in enumerate(ev.probes) if p.kind == kind]
        hits = [
            rs[j].rejected if kind == "loc" else ev.probes[j].edit_id in rs[j].edit_ids for j in idx
        ]
        out[kind] = float(np.mean(hits)) if hits else float("nan")
    out["t+i"] = (out["t_gen"] + out["i_gen"]) / 2
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-edits", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--factors",
        default="0,0.3,1,3,10,30",
        help="multiples of the layer's auto w (0: the layer alone; 10: equal spread)",
    )
    ap.add_argument(
        "--points",
        default="input,normed",
        help="hook points to grid: input (raw block input), normed (after the norm), or both",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        editor = Editor(Path(tmp) / "cb", create=True)
        gen = E.Generations(editor.vlm, 16)
        edits, probes, _ = build_easyvqa(E.easyvqa_asker(gen), n_edits=args.n_edits, seed=args.seed)
        points = set(args.points.split(","))
        layers = [li.label for li in editor.vlm.candidate_layers() if li.point in points]
        ev = E.Evaluation(editor, edits, probes, workdir=Path(tmp) / "v", gen=gen)
        ev.halves = E.HalfCache(editor.vlm, editor.text, layers, 16)  # all layers, one pass
        images = [ev.gen.image(e.image_bytes) for e in ev.edits]
        questions = [e.question for e in ev.edits]
        rows = []
        for layer in layers:
            h = ev.halves.vlm_half(images, questions, layer)
            w_auto = auto_w(h, ev.halves.text_half(questions))
            for f in (float(x) for x in args.factors.split(",")):
                emb = (
                    E.CachedEmbedder(ev.halves, layer, 0.0, "vision")
                    if f == 0
                    else E.CachedEmbedder(ev.halves, layer, w_auto * f)
                )
                rows.append(
                    {"layer": layer, "w_factor": f, **recall(ev, *ev.build(f"{layer}-{f:g}", emb))}
                )
        text = recall(ev, *ev.build("text", E.CachedEmbedder(ev.halves, layers[0], 1.0, "text")))
        rows.append({"layer": "text only", "w_factor": None, **text})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| layer | w (x auto) | T-Gen | I-Gen | R-Gen | Loc | (T+I)/2 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f = (
            "-"
            if r["w_factor"] is None
            else ("alone" if r["w_factor"] == 0 else f"{r['w_factor']:g}")
        )
        print(
            f"| {r['layer']} | {f} | {r['t_gen']:.2f} | {r['i_gen']:.2f} | "
            f"{r['r_gen']:.2f} | {r['loc']:.2f} | {r['t+i']:.3f} |"
        )


if __name__ == "__main__":
    main()
