"""Region keys: a key for the object an edit is about, not for the whole scene (issue #18).

The dual key pools the VLM's vision features over the whole image, so on a scene with
several objects the other objects and the background dominate it: the same object in
another scene (I-Gen) lands as far from the edit's key as an unrelated scene, and I-Gen
retrieval is 0.00 at every layer and w (docs/evaluation.md, Scenes). A region key pools
the same features over the token window of the object instead:

* **Windows.** The vision layer's patch tokens form a `g x g` grid (CLS dropped). The
  candidate regions are the windows of half the grid's side at a stride of a quarter of
  it (9 windows on the scenes VLM's 4x4 grid), each with its box as a share of the image.
* **Edit side.** An edit gets one extra `answer` key whose image half is the window that
  best overlaps (IoU) the crop the patch search chose for its reasoning (the first
  sentence that got one; `patches.search_patches`), and whose text half is the edit's
  question, as its whole-image answer key. It is stored as an `answer` key with that
  window's box (in the image's pixels).
* **Query side.** A query is embedded for the whole image and for every window (one
  vision forward: the windows are pools of the same tokens, so a query costs no extra
  VLM call, only `1 + windows` searches); the retrieval whose nearest key is nearest
  (smallest corrected distance) among those that pass tau wins. The text half still
  decides which of a scene's edits a question is about.

Only vision-side layers (`vision.*`, `projector`) have a token grid; others raise.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from reasonedit_cli.errors import ReasonEditError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from reasonedit_cli.retrieval import Retrieval

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Window:
    """A square window of the token grid: its token positions and its box (0-1 shares)."""

    tokens: tuple[int, ...]
    box: Box  # x0, y0, x1, y1 as shares of the image's width and height


def windows(grid: int) -> list[Window]:
    """Windows of side max(1, grid // 2) at stride max(1, side // 2), row-major."""
    side = max(1, grid // 2)
    stride = max(1, side // 2)
    starts = list(range(0, grid - side + 1, stride))
    out = []
    for r in starts:
        for c in starts:
            toks = tuple(rr * grid + cc for rr in range(r, r + side) for cc in range(c, c + side))
            out.append(Window(toks, (c / grid, r / grid, (c + side) / grid, (r + side) / grid)))
    return out


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def share_box(box: Sequence[float], size: tuple[int, int]) -> Box:
    """A pixel box of an image of `size` (width, height) as shares of it."""
    w, h = size
    return (box[0] / w, box[1] / h, box[2] / w, box[3] / h)


def pixel_box(box: Box, size: tuple[int, int]) -> list[int]:
    w, h = size
    return [round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)]


def window_for(box: Sequence[float], size: tuple[int, int], wins: Sequence[Window]) -> int:
    """The window that best overlaps a pixel `box` of an image of `size`."""
    b = share_box(box, size)
    return max(range(len(wins)), key=lambda j: (iou(b, wins[j].box), -j))


def token_states(vlm: Any, images: Sequence[Image.Image], layer: str, batch_size: int = 16):
    """(n, tokens, d) float32 patch-token inputs of a vision-side `layer`, CLS dropped.

    The layer's module (`vlm.layer_module`) is hooked while `vlm.pooled_inputs` runs the
    forward, so the tokens are exactly those the pooled key averages.
    """
    import torch

    info = vlm.resolve_layer(layer)
    if info.role not in ("vision", "projector"):
        raise ReasonEditError(f"region keys need a vision-side layer, not {info.label}")
    store: list[Any] = []

    def pre(module: Any, args: Any, kwargs: Any) -> None:
        x = args[0] if args else next(v for v in kwargs.values() if hasattr(v, "shape"))
        store.append(x.detach().float())

    def post(module: Any, args: Any, output: Any) -> None:
        store.append((output[0] if isinstance(output, tuple) else output).detach().float())

    module = vlm.layer_module(info.label)
    handle = (
        module.register_forward_hook(post)
        if info.hook_output
        else module.register_forward_pre_hook(pre, with_kwargs=True)
    )
    try:
        vlm.pooled_inputs(list(images), ["x"] * len(images), [info.label], batch_size=batch_size)
    finally:
        handle.remove()
    t = torch.cat(store).numpy()
    if t.ndim != 3 or t.shape[0] != len(images):
        raise ReasonEditError(f"region keys: layer {info.label} gives no token grid")
    n = t.shape[1]
    g = math.isqrt(n)
    if g * g != n:
        g = math.isqrt(n - 1)
        if g * g != n - 1:
            raise ReasonEditError(f"region keys: {n} tokens at {info.label} are not a grid")
        t = t[:, 1:]
    return t.astype(np.float32)


def _image_key(img: Image.Image) -> str:
    return hashlib.sha256(f"{img.mode}{img.size}".encode() + img.tobytes()).hexdigest()


class RegionEmbedder:
    """Dual keys over token windows: concat(mean of the window's tokens, w * S(text)).

    `text_half(texts)` is the sentence encoder (cached by the caller); `w` the dual key's
    weight, the same as the whole-image keys'. Token grids are cached per image.
    """

    def __init__(
        self,
        vlm: Any,
        layer: str,
        text_half: Callable[[Sequence[str]], np.ndarray],
        w: float,
        batch_size: int = 16,
        normalize: bool = False,
    ) -> None:
        self.vlm = vlm
        self.layer = layer
        self.text_half = text_half
        self.w = float(w)
        self.batch_size = batch_size
        self.normalize = normalize  # unit-length image halves (times sqrt(d))
        self._tokens: dict[str, np.ndarray] = {}

    def tokens(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        keys = [_image_key(i) for i in images]
        todo = {k: img for k, img in zip(keys, images) if k not in self._tokens}
        if todo:
            out = token_states(self.vlm, list(todo.values()), self.layer, self.batch_size)
            self._tokens.update(zip(todo, out))
        return [self._tokens[k] for k in keys]

    def grid_windows(self, images: Sequence[Image.Image]) -> list[Window]:
        n = self.tokens(images[:1])[0].shape[0]
        return windows(math.isqrt(n))

    def image_half(self, h: np.ndarray) -> np.ndarray:
        if not self.normalize:
            return h
        n = np.linalg.norm(h, axis=-1, keepdims=True)
        return h / np.maximum(n, 1e-12) * np.sqrt(h.shape[-1])

    def _dual(self, h: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        from reasonedit_cli.calibration import dual_concat

        return dual_concat(self.image_half(h), self.text_half(list(texts)), self.w)

    def whole_vectors(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """Whole-image keys (mean of all tokens), as the region keys are made."""
        return self._dual(np.stack([t.mean(0) for t in self.tokens(images)]), texts)

    def key_vectors(
        self, images: Sequence[Image.Image], texts: Sequence[str], boxes: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, list[list[int]]]:
        """Region keys for pixel `boxes`, each snapped to its best window; the windows'
        pixel boxes (what is stored)."""
        if not images:
            return np.zeros((0, 0), dtype=np.float32), []
        wins = self.grid_windows(images)
        toks = self.tokens(images)
        picked = [wins[window_for(b, img.size, wins)] for b, img in zip(boxes, images)]
        h = np.stack([t[list(w.tokens)].mean(0) for t, w in zip(toks, picked)])
        return self._dual(h, texts), [pixel_box(w.box, img.size) for w, img in zip(picked, images)]

    def query_vectors(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """(n, 1 + windows, dim): each query over the whole image, then every window."""
        if not images:
            return np.zeros((0, 0, 0), dtype=np.float32)
        wins = self.grid_windows(images)
        toks = self.tokens(images)
        h = np.stack(
            [np.stack([t.mean(0), *(t[list(w.tokens)].mean(0) for w in wins)]) for t in toks]
        )
        from reasonedit_cli.calibration import dual_concat

        s = self.text_half(list(texts))  # once per query, shared by its windows
        s = np.broadcast_to(s[:, None, :], (h.shape[0], h.shape[1], s.shape[-1]))
        return dual_concat(self.image_half(h), s, self.w)


_PLACE = re.compile(
    r"\b(?:in|at|on) the (top|bottom|upper|lower|left|right|middle|centre|center)"
    r"(?:[ -](left|right))?\b",
    re.IGNORECASE,
)
_SIDES = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}


def named_box(sentence: str) -> Box | None:
    """The part of the image a sentence names (`The star in the top left ...`), as
    shares of the image; None when it names none. Halves and quarters only."""
    m = _PLACE.search(sentence)
    if not m:
        return None
    a, b = m.group(1).lower(), (m.group(2) or "").lower()
    if a in ("middle", "centre", "center"):
        return (0.25, 0.25, 0.75, 0.75)
    x0, x1, y0, y1 = 0.0, 1.0, 0.0, 1.0
    side = _SIDES.get(a)
    if side == "top":
        y1 = 0.5
    elif side == "bottom":
        y0 = 0.5
    horiz = b or (a if a in ("left", "right") else "")
    if horiz == "left":
        x1 = 0.5
    elif horiz == "right":
        x0 = 0.5
    return (x0, y0, x1, y1)


#: where an edit's region comes from: the region its reasoning names, else the patch
#: search's crop ("named"); or the patch search's crop only ("patches")
REGION_SOURCES = ("named", "patches")


def region_box(
    specs: Sequence[Any],
    edit_index: int,
    reasoning: Sequence[str] = (),
    size: tuple[int, int] | None = None,
    source: str = "named",
) -> list[int] | None:
    """Where the edit's object is, in pixels: with `source="named"` the region the first
    reasoning sentence naming one names (`in the top left`); otherwise (or when none
    does) the crop the patch search or a manual box gave its first sentence that got
    one; `source="named-only"`: the named region or None (the object index of
    `object_outcomes` keys only objects a reasoning names). None when neither exists.

    Why the named region first: on the scenes VLM the patch search picks the edited
    object's quadrant for 8 of 30 edits (chance: 7.5), its verification prompt was
    trained on whole scenes only; the reasoning's own words name it every time."""
    if source in ("named", "named-only") and size is not None:
        for sentence in reasoning:
            b = named_box(sentence)
            if b is not None:
                return pixel_box(b, size)
    if source == "named-only":
        return None
    for s in specs:
        if s.edit_index == edit_index and s.kind == "patch" and s.box:
            return list(s.box)
    return None


def is_region_key(kind: str, box: Any) -> bool:
    """Region keys are `answer` keys with a box (whole-image answer keys have none)."""
    return kind == "answer" and box is not None


def best_retrieval(
    codebook: Any, vectors: np.ndarray, *, k: int, p: float | None = None
) -> Retrieval:
    """Retrieve for every region query of one question; the one whose nearest key is
    nearest among those not rejected wins (rejected when all are: the whole image's)."""
    from reasonedit_cli.retrieval import retrieve

    found = [retrieve(codebook, v, k=k, p=p) for v in vectors]
    ok = [r for r in found if not r.rejected]
    if not ok:
        return found[0]
    return min(ok, key=lambda r: float("inf") if r.nearest is None else r.nearest)


# ------------------------------------------------------------------ evaluate's methods
#: evaluate's methods with region keys: the dual key, and its vision half alone
REGION_METHODS = {"reasonedit-regions": "dual", "vision-regions": "vision"}


def region_seed(edit_id: str, box: Sequence[int]) -> int:
    """The augmentation seed of a region key's radius: by the edit and the box, so the same
    key always gets the same radius (docs/method.md#radii)."""
    return int.from_bytes(
        hashlib.sha256(f"{edit_id}|region|{list(box)}".encode()).digest()[:4], "big"
    )


def region_outcomes(ev: Any, method: str, source: str = "named") -> list[Any]:
    """`evaluate`'s `reasonedit-regions` (and `vision-regions`: w = 0) on an Evaluation:
    the keys of `reasonedit` plus one region key per edit, queries over every window."""
    from reasonedit_cli.evaluation import Outcome

    codebook, rk = region_codebook(ev, method, source)
    images = ev.probe_images()
    vecs = rk.query_vectors(images, [p.question for p in ev.probes])
    rs = [best_retrieval(codebook, q, k=ev.top_k, p=ev.percentile) for q in vecs]
    prompts = ev.prompts_with_facts([r.facts for r in rs])
    answers = ev.gen.answer([p.image_bytes for p in ev.probes], prompts)
    return [Outcome(a, r.edit_ids, r.rejected, q) for a, r, q in zip(answers, rs, prompts)]


def region_codebook(
    ev: Any,
    method: str,
    source: str = "named",
    normalize: bool = False,
    w: float | None = None,
) -> tuple[Any, RegionEmbedder]:
    """The codebook of `region_outcomes` (every edit's keys plus its region key) and the
    region embedder that made it (for the queries). `w` overrides the dual key's weight
    (default: the evaluation's, `auto` on the first keys); `normalize` gives every image
    half unit length (times sqrt(d)) and its own `auto` w."""
    from reasonedit_cli.augment import augment_image
    from reasonedit_cli.editor import KeySpec, answer_value

    mode = REGION_METHODS[method]
    embedder = ev.embedder
    if mode == "vision" or w is not None:
        from reasonedit_cli.evaluation import CachedEmbedder

        w_half = 0.0 if mode == "vision" else w
        embedder = CachedEmbedder(ev.halves, ev.embedder.layer, w_half, "dual")
    ed = ev.editor_for(method, embedder)
    rk = RegionEmbedder(
        ev.editor.vlm, embedder.layer, ev.halves.text_half, 0.0, ev.batch_size, normalize
    )
    base_specs, base_embed = ed.key_specs, ed.embed_specs

    def key_specs(chunk: Sequence[Any], images: Any = None, **kw: Any) -> list[Any]:
        specs = list(base_specs(chunk, images, **kw))
        for i, e in enumerate(chunk):
            img = ev.gen.image(e.image_bytes)
            box = region_box(specs, i, e.reasoning, img.size, source)
            if box is not None:
                wins = rk.grid_windows([img])
                win = wins[window_for(box, img.size, wins)]
                value = answer_value(e.question, e.answer)
                specs.append(KeySpec(i, "answer", e.question, value, pixel_box(win.box, img.size)))
        return specs

    def embed_specs(edits: Sequence[Any], specs: Sequence[Any], images: Sequence[Any]):
        reg = [j for j, s in enumerate(specs) if is_region_key(s.kind, s.box)]
        rest = [j for j in range(len(specs)) if j not in set(reg)]
        if normalize:
            # every key through the region embedder, so all image halves share one scale
            from reasonedit_cli.editor import crop
            from reasonedit_cli.embedding import auto_w

            plain = [
                crop(images[specs[j].edit_index], specs[j].box)
                if specs[j].box
                else images[specs[j].edit_index]
                for j in rest
            ]
            ptexts = [specs[j].key_text for j in rest]
            if mode == "vision":
                rk.w = 0.0
            elif w is not None:
                rk.w = w
            elif not rk.w:
                h = rk.image_half(np.stack([t.mean(0) for t in rk.tokens(plain)]))
                rk.w = auto_w(h, ev.halves.text_half(ptexts))
            v = rk.whole_vectors(plain, ptexts)
            r = np.zeros(len(rest))
        else:
            v, r = base_embed(edits, [specs[j] for j in rest], images)
            rk.w = float(embedder.w or 0.0)
        imgs = [images[specs[j].edit_index] for j in reg]
        texts = [specs[j].key_text for j in reg]
        boxes = [specs[j].box for j in reg]
        rv, _ = rk.key_vectors(imgs, texts, boxes)
        aug = [
            augment_image(img, np.random.default_rng(region_seed(edits[specs[j].edit_index].id, b)))
            for img, j, b in zip(imgs, reg, boxes)
        ]
        av, _ = rk.key_vectors(aug, texts, boxes)
        vectors = np.zeros((len(specs), v.shape[1]), dtype=np.float32)
        radii = np.zeros(len(specs), dtype=np.float64)
        vectors[rest], radii[rest] = v, r
        if reg:
            vectors[reg], radii[reg] = rv, np.linalg.norm(rv - av, axis=1)
        return vectors, radii

    ed.key_specs = key_specs  # the same override `Evaluation.editor_for` makes
    ed.embed_specs = embed_specs
    ed.add_edits(ev.edits, batch_size=max(ev.batch_size, 32), patches="none")
    return ed.codebook, rk


# ------------------------------------------------------------------ the object index
#: `reasonedit-objects` (issue #18 item 4): the object index's w as a multiple of the
#: whole-image keys' plain auto w, and its tau as a multiple of its own `images` tau. Chosen on
#: scenes seeds 1 and 2 by retrieval (`scripts/scenes_keys.py --union 30:images*1.5`):
#: I-Gen 0.48 / 0.72 at Loc 0.97 / 0.97, 8-15 % of same-attribute confusers let in.
OBJECT_W_FACTOR = 30.0
OBJECT_TAU_X = 1.5


class ScaledTau:
    """A codebook whose rejection threshold is `factor` x its own (the object index's
    wider gate); searches and facts are the codebook's."""

    def __init__(self, codebook: Any, factor: float) -> None:
        self.codebook = codebook
        self.factor = float(factor)

    @property
    def config(self) -> dict[str, Any]:
        return dict(getattr(self.codebook, "config", {}))

    @property
    def tau(self) -> float | None:
        t = self.codebook.tau
        return None if t is None else float(t) * self.factor

    def tau_for(self, p: float) -> float | None:
        t = self.codebook.tau_for(p)
        return None if t is None else float(t) * self.factor

    def search(self, q: np.ndarray, k: int) -> Any:
        return self.codebook.search(q, k=k)

    def key_facts(self, rows: Sequence[int]) -> Any:
        return self.codebook.key_facts(rows)


def union_retrieval(main: Retrieval, extra: Retrieval) -> Retrieval:
    """`main`'s retrieval with `extra`'s hits added: facts `extra` alone found go first,
    so `main`'s nearest fact still stands right before the question."""
    from dataclasses import replace

    if extra.rejected:
        return main
    if main.rejected:
        return extra
    new = [f for f in extra.facts if f not in main.facts]
    return replace(main, hits=[*main.hits, *extra.hits], facts=[*new, *main.facts])


def object_outcomes(
    ev: Any, w: float | None = None, tau_x: float = OBJECT_TAU_X, layer: str | None = None
) -> list[Any]:
    """`evaluate`'s `reasonedit-objects`: `reasonedit`'s keys plus the object index, built
    and queried by the product's own code (`Editor.add_edits` / `Editor.retrievals` with
    `objects=True`, `reasonedit_cli.objects`), so the numbers are what `add-edit` and
    `ask` give. Beside the whole-image keys sits a separate index of one region key per
    edit (the window of the object its reasoning names) with a text-heavy w (default
    `OBJECT_W_FACTOR` x the plain auto w of the first 32 edits' keys,
    `Editor.object_w`) and a wider gate (`tau_x` x its own `images` tau at p 25,
    whatever `--percentile` says: the constants were chosen there); a query is asked
    over every window, and a probe gets the union of the two retrievals.

    Why a second index and not region keys among the whole-image ones
    (`reasonedit-regions`): an I-Gen probe asks the edit's own question, so its text half
    is the edit's and a heavy w leaves its distance alone while it pushes every other
    question away; the whole-image keys need a light w, or rephrasings are lost. One
    codebook cannot have both w. Only objects a reasoning names get a key (no patch-crop
    fallback), so a codebook whose reasoning names no region (easy-vqa, the sample edits)
    gets exactly `reasonedit`'s retrieval.

    `w`, `tau_x`, `layer`: the object index's settings instead of the defaults (a
    diagnostic that asks what a calibrated codebook's own object index would give)."""
    from reasonedit_cli.evaluation import Outcome

    ed = ev.editor_for("reasonedit-objects", ev.embedder, objects=True)
    ed.object_settings = {"w": w, "tau_x": tau_x, "layer": layer}
    ed.add_edits(ev.edits, batch_size=max(ev.batch_size, 32), patches="none")
    rs = ed.retrievals(
        ev.probe_images(),
        [p.question for p in ev.probes],
        k=ev.top_k,
        percentile=ev.percentile,
        batch_size=ev.batch_size,
    )
    prompts = ev.prompts_with_facts([r.facts for r in rs])
    answers = ev.gen.answer([p.image_bytes for p in ev.probes], prompts)
    return [Outcome(a, r.edit_ids, r.rejected, q) for a, r, q in zip(answers, rs, prompts)]
