"""Visual evidence patch search (docs/method.md#patches): grid, question, selection, batching.

The tiny random LLaVA answers p_yes ~0.49 for every crop, so at the design threshold of
0.5 nothing passes and a batched-vs-naive comparison would be vacuous. The model tests
therefore also run with a threshold placed inside the observed p_yes range (asserting
that some crops pass and some fail); a deterministic fake VLM adds passing crops,
exact loss ties and several items per call, cheaply.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import shape_image
from PIL import Image, ImageDraw

from reasonedit_cli import patches as P

SENTENCES_3 = ["The shape is red.", "A shape with no corners is a circle.", "The sky is blue."]


# ------------------------------------------------------------------------------ grid
def _size_counts(width: int, height: int) -> Counter:
    return Counter((c.width, c.height) for c in P.grid_candidates(width, height))


def test_grid_counts_square() -> None:
    counts = _size_counts(64, 64)
    assert counts == {(1, 1): 9, (1, 2): 6, (2, 1): 6, (2, 2): 4, (2, 3): 2, (3, 2): 2}
    assert sum(counts.values()) == 29


def test_grid_counts_landscape_drops_wide() -> None:
    # (width, height) in cells: a landscape image keeps crops no wider than tall in cells
    counts = _size_counts(96, 64)
    assert counts == {(1, 1): 9, (1, 2): 6, (2, 2): 4, (2, 3): 2}


def test_grid_counts_portrait_drops_tall() -> None:
    counts = _size_counts(48, 80)
    assert counts == {(1, 1): 9, (2, 1): 6, (2, 2): 4, (3, 2): 2}


def test_orientation_filter() -> None:
    assert P.orientation(10, 20) == "portrait"
    assert P.orientation(20, 10) == "landscape"
    assert P.orientation(7, 7) == "square"
    assert P.allowed_sizes(20, 10) == [(1, 1), (1, 2), (2, 2), (2, 3)]
    assert P.allowed_sizes(10, 20) == [(1, 1), (2, 1), (2, 2), (3, 2)]
    assert P.allowed_sizes(7, 7) == list(P.CROP_SIZES)


@pytest.mark.parametrize(
    ("size", "dropped"),
    [((600, 300), {(400, 100), (600, 200)}), ((300, 600), {(100, 400), (200, 600)})],
)
def test_crops_stay_near_square_in_pixels(size, dropped) -> None:
    """REFERENCE row 1: a 600x300 image has 200x100-px cells; the crops 2 cells across
    by 1 down (400x100, 4:1) and 3 by 2 (600x200, 3:1) are dropped, so no kept crop is
    more elongated than one cell (2:1). The portrait image is the transpose."""
    grid = P.crop_grid(Image.new("RGB", size, "white"))
    pixel_sizes = {(c.box[2] - c.box[0], c.box[3] - c.box[1]) for c in grid.candidates}
    assert pixel_sizes.isdisjoint(dropped)
    assert max(max(w / h, h / w) for w, h in pixel_sizes) == 2.0
    assert len(grid.candidates) == 9 + 6 + 4 + 2
    for crop in grid.crops:  # cut from the 512-px copy: same shapes, scaled
        assert max(crop.size[0] / crop.size[1], crop.size[1] / crop.size[0]) < 2.05
    # the reference's kernel names (rows x cols) of what is kept, in enumeration order
    kept = list(dict.fromkeys(f"{c.height}x{c.width}" for c in grid.candidates))
    assert kept == (
        ["1x1", "2x1", "2x2", "3x2"] if size[0] > size[1] else ["1x1", "1x2", "2x2", "2x3"]
    )


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (48, 80), (1200, 800), (5, 4), (3, 3)])
def test_boxes_inside_image_and_never_whole(size: tuple[int, int]) -> None:
    w, h = size
    cands = P.grid_candidates(w, h)
    assert cands
    boxes = [c.box for c in cands]
    assert len(set(boxes)) == len(boxes)
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert all(isinstance(v, int) for v in (x0, y0, x1, y1))
        assert (x0, y0, x1, y1) != (0, 0, w, h)


def test_large_image_maps_back_to_original_pixels() -> None:
    # A 1200x800 image whose centre cell is solid red: the crop grid is cut from a
    # 512x341 copy, but boxes must be thirds of the ORIGINAL image and each crop must
    # show exactly the region its box names.
    img = Image.new("RGB", (1200, 800), "white")
    ImageDraw.Draw(img).rectangle((400, 267, 799, 532), fill="red")
    grid = P.crop_grid(img)
    assert grid.image_size == (1200, 800)
    assert grid.resized_size == (512, 341)
    assert grid.scale == pytest.approx(512 / 1200)
    xs = {v for c in grid.candidates for v in (c.box[0], c.box[2])}
    ys = {v for c in grid.candidates for v in (c.box[1], c.box[3])}
    assert xs == {0, 400, 800, 1200}
    assert ys == {0, 267, 533, 800}
    for cand, crop in zip(grid.candidates, grid.crops):
        bw, bh = cand.box[2] - cand.box[0], cand.box[3] - cand.box[1]
        assert abs(crop.width - bw * grid.scale) <= 1
        assert abs(crop.height - bh * grid.scale) <= 1
        assert max(crop.size) <= 512
    centre = next(i for i, c in enumerate(grid.candidates) if c.box == (400, 267, 800, 533))
    arr = np.asarray(grid.crops[centre]).astype(float)
    assert arr[2:-2, 2:-2, 0].mean() > 250 and arr[2:-2, 2:-2, 1].mean() < 5
    corner = next(i for i, c in enumerate(grid.candidates) if c.box == (0, 0, 400, 267))
    assert np.asarray(grid.crops[corner])[:-2, :-2].min() > 250  # white (edge: resampling)


def test_small_image_is_not_resized_and_crops_match_boxes() -> None:
    img = Image.new("L", (90, 60), 0)  # a grayscale edit image: crops come out RGB
    grid = P.crop_grid(img)
    assert grid.resized_size == (90, 60) and grid.scale == 1.0
    for cand, crop in zip(grid.candidates, grid.crops):
        assert crop.mode == "RGB"
        assert crop.size == (cand.box[2] - cand.box[0], cand.box[3] - cand.box[1])


# -------------------------------------------------------------------------- question
@pytest.mark.parametrize(
    ("sentence", "question"),
    [
        ("The sign is red.", "Does the image show the sign is red?"),
        ("  Grass is green!  ", "Does the image show grass is green?"),
        (
            "A shape with three corners is a triangle.",
            "Does the image show a shape with three corners is a triangle?",
        ),
        ("NASA built the rocket.", "Does the image show NASA built the rocket?"),
        ("TV screens are rectangles", "Does the image show TV screens are rectangles?"),
        ("I see a circle.", "Does the image show I see a circle?"),
        ("iPhone screens are rectangles.", "Does the image show iPhone screens are rectangles?"),
        ("Is it blue?", "Does the image show is it blue?"),
        ("...", "Does the image show anything?"),
    ],
)
def test_sentence_question(sentence: str, question: str) -> None:
    assert P.sentence_question(sentence) == question


# ------------------------------------------------------------------------- selection
def test_select_none_passing_is_empty() -> None:
    assert P.select_crops([1, 1, 2], [0.1, 0.5, 0.49], [1.0, 0.5, 0.2]) == []
    assert P.select_crops([], [], []) == []


def test_select_threshold_is_strict_and_failing_losses_ignored() -> None:
    # p_yes == 0.5 does not pass; the failing crop's NaN/low loss is never considered.
    sel = P.select_crops([1, 1, 1], [0.5, 0.9, 0.2], [0.0, 3.0, float("nan")])
    assert sel == [1]


def test_select_smallest_size_ties_plus_top_k() -> None:
    sizes = [1, 1, 1, 2, 4, 6]
    p_yes = [0.9, 0.8, 0.3, 0.7, 0.6, 0.95]
    loss = [2.0, 2.0 + 1e-7, 0.1, 1.5, 1.0, 0.5]
    # (a) size-1 passing crops 0 and 1 tie (within tolerance) at the lowest loss;
    #     crop 2 has the lowest loss of all but fails verification.
    # (b) top_k=1: the lowest-loss passing crop is 5 (size 6).
    assert P.select_crops(sizes, p_yes, loss, top_k=1) == [5, 0, 1]
    assert P.select_crops(sizes, p_yes, loss, top_k=2) == [5, 4, 0, 1]
    assert P.select_crops(sizes, p_yes, loss, top_k=0) == [0, 1]
    # top_k larger than the passing set: every passing crop, by loss.
    assert P.select_crops(sizes, p_yes, loss, top_k=10) == [5, 4, 3, 0, 1]


def test_select_tie_tolerance_is_tight() -> None:
    sizes = [1, 1, 1]
    p_yes = [0.9, 0.9, 0.9]
    sel = P.select_crops(sizes, p_yes, [1.0, 1.001, 1.0], top_k=1, tie="tolerance")
    assert sel == [0, 2]
    sel = P.select_crops(sizes, p_yes, [1.0, 1.0 + 1e-6, 2.0], top_k=1, tie="tolerance")
    assert sel == [0, 1]


def test_select_ties_at_two_decimals_by_default() -> None:
    """REFERENCE row 2: losses equal to 2 decimals tie (Python round, half to even)."""
    sizes = [1, 1, 1, 2, 2]
    p_yes = [0.9, 0.9, 0.9, 0.9, 0.9]
    loss = [1.004, 0.996, 1.006, 0.9951, 0.99]
    # rounded: 1.0, 1.0, 1.01, 1.0, 0.99 -> (a) size-1 crops 0 and 1 tie at 1.00;
    # (b) top_k=2 of the stable sort by rounded loss: 4 (0.99), then 0 (1.00, first index)
    assert P.select_crops(sizes, p_yes, loss, top_k=2) == [4, 0, 1]
    assert P.select_crops(sizes, p_yes, loss, top_k=2, tie="round") == [4, 0, 1]
    # the old tolerance sees no tie: crop 1 alone is best of size 1, then 4 and 3 by loss
    assert P.select_crops(sizes, p_yes, loss, top_k=2, tie="tolerance") == [4, 3, 1]
    assert P.rounded_loss(0.125) == 0.12 and P.rounded_loss(2.675) == 2.67  # binary value
    with pytest.raises(ValueError):
        P.select_crops(sizes, p_yes, loss, tie="two")


def test_select_top_k_overlapping_with_ties() -> None:
    # The best crop overall is also the smallest: the union has no duplicates.
    assert P.select_crops([1, 2, 2], [0.9, 0.9, 0.9], [0.1, 0.2, 0.3], top_k=2) == [0, 1]


def test_tie_order_goes_by_index_despite_float_noise() -> None:
    losses = np.array([3.0, 1.0 + 2e-7, 1.0, 1.0 - 1e-7, 0.5])
    assert P._tie_ordered([0, 1, 2, 3, 4], losses) == [4, 1, 2, 3, 0]


def test_negative_top_k_is_rejected() -> None:
    with pytest.raises(ValueError):
        P.select_crops([1], [0.9], [1.0], top_k=-1)


# ------------------------------------------------------ batched == naive (fake VLM)
class FakeVLM:
    """Deterministic stand-in: p_yes from how red the crop is, loss from its darkness.

    Blank crops get bit-identical losses (exact ties); batches are counted like the
    real backend counts forward passes.
    """

    def __init__(self) -> None:
        self.forward_calls = 0

    def _count(self, n: int, batch_size: int) -> None:
        self.forward_calls += math.ceil(n / batch_size)

    def yes_probability(self, images, prompts, *, batch_size=16):
        self._count(len(prompts), batch_size)
        out = []
        for img, prompt in zip(images, prompts):
            a = np.asarray(img, dtype=np.float32) / 255
            red = float(((a[..., 0] > 0.6) & (a[..., 1] < 0.4)).mean())
            bonus = 0.2 if "red" in prompt else -0.1
            out.append(min(1.0, red * 2 + bonus + 0.35))
        return np.asarray(out, np.float32)

    def answer_loss(self, images, prompts, answers, *, batch_size=16):
        self._count(len(prompts), batch_size)
        out = []
        for img, ans in zip(images, answers):
            a = np.asarray(img, dtype=np.float32) / 255
            out.append(round(float(a.mean()), 2) * 3 + 0.01 * len(ans))
        return np.asarray(out, np.float32)


def _fake_items(tmp_path: Path) -> list[tuple[Image.Image, list[str]]]:
    return [
        (
            Image.open(shape_image(tmp_path / "a.png", "circle", "red", size=64)),
            SENTENCES_3,
        ),
        (
            Image.open(
                shape_image(tmp_path / "b.png", "rectangle", "red", size=90, where=(0, 0, 40, 40))
            ).resize((120, 90)),
            ["There is a red square.", "It is small."],
        ),
        (
            Image.open(shape_image(tmp_path / "c.png", "triangle", "red", size=60)).resize(
                (60, 100)
            ),
            ["The triangle is red."],
        ),
        (Image.new("RGB", (40, 40), "white"), ["Nothing is drawn here."]),
        (Image.new("RGB", (50, 50), "white"), []),
        (_two_squares(), ["Two red squares."]),
    ]


def _two_squares() -> Image.Image:
    """Identical red cells at the top-left and bottom-right: an exact loss tie."""
    img = Image.new("RGB", (90, 90), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 29, 29), fill="red")
    draw.rectangle((60, 60, 89, 89), fill="red")
    return img


def test_batched_equals_naive_fake_vlm(tmp_path: Path) -> None:
    items = _fake_items(tmp_path)
    fake = FakeVLM()
    for top_k in (0, 1, 3):
        batched = P.search_patches(fake, items, top_k=top_k, batch_size=7)
        naive = P.search_patches_naive(fake, items, top_k=top_k)
        assert batched == naive
    assert sum(len(boxes) for item in batched for boxes in item) > 0  # not vacuous
    assert batched[3] == [[]]  # a blank image: no crop passes
    assert batched[4] == []  # an edit without sentences
    # Identical crops tie exactly: with top_k=0 both red cells are chosen, in order.
    assert P.search_patches(fake, items, top_k=0)[5] == [[[0, 0, 30, 30], [60, 60, 90, 90]]]


def test_batched_forward_calls_fake_vlm(tmp_path: Path) -> None:
    items = _fake_items(tmp_path)
    fake = FakeVLM()
    detail = P.search_patches_detailed(fake, items, batch_size=16)
    n_pairs = sum(len(r.candidates) * len(r.sentences) for r in detail)
    n_scored = sum(int(np.isfinite(s.loss).sum()) for r in detail for s in r.sentences)
    assert 0 < n_scored < n_pairs  # only passing pairs are scored
    assert fake.forward_calls == math.ceil(n_pairs / 16) + math.ceil(n_scored / 16)
    data = detail[0].to_dict(candidates=True)
    assert data["n_candidates"] == 29 and len(data["sentences"]) == 3
    assert all(len(s["candidates"]) == 29 for s in data["sentences"])


# ---------------------------------------------------- batched == naive (tiny LLaVA)
@pytest.fixture(scope="module")
def vlm(tiny_llava):
    """The tiny LLaVA on one thread: tiny matmuls are ~30x slower with threads that
    fight a busy CPU, and the naive reference makes hundreds of calls."""
    import torch

    from reasonedit_cli.vlm import VLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield VLM(str(tiny_llava), device="cpu")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_items(tmp_path_factory) -> list[tuple[Image.Image, list[str]]]:
    d = tmp_path_factory.mktemp("patch_images")
    square = Image.open(shape_image(d / "sq.png", "circle", "red", size=64)).convert("RGB")
    wide = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(wide).polygon([(60, 60), (78, 20), (94, 60)], fill="blue")
    tall = Image.new("RGB", (48, 80), "white")
    ImageDraw.Draw(tall).rectangle((4, 4, 30, 30), fill="green")
    return [
        (square, SENTENCES_3),
        (wide, ["The triangle is blue.", "A triangle has three corners."]),
        (tall, ["The rectangle is green."]),
    ]


@pytest.fixture(scope="module")
def naive_runs(vlm, model_items):
    """The literal algorithm per item (complete p_yes/loss tables) and its call count."""
    runs = []
    for item in model_items:
        vlm.forward_calls = 0
        (detail,) = P.search_patches_naive_detailed(vlm, [item])
        runs.append((detail, vlm.forward_calls))
    return runs


def _mid_threshold(p_yes: np.ndarray) -> float:
    """A threshold inside the observed p_yes range, away from any value (no flip-flops)."""
    vals = np.unique(np.round(p_yes, 6))
    gaps = np.diff(vals)
    mid = len(vals) // 2
    # the widest gap among the middle half of the values
    lo, hi = len(vals) // 4, max(len(vals) // 4 + 1, 3 * len(vals) // 4)
    k = lo + int(np.argmax(gaps[lo:hi])) if len(gaps) else mid
    assert gaps[k] > 1e-4
    return float(vals[k] + gaps[k] / 2)


@pytest.mark.parametrize("threshold", ["design", "mid"])
def test_batched_equals_naive_tiny_llava(vlm, model_items, naive_runs, threshold) -> None:
    all_p = np.concatenate([s.p_yes for d, _ in naive_runs for s in d.sentences])
    thr = P.PASS_THRESHOLD if threshold == "design" else _mid_threshold(all_p)
    for top_k in (1, 2):
        batched = P.search_patches_detailed(vlm, model_items, top_k=top_k, threshold=thr)
        passing = failing = 0
        for got, (ref, _) in zip(batched, naive_runs):
            assert [c.box for c in got.candidates] == [c.box for c in ref.candidates]
            for s_got, s_ref in zip(got.sentences, ref.sentences):
                np.testing.assert_allclose(s_got.p_yes, s_ref.p_yes, atol=1e-5)
                scored = np.isfinite(s_got.loss)
                np.testing.assert_allclose(s_got.loss[scored], s_ref.loss[scored], atol=1e-4)
                want = P.select_crops(
                    [c.size for c in ref.candidates],
                    s_ref.p_yes,
                    s_ref.loss,
                    top_k=top_k,
                    threshold=thr,
                )
                assert s_got.selected == want
                assert s_got.boxes == [list(ref.candidates[i].box) for i in want]
                passing += int((s_ref.p_yes > thr).sum())
                failing += int((s_ref.p_yes <= thr).sum())
        if threshold == "mid":  # the comparison must not be vacuous
            assert passing > 0 and failing > 0
            assert any(got.boxes != [[]] * len(got.sentences) for got in batched)
        else:  # the random model is unsure of everything: nothing passes at 0.5
            assert all(b == [] for got in batched for b in got.boxes)


def test_batched_uses_10x_fewer_forward_calls(vlm, model_items, naive_runs) -> None:
    item = model_items[0]  # one edit, 3 sentences, 29 crops
    _, naive_calls = naive_runs[0]
    assert naive_calls == 2 * 29 * 3
    vlm.forward_calls = 0
    P.search_patches(vlm, [item], threshold=0.0)  # worst case: every pair is scored
    batched_calls = vlm.forward_calls
    assert batched_calls == 2 * math.ceil(29 * 3 / P.DEFAULT_BATCH_SIZE)
    assert naive_calls >= 10 * batched_calls


# ------------------------------------- issue 4: the bundled model finds the named detail
# A sample-like edit on an easy-vqa test image (never trained on) whose shape sits in one
# part of a larger image: the 64x64 image pasted into one cell of a 3x3-cell canvas filled
# with its own background colour. The reasoning names the shape's colour or form; the
# automatic search on the bundled demo VLM must choose a crop covering that part.
# (image id in the easy-vqa test split, its colour, its shape, (column, row) of the cell)
BUNDLED_CASES = [
    (12, "red", "triangle", (0, 0)),
    (6, "blue", "circle", (2, 0)),
    (27, "blue", "rectangle", (2, 2)),
]


def _composed(image_id: int, cell: tuple[int, int]) -> tuple[Image.Image, tuple[int, ...]]:
    """The test image in `cell` of a 192x192 canvas of its background; the shape's bbox."""
    from easy_vqa import get_test_image_paths

    img = Image.open(get_test_image_paths()[image_id]).convert("RGB")
    arr = np.asarray(img)
    background = tuple(int(v) for v in np.median(arr.reshape(-1, 3), axis=0))
    canvas = Image.new("RGB", (3 * img.width, 3 * img.height), background)
    canvas.paste(img, (cell[0] * img.width, cell[1] * img.height))
    mask = np.abs(np.asarray(canvas).astype(int) - background).sum(-1) > 120
    ys, xs = np.nonzero(mask)
    return canvas, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _contains(box, inner) -> bool:
    return box[0] <= inner[0] and box[1] <= inner[1] and box[2] >= inner[2] and box[3] >= inner[3]


