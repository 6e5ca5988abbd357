"""Readers for the input layouts: our edit JSONL, A-OKVQA JSON, RationaleVQA Parquet,
and question JSONL for batch `ask`.

All of them produce `Edit` objects validated by `reasonedit_cli.edits`, so every layout
gets the same checks and the same one-line errors naming file and record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reasonedit_cli.edits import (
    Edit,
    InputError,
    clean_text,
    clean_words,
    edit_from_record,
    image_path_field,
    iter_jsonl,
    read_edits_jsonl,
    read_image_file,
)

FORMATS = ("jsonl", "aokvqa", "rationalevqa")


def read_edits(
    path: str, fmt: str = "jsonl", *, images_root: Path | None = None, skip_invalid: bool = False
) -> tuple[list[Edit], list[str]]:
    """Edits from `path` in layout `fmt`, plus the errors skipped when `skip_invalid`."""
    if fmt == "jsonl":
        return read_edits_jsonl(path, skip_invalid=skip_invalid)
    if fmt == "aokvqa":
        records = aokvqa_records(path, images_root)
    elif fmt == "rationalevqa":
        records = rationalevqa_records(path, images_root)
    else:
        from reasonedit_cli.errors import UsageError

        raise UsageError(f"unknown `fmt` {fmt!r}; choose one of {', '.join(FORMATS)}")
    return _collect(records, skip_invalid, fmt)


def _collect(records, skip_invalid: bool, source: str) -> tuple[list[Edit], list[str]]:
    edits: list[Edit] = []
    errors: list[str] = []
    for where, base, rec in records:
        try:
            edits.append(edit_from_record(rec, base, where, source))
        except InputError as exc:
            if not skip_invalid:
                raise
            errors.append(str(exc))
    return edits, errors


def _find_coco_image(root: Path, image_id: int) -> str:
    """COCO 2017 file name for an image id, looked up in the usual sub-folders.

    Returned relative to `root`: the record's image is joined to its base (`root`) once,
    by `edit_from_record`, like every other layout's (joining here too applied a
    relative root twice).
    """
    name = f"{int(image_id):012d}.jpg"
    for sub in ("", "train2017", "val2017", "test2017", "images"):
        if (root / sub / name).is_file():
            return str(Path(sub) / name)
    return name  # reported as missing by the image reader


def aokvqa_records(path: str, images_root: Path | None):
    """A-OKVQA JSON (a list of questions): rationales become the reasoning.

    The answer is the correct multiple-choice option, else the most frequent direct
    answer. Images are COCO 2017 files found under `--images-root` by image id.
    """
    import json

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file does not exist") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a readable A-OKVQA JSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: not a readable A-OKVQA JSON file ({exc.msg} at line {exc.lineno})"
        ) from None
    except (OSError, ValueError, RecursionError):
        raise InputError(f"{path}: not a readable A-OKVQA JSON file") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of A-OKVQA questions")
    root = images_root or p.parent
    for i, item in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            yield where, root, item
            continue
        answer: Any = None
        choices, idx = item.get("choices"), item.get("correct_choice_idx")
        if isinstance(choices, list) and isinstance(idx, int) and 0 <= idx < len(choices):
            answer = choices[idx]
        elif isinstance(item.get("direct_answers"), list) and item["direct_answers"]:
            answers = [a for a in item["direct_answers"] if isinstance(a, str)]
            answer = max(set(answers), key=answers.count) if answers else None
        image_id = item.get("image_id")
        image = (
            _find_coco_image(root, image_id)
            if isinstance(image_id, int) and not isinstance(image_id, bool)
            else image_id
        )
        rec = {
            "id": str(item.get("question_id", "")) or None,
            "image": image,
            "question": item.get("question"),
            "answer": answer,
            "reasoning": item.get("rationales"),
        }
        yield where, root, {k: v for k, v in rec.items() if v is not None or k != "id"}


def rationalevqa_records(path: str, images_root: Path | None):
    """RationaleVQA Parquet (uid, image_path, question, answer, rationale, choices, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: file does not exist")
    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError):
        raise InputError(
            f"{path}: not a readable Parquet file (damaged, or another format)"
        ) from None
    needed = {"image_path", "question", "answer", "rationale"}
    missing = needed - set(table.column_names)
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    root = images_root or p.parent
    for i, row in enumerate(table.to_pylist()):
        rec = {
            "image": row.get("image_path"),
            "question": row.get("question"),
            "answer": row.get("answer"),
            "reasoning": row.get("rationale"),
        }
        if row.get("uid") is not None:
            rec["id"] = str(row["uid"])
        yield f"{path}:row {i}", root, rec


def read_questions(path: str) -> list[dict[str, Any]]:
    """Questions for batch `ask`: JSONL of `{image, question[, id]}`; extra fields ignored."""
    items: list[dict[str, Any]] = []
    for where, base, obj in iter_jsonl(path):
        if isinstance(obj, InputError):
            raise obj
        items.append(_question_item(obj, base, where))
    if not items:
        raise InputError(f"{path}: no questions found")
    return items


def _question_item(obj: Any, base: Path, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("image", "question"):
        if key not in obj:
            raise InputError(f"{where}: missing field {key}")
    data, _, img = read_image_file(image_path_field(obj["image"], base, where), where)
    item = {
        "image_bytes": data,
        "image": img,
        "question": clean_words(obj["question"], "question", where),
        "where": where,
    }
    for extra in ("id", "answer", "kind", "edit_id", "choices"):
        if extra in obj:
            item[extra] = obj[extra]
    return item


def read_calibration_items(path: str) -> list[tuple[Any, str]]:
    """Calibration anchors: JSONL of `{image, text}` (`question` is accepted for text)."""
    items = []
    for where, base, obj in iter_jsonl(path):
        if isinstance(obj, InputError):
            raise obj
        if isinstance(obj, dict) and "text" not in obj and "question" in obj:
            obj = {**obj, "text": obj["question"]}
        if not isinstance(obj, dict) or "image" not in obj or "text" not in obj:
            raise InputError(f"{where}: expected an object with 'image' and 'text'")
        _, _, img = read_image_file(image_path_field(obj["image"], base, where), where)
        items.append((img, clean_text(obj["text"], "text", where)))
    if not items:
        raise InputError(f"{path}: no calibration pairs found")
    return items
