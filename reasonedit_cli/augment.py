"""Seeded, meaning-preserving augmentations of images and texts.

Two parts of ReasonEdit need "the same content, slightly different":

* calibration (docs/method.md#calibration) builds the bimodal partition from an anchor pair plus a
  rephrased text and a perturbed image;
* codebook insertion (docs/method.md#radii) sets each key's deferral radius from the distance
  between the key and one augmented copy of it.

Both must be reproducible, so every function takes a `numpy.random.Generator` (or a seed)
and draws all of its randomness from it. Only PIL and numpy are used: torchvision has no
CPU build here, and these run on a handful of small images, where PIL is fast enough.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance

from reasonedit_cli.errors import ReasonEditError

__all__ = [
    "Augmenter",
    "augment_image",
    "paraphrase_text",
    "perturb_text",
]

RngLike = np.random.Generator | int | None

# Strength of the image augmentation (docs/method.md#radii: "small rotation, colour jitter,
# crop/pad").
MAX_ROTATION_DEG = 10.0
MAX_JITTER = 0.15  # brightness, contrast and saturation factors in [0.85, 1.15]
MAX_CROP_PAD = 0.06  # crop or pad by up to 6 % of each side's length

# A paraphrase longer than this many times the original is treated as a rambling answer.
MAX_PARAPHRASE_RATIO = 3.0


def _rng(rng: RngLike) -> np.random.Generator:
    """Accept a Generator or a seed, so callers can pass whichever they hold."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


# --------------------------------------------------------------------------- images


def _border_colour(img: Image.Image) -> tuple[int, ...] | int:
    """Mean colour of the image border, used to fill rotated corners and padding.

    Black corners would be a strong artificial cue that the perturbed image shares with no
    real image; the border mean blends in with the background of typical photos and of the
    easy-vqa renders (flat backgrounds).
    """
    a = np.asarray(img)
    border = np.concatenate(
        [
            a[0].reshape(-1, *a.shape[2:]),
            a[-1].reshape(-1, *a.shape[2:]),
            a[:, 0].reshape(-1, *a.shape[2:]),
            a[:, -1].reshape(-1, *a.shape[2:]),
        ]
    )
    mean = np.rint(border.mean(axis=0)).astype(int)
    return int(mean) if mean.ndim == 0 else tuple(int(v) for v in mean)


def augment_image(img: Image.Image, rng: RngLike) -> Image.Image:
    """Return a lightly perturbed copy of `img` with the same size.

    Applies, with parameters drawn from `rng`: a rotation of up to +-10 degrees, brightness,
    contrast and saturation jitter of up to +-15 %, and a crop or pad of up to 6 % followed
    by a resize back to the original size. These keep what the image shows while moving its
    pixels enough that the VLM's embedding moves a little, which is what the deferral radius
    and the bimodal partition need. The input is not modified.
    """
    g = _rng(rng)
    # Work in a mode that ImageEnhance and rotate handle; keep L and RGB as they are.
    out = img.convert("RGB") if img.mode not in ("RGB", "L") else img.copy()
    width, height = out.size
    fill = _border_colour(out)

    angle = float(g.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    out = out.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=fill)

    # Colour jitter; saturation is meaningless for grey images, so skip it there.
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        factor = float(g.uniform(1.0 - MAX_JITTER, 1.0 + MAX_JITTER))
        if enhancer is ImageEnhance.Color and out.mode == "L":
            continue
        out = enhancer(out).enhance(factor)

    # Crop (scale < 1) or pad (scale > 1) around a random offset, then restore the size.
    scale = float(g.uniform(1.0 - MAX_CROP_PAD, 1.0 + MAX_CROP_PAD))
    if scale < 1.0:
        cw, ch = max(1, round(width * scale)), max(1, round(height * scale))
        x0 = int(g.integers(0, width - cw + 1))
        y0 = int(g.integers(0, height - ch + 1))
        out = out.crop((x0, y0, x0 + cw, y0 + ch))
    else:
        cw, ch = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = Image.new(out.mode, (cw, ch), fill)
        canvas.paste(out, (int(g.integers(0, cw - width + 1)), int(g.integers(0, ch - height + 1))))
        out = canvas
    if out.size != (width, height):
        out = out.resize((width, height), Image.Resampling.BILINEAR)
    return out


# --------------------------------------------------------------------------- texts

