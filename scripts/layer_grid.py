"""Retrieval recall per key layer and w on a dataset: where could a dual key generalise?

For every candidate layer of the model, at both hook points (`language.2`: the block's raw
input; `language.2.normed`: the input of its MLP's first Linear, after the norm), and
several multiples of the auto w (0 = the layer alone), builds a codebook of the easy-vqa
edits (patch search once, keys re-embedded per variant) and reports per probe kind the
share of probes that retrieve their own edit (`loc`: the share that retrieve nothing).
`calibrate` chooses among these variants by modularity; this grid shows what retrieval
each variant actually gives.

    python scripts/layer_grid.py [--n-edits 100] [--factors 0,0.3,1,3,10,30]
        [--points input,normed] [--json]
    python scripts/layer_grid.py --dataset scenes --model scenes --points input --plot grid.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from reasonedit_cli import evaluation as E
from reasonedit_cli.editor import Editor
from reasonedit_cli.embedding import auto_w
from reasonedit_cli.retrieval import retrieve

KINDS = E.PROBE_KINDS


def recall(ev: E.Evaluation, codebook, vecs) -> dict[str, float]:
    rs = [retrieve(codebook, v, k=ev.top_k) for v in vecs]
    out = {}
    for kind in KINDS:
        idx = [j for j, p in enumerate(ev.probes) if p.kind == kind]
        hits = [
            rs[j].rejected if kind in E.LOC_KINDS else ev.probes[j].edit_id in rs[j].edit_ids
            for j in idx
        ]
        out[kind] = float(np.mean(hits)) if hits else float("nan")
    out["t+i"] = (out["t_gen"] + out["i_gen"]) / 2
    return out


def plot_grid(rows: list[dict], path: Path) -> None:
    """Heat maps of T-Gen, I-Gen and (T+I)/2 retrieval over layer x w (text only as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in rows if r["w_factor"] is not None]
    layers = list(dict.fromkeys(r["layer"] for r in grid))
    factors = list(dict.fromkeys(r["w_factor"] for r in grid))
    text = next((r for r in rows if r["w_factor"] is None), None)
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(layers) + 2.2))
    for ax, key, title in zip(axes, ("t_gen", "i_gen", "t+i"), ("T-Gen", "I-Gen", "(T+I)/2")):
        m = np.array(
            [
                [
                    next(r[key] for r in grid if r["layer"] == la and r["w_factor"] == f)
                    for f in factors
                ]
                for la in layers
            ]
        )
        ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(len(layers)):
            for j in range(len(factors)):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if m[i, j] < 0.6 else "black",
                )
        ax.set_xticks(range(len(factors)), ["alone" if f == 0 else f"{f:g}x" for f in factors])
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("w (multiple of the layer's auto w; alone = VLM half only)")
        sub = f" (text only {text[key]:.2f})" if text else ""
        ax.set_title(f"{title} retrieval{sub}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _name(r: dict) -> str:
    if r["layer"] == "text only":
        return "text"
    if r["layer"].startswith("calibrated"):
        return "calibrated"
    return f"{r['layer']}-{r['w_factor']:g}"


def calibrated(args: argparse.Namespace, tmp: Path, gen: E.Generations) -> tuple[str, float]:
    """`calibrate`'s (layer, w) on a codebook of the `--tune-seed` edits (no patch keys)."""
    editor = Editor(tmp / "tune", model=args.model, create=True)
    editor.attach_vlm(gen.vlm)
    edits, _, _ = E.build_dataset(args.dataset, gen, n_edits=args.n_edits, seed=args.tune_seed)
    editor.add_edits(edits, patches="none")
    # its choice, even where its self-check would refuse to commit it (scored here)
    result, _ = editor.calibrate(dry_run=True, force=True)
    print(f"calibrate on seed {args.tune_seed}: {result.layer} w={result.w:.4g}", flush=True)
    return result.layer, float(result.w)


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
    ap.add_argument("--dataset", choices=E.DATASETS, default="easy-vqa")
    ap.add_argument("--model", default=None, help="VLM (default: the bundled demo; scenes)")
    ap.add_argument("--plot", type=Path, default=None, help="write a (T+I)/2 heat map PNG")
    ap.add_argument(
        "--tune-seed",
        type=int,
        default=None,
        help="also run calibrate on the edits of this seed and score its (layer, w) here",
    )
    ap.add_argument(
        "--gen",
        type=int,
        default=0,
        help="Gen-mean by generation for the N best cells by (T+I)/2, the calibrated cell, "
        "vision-only and text-only",
    )
    ap.add_argument("--patches", action="store_true", help="with patch keys (slow)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        editor = Editor(Path(tmp) / "cb", model=args.model, create=True)
        gen = E.Generations(editor.vlm, 16)
        edits, probes, _ = E.build_dataset(args.dataset, gen, n_edits=args.n_edits, seed=args.seed)
        points = set(args.points.split(","))
        layers = [li.label for li in editor.vlm.candidate_layers() if li.point in points]
        ev = E.Evaluation(
            editor, edits, probes, workdir=Path(tmp) / "v", gen=gen, patch_search=args.patches
        )
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
        text_emb = E.CachedEmbedder(ev.halves, layers[0], 1.0, "text")
        rows.append(
            {"layer": "text only", "w_factor": None, **recall(ev, *ev.build("text", text_emb))}
        )
        embs = {f"{r['layer']}-{r['w_factor']:g}": r for r in rows if r["w_factor"] is not None}
        if args.tune_seed is not None:
            layer, w = calibrated(args, Path(tmp), gen)
            ev.halves.add_layer(layer)  # its hook point may be one the grid left out
            emb = E.CachedEmbedder(ev.halves, layer, w)
            rows.append(
                {
                    "layer": f"calibrated {layer}",
                    "w_factor": None,
                    "w": w,
                    **recall(ev, *ev.build("calibrated", emb)),
                }
            )
        if args.gen:
            grid = sorted(embs, key=lambda k: -embs[k]["t+i"])[: args.gen]
            names = grid + ["text"] + (["calibrated"] if args.tune_seed is not None else [])
            vis = E.last_vision_layer(editor.vlm)
            names.append(f"{vis}-0")
            if f"{vis}-0" not in embs:
                ev.build(f"{vis}-0", E.CachedEmbedder(ev.halves, vis, 0.0, "vision"))
            for name in names:
                out = ev.retrieval_method(*ev.build(name, None), None)  # type: ignore[arg-type]
                m = E.summarize(ev.probes, {"r": out})["methods"]["r"]
                row = next(
                    (r for r in rows if _name(r) == name),
                    None,
                ) or {"layer": name, "w_factor": 0.0, **recall(ev, *ev.build(name, None))}
                if row not in rows:
                    rows.append(row)
                row.update({f"gen_{k}": v for k, v in m.items()})
    if args.plot:
        plot_grid(rows, args.plot)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| layer | w (x auto) | T-Gen | I-Gen | R-Gen | Loc | Hard-Loc | (T+I)/2 | Gen-mean |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = (
            "-"
            if r["w_factor"] is None
            else ("alone" if r["w_factor"] == 0 else f"{r['w_factor']:g}")
        )
        if "w" in r:
            f = f"w={r['w']:.3g}"
        g = r.get("gen_Gen-mean")
        gen = (
            ""
            if g is None
            else f"{g:.3f} (Loc {r['gen_Loc']:.2f}, hard {_fmt(r.get('gen_Hard-Loc'))})"
        )
        print(
            f"| {r['layer']} | {f} | {r['t_gen']:.2f} | {r['i_gen']:.2f} | "
            f"{r['r_gen']:.2f} | {r['loc']:.2f} | {_fmt(r.get('hard_loc'))} | "
            f"{r['t+i']:.3f} | {gen} |"
        )


def _fmt(v) -> str:
    return "-" if v is None or v != v else f"{v:.2f}"


if __name__ == "__main__":
    main()
