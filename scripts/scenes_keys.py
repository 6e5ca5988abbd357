#!/usr/bin/env python
"""Retrieval-only sweeps of key kinds, text halves and tau rules (issue #18 items 1, 2, 5).

    python scripts/scenes_keys.py --dataset scenes --seed 1 --n-edits 40
    python scripts/scenes_keys.py --dataset easy-vqa --seed 0 --n-edits 100

Builds the evaluation's edits, probes and key specs once (cached under --cache), then
for every combination of text half (`mean` MiniLM, `idf`: token states pooled with the
codebook's own idf weights), w factor, tau rule and p, recomputes in numpy what the
codebook does (sigma = median of the 30 nearest keys, corrected distance d / sigma_k,
the K = 5 nearest within tau) and prints one JSON row of own-edit retrieval per probe
kind (Loc, Hard-Loc: share retrieving nothing) and precision. No answers are generated.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("acc", "t_gen", "i_gen", "r_gen", "coe_gen", "loc", "hard_loc", "confuser")


def cache_name(args, revision: str) -> str:
    """The cached edit set of a dataset, seed, size and model revision (new weights, new
    edits: the model's own mistakes)."""
    return f"{args.dataset}-{str(revision)[:12]}-s{args.seed}-n{args.n_edits}.pkl"


def load(args):
    import tempfile

    import torch

    torch.set_num_threads(1)
    from reasonedit_cli.editor import Editor
    from reasonedit_cli.evaluation import Evaluation, Generations, build_dataset

    tmp = Path(tempfile.mkdtemp(prefix="scenes-keys-"))
    model = args.model or ("scenes" if args.dataset == "scenes" else None)
    ed = Editor(tmp / "cb", model=model, create=True)
    gen = Generations(ed.vlm, 16)
    cache = Path(args.cache) / cache_name(args, ed.vlm.revision)
    if cache.exists():
        edits, probes, specs = pickle.loads(cache.read_bytes())
    else:
        edits, probes, _ = build_dataset(args.dataset, gen, n_edits=args.n_edits, seed=args.seed)
        ev = Evaluation(ed, edits, probes, workdir=tmp / "w", gen=gen)
        specs = ev.specs()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps((edits, probes, specs)))
    ev = Evaluation(ed, edits, probes, workdir=tmp / "w", gen=gen)
    ev.use_specs(specs)
    return ed, ev, specs


def tau_of(RT, kv, eo, io, rule, p):
    """sigma and tau of keys `kv` (edit codes `eo`, image codes `io`) under `rule`."""
    knn_i, knn_d = RT.knn_lists(kv)
    sigma = RT.sigma_from_knn(knn_d)
    _, ecodes = np.unique(eo, return_inverse=True)
    _, icodes = np.unique(io, return_inverse=True)
    base, _, m = rule.partition("*")
    if base == "images":
        tau = RT.other_image_threshold(knn_i, knn_d, sigma, icodes, ecodes, p)
    elif base == "edits":
        tau = RT.other_edit_threshold(knn_i, knn_d, sigma, ecodes, p, len(set(eo)))
    else:
        raise SystemExit(f"rule {rule}")
    return sigma, float(tau) * (float(m) if m else 1.0), icodes, ecodes


