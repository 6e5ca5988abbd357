#!/usr/bin/env python
"""The distances that decide I-Gen retrieval on the scenes world (issue #18 item 4).

    python scripts/scenes_dists.py --seed 1 --n-edits 60 [--w-factor 1] [--text mean]

For every edit of the evaluation's edit set (built and cached as scripts/scenes_keys.py
builds it) three probes ask the edit's own question, so their text half equals the
edit's and only the image half separates them:

* `i_gen`: the protocol's I-Gen probe (another scene holding the same object);
* `confuser`: a scene holding the *named* attribute with the other one changed (for
  `what color is the star?` a star of another colour; for `what shape is the red
  object?` a red object of another shape): the locality probe that an I-Gen threshold
  must still reject, since the edit's fact would make its answer wrong;
* `t_gen`: the protocol's rephrasing on the edited scene (for scale).

For the whole-image keys of the default codebook (projector, auto w x `--w-factor`,
`tau_rule: images`, p 25) and for region keys (the named object's token window, the
query's best window) it prints, as JSON, each probe kind's corrected distance to its
edit's nearest key (quantiles), the share within tau, and the share of edits whose
I-Gen probe is nearer than its confuser (the ranking the tower's pair metric measures).
It also prints the raw image-half distances (edited scene to I-Gen scene, to confuser
scene, to the nearest other edited scene), which are what tau is made of. No answers are
generated.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def q3(x: np.ndarray) -> list[float]:
    return [round(float(v), 3) for v in np.percentile(x, [10, 25, 50, 75, 90])]


def confusers(edits, seed: int) -> list[bytes]:
    """Per edit, the PNG of a scene holding its question's named attribute with the other
    one changed (a star of another colour; a red object of another shape), never the
    edited object itself (a scene's shapes and colours are distinct)."""
    from reasonedit_cli import scenes as S

    rng = random.Random(1000 + seed)
    out = []
    for n, e in enumerate(edits):
        words = e.question.replace("?", " ").replace(".", " ").split()
        shape = next((w for w in words if w in S.SHAPES), None)
        color = next((w for w in words if w in S.COLORS), None)
        if shape is not None and e.answer in S.COLORS:  # colour question
            fixed = ((shape, rng.choice([c for c in S.COLORS if c != e.answer])),)
        else:  # shape question: same colour, another shape
            assert color is not None, e.question
            fixed = ((rng.choice([s for s in S.SHAPES if s != e.answer]), color),)
        sc = S.make_scene(S.scene_rng(seed, 9, n), fixed=fixed)
        out.append(S.png_bytes(S.render(sc)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="scenes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n-edits", type=int, default=60)
    ap.add_argument("--model", default=None)
    ap.add_argument("--cache", default="/tmp/scenes-keys-cache")
    ap.add_argument("--w-factor", type=float, default=1.0)
    ap.add_argument("--text", default="mean")
    ap.add_argument("--p", type=float, default=25.0)
    args = ap.parse_args()

    from scenes_keys import load

    from reasonedit_cli import regions as R
    from reasonedit_cli import retrieval as RT
    from reasonedit_cli.editor import crop
    from reasonedit_cli.embedding import auto_w
    from reasonedit_cli.textkeys import IdfText

    ed, ev, specs = load(args)
    edits, probes, gen = ev.edits, ev.probes, ev.gen
    layer = ev.embedder.layer

    conf_bytes = confusers(edits, args.seed)
    conf_imgs = [gen.image(b) for b in conf_bytes]

    # ---- whole-image keys, as scenes_keys.py builds them
    rows = []
    for e in edits:
        img = gen.image(e.image_bytes)
        for s in specs[e.id]:
            rows.append((e.id, e.image_bytes, s.key_text, s.box, img))
    key_imgs = [crop(r[4], r[3]) if r[3] else r[4] for r in rows]
    key_texts = [r[2] for r in rows]
    tf = (
        ev.halves.text_half
        if args.text == "mean"
        else IdfText.fit(ed.text, key_texts, mode=args.text).encode
    )
    h_keys = ev.halves.vlm_half(key_imgs, key_texts, layer)
    s_keys = tf(key_texts)
    w = auto_w(h_keys, s_keys) * args.w_factor
    edit_of = np.array([r[0] for r in rows])
    _, ecodes = np.unique(edit_of, return_inverse=True)
    _, icodes = np.unique(np.array([hash(r[1]) for r in rows]), return_inverse=True)

    by_kind: dict[str, list[tuple[str, object, str]]] = {"i_gen": [], "t_gen": []}
    for p in probes:
        if p.kind in by_kind:
            by_kind[p.kind].append((p.edit_id, gen.image(p.image_bytes), p.question))
    by_kind["confuser"] = [(e.id, im, e.question) for e, im in zip(edits, conf_imgs)]

    out: dict[str, object] = {"seed": args.seed, "w": round(float(w), 3), "text": args.text}

    def score(label: str, kv: np.ndarray, eo: np.ndarray, io: np.ndarray, queries) -> None:
        knn_i, knn_d = RT.knn_lists(kv)
        sigma = RT.sigma_from_knn(knn_d)
        _, ec = np.unique(eo, return_inverse=True)
        _, ic = np.unique(io, return_inverse=True)
        tau = float(RT.other_image_threshold(knn_i, knn_d, sigma, ic, ec, args.p))
        res: dict[str, object] = {"tau": round(tau, 3)}
        own: dict[str, np.ndarray] = {}
        for kind, qv in queries.items():
            ids = [x[0] for x in by_kind[kind]]
            d_own, d_other = [], []
            for i, eid in enumerate(ids):
                d = np.min([RT.pairwise_l2(v[i : i + 1], kv)[0] / sigma for v in qv], axis=0)
                d_own.append(d[eo == eid].min())
                d_other.append(d[eo != eid].min())
            own[kind] = np.array(d_own)
            res[kind] = {
                "own_q10_25_50_75_90": q3(own[kind]),
                "own_within_tau": round(float(np.mean(own[kind] <= tau)), 3),
                "own_is_nearest": round(float(np.mean(own[kind] < np.array(d_other))), 3),
            }
        # I-Gen probe nearer its edit than the confuser (edits align by id)
        ig = dict(zip([x[0] for x in by_kind["i_gen"]], own["i_gen"]))
        cf = dict(zip([x[0] for x in by_kind["confuser"]], own["confuser"]))
        both = [k for k in ig if k in cf]
        res["i_gen_nearer_than_confuser"] = round(float(np.mean([ig[k] < cf[k] for k in both])), 3)
        # the smallest tau x m that admits half the I-Gen probes, and what it lets in
        m50 = float(np.median(own["i_gen"])) / tau
        res["tau_x_for_half_i_gen"] = round(m50, 2)
        res["confuser_within_that"] = round(float(np.mean(own["confuser"] <= m50 * tau)), 3)
        out[label] = res

    # whole-image keys
    kv = np.concatenate([h_keys, w * s_keys], 1)
    queries = {}
    for kind, items in by_kind.items():
        imgs = [x[1] for x in items]
        texts = [x[2] for x in items]
        queries[kind] = [np.concatenate([ev.halves.vlm_half(imgs, texts, layer), w * tf(texts)], 1)]
    score("whole_image", kv, edit_of, icodes, queries)

    # region keys (the named window) next to the whole-image keys, query over every window
    rk = R.RegionEmbedder(ed.vlm, layer, ev.halves.text_half, 0.0, 16)
    reg_h, reg_e, reg_i, reg_t = [], [], [], []
    for e in edits:
        img = gen.image(e.image_bytes)
        box = R.region_box(specs[e.id], 0, e.reasoning, img.size, "named")
        if box is None:
            continue
        wins = rk.grid_windows([img])
        win = wins[R.window_for(box, img.size, wins)]
        reg_h.append(rk.tokens([img])[0][list(win.tokens)].mean(0))
        reg_e.append(e.id)
        reg_i.append(hash(e.image_bytes))
        reg_t.append(e.question)
    kv_r = np.concatenate([kv, np.concatenate([np.stack(reg_h), w * tf(reg_t)], 1)])
    eo_r = np.concatenate([edit_of, reg_e])
    io_r = np.concatenate([np.array([hash(r[1]) for r in rows]), reg_i])
    rqueries = {}
    for kind, items in by_kind.items():
        imgs = [x[1] for x in items]
        texts = [x[2] for x in items]
        toks = rk.tokens(imgs)
        wins = rk.grid_windows(imgs[:1])
        st = w * tf(texts)
        qs = [queries[kind][0]]
        for win in wins:
            hw = np.stack([t[list(win.tokens)].mean(0) for t in toks])
            qs.append(np.concatenate([hw, st], 1))
        rqueries[kind] = qs
    score("region_keys", kv_r, eo_r, io_r, rqueries)

    # raw image halves: edited scene to its I-Gen scene, to its confuser, to the nearest
    # other edited scene (one answer key per edit, its question as the prompt)
    eimgs = [gen.image(e.image_bytes) for e in edits]
    etexts = [e.question for e in edits]
    he = ev.halves.vlm_half(eimgs, etexts, layer)
    ig_map = {x[0]: x for x in by_kind["i_gen"]}
    keep = [i for i, e in enumerate(edits) if e.id in ig_map]
    ktexts = [etexts[i] for i in keep]
    hi = ev.halves.vlm_half([ig_map[edits[i].id][1] for i in keep], ktexts, layer)
    hc = ev.halves.vlm_half([conf_imgs[i] for i in keep], ktexts, layer)
    hk = he[keep]
    d_ig = np.linalg.norm(hk - hi, axis=1)
    d_cf = np.linalg.norm(hk - hc, axis=1)
    dd = RT.pairwise_l2(he, he)
    same = np.array([[a.image_bytes == b.image_bytes for b in edits] for a in edits])
    d_nn = np.where(same, np.inf, dd).min(1)[keep]
    out["image_half_l2"] = {
        "to_i_gen_scene": q3(d_ig),
        "to_confuser_scene": q3(d_cf),
        "to_nearest_other_edited_scene": q3(d_nn),
        "i_gen_nearer_than_confuser": round(float(np.mean(d_ig < d_cf)), 3),
        "i_gen_nearer_than_nearest_other": round(float(np.mean(d_ig < d_nn)), 3),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
