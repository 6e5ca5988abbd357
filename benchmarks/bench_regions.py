"""Benchmark region queries (reasonedit_cli/regions.py) against whole-image queries.

    python benchmarks/bench_regions.py [--queries N] [--edits N] [--repeats R] [--json]

On the bundled scenes VLM: a codebook of `--edits` scene edits (answer and sentence
keys), then `--queries` (scene, question) queries embedded and
retrieved two ways, in the same run:

* whole: one dual key per query (`DualEmbedder.embed`) and one `retrieve`;
* regions: the whole image and every token window (`RegionEmbedder.query_vectors`, one
  vision forward per query: the windows pool the same tokens) and `1 + windows`
  retrieves (`best_retrieval`).

Reports medians over `--repeats` runs (fresh caches each time), the ratio regions /
whole, and the VLM forwards each way (the model's forward calls are counted by a hook).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--edits", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from reasonedit_cli import scenes as S
    from reasonedit_cli.editor import Editor
    from reasonedit_cli.edits import Edit
    from reasonedit_cli.regions import RegionEmbedder, best_retrieval
    from reasonedit_cli.retrieval import retrieve

    tmp = Path(tempfile.mkdtemp(prefix="bench-regions-"))
    ed = Editor(tmp / "cb", model="scenes", create=True)
    rng = random.Random(0)
    edits, images = [], []
    for i in range(args.edits):
        sc = S.make_scene(random.Random(S.hash_parts(77, i)))
        q = S.question(sc, rng.choice(("color", "shape")), rng, "train", target=sc.objects[0])
        img = S.render(sc)
        e = Edit(
            image_path=Path(f"b{i}.png"),
            question=q.text,
            answer=q.answer,
            reasoning=S.reasoning(q),
            source="bench",
            image_bytes=S.png_bytes(img),
            image_ext="png",
        )
        e.ensure_id()
        edits.append(e)
        images.append(img)
    ed.add_edits(edits, patches="none")
    w = float(ed.embedder.w or 0.0)
    wins = RegionEmbedder(ed.vlm, ed.embedder.layer, ed.text.encode, w).grid_windows(images[:1])
    queries = []
    for n in range(args.queries):
        sc = S.make_scene(random.Random(S.hash_parts(78, n)))
        q = S.question(sc, rng.choice(("color", "shape")), rng, "heldout", target=sc.objects[0])
        queries.append((S.render(sc), q.text))
    qi, qt = [x for x, _ in queries], [t for _, t in queries]

    calls = {"n": 0}
    ed.vlm.model.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))

    def whole() -> int:
        calls["n"] = 0
        vecs = ed.embedder.embed(qi, qt)
        for v in vecs:
            retrieve(ed.codebook, v, k=5)
        return calls["n"]

    def regions() -> int:
        calls["n"] = 0
        r = RegionEmbedder(ed.vlm, ed.embedder.layer, ed.text.encode, w)
        for q in r.query_vectors(qi, qt):
            best_retrieval(ed.codebook, q, k=5)
        return calls["n"]

    out: dict[str, dict[str, float]] = {}
    for name, fn in (("whole", whole), ("regions", regions)):
        times, fwd = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fwd = fn()
            times.append(time.perf_counter() - t0)
        out[name] = {
            "median_s": round(statistics.median(times), 4),
            "per_query_ms": round(1000 * statistics.median(times) / args.queries, 3),
            "vlm_forwards": fwd,
        }
    report = {
        "queries": args.queries,
        "codebook_keys": ed.codebook.n_keys,
        "windows": len(wins),
        **out,
        "ratio_regions_over_whole": round(out["regions"]["median_s"] / out["whole"]["median_s"], 2),
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for k, v in report.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
