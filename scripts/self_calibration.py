#!/usr/bin/env python
"""Would a codebook gain by calibrating itself after its first batch of edits? (#18 item 5)

    python scripts/self_calibration.py --dataset scenes --seed 1 --n-edits 60 --first 24

Takes the first `--first` edits of the evaluation's edit set (built as `evaluate` builds
it, cached by scripts/scenes_keys.py), adds them to a fresh codebook, and runs
`calibrate` on it as a dry run (the self-check included). Prints the chosen layer and w,
the first-batch w of the projector (embedding.first_batch_w) and the self-check counts,
as JSON; feed the layer and w to `scripts/scenes_keys.py --layer L --w-abs W` for their
retrieval.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="scenes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n-edits", type=int, default=60)
    ap.add_argument("--first", type=int, default=24)
    ap.add_argument("--model", default=None)
    ap.add_argument("--cache", default="/tmp/scenes-keys-cache")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from scenes_keys import cache_name

    from reasonedit_cli.editor import Editor

    model = args.model or ("scenes" if args.dataset == "scenes" else None)
    tmp = Path(tempfile.mkdtemp(prefix="selfcal-"))
    ed = Editor(tmp / "cb", model=model, create=True)
    cache = Path(args.cache) / cache_name(args, ed.vlm.revision)
    edits, _, _ = pickle.loads(cache.read_bytes())
    first = list(edits[: args.first])
    ed.add_edits(first, patches="none")
    auto = ed.config.get("w")
    result, _ = ed.calibrate(dry_run=True, force=True)
    print(
        json.dumps(
            {
                "seed": args.seed,
                "first": args.first,
                "first_batch_w": auto,  # auto_w_projector before #18 changed the rule
                "layer": result.layer,
                "w": float(result.w),
                "check": result.extra.get("check") if getattr(result, "extra", None) else None,
            },
            default=str,
        )
    )


if __name__ == "__main__":
    main()