def retrieved(RT, qs, kv, sigma, tau, eo):
    """Per query row: the edits retrieved (K = 5 within tau; over several query rows, the
    row whose nearest key is nearest among those that retrieve anything)."""
    ds = [RT.pairwise_l2(q, kv) / sigma[None, :] for q in qs]
    out = []
    for i in range(qs[0].shape[0]):
        cands = []
        for d in ds:
            row = d[i]
            order = np.argsort(row, kind="stable")[:5]
            ok = [j for j in order if row[j] <= tau]
            if ok:
                cands.append((row[order[0]], ok))
        out.append(set(eo[min(cands)[1]]) if cands else set())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="scenes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n-edits", type=int, default=40)
    ap.add_argument("--model", default=None)
    ap.add_argument("--cache", default="/tmp/scenes-keys-cache")
    ap.add_argument("--texts", default="mean,idf")
    ap.add_argument("--w-factors", default="1")
    ap.add_argument("--rules", default="images,edits")
    ap.add_argument("--ps", default="25")
    ap.add_argument("--regions", default="0,1")
    ap.add_argument("--no-patches", action="store_true")
    ap.add_argument("--layer", default=None, help="key layer (default: the editor's)")
    ap.add_argument("--w-abs", type=float, default=None, help="w itself, not a factor of auto")
    ap.add_argument(
        "--confusers",
        action="store_true",
        help="add a `confuser` probe per edit (scripts/scenes_dists.py): the edit's question on "
        "a scene with its named attribute and the other changed; scored: own edit NOT retrieved",
    )
    ap.add_argument(
        "--union",
        default=None,
        help="W_FACTOR:RULE,...: also a SEPARATE index of region keys only (one per edit) "
        "at w = W_FACTOR x auto with its own tau under RULE; a probe retrieves the union",
    )
    args = ap.parse_args()

    from reasonedit_cli import regions as R
    from reasonedit_cli import retrieval as RT
    from reasonedit_cli.editor import crop
    from reasonedit_cli.embedding import auto_w
    from reasonedit_cli.textkeys import IdfText

    ed, ev, specs = load(args)
    edits, probes = ev.edits, list(ev.probes)
    if args.confusers:
        from dataclasses import replace

        from scenes_dists import confusers

        for e, data in zip(edits, confusers(edits, args.seed)):
            probes.append(
                replace(
                    probes[0],
                    image_bytes=data,
                    question=e.question,
                    answer="",
                    kind="confuser",
                    edit_id=e.id,
                    where="confuser",
                )
            )
    gen = ev.gen
    layer = ev.embedder.layer
    if args.layer:
        ev.halves.add_layer(args.layer)
        layer = ed.vlm.resolve_layer(args.layer).label
    # ----- keys: (image, text, edit, image id, kind, box)
    rows = []
    for e in edits:
        img = gen.image(e.image_bytes)
        for s in specs[e.id]:
            if args.no_patches and s.kind == "patch":
                continue
            rows.append((e.id, e.image_bytes, s.kind, s.key_text, s.box, img))
    key_imgs = [crop(r[5], r[4]) if r[4] else r[5] for r in rows]
    key_texts = [r[3] for r in rows]
    h_keys = ev.halves.vlm_half(key_imgs, key_texts, layer)
    edit_of = np.array([r[0] for r in rows])
    image_of = np.array([hash(r[1]) for r in rows])
    # region keys: one per edit, the named window
    rk = R.RegionEmbedder(ed.vlm, layer, ev.halves.text_half, 0.0, 16)
    reg_rows, reg_h = [], []
    for e in edits:
        img = gen.image(e.image_bytes)
        box = R.region_box(specs[e.id], 0, e.reasoning, img.size, "named")
        if box is None:
            continue
        wins = rk.grid_windows([img])
        win = wins[R.window_for(box, img.size, wins)]
        reg_rows.append((e.id, e.image_bytes, e.question))
        reg_h.append(rk.tokens([img])[0][list(win.tokens)].mean(0))
    reg_h = np.stack(reg_h) if reg_h else np.zeros((0, h_keys.shape[1]))
    pimgs = [gen.image(p.image_bytes) for p in probes]
    ptexts = [p.question for p in probes]
    h_q = ev.halves.vlm_half(pimgs, ptexts, layer)
    wins = rk.grid_windows(pimgs[:1])
    q_tok = rk.tokens(pimgs)
    h_qw = np.stack([np.stack([t[list(w.tokens)].mean(0) for w in wins]) for t in q_tok])

    texts_cache = {}

    def text_fn(kind):
        if kind in texts_cache:
            return texts_cache[kind]
        if kind == "mean":
            f = ev.halves.text_half
        else:
            idf = IdfText.fit(ed.text, key_texts, mode=kind)
            f = idf.encode
        texts_cache[kind] = f
        return f

    def report(out, gots, tau, gaps, use_reg):
        res = {k: [] for k in KINDS}
        prec = {k: [] for k in KINDS}
        for pr, got in zip(probes, gots):
            if pr.kind in ("loc", "hard_loc"):
                res[pr.kind].append(not got)
            elif pr.kind == "confuser":
                res[pr.kind].append(pr.edit_id not in got)
            else:
                res[pr.kind].append(pr.edit_id in got)
                if got:
                    prec[pr.kind].append(len(got & {pr.edit_id}) / len(got))
        out |= {"reg": use_reg, "tau": round(float(tau), 3), **gaps}
        out |= {k: round(float(np.mean(v)), 3) for k, v in res.items() if v}
        out |= {f"P_{k}": round(float(np.mean(v)), 2) for k, v in prec.items() if v}
        out["n"] = {k: len(v) for k, v in res.items() if v}
        print(json.dumps(out), flush=True)

    for tk, wf, rule, p, use_reg in itertools.product(
        args.texts.split(","),
        [float(x) for x in args.w_factors.split(",")],
        args.rules.split(","),
        [float(x) for x in args.ps.split(",")],
        [int(x) for x in args.regions.split(",")],
    ):
        tf = text_fn(tk)
        s_keys = tf(key_texts)
        w = args.w_abs if args.w_abs is not None else auto_w(h_keys, s_keys) * wf
        kv = np.concatenate([h_keys, w * s_keys], 1)
        eo, io = edit_of, image_of
        if use_reg and len(reg_rows):
            rv = np.concatenate([reg_h, w * tf([r[2] for r in reg_rows])], 1)
            kv = np.concatenate([kv, rv])
            eo = np.concatenate([edit_of, [r[0] for r in reg_rows]])
            io = np.concatenate([image_of, [hash(r[1]) for r in reg_rows]])
        sigma, tau, icodes, ecodes = tau_of(RT, kv, eo, io, rule, p)
        # the gap to the nearest key of another edit ON THE SAME image, against the
        # gap to the nearest key of another image (what `images` measures), corrected
        dfull = RT.pairwise_l2(kv, kv) / sigma[:, None]
        same_img = icodes[:, None] == icodes[None, :]
        other_edit = ecodes[:, None] != ecodes[None, :]
        sib = np.where(same_img & other_edit, dfull, np.inf).min(1)
        img = np.where(~same_img, dfull, np.inf).min(1)
        sib = sib[np.isfinite(sib)]
        gaps = {
            "sib_p25": round(float(np.percentile(sib, p)), 3) if len(sib) else None,
            "img_p25": round(float(np.percentile(img, p)), 3),
        }
        s_q = tf(ptexts)
        qs = [np.concatenate([h_q, w * s_q], 1)]
        if use_reg:
            for j in range(h_qw.shape[1]):
                qs.append(np.concatenate([h_qw[:, j], w * s_q], 1))
        gots = retrieved(RT, qs, kv, sigma, tau, eo)
        unions = [None]
        if args.union and len(reg_rows):
            unions += args.union.split(",")
        for un in unions:
            extra = [set() for _ in probes]
            out = {"text": tk, "w_x": wf, "w": round(float(w), 3), "rule": rule, "p": p}
            if un:
                uf, urule = un.split(":")
                uw = auto_w(h_keys, s_keys) * float(uf)
                rv = np.concatenate([reg_h, uw * tf([r[2] for r in reg_rows])], 1)
                reo = np.array([r[0] for r in reg_rows])
                rio = np.array([hash(r[1]) for r in reg_rows])
                rsig, rtau, _, _ = tau_of(RT, rv, reo, rio, urule, p)
                rqs = [np.concatenate([h_qw[:, j], uw * s_q], 1) for j in range(h_qw.shape[1])]
                extra = retrieved(RT, rqs, rv, rsig, rtau, reo)
                out |= {"union_w_x": float(uf), "union_rule": urule, "union_tau": round(rtau, 3)}
            report(out, [g | x for g, x in zip(gots, extra)], tau, gaps, use_reg)


if __name__ == "__main__":
    main()
