#!/usr/bin/env python
"""Plot the vision-versus-language trade-off of the scenes keys (issue #18 item 4).

    python scripts/scenes_frontier.py [--out docs/scenes_frontier.png]

Reads the retrieval rows of `docs/scenes_levers.json` (`committed_weights`, measured by
`scripts/scenes_keys.py` on seeds 1 and 2). Left: the whole-image index as w grows
(multiples of the auto w, p 25), where T-Gen retrieval falls as Hard-Loc rises, for the
plain and the idf0 text half. Right: the object index (`--union`) as its w and gate
grow, where I-Gen rises as more same-attribute confusers get in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levers", type=Path, default=ROOT / "docs" / "scenes_levers.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "scenes_frontier.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(args.levers.read_text())["committed_weights"]["retrieval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for seed, ls in ((1, "-"), (2, "--")):
        for text, col in (("mean", "tab:blue"), ("idf0", "tab:orange")):
            pts = sorted(
                (
                    (r["w_x"], r)
                    for r in rows[f"levers_s{seed}"]
                    if r["text"] == text and r["rule"] == "images" and r["reg"] == 0
                ),
                key=lambda t: t[0],
            )
            xs = [w for w, _ in pts]
            a.plot(
                xs,
                [r["t_gen"] for _, r in pts],
                ls,
                color=col,
                marker="o",
                label=f"T-Gen, {text}, seed {seed}",
            )
            a.plot(
                xs,
                [r["hard_loc"] for _, r in pts],
                ls,
                color=col,
                marker="s",
                alpha=0.5,
                label=f"Hard-Loc, {text}, seed {seed}",
            )
        us = sorted(
            (
                r
                for r in rows[f"union_confusers_s{seed}"]
                if r["text"] == "mean" and r["w_x"] == 1.0 and "union_w_x" in r
            ),
            key=lambda r: (1 - r["confuser"], r["i_gen"]),
        )
        b.plot(
            [1 - r["confuser"] for r in us],
            [r["i_gen"] for r in us],
            "o" if seed == 1 else "s",
            color="tab:green" if seed == 1 else "tab:purple",
            label=f"seed {seed}",
        )
        for r in us:
            b.annotate(
                f"{r['union_w_x']:g}x {r['union_rule'].replace('images', 'tau')}",
                (1 - r["confuser"], r["i_gen"]),
                fontsize=7,
                xytext=(3, 2),
                textcoords="offset points",
            )
    a.set_xscale("log")
    a.set_xlabel("w of the whole-image index (multiple of the auto w), p 25")
    a.set_ylabel("retrieval (T-Gen: own edit; Hard-Loc: nothing)")
    a.set_title("whole-image keys: rephrasings against the scene's other objects", fontsize=10)
    a.legend(fontsize=7)
    b.axhline(0.6, color="grey", lw=0.8, ls=":")
    b.set_xlabel("share of same-attribute confusers that retrieve the edit")
    b.set_ylabel("I-Gen retrieval (own edit)")
    b.set_title("object index (+ default whole-image index)", fontsize=10)
    b.legend(fontsize=8)
    fig.suptitle("Scenes VLM, committed weights (tower vG), seeds 1 / 2, 60 edits")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
