"""Edit records: reading them from flags and JSONL, validating them, loading their images.

An edit is `(image, question, answer, reasoning)` plus optional boxes, one per reasoning
sentence. Every problem with user input becomes an `InputError` whose message names the
file and line, so the CLI can print one line and leave the codebook untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
import sys
import unicodedata
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reasonedit_cli.errors import InputError
from reasonedit_cli.validation import sentence_problem, text_problem

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

#: Limits that keep a single bad record from exhausting memory or the VLM's context.
MAX_IMAGE_BYTES = 50 * 1024 * 1024
#: Images with more pixels than this are refused before they are decoded (decompression
#: bombs); 250 MP admits every phone and camera photo. Change it with `--max-image-pixels`
#: or the environment variable below.
MAX_IMAGE_PIXELS = 250_000_000
MAX_IMAGE_PIXELS_ENV = "REASONEDIT_MAX_IMAGE_PIXELS"
#: Larger images are decoded reduced so that their longer side is at most this (JPEG DCT
#: scaling, then `Image.reduce`): every supported VLM resizes its input to a few hundred
#: pixels, so a 48 MP photo costs a fraction of its full decode and gives the same keys.
DECODE_MAX_SIDE = 2048
MAX_TEXT_CHARS = 2_000
MAX_SENTENCES = 32
MAX_LINE_BYTES = 1_000_000

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Split reasoning after `.`, `!` or `?` followed by whitespace (docs/method.md#sentences)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


@dataclass
class Edit:
    """One correction: an image, a question, its correct answer and the reasoning."""

    image_path: Path
    question: str
    answer: str
    reasoning: list[str]
    boxes: list[list[int] | None] | None = None
    id: str | None = None
    source: str = "cli"
    image_bytes: bytes = field(default=b"", repr=False)
    image_ext: str = "png"
    where: str = ""  # "file.jsonl:3" for error messages

    @property
    def image_sha256(self) -> str:
        return hashlib.sha256(self.image_bytes).hexdigest()

    def ensure_id(self) -> str:
        """A content id: the same edit (same image bytes and texts) always gets the same id."""
        if not self.id:
            h = hashlib.sha256()
            for part in (self.image_sha256, self.question, self.answer, *self.reasoning):
                h.update(part.encode("utf-8"))
                h.update(b"\x00")
            self.id = h.hexdigest()[:16]
        return self.id

    def load_image(self) -> Image.Image:
        return decode_image(self.image_bytes, self.where or str(self.image_path))


def clean_text(value: Any, name: str, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    text = unicodedata.normalize("NFC", value).strip()
    if not text and not allow_empty:
        raise InputError(f"{where}: field '{name}' is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(
            f"{where}: field '{name}' is too long ({len(text)} > {MAX_TEXT_CHARS} characters)"
        )
    bad = [
        c for c in text if unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") and c not in "\t\n"
    ]
    if bad:
        raise InputError(
            f"{where}: field '{name}' contains control or unassigned character U+{ord(bad[0]):04X}"
        )
    return text


def clean_words(value: Any, name: str, where: str) -> str:
    """A question or answer: clean text with at least one letter or digit."""
    text = clean_text(value, name, where)
    problem = text_problem(text)
    if problem:
        raise InputError(f"{where}: field '{name}' {problem}")
    return text


def parse_reasoning(value: Any, where: str) -> list[str]:
    """Reasoning as a string (split into sentences) or a list of sentences."""
    if isinstance(value, str):
        sentences = split_sentences(clean_text(value, "reasoning", where))
    elif isinstance(value, list):
        sentences = []
        for i, item in enumerate(value, start=1):
            name = "reasoning" if len(value) == 1 else f"reasoning (item {i} of the list)"
            sentences.extend(split_sentences(clean_text(item, name, where)))
    else:
        raise InputError(f"{where}: field 'reasoning' must be a string or a list of strings")
    if not sentences:
        raise InputError(f"{where}: field 'reasoning' is empty")
    for i, sentence in enumerate(sentences, start=1):
        problem = sentence_problem(sentence)
        if problem:
            raise InputError(f"{where}: reasoning sentence {i} {problem}")
    if len(sentences) > MAX_SENTENCES:
        raise InputError(
            f"{where}: reasoning has {len(sentences)} sentences (at most {MAX_SENTENCES})"
        )
    return sentences


def parse_box(value: Any, where: str) -> list[int] | None:
    """A box `[x0, y0, x1, y1]` in image pixels, or null."""
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 4
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
        or any(abs(v) > 1_000_000 for v in value)
    ):
        raise InputError(f"{where}: a box must be [x0, y0, x1, y1] with numbers, got {value!r}")
    x0, y0, x1, y1 = (int(round(v)) for v in value)
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"{where}: box {value!r} is empty (need x0 < x1 and y0 < y1)")
    return [x0, y0, x1, y1]


def image_path_field(value: Any, base: Path, where: str) -> Path:
    """The `image` field of a JSONL record: a path, relative to the file's folder."""
    image = clean_text(value, "image", where)
    return Path(image) if Path(image).is_absolute() else base / image


