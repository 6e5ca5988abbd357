#!/usr/bin/env python
"""Build `sample_edits/scenes/`: scenes edits and probes for the README demo's I-Gen case.

    python scripts/make_sample_scenes.py [--seed 3] [--n-edits 8] [--n-loc 4] [--out DIR]

(`--n-edits 40 --n-loc 40 --out DIR` measures the CLI path at evaluate's size.)

Everything comes from the scenes generator (`reasonedit_cli.scenes.build_scenes`, the
protocol of `evaluate --dataset scenes`) on `--seed` (3: never used to train or tune
anything) with the bundled scenes VLM: the first `--n-edits` mistakes of the unedited
model become the edits (generator order, none left out), each edit's I-Gen probe (the
same object in another scene, asked the edit's question) and the first `--n-loc`
locality probes (scenes holding none of the edited objects) become the probes.

Then it measures what the README demo runs, through the same code as `add-edit` and
`ask` (an `Editor` with their defaults): every probe unedited, edited, and edited with
`--no-objects`; and picks the demo's case by a fixed rule, written to `case.json`:

* the I-Gen case: the first I-Gen probe (file order) that the unedited model answers
  wrongly, the edited model rightly with the fact coming from the object index, and the
  edited model with `--no-objects` wrongly again;
* the unrelated scene: the first locality probe that retrieves nothing and keeps its
  (right) unedited answer.

`case.json` also records the I-Gen retrieval and accuracy over all the sample's I-Gen
probes, next to the rates `evaluate` measured on 40 edits (seeds 3 / 5).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "sample_edits" / "scenes"


def main() -> None:
    from reasonedit_cli import evaluation as E
    from reasonedit_cli.editor import Editor
    from reasonedit_cli.edits import decode_image, read_edits_jsonl
    from reasonedit_cli.scenes import build_scenes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--n-edits", type=int, default=8)
    ap.add_argument("--n-loc", type=int, default=4)
    ap.add_argument("--out", type=Path, default=OUT, help="default: sample_edits/scenes")
    args = ap.parse_args()
    out = args.out

    probe_ed = Editor(None, model="scenes")
    gen = E.Generations(probe_ed.vlm, 16)
    edits, probes, _ = build_scenes(E.bytes_asker(gen), n_edits=args.n_edits, seed=args.seed)

    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    names: dict[bytes, str] = {}

    def image(data: bytes, name: str) -> str:
        if data not in names:
            names[data] = f"images/{name}.png"
            (out / names[data]).write_bytes(data)
        return names[data]

    old_ids = [e.ensure_id() for e in edits]  # what the probes name
    edit_rows = []
    for n, e in enumerate(edits):
        eid = f"scene{n}-{e.answer}"
        edit_rows.append(
            {
                "id": eid,
                "image": image(e.image_bytes, f"edit{n}"),
                "question": e.question,
                "answer": e.answer,
                "reasoning": list(e.reasoning),
            }
        )
    probe_rows = []
    for p in (x for x in probes if x.kind == "i_gen"):
        k = old_ids.index(p.edit_id)
        row = {"image": image(p.image_bytes, f"igen{k}"), "question": p.question}
        probe_rows.append(
            {**row, "answer": p.answer, "kind": "i_gen", "edit_id": edit_rows[k]["id"]}
        )
    for n, p in enumerate([x for x in probes if x.kind == "loc"][: args.n_loc]):
        row = {"image": image(p.image_bytes, f"loc{n}"), "question": p.question}
        probe_rows.append({**row, "answer": p.answer, "kind": "loc"})
    for name, rows in (("edits.jsonl", edit_rows), ("probes.jsonl", probe_rows)):
        with open(out / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    # measure what the demo runs: add-edit's and ask's defaults
    with tempfile.TemporaryDirectory() as tmp:
        ed = Editor(Path(tmp) / "cb", model="scenes", create=True)
        report = ed.add_edits(read_edits_jsonl(str(out / "edits.jsonl"))[0], batch_size=16)
        imgs = [decode_image((out / r["image"]).read_bytes(), r["image"]) for r in probe_rows]
        qs = [r["question"] for r in probe_rows]
        plain = ed.ask(imgs, qs, no_edit=True)
        edited = ed.ask(imgs, qs)
        ed.objects = False
        whole = ed.ask(imgs, qs)
    rows = []
    for r, a, b, c in zip(probe_rows, plain, edited, whole):
        obj = b.retrieval.objects if b.retrieval else None
        rows.append(
            {
                **{k: r[k] for k in ("image", "question", "answer", "kind")},
                "edit_id": r.get("edit_id"),
                "unedited": a.answer,
                "edited": b.answer,
                "edited_no_objects": c.answer,
                "retrieved": b.retrieval.edit_ids if b.retrieval else [],
                "from_object_index": (obj.edit_ids if obj and not obj.rejected else []),
            }
        )
    ok = E.exact_match
    igen = [x for x in rows if x["kind"] == "i_gen"]
    case = next(
        (
            x
            for x in igen
            if not ok(x["unedited"], x["answer"])
            and ok(x["edited"], x["answer"])
            and x["edit_id"] in x["from_object_index"]
            and not ok(x["edited_no_objects"], x["answer"])
        ),
        None,
    )
    unrelated = next(
        (
            x
            for x in rows
            if x["kind"] == "loc" and not x["retrieved"] and ok(x["edited"], x["unedited"])
        ),
        None,
    )
    summary = {
        "seed": args.seed,
        "edits": len(edit_rows),
        "object_keys": report.object_keys,
        "i_gen_probes": len(igen),
        "i_gen_retrieved": sum(x["edit_id"] in x["retrieved"] for x in igen),
        "i_gen_right": {
            "unedited": sum(ok(x["unedited"], x["answer"]) for x in igen),
            "edited": sum(ok(x["edited"], x["answer"]) for x in igen),
            "edited_no_objects": sum(ok(x["edited_no_objects"], x["answer"]) for x in igen),
        },
        "loc_right": {
            "unedited": sum(ok(x["unedited"], x["answer"]) for x in rows if x["kind"] == "loc"),
            "edited": sum(ok(x["edited"], x["answer"]) for x in rows if x["kind"] == "loc"),
        },
        "evaluate_i_gen_retrieval_seeds_3_5": [0.55, 0.725],
        "case": case,
        "unrelated": unrelated,
        "rule": "case: the first i_gen probe the unedited model gets wrong, the edited one "
        "right through the object index, and the edited one with --no-objects wrong; "
        "unrelated: the first loc probe that retrieves nothing and keeps its answer",
        "probes": rows,
    }
    (out / "case.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "probes"}, indent=2))


if __name__ == "__main__":
    main()