def _overlaps(box, inner) -> bool:
    return box[0] < inner[2] and inner[0] < box[2] and box[1] < inner[3] and inner[1] < box[3]


@pytest.fixture(scope="module")
def bundled_vlm():
    import torch

    from reasonedit_cli.vlm import DEFAULT_MODEL, VLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield VLM(DEFAULT_MODEL, device="cpu")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("image_id", "colour", "shape", "cell"), BUNDLED_CASES)
def test_bundled_model_finds_the_part_the_reasoning_names(
    bundled_vlm, image_id, colour, shape, cell
) -> None:
    canvas, bbox = _composed(image_id, cell)
    cell_box = (cell[0] * 64, cell[1] * 64, cell[0] * 64 + 64, cell[1] * 64 + 64)
    assert _contains(cell_box, bbox)  # the shape lies in that third of the image
    sentences = [f"The shape is {colour}.", f"The shape is a {shape}."]
    (found,) = P.search_patches_detailed(bundled_vlm, [(canvas, sentences)])
    for sp in found.sentences:
        assert sp.boxes, f"{sp.question}: no crop passed verification"
        # the best crop holds the whole shape; every chosen crop shows part of it
        assert _contains(sp.boxes[0], bbox), (sp.question, sp.boxes, bbox)
        assert all(_overlaps(b, bbox) for b in sp.boxes), (sp.question, sp.boxes, bbox)
        # crops of empty background fail verification
        blank = [i for i, c in enumerate(found.candidates) if not _overlaps(c.box, bbox)]
        assert blank and all(sp.p_yes[i] <= P.PASS_THRESHOLD for i in blank), sp.question
    # the smallest passing crop of the colour sentence is the shape's own cell
    assert list(cell_box) in found.sentences[0].boxes


def test_bundled_model_add_edit_json_reports_the_crop(tmp_path) -> None:
    """The same through `add-edit --patches auto --json` on the default model."""
    import json

    from typer.testing import CliRunner

    from reasonedit_cli.cli import app

    image_id, colour, _shape, cell = BUNDLED_CASES[0]
    canvas, bbox = _composed(image_id, cell)
    canvas.save(tmp_path / "edit.png")
    edit = {
        "id": "top-left",
        "image": "edit.png",
        "question": "what color is the shape?",
        "answer": colour,
        "reasoning": f"The shape is {colour}.",
    }
    (tmp_path / "edits.jsonl").write_text(json.dumps(edit) + "\n")
    result = CliRunner().invoke(
        app,
        [
            "add-edit",
            "--from",
            str(tmp_path / "edits.jsonl"),
            "--codebook",
            str(tmp_path / "cb"),
            "--device",
            "cpu",
            "--patches",
            "auto",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    (boxes,) = json.loads(result.stdout)["boxes"]["top-left"]
    assert boxes and _contains(boxes[0], bbox), boxes
