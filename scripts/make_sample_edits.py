"""Build `sample_edits/` from the easy-vqa test split and the bundled model.

Picks test images whose shape or colour the unedited model gets wrong, writes them as
edits with human-style reasoning (hand-written per answer below), and writes probes:
`t_gen` (same image, rephrased question), `i_gen` (another image with the same
shape/colour that the model also gets wrong), `r_gen` (a yes/no question that follows from
the reasoning) and `loc` (unrelated images the model answers correctly).

    python scripts/make_sample_edits.py [--model DIR] [--n-shape 3] [--n-color 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "sample_edits"

SHAPE_REASONS = {
    "triangle": "The shape has three straight sides and three corners. "
    "A shape with three corners is a triangle.",
    "circle": "The shape is perfectly round and has no corners. "
    "A round shape without corners is a circle.",
    "rectangle": "The shape has four straight sides and four right-angled corners. "
    "A shape with four right angles is a rectangle.",
}
COLOR_REASONS = {
    "red": "The shape has the colour of a ripe tomato. Ripe tomatoes are red.",
    "green": "The shape has the colour of fresh grass. Fresh grass is green.",
    "blue": "The shape has the colour of a clear sky. A clear sky is blue.",
    "yellow": "The shape has the colour of a lemon. Lemons are yellow.",
    "teal": "The shape is a blue-green colour like a peacock's feather. That colour is teal.",
    "brown": "The shape has the colour of chocolate. Chocolate is brown.",
    "black": "The shape is as dark as coal. Coal is black.",
    "gray": "The shape has the colour of ash. Ash is gray.",
}
SHAPE_Q = "what shape is in the image?"
SHAPE_T = "what shape does the image contain?"
COLOR_Q = "what color is the shape?"
COLOR_T = "what is the color of the shape?"


def main() -> None:
    from easy_vqa import get_test_image_paths, get_test_questions
    from PIL import Image

    from reasonedit_cli.easyvqa import image_attributes
    from reasonedit_cli.evaluation import exact_match
    from reasonedit_cli.vlm import DEFAULT_MODEL, VLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n-shape", type=int, default=3)
    ap.add_argument("--n-color", type=int, default=3)
    ap.add_argument("--n-loc", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    questions, answers, image_ids = get_test_questions()
    paths = get_test_image_paths()
    # shape and colour of every test image, read off all its questions (yes/no ones too)
    truth = image_attributes(questions, answers, image_ids)
    ids = sorted(i for i, t in truth.items() if "shape" in t and "color" in t)
    vlm = VLM(args.model, device="cpu")
    images = {i: Image.open(paths[i]).convert("RGB") for i in ids}
    shape_ans = dict(
        zip(ids, vlm.generate([images[i] for i in ids], [SHAPE_Q] * len(ids), max_new_tokens=4))
    )
    color_ans = dict(
        zip(ids, vlm.generate([images[i] for i in ids], [COLOR_Q] * len(ids), max_new_tokens=4))
    )

    def wrong(i: int, field: str) -> bool:
        ans = shape_ans if field == "shape" else color_ans
        return not exact_match(ans[i], truth[i][field])

    # only this script's files: sample_edits/scenes/ is make_sample_scenes.py's
    shutil.rmtree(OUT / "images", ignore_errors=True)
    for name in ("edits.jsonl", "probes.jsonl"):
        (OUT / name).unlink(missing_ok=True)
    (OUT / "images").mkdir(parents=True)
    edits, probes, used = [], [], set()

    def add_image(i: int) -> str:
        dst = OUT / "images" / f"{i}.png"
        if not dst.exists():
            shutil.copyfile(paths[i], dst)
        used.add(i)
        return f"images/{i}.png"

    for field, n, reasons, q, tq in (
        ("shape", args.n_shape, SHAPE_REASONS, SHAPE_Q, SHAPE_T),
        ("color", args.n_color, COLOR_REASONS, COLOR_Q, COLOR_T),
    ):
        candidates = [i for i in ids if wrong(i, field) and i not in used]
        rng.shuffle(candidates)
        picked_values: set[str] = set()
        for i in candidates:
            value = truth[i][field]
            if value in picked_values or len(picked_values) >= n:
                continue
            others = [
                j for j in candidates if j != i and truth[j][field] == value and j not in used
            ]
            if not others:
                continue
            picked_values.add(value)
            edit_id = f"{field}-{value}-{i}"
            edits.append(
                {
                    "id": edit_id,
                    "image": add_image(i),
                    "question": q,
                    "answer": value,
                    "reasoning": reasons[value],
                }
            )
            probes.append(
                {
                    "image": f"images/{i}.png",
                    "question": tq,
                    "answer": value,
                    "kind": "t_gen",
                    "edit_id": edit_id,
                }
            )
            j = others[0]
            probes.append(
                {
                    "image": add_image(j),
                    "question": q,
                    "answer": value,
                    "kind": "i_gen",
                    "edit_id": edit_id,
                }
            )
            rq = f"is there a {value} shape?" if field == "color" else f"is there a {value}?"
            probes.append(
                {
                    "image": f"images/{i}.png",
                    "question": rq,
                    "answer": "yes",
                    "kind": "r_gen",
                    "edit_id": edit_id,
                }
            )
    right = [i for i in ids if not wrong(i, "shape") and not wrong(i, "color") and i not in used]
    rng.shuffle(right)
    for k, i in enumerate(right[: args.n_loc]):
        field = "shape" if k % 2 == 0 else "color"
        probes.append(
            {
                "image": add_image(i),
                "question": SHAPE_Q if field == "shape" else COLOR_Q,
                "answer": truth[i][field],
                "kind": "loc",
            }
        )
    (OUT / "edits.jsonl").write_text("".join(json.dumps(e) + "\n" for e in edits))
    (OUT / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    print(f"wrote {len(edits)} edits and {len(probes)} probes to {OUT}")


if __name__ == "__main__":
    main()
