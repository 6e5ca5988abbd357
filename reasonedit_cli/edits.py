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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reasonedit_cli.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

#: Limits that keep a single bad record from exhausting memory or the VLM's context.
MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
MAX_TEXT_CHARS = 2_000
MAX_SENTENCES = 32
MAX_LINE_BYTES = 1_000_000

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Split reasoning after `.`, `!` or `?` followed by whitespace (DESIGN 1.1)."""
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


def parse_reasoning(value: Any, where: str) -> list[str]:
    """Reasoning as a string (split into sentences) or a list of sentences."""
    if isinstance(value, str):
        sentences = split_sentences(clean_text(value, "reasoning", where))
    elif isinstance(value, list):
        sentences = []
        for i, item in enumerate(value):
            sentences.extend(split_sentences(clean_text(item, f"reasoning[{i}]", where)))
    else:
        raise InputError(f"{where}: field 'reasoning' must be a string or a list of strings")
    if not sentences:
        raise InputError(f"{where}: field 'reasoning' is empty")
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


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode image bytes to RGB, turning every PIL failure into an InputError."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            img.load()
            rgb = img.convert("RGB")
            rgb.format = fmt
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{where} has too many pixels (possible decompression bomb)") from None
    except Exception as exc:  # PIL raises many types for damaged files
        raise InputError(f"{where} is not a readable image ({type(exc).__name__})") from None
    if rgb.width < 1 or rgb.height < 1:
        raise InputError(f"{where} has no pixels")
    return rgb


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
        question=clean_text(record["question"], "question", where),
        answer=clean_text(record["answer"], "answer", where),
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
        for box in edit.boxes:
            if box is not None:
                check_box_in_image(box, img.width, img.height, edit.where)
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
        except (ValueError, RecursionError) as exc:  # nesting too deep, int too long
            obj = InputError(f"{where}: invalid JSON ({type(exc).__name__})")
        yield where, base, obj


def read_edits_jsonl(
    path: str, *, skip_invalid: bool = False, source: str = "jsonl"
) -> tuple[list[Edit], list[str]]:
    """All edits of a JSONL file, plus the error lines skipped when `skip_invalid`."""
    edits: list[Edit] = []
    errors: list[str] = []
    for where, base, obj in iter_jsonl(path):
        try:
            if isinstance(obj, InputError):
                raise obj
            edits.append(edit_from_record(obj, base, where, source))
        except InputError as exc:
            if not skip_invalid:
                raise
            errors.append(str(exc))
    return edits, errors