def read_image_file(path: Path, where: str) -> tuple[bytes, str, Image.Image]:
    """Read an image file safely: regular file, bounded size, decodable, not a bomb.

    Returns the bytes (what the codebook stores), the format, and the decoded RGB image,
    so callers that need the pixels do not decode the file a second time.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{where}: image {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"{where}: cannot read image {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{where}: image {path} is not a regular file")
    if st.st_size > MAX_IMAGE_BYTES:
        raise InputError(f"{where}: image {path} is too large ({st.st_size} bytes)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{where}: cannot read image {path}: {exc.strerror}") from None
    img = decode_image(data, f"{where}: image {path}")
    return data, (img.format or path.suffix.lstrip(".") or "png").lower(), img


_max_pixels_override: int | None = None


def set_max_image_pixels(limit: int | None) -> None:
    """Set the pixel limit for this process (None: the environment variable or default)."""
    global _max_pixels_override
    if limit is not None and limit < 1:
        raise ValueError("the image pixel limit must be positive")
    _max_pixels_override = limit


def max_image_pixels() -> int:
    """The pixel limit in force: `set_max_image_pixels`, else the environment, else default."""
    if _max_pixels_override is not None:
        return _max_pixels_override
    raw = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not raw:
        return MAX_IMAGE_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value < 1:
        from reasonedit_cli.errors import UsageError

        raise UsageError(f"{MAX_IMAGE_PIXELS_ENV}={raw!r}: expected a positive number of pixels")
    return value


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode image bytes to RGB, reduced when large, turning every PIL failure into an
    InputError.

    The declared size is checked against `max_image_pixels()` before any pixel is decoded
    (PIL's own guard is set to the same limit). An image whose longer side exceeds
    `DECODE_MAX_SIDE` is decoded reduced (deterministically: the same bytes always give
    the same pixels); `original_size` and the box helpers map between its pixels and the
    original's, in which boxes are given and stored.
    """
    from PIL import Image

    limit = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = limit
    size: tuple[int, int] | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            size = img.size
            if size[0] * size[1] > limit:
                raise Image.DecompressionBombError(size)
            factor = -(-max(size) // DECODE_MAX_SIDE)
            if factor > 1 and fmt == "JPEG":
                # DCT scaling by 1/2..1/8: decodes at the smallest scale >= the request
                img.draft("RGB", (-(-size[0] // factor), -(-size[1] // factor)))
            img.load()
            orientation = _orientation(img)
            rgb = img.convert("RGB")
            factor = -(-max(rgb.size) // DECODE_MAX_SIDE)
            if factor > 1:
                rgb = rgb.reduce(factor)
            if orientation in _transposes():
                # a camera's EXIF orientation: the model sees the photo upright, as a viewer
                # shows it, and boxes are given in that frame
                rgb = rgb.transpose(_transposes()[orientation])
                if orientation >= 5:  # a quarter turn: width and height swap
                    size = (size[1], size[0])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        size = size or _header_size(data)
        raise InputError(
            f"{where} has too many pixels to decode safely: {_size_text(size)}, over the limit of "
            f"{limit / 1e6:g} MP (raise it with `max_image_pixels` or {MAX_IMAGE_PIXELS_ENV})"
        ) from None
    except Exception:  # PIL raises many types for damaged or foreign files
        raise InputError(
            f"{where} is not a readable image (not an image format, or a damaged or truncated file)"
        ) from None
    if rgb.width < 1 or rgb.height < 1:
        raise InputError(f"{where} has no pixels")
    rgb.format = fmt
    if rgb.size != size:
        rgb.info["reasonedit_original_size"] = size
    return rgb


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright; 2-8 flips and quarter turns), 1 if unreadable."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block must not make a readable image unreadable
        return 1
    return value if isinstance(value, int) else 1


def _transposes() -> dict[int, Image.Transpose]:
    from PIL import Image

    t = Image.Transpose
    return {
        2: t.FLIP_LEFT_RIGHT,
        3: t.ROTATE_180,
        4: t.FLIP_TOP_BOTTOM,
        5: t.TRANSPOSE,
        6: t.ROTATE_270,
        7: t.TRANSVERSE,
        8: t.ROTATE_90,
    }


def _header_size(data: bytes) -> tuple[int, int] | None:
    """The size an image file declares, read from its header with PIL's guard off (no
    pixel is decoded), for the message that refuses it."""
    from PIL import Image

    guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data)).size
    except Exception:
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = guard


def _size_text(size: tuple[int, int] | None) -> str:
    if size is None:
        return "its size"
    return f"{size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.1f} MP"


def original_size(img: Image.Image) -> tuple[int, int]:
    """Width and height of the image as stored (before a reduced decode)."""
    return tuple(img.info.get("reasonedit_original_size", img.size))  # type: ignore[return-value]


def box_to_decoded(box: list[int] | tuple[int, ...], img: Image.Image) -> list[int]:
    """A box in original pixels (as given and stored) in the pixels of the decoded `img`."""
    (ow, oh), (w, h) = original_size(img), img.size
    if (ow, oh) == (w, h):
        return list(box)
    x0, y0, x1, y1 = box
    return [
        min(w - 1, int(x0 * w / ow)),
        min(h - 1, int(y0 * h / oh)),
        max(1, min(w, math.ceil(x1 * w / ow))),
        max(1, min(h, math.ceil(y1 * h / oh))),
    ]


def box_to_original(box: list[int] | tuple[int, ...], img: Image.Image) -> list[int]:
    """A box in the pixels of the decoded `img` in original pixels."""
    (ow, oh), (w, h) = original_size(img), img.size
    if (ow, oh) == (w, h):
        return list(box)
    x0, y0, x1, y1 = box
    return [
        round(x0 * ow / w),
        round(y0 * oh / h),
        min(ow, round(x1 * ow / w)),
        min(oh, round(y1 * oh / h)),
    ]


def check_box_in_image(box: list[int], width: int, height: int, where: str) -> None:
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise InputError(f"{where}: box {box} lies outside the {width}x{height} image")


def edit_from_record(record: Any, base: Path, where: str, source: str) -> Edit:
    """Validate one JSON object and load its image."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("image", "question", "answer", "reasoning") if k not in record]
    if missing:
        raise InputError(
            f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        )
    unknown = set(record) - {"id", "image", "question", "answer", "reasoning", "boxes", "source"}
    if unknown:
        raise InputError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    image_path = image_path_field(record["image"], base, where)
    edit_id = record.get("id")
    if edit_id is not None:
        edit_id = clean_text(edit_id if isinstance(edit_id, str) else str(edit_id), "id", where)
        if not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,128}", edit_id):
            raise InputError(f"{where}: id {edit_id!r} may only use letters, digits and _.:-")
    edit = Edit(
        image_path=image_path,
        question=clean_words(record["question"], "question", where),
        answer=clean_words(record["answer"], "answer", where),
        reasoning=parse_reasoning(record["reasoning"], where),
        id=edit_id,
        source=(
            clean_text(record["source"], "source", where)
            if record.get("source") is not None
            else source
        ),
        where=where,
    )
    edit.boxes = parse_boxes(record.get("boxes"), len(edit.reasoning), where)
    load_edit_image(edit)
    return edit


def parse_boxes(value: Any, n_sentences: int, where: str) -> list[list[int] | None] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InputError(f"{where}: field 'boxes' must be a list with one box or null per sentence")
    if len(value) != n_sentences:
        raise InputError(
            f"{where}: 'boxes' has {len(value)} entries for {n_sentences} reasoning sentences"
        )
    return [parse_box(b, where) for b in value]


def load_edit_image(edit: Edit) -> None:
    """Read the image bytes and check the boxes against its size."""
    edit.image_bytes, edit.image_ext, img = read_image_file(edit.image_path, edit.where)
    if edit.boxes:
        width, height = original_size(img)  # boxes are in the original image's pixels
        for box in edit.boxes:
            if box is not None:
                check_box_in_image(box, width, height, edit.where)
    edit.ensure_id()


def iter_jsonl(path: str, *, stdin_base: Path | None = None) -> Iterator[tuple[str, Path, Any]]:
    """Yield `(where, base_dir, parsed_object_or_InputError)` per non-blank line; `-` is stdin."""
    if path == "-":
        stream = sys.stdin
        base = stdin_base or Path.cwd()
        name = "<stdin>"
        yield from _iter_lines(stream, name, base)
        return
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: file does not exist")
    if not p.is_file():
        raise InputError(f"{path}: not a regular file")
    try:
        with open(p, encoding="utf-8-sig") as stream:
            yield from _iter_lines(stream, path, p.parent)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _iter_lines(stream, name: str, base: Path) -> Iterator[tuple[str, Path, Any]]:
    """Parsed lines; a line that is not JSON yields an `InputError` as its object."""
    for lineno, line in enumerate(stream, start=1):
        where = f"{name}:{lineno}"
        if len(line) > MAX_LINE_BYTES:
            yield where, base, InputError(f"{where}: line is too long ({len(line)} characters)")
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            obj = InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
        except (ValueError, RecursionError):  # nesting too deep, int too long
            obj = InputError(f"{where}: invalid JSON (nested too deeply, or a number too long)")
        yield where, base, obj


def read_edits_jsonl(
    path: str, *, skip_invalid: bool = False, source: str = "jsonl"
) -> tuple[list[Edit], list[str]]:
    """All edits of a JSONL file, plus the error lines skipped when `skip_invalid`."""
    return collect_edits(iter_jsonl(path), skip_invalid=skip_invalid, source=source)


def collect_edits(
    records: Iterable[tuple[str, Path, Any]], *, skip_invalid: bool, source: str
) -> tuple[list[Edit], list[str]]:
    """The edits of `(where, base_dir, record)` triples (a record may be the `InputError`
    its reader met), plus the errors skipped when `skip_invalid`: every input layout
    turns its records into edits here."""
    edits: list[Edit] = []
    errors: list[str] = []
    for where, base, obj in records:
        try:
            if isinstance(obj, InputError):
                raise obj
            edits.append(edit_from_record(obj, base, where, source))
        except InputError as exc:
            if not skip_invalid:
                raise
            errors.append(str(exc))
    return edits, errors
