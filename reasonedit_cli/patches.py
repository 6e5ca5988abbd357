"""Visual evidence patches: find the image region each reasoning sentence talks about.

docs/method.md#patches, step 2. When an edit gives no box for a sentence, the VLM itself locates the
evidence:

1. **Grid.** A copy of the image is resized so its longer side is at most 512 px and cut
   into a 3x3 grid. Candidate crops are rectangles of grid cells of sizes (width x height
   in cells) 1x1, 2x1, 1x2, 2x2, 3x2 and 2x3 at every position -- never the whole image.
   Crops are kept near-square *in pixels*, as the authors' code does: a landscape image's
   cells are already wider than tall, so it drops the crops spanning more cells across
   than down (2x1, 3x2 here; `1x2`/`2x3` in the reference's rows x cols naming); a
   portrait image drops those spanning more cells down than across. (Before 0.2 this
   was the other way round, following an error in the design notes.)
2. **Verify.** `p_yes` of `Does the image show <sentence as a question>?` on the crop;
   crops with `p_yes > 0.5` pass.
3. **Score.** The mean token loss of the sentence as the answer to `Describe this image.`
   on the crop (lower is better).
4. **Select** (per sentence) the union of (a) every passing crop tied for the lowest loss
   among the smallest passing crop size and (b) the `top_k` lowest-loss passing crops.
   Losses are compared rounded to 2 decimals (`TIE_DECIMALS`), as the reference does.
   A sentence with no passing crop gets no patch; it keeps its whole-image key.

The literal algorithm costs two VLM forwards per crop per sentence (`search_patches_naive`,
kept as the reference the tests compare against). `search_patches` produces every crop
image once, builds the cartesian list crop x sentence for all edits of a call, verifies it
in large batches, and then scores only the pairs that passed verification -- usually more
than an order of magnitude fewer forward calls (see `benchmarks/bench_patches.py`).

Only PIL, numpy and the `VLM` object are used here; torch stays inside `VLM`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from reasonedit_cli.backend import VLMBackend as VLM  # any backend (VLM, RemoteVLM)

#: The longer side of the copy the grid is cut from (docs/method.md#patches).
MAX_SIDE = 512
#: Cells per side of the grid.
GRID = 3
#: Crop sizes as (width, height) in grid cells, in the order candidates are enumerated:
#: the reference's kernel order 1x1, 1x2, 2x1, 2x2, 2x3, 3x2 in its rows x cols naming,
#: so equal rounded losses break ties the same way.
CROP_SIZES: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2), (2, 2), (3, 2), (2, 3))
#: The prompt a sentence is scored against as an answer.
DESCRIBE_PROMPT = "Describe this image."
#: A crop passes verification when p_yes is strictly above this.
PASS_THRESHOLD = 0.5
#: Losses equal when rounded to this many decimals are tied (the reference's rule; the
#: default tie rule "round", docs/reference.md row 2).
TIE_DECIMALS = 2
#: Tie rules: "round" (TIE_DECIMALS, default) or "tolerance" (the 0.1 rule: np.isclose
#: with TIE_RTOL / TIE_ATOL, wider than the ~1e-6 float32 noise of batching).
TIE_RULES = ("round", "tolerance")
DEFAULT_TIE_RULE = "round"
TIE_RTOL = 1e-5
TIE_ATOL = 1e-5
#: Default batch size of the batched search: big batches are what makes it cheap.
DEFAULT_BATCH_SIZE = 64


# ------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class Candidate:
    """One candidate crop: where it is in grid cells and in original image pixels."""

    col: int  # left cell (0..2)
    row: int  # top cell (0..2)
    width: int  # in cells
    height: int  # in cells
    box: tuple[int, int, int, int]  # [x0, y0, x1, y1] in ORIGINAL image pixels

    @property
    def size(self) -> int:
        """Area in cells; the selection rule prefers the smallest passing size."""
        return self.width * self.height


@dataclass
class CropGrid:
    """The candidate crops of one image and their pixels (cut from the resized copy)."""

    image_size: tuple[int, int]  # original (width, height)
    resized_size: tuple[int, int]  # (width, height) of the copy the crops are cut from
    candidates: list[Candidate]
    crops: list[Image.Image]  # one image per candidate, produced once

    @property
    def scale(self) -> float:
        """resized / original (1.0 when the image already fits in MAX_SIDE)."""
        return self.resized_size[0] / self.image_size[0]


def orientation(width: int, height: int) -> str:
    """`portrait`, `landscape` or `square`: decides which crop shapes are dropped."""
    if height > width:
        return "portrait"
    if width > height:
        return "landscape"
    return "square"


def allowed_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """The crop sizes (width, height in cells) kept for an image: near-square in pixels.

    A landscape image (wider than tall) keeps the crops with at most as many cells across
    as down, (1,1), (1,2), (2,2), (2,3); a portrait image those with at most as many
    down as across; a square image all six. Same as the reference's patchifier dropping
    its kernels `1x2`, `2x3` (rows x cols) on landscape and `2x1`, `3x2` on portrait.
    """
    kind = orientation(width, height)
    if kind == "landscape":
        return [(w, h) for w, h in CROP_SIZES if w <= h]
    if kind == "portrait":
        return [(w, h) for w, h in CROP_SIZES if h <= w]
    return list(CROP_SIZES)


def _lines(extent: int) -> list[int]:
    """Grid lines of one axis: the rounded thirds of `extent`."""
    return [round(i * extent / GRID) for i in range(GRID + 1)]


def grid_candidates(width: int, height: int) -> list[Candidate]:
    """All candidate crops of a `width` x `height` image, boxes in that image's pixels.

    Order (also the tie-break of the selection): crop size in `CROP_SIZES` order, then
    row, then column -- smaller crops first, top-to-bottom, left-to-right. Degenerate
    boxes (images under 3 px on a side) are skipped.
    """
    xs, ys = _lines(width), _lines(height)
    out: list[Candidate] = []
    for w, h in allowed_sizes(width, height):
        for row in range(GRID - h + 1):
            for col in range(GRID - w + 1):
                box = (xs[col], ys[row], xs[col + w], ys[row + h])
                if box[2] > box[0] and box[3] > box[1]:
                    out.append(Candidate(col, row, w, h, box))
    return out


def crop_grid(image: Image.Image, *, max_side: int = MAX_SIDE) -> CropGrid:
    """Resize a copy to at most `max_side`, cut the candidate crops, keep original boxes.

    A crop covers cells [col, col + w) x [row, row + h) of the resized copy; its box is
    the same cells' grid lines computed on the original size (the thirds of the original
    extent). That is the resized crop mapped back by the scale factor, without the up to
    one-resized-pixel error that rounding the resized lines and scaling them back adds.
    """
    from PIL import Image as PILImage

    width, height = image.size
    longer = max(width, height)
    rgb = image.convert("RGB")
    if longer > max_side:
        scale = max_side / longer
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = rgb.resize(size, PILImage.Resampling.BICUBIC)
    else:
        small = rgb.copy()
    rw, rh = small.size
    rxs, rys = _lines(rw), _lines(rh)
    candidates: list[Candidate] = []
    crops: list[Image.Image] = []
    for cand in grid_candidates(width, height):
        rbox = (
            rxs[cand.col],
            rys[cand.row],
            rxs[cand.col + cand.width],
            rys[cand.row + cand.height],
        )
        if rbox[2] <= rbox[0] or rbox[3] <= rbox[1]:
            continue
        candidates.append(cand)
        crops.append(small.crop(rbox))
    return CropGrid((width, height), (rw, rh), candidates, crops)


# --------------------------------------------------------------------------- question
def sentence_question(sentence: str) -> str:
    """The verification prompt `Does the image show <sentence as a question>?`.

    Deliberately simple: strip whitespace and the final `.`/`!`/`?`, and lowercase the
    first letter when the first word is plain title case (`The`, `Grass`, `A`) -- a
    sentence-initial capital rather than a name. All-caps words and mixed case (`NASA`,
    `TV`, `iPhone`), the pronoun `I` and words with digits keep their spelling. A proper
    noun in title case (`Paris`) is lowercased too; that only changes the wording of a
    yes/no prompt, which a VLM is robust to.
    """
    text = sentence.strip().rstrip(".!?").rstrip()
    if not text:
        return "Does the image show anything?"
    first = text.split(maxsplit=1)[0]
    word = first.rstrip(",;:")
    if (
        word[:1].isupper()
        and (len(word) == 1 or word[1:].islower())
        and word.isalpha()
        and word != "I"
    ):
        text = text[0].lower() + text[1:]
    return f"Does the image show {text}?"


QUESTION_RULES = ("default", "reference")


def sentence_question_reference(sentence: str) -> str:
    """The reference's verification prompt (REFERENCE row 15, `--preset reference`).

    `"Does the image show " + sentence.lower().replace(".", "?")`: the whole sentence
    lower-cased and EVERY "." turned into "?" ("3.5 cm." -> "3?5 cm?"); no "?" is added
    when the sentence does not end in ".".
    """
    return f"Does the image show {sentence.lower().replace('.', '?')}"


def question_for(sentence: str, rule: str = "default") -> str:
    """The verification prompt of `sentence` under `rule` (QUESTION_RULES)."""
    if rule == "reference":
        return sentence_question_reference(sentence)
    if rule != "default":
        raise ValueError(f"question rule must be one of {QUESTION_RULES}, got {rule!r}")
    return sentence_question(sentence)


# -------------------------------------------------------------------------- selection
def rounded_loss(loss: float) -> float:
    """A loss as the tie rule "round" compares it: Python's `round(loss, TIE_DECIMALS)`.

    Python's `round` (correctly rounded from the binary value, half to even), not
    `np.round` (which scales by 100 first and can differ at x.xx5), because that is what
    the reference applies to its float losses.
    """
    return round(float(loss), TIE_DECIMALS)


def _tie_ordered(indices: Sequence[int], losses: np.ndarray, tie: str = "tolerance") -> list[int]:
    """Indices ordered by loss; tied losses (by the `tie` rule) go by index.

    With "round" that is a stable sort on the rounded loss. With "tolerance", plain
    (loss, index) sorting would let float noise of ~1e-7 reorder crops with equal loss
    (e.g. two blank corners); grouping near-equal losses makes the order -- and so top_k
    -- the same for the batched and the naive search.
    """
    if tie == "round":
        return sorted(indices, key=lambda i: (rounded_loss(float(losses[i])), i))
    by_loss = sorted(indices, key=lambda i: (float(losses[i]), i))
    out: list[int] = []
    k = 0
    while k < len(by_loss):
        lead = float(losses[by_loss[k]])
        j = k + 1
        while j < len(by_loss) and _tied(float(losses[by_loss[j]]), lead):
            j += 1
        out.extend(sorted(by_loss[k:j]))
        k = j
    return out


def _tied(a: float, b: float, tie: str = "tolerance") -> bool:
    if tie == "round":
        return rounded_loss(a) == rounded_loss(b)
    return bool(np.isclose(a, b, rtol=TIE_RTOL, atol=TIE_ATOL)) or a == b


def select_crops(
    sizes: Sequence[int],
    p_yes: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    *,
    top_k: int = 1,
    threshold: float = PASS_THRESHOLD,
    tie: str = DEFAULT_TIE_RULE,
) -> list[int]:
    """The selection rule of docs/method.md#patches for one sentence; returns candidate indices.

    Union of (a) every passing crop tied for the lowest loss among the smallest passing
    crop size (size = cells, width x height) and (b) the `top_k` lowest-loss passing
    crops, in order of loss, then candidate index. Empty when no crop has
    `p_yes > threshold`. Losses of crops that fail verification are never read (they
    may be NaN).

    `tie` "round" (default) is the reference's rule: losses are compared as
    `round(loss, 2)`; (a) keeps every smallest-size crop whose rounded loss equals the
    smallest rounded loss of that size, (b) is a stable sort of the passing crops by
    rounded loss (candidate order breaks ties), cut at top_k. "tolerance" compares with
    `np.isclose(rtol=1e-5, atol=1e-5)` instead (reasonedit 0.1).
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if tie not in TIE_RULES:
        raise ValueError(f"tie must be one of {TIE_RULES}, got {tie!r}")
    size = np.asarray(sizes)
    p = np.asarray(p_yes, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    passing = [i for i in range(len(p)) if p[i] > threshold]
    if not passing:
        return []
    loss = np.where(np.isfinite(loss), loss, np.inf)
    smallest = min(int(size[i]) for i in passing)
    group = [i for i in passing if size[i] == smallest]
    best = min(float(loss[i]) for i in group)
    chosen = {i for i in group if _tied(float(loss[i]), best, tie)}
    ordered = _tie_ordered(passing, loss, tie)
    chosen.update(ordered[:top_k])
    return [i for i in ordered if i in chosen]


# ------------------------------------------------------------------------ diagnostics
@dataclass
class SentencePatches:
    """The search for one sentence: every candidate's p_yes and loss, and the choice."""

    sentence: str
    question: str
    p_yes: np.ndarray  # (n_candidates,)
    loss: np.ndarray  # (n_candidates,); NaN where not scored (failed verification)
    selected: list[int]  # candidate indices, best first
    boxes: list[list[int]]  # the selected boxes in original pixels, best first


@dataclass
class PatchSearch:
    """The patch search of one image (edit): its grid and one entry per sentence."""

    image_size: tuple[int, int]
    resized_size: tuple[int, int]
    candidates: list[Candidate]
    sentences: list[SentencePatches] = field(default_factory=list)

    @property
    def boxes(self) -> list[list[list[int]]]:
        """For each sentence, the selected boxes (possibly none)."""
        return [s.boxes for s in self.sentences]

    def to_dict(self, *, candidates: bool = False) -> dict[str, Any]:
        """JSON-ready summary for `ask --explain` / `add-edit --json`.

        Per sentence the chosen boxes with their p_yes and loss; with `candidates=True`
        also every candidate's scores (29 per sentence at most).
        """
        out: dict[str, Any] = {
            "image_size": list(self.image_size),
            "resized_size": list(self.resized_size),
            "n_candidates": len(self.candidates),
            "sentences": [],
        }
        for s in self.sentences:
            entry: dict[str, Any] = {
                "sentence": s.sentence,
                "question": s.question,
                "n_passing": int((s.p_yes > PASS_THRESHOLD).sum()),
                "selected": [
                    {
                        "box": list(self.candidates[i].box),
                        "cells": _cells(self.candidates[i]),
                        "p_yes": round(float(s.p_yes[i]), 6),
                        "loss": round(float(s.loss[i]), 6),
                    }
                    for i in s.selected
                ],
            }
            if candidates:
                entry["candidates"] = [
                    {
                        "box": list(c.box),
                        "cells": _cells(c),
                        "p_yes": round(float(s.p_yes[i]), 6),
                        "loss": None if np.isnan(s.loss[i]) else round(float(s.loss[i]), 6),
                    }
                    for i, c in enumerate(self.candidates)
                ]
            out["sentences"].append(entry)
        return out


def _cells(c: Candidate) -> str:
    return f"{c.width}x{c.height}@r{c.row}c{c.col}"


def _finish(
    grid: CropGrid,
    sentences: Sequence[str],
    p_yes: np.ndarray,
    loss: np.ndarray,
    top_k: int,
    threshold: float,
    question_rule: str = "default",
) -> PatchSearch:
    """Apply the selection rule to a (n_candidates, n_sentences) score table."""
    sizes = [c.size for c in grid.candidates]
    result = PatchSearch(grid.image_size, grid.resized_size, grid.candidates)
    for k, sentence in enumerate(sentences):
        chosen = select_crops(sizes, p_yes[:, k], loss[:, k], top_k=top_k, threshold=threshold)
        result.sentences.append(
            SentencePatches(
                sentence=sentence,
                question=question_for(sentence, question_rule),
                p_yes=p_yes[:, k].copy(),
                loss=loss[:, k].copy(),
                selected=chosen,
                boxes=[list(grid.candidates[i].box) for i in chosen],
            )
        )
    return result


# ----------------------------------------------------------------------------- search
Item = tuple["Image.Image", Sequence[str]]


def search_patches_detailed(
    vlm: VLM,
    items: Sequence[Item],
    *,
    top_k: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threshold: float = PASS_THRESHOLD,
    question_rule: str = "default",
) -> list[PatchSearch]:
    """Batched patch search over several edits, with every candidate's scores.

    Two batched VLM passes for the whole call, whatever the number of edits:
    verification of every (crop, sentence) pair of every item, then scoring of only the
    pairs that passed. Pairs are sorted by prompt length so a batch holds similar lengths
    (little padding). Crop images are cut once per item and shared by all its sentences.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    grids = [crop_grid(image) for image, _ in items]
    sents = [list(s) for _, s in items]
    p_tables = [np.zeros((len(g.candidates), len(s)), np.float32) for g, s in zip(grids, sents)]
    l_tables = [
        np.full((len(g.candidates), len(s)), np.nan, np.float32) for g, s in zip(grids, sents)
    ]

    # (item, candidate, sentence) for every pair, sentence-major inside an item.
    pairs = [
        (t, c, k)
        for t, (g, s) in enumerate(zip(grids, sents))
        for k in range(len(s))
        for c in range(len(g.candidates))
    ]
    questions = [[question_for(x, question_rule) for x in s] for s in sents]
    pairs.sort(key=lambda x: len(questions[x[0]][x[2]]))  # stable: keeps the order otherwise
    if pairs:
        p = vlm.yes_probability(
            [grids[t].crops[c] for t, c, _ in pairs],
            [questions[t][k] for t, _, k in pairs],
            batch_size=batch_size,
        )
        for (t, c, k), v in zip(pairs, p):
            p_tables[t][c, k] = v

    passed = [(t, c, k) for t, c, k in pairs if p_tables[t][c, k] > threshold]
    passed.sort(key=lambda x: len(sents[x[0]][x[2]]))
    if passed:
        losses = vlm.answer_loss(
            [grids[t].crops[c] for t, c, _ in passed],
            [DESCRIBE_PROMPT] * len(passed),
            [sents[t][k] for t, _, k in passed],
            batch_size=batch_size,
        )
        for (t, c, k), v in zip(passed, losses):
            l_tables[t][c, k] = v

    return [
        _finish(g, s, p, ls, top_k, threshold, question_rule)
        for g, s, p, ls in zip(grids, sents, p_tables, l_tables)
    ]


def search_patches(
    vlm: VLM,
    items: Sequence[Item],
    *,
    top_k: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threshold: float = PASS_THRESHOLD,
    question_rule: str = "default",
) -> list[list[list[list[int]]]]:
    """Selected boxes per item, per sentence: `[[[x0, y0, x1, y1], ...], ...]`.

    `items` are `(image, sentences)` pairs, one per edit; boxes are in the image's
    original pixels. A sentence with no passing crop gets `[]`. `question_rule`
    "reference" verifies with the reference's prompt (`sentence_question_reference`).
    """
    found = search_patches_detailed(
        vlm,
        items,
        top_k=top_k,
        batch_size=batch_size,
        threshold=threshold,
        question_rule=question_rule,
    )
    return [r.boxes for r in found]


def search_patches_naive_detailed(
    vlm: VLM,
    items: Sequence[Item],
    *,
    top_k: int = 1,
    threshold: float = PASS_THRESHOLD,
    question_rule: str = "default",
) -> list[PatchSearch]:
    """The literal algorithm: two single-pair VLM calls per crop per sentence.

    The reference for the batched search (tests) and the baseline of the benchmark.
    """
    out: list[PatchSearch] = []
    for image, sentences in items:
        grid = crop_grid(image)
        sents = list(sentences)
        p = np.zeros((len(grid.candidates), len(sents)), np.float32)
        loss = np.full_like(p, np.nan)
        for k, sentence in enumerate(sents):
            question = question_for(sentence, question_rule)
            for c, crop in enumerate(grid.crops):
                p[c, k] = vlm.yes_probability([crop], [question], batch_size=1)[0]
                loss[c, k] = vlm.answer_loss([crop], [DESCRIBE_PROMPT], [sentence], batch_size=1)[0]
        out.append(_finish(grid, sents, p, loss, top_k, threshold, question_rule))
    return out


def search_patches_naive(
    vlm: VLM,
    items: Sequence[Item],
    *,
    top_k: int = 1,
    threshold: float = PASS_THRESHOLD,
) -> list[list[list[list[int]]]]:
    """`search_patches` computed the literal, unbatched way (same result, ~2x29 calls
    per sentence)."""
    return [
        r.boxes for r in search_patches_naive_detailed(vlm, items, top_k=top_k, threshold=threshold)
    ]