# Meaning-preserving word swaps. Keys are matched as whole words, case-insensitively, in a
# single regex pass, so the pairs that map both ways (colour <-> color) never undo each
# other. Multi-word keys come first in the alternation so they win over their parts.
SYNONYMS: dict[str, str] = {
    "is there": "does it have",
    "are there": "does it have",
    "what": "which",
    "shape": "figure",
    "shapes": "figures",
    "colour": "color",
    "color": "colour",
    "colours": "colors",
    "colors": "colours",
    "image": "picture",
    "picture": "image",
    "images": "pictures",
    "pictures": "images",
    "photo": "photograph",
    "big": "large",
    "large": "big",
    "small": "little",
    "show": "depict",
    "shows": "depicts",
    "shown": "depicted",
    "contain": "have",
    "contains": "has",
    "object": "item",
    "objects": "items",
    "because": "since",
    "near": "close to",
}
_SYN_RE = re.compile(
    r"\b(" + "|".join(re.escape(k) for k in sorted(SYNONYMS, key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)

# Words that may be lowercased at the start of a sentence without harming a proper noun.
_COMMON_STARTERS = frozenset(
    "what which who whom whose where when why how is are was were do does did can could "
    "will would should the a an this that these those there it its in on at".split()
)
_QUESTION_FILLERS = ("please tell me, {}", "could you tell me: {}", "{} Please answer.")
_STATEMENT_FILLERS = ("note that {}", "in fact, {}", "it is true that {}")


def _match_case(src: str, repl: str) -> str:
    """Give `repl` the casing pattern of `src` (What -> Which, COLOR -> COLOUR)."""
    if src.isupper() and len(src) > 1:
        return repl.upper()
    if src[:1].isupper():
        return repl[:1].upper() + repl[1:]
    return repl


def _norm(text: str) -> str:
    """What a sentence encoder sees, roughly: lowercase words without punctuation."""
    return " ".join(re.findall(r"\w+", text.lower()))


def _is_question(text: str) -> bool:
    first = text.split(maxsplit=1)[0].lower() if text.split() else ""
    return text.rstrip().endswith("?") or first in {
        "what",
        "which",
        "who",
        "where",
        "when",
        "why",
        "how",
        "is",
        "are",
        "does",
        "do",
        "can",
        "could",
    }


def _lower_first(text: str) -> str:
    """Lowercase the first letter only when the first word is a common function word."""
    first = text.split(maxsplit=1)[0] if text.split() else ""
    if first.lower() in _COMMON_STARTERS:
        return text[:1].lower() + text[1:]
    return text


def _add_filler(text: str, g: np.random.Generator) -> str:
    fillers = _QUESTION_FILLERS if _is_question(text) else _STATEMENT_FILLERS
    template = fillers[int(g.integers(len(fillers)))]
    if template.startswith("{}"):
        return template.format(text.rstrip())
    out = template.format(_lower_first(text))
    return out[:1].upper() + out[1:]


def _swap_synonyms(text: str, g: np.random.Generator) -> str:
    """Replace about half of the matching words (at least one when any match)."""
    matches = list(_SYN_RE.finditer(text))
    if not matches:
        return text
    chosen = g.random(len(matches)) < 0.5
    chosen[int(g.integers(len(matches)))] = True
    parts: list[str] = []
    last = 0
    for m, take in zip(matches, chosen, strict=True):
        if not take:
            continue
        parts.append(text[last : m.start()])
        parts.append(_match_case(m.group(0), SYNONYMS[m.group(0).lower()]))
        last = m.end()
    parts.append(text[last:])
    return "".join(parts)


def _change_punctuation(text: str, g: np.random.Generator) -> str:
    """Drop or add the final punctuation mark, or change the case of the first letter."""
    stripped = text.rstrip()
    choice = int(g.integers(3))
    if choice == 0 and stripped[-1:] in ".?!":
        return stripped[:-1]
    if choice == 1 and stripped[-1:] not in ".?!":
        return stripped + ("?" if _is_question(stripped) else ".")
    lowered = _lower_first(stripped)
    return lowered if lowered != stripped else stripped[:1].upper() + stripped[1:]


def perturb_text(text: str, rng: RngLike) -> str:
    """Return a light, meaning-preserving rewording of `text`, deterministic for a seed.

    Swaps some words for synonyms from a small built-in table (what -> which, colour <->
    color, image <-> picture, is there -> does it have, ...), sometimes adds a filler
    ("please tell me, ...", "note that ...") and sometimes changes the final punctuation or
    the first letter's case. The result always differs from the input in its words, not
    just its casing or punctuation: the default sentence encoder lowercases its input, so a
    casing-only change would leave the text half of the embedding unchanged.
    """
    if not text or not text.strip():
        raise ReasonEditError("cannot perturb an empty text")
    g = _rng(rng)
    out = _swap_synonyms(text.strip(), g)
    if g.random() < 0.5:
        out = _add_filler(out, g)
    if g.random() < 0.5:
        out = _change_punctuation(out, g)
    if _norm(out) == _norm(text):
        # No synonym matched and no filler was drawn: a filler guarantees a word change.
        out = _add_filler(out, g)
    return out


def _clean_paraphrase(raw: object) -> str:
    """First non-empty line of a generated paraphrase, without wrapping quotes."""
    if not isinstance(raw, str):
        return ""
    for line in raw.strip().splitlines():
        line = line.strip().strip("\"'“”‘’").strip()
        if line:
            return line
    return ""


def paraphrase_text(
    text: str,
    rng: RngLike,
    paraphraser: Callable[[str], str] | None = None,
) -> str:
    """Paraphrase `text` with `paraphraser` (e.g. the VLM), else fall back to `perturb_text`.

    A model paraphrase varies the wording more than the synonym table can, but small VLMs
    often answer the question instead, echo it, or ramble. So the model's output is used
    only when it is non-empty, differs from the input in its words, and is at most three
    times longer; otherwise the deterministic perturbation is returned. `rng` is used only
    by the fallback, so a deterministic paraphraser keeps the whole call deterministic.
    """
    if paraphraser is not None:
        candidate = _clean_paraphrase(paraphraser(text))
        if (
            candidate
            and _norm(candidate) != _norm(text)
            and len(candidate) <= MAX_PARAPHRASE_RATIO * max(len(text.strip()), 1)
        ):
            return candidate
    return perturb_text(text, rng)


@dataclass(frozen=True)
class Augmenter:
    """The pair of augmentations used to build calibration pairs and key radii.

    A small value object rather than two loose callables so that callers (calibration, the
    codebook insert) can pass one thing and tests can substitute a trivial augmenter.
    """

    image: Callable[[Image.Image, np.random.Generator], Image.Image] = field(default=augment_image)
    text: Callable[[str, np.random.Generator], str] = field(default=perturb_text)

    @classmethod
    def with_paraphraser(cls, paraphraser: Callable[[str], str] | None) -> Augmenter:
        """Default image augmentation; texts paraphrased by `paraphraser` with fallback."""
        if paraphraser is None:
            return cls()
        return cls(text=lambda t, g: paraphrase_text(t, g, paraphraser))
