"""See and carry what a codebook holds: list, show, export, and what each version did.

The operations behind `reasonedit list`, `show`, `export` and `history` (issue #19), on
an open `Codebook`; `Editor` exposes them as methods and the CLI only renders. Nothing
here loads a model, so every operation is as quick as reading the Parquet segments.

Export writes the edits as the JSONL that `add-edit --from` reads, with the stored image
bytes next to it, so a codebook can be rebuilt from an export (same edit ids, texts,
manual boxes and sources; same key ids when the model and patch settings are the same).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reasonedit_cli.errors import InputError, ReasonEditError

if TYPE_CHECKING:  # pragma: no cover
    from reasonedit_cli.store import Codebook, EditRecord

EXPORT_EDITS = "edits.jsonl"
EXPORT_IMAGES = "images"
EXPORT_SETTINGS = "settings.json"
BOX_COLOURS = ("#ff3030", "#30c030", "#3070ff", "#ffb000", "#c030c0", "#00b0b0")
MIN_DRAW_SIDE = 256  # small images (easy-vqa: 64 px) are enlarged so boxes stay visible


# ------------------------------------------------------------------ list / show
def _matches(value: str, needle: str | None) -> bool:
    return needle is None or needle.casefold() in value.casefold()


def list_edits(
    cb: Codebook,
    *,
    question: str | None = None,
    answer: str | None = None,
    edit_id: str | None = None,
    image: str | None = None,
) -> list[dict[str, Any]]:
    """One row per live edit (insertion order): id, question, answer, image, keys, version.

    Filters are case-insensitive substrings (`image` matches the image hash prefix);
    all given filters must match.
    """
    versions = cb.edit_versions()
    keys_per_edit: dict[str, int] = {}
    for row in cb.keys_table().select(["edit_id", "merged"]).to_pylist():
        for eid in dict.fromkeys([row["edit_id"], *(m["edit_id"] for m in row["merged"] or [])]):
            keys_per_edit[eid] = keys_per_edit.get(eid, 0) + 1
    rows = []
    for rec in cb.edits():
        if not (
            _matches(rec.question, question)
            and _matches(rec.answer, answer)
            and _matches(rec.edit_id, edit_id)
            and (image is None or rec.image_sha256.startswith(image.lower()))
        ):
            continue
        rows.append(
            {
                "id": rec.edit_id,
                "question": rec.question,
                "answer": rec.answer,
                "image": rec.image_sha256,
                "keys": keys_per_edit.get(rec.edit_id, 0),
                "version": versions.get(rec.edit_id),
                "added": rec.added.isoformat() if rec.added else None,
                "source": rec.source,
            }
        )
    return rows


def _edit_record(cb: Codebook, edit_id: str) -> EditRecord:
    for rec in cb.edits(ids=[edit_id]):
        return rec
    raise InputError(f"no such edit in {cb.path}: {edit_id}")


def show_edit(cb: Codebook, edit_id: str) -> dict[str, Any]:
    """An edit with its facts and every key that holds one of them (kind, box, radius).

    A merged key (docs/method.md#merging) counts when it holds a fact of this edit, also when its
    vector came from another edit's key (`own: false`).
    """
    from reasonedit_cli.editor import answer_value

    rec = _edit_record(cb, edit_id)
    keys = []
    for row in cb.keys_table().drop_columns(["vector"]).to_pylist():
        entries = [(row["value"], row["edit_id"])] + [
            (m["value"], m["edit_id"]) for m in row["merged"] or []
        ]
        mine = [v for v, e in entries if e == edit_id]
        if not mine:
            continue
        keys.append(
            {
                "key_id": row["key_id"],
                "kind": row["kind"],
                "text": row["key_text"],
                "facts": list(dict.fromkeys(mine)),
                "box": list(row["box"]) if row["box"] is not None else None,
                "radius": row["radius"],
                "own": row["edit_id"] == edit_id,
                "edit_ids": list(dict.fromkeys(e for _, e in entries)),
            }
        )
    return {
        "id": rec.edit_id,
        "question": rec.question,
        "answer": rec.answer,
        "reasoning": list(rec.reasoning),
        "facts": [answer_value(rec.question, rec.answer), *rec.reasoning],
        "boxes": rec.boxes,
        "image": rec.image_sha256,
        "image_file": str(cb.image_path(rec.image_sha256).relative_to(cb.path)),
        "source": rec.source,
        "added": rec.added.isoformat() if rec.added else None,
        "version": cb.edit_versions().get(rec.edit_id),
        "keys": keys,
    }


def draw_edit_boxes(cb: Codebook, edit_id: str, out: str | Path) -> tuple[Path, list[list[int]]]:
    """Write the edit's image with the boxes of its patch keys and manual boxes drawn.

    Returns the path and the boxes in the order they are numbered on the image (first
    use in the order `show` lists the keys, then manual boxes no key uses). An image
    smaller than 256 px is enlarged (nearest neighbour) first so thin boxes stay visible.
    """
    from PIL import ImageDraw

    from reasonedit_cli.edits import decode_image

    info = show_edit(cb, edit_id)
    img = decode_image(cb.read_image_bytes(info["image"]), f"edit {edit_id}").convert("RGB")
    boxes: list[list[int]] = []
    for k in info["keys"]:
        if k["box"] is not None and k["box"] not in boxes:
            boxes.append(k["box"])
    for b in info["boxes"] or []:
        if b is not None and list(b) not in boxes:
            boxes.append(list(b))
    scale = max(1, -(-MIN_DRAW_SIDE // max(1, min(img.size))))
    if scale > 1:
        from PIL import Image

        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    width = max(2, scale)
    for i, box in enumerate(boxes):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=width)
        draw.text((x0 + width + 1, y0 + width), str(i + 1), fill=colour)
    path = Path(out)
    try:
        img.save(path)
    except (OSError, ValueError) as e:
        raise ReasonEditError(f"cannot write {path}: {e}") from None
    return path, boxes


# ---------------------------------------------------------------------- export
def export_record(rec: EditRecord, image_rel: str) -> dict[str, Any]:
    """The `add-edit --from` JSONL record of a stored edit (reasoning as its sentences)."""
    out: dict[str, Any] = {
        "id": rec.edit_id,
        "image": image_rel,
        "question": rec.question,
        "answer": rec.answer,
        "reasoning": list(rec.reasoning),
    }
    if rec.boxes is not None and any(b is not None for b in rec.boxes):
        out["boxes"] = [None if b is None else list(b) for b in rec.boxes]
    if rec.source:
        out["source"] = rec.source
    return out


def export_codebook(
    cb: Codebook, out_dir: str | Path, *, edit_ids: Sequence[str] | None = None
) -> dict[str, Any]:
    """Write `edits.jsonl`, `images/` and `settings.json` into `out_dir` (created; must be
    empty or absent). Returns {edits, images, path}.

    `settings.json` records the model, layer, w and tau settings the keys were made
    with, for the record: `add-edit` on a new codebook chooses its own (auto w from its
    first batch), so vectors match only when those agree.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty folder")
    records = cb.edits()
    if edit_ids is not None:
        wanted = set(edit_ids)
        unknown = sorted(wanted - {r.edit_id for r in records})
        if unknown:
            raise InputError(f"no such edit in {cb.path}: {', '.join(unknown)}")
        records = [r for r in records if r.edit_id in wanted]
    try:
        (out / EXPORT_IMAGES).mkdir(parents=True, exist_ok=True)
        images: dict[str, str] = {}
        lines = []
        for rec in records:
            if rec.image_sha256 not in images:
                src = cb.image_path(rec.image_sha256)
                rel = f"{EXPORT_IMAGES}/{src.name}"
                (out / rel).write_bytes(cb.read_image_bytes(rec.image_sha256))
                images[rec.image_sha256] = rel
            lines.append(
                json.dumps(export_record(rec, images[rec.image_sha256]), ensure_ascii=False)
            )
        (out / EXPORT_EDITS).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        settings = {
            k: cb.config.get(k)
            for k in (
                "model",
                "model_revision",
                "text_model",
                "layer",
                "w",
                "percentile",
                "tau_rule",
            )
        }
        settings["version"] = cb.version
        (out / EXPORT_SETTINGS).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        raise ReasonEditError(f"cannot write the export to {out}: {e.strerror or e}") from None
    return {"edits": len(records), "images": len(images), "path": str(out)}


# --------------------------------------------------------------------- history
def _content(m: dict) -> tuple:
    """What `restore` copies from a version: segments, tombstones and config."""
    return (m["segments"], m["removed_edits"], m["config"])


def _describe_change(prev: dict | None, cur: dict, earlier: list[dict]) -> str:
    """What one version did, from its manifest and the previous one's."""
    if prev is None:
        return "created the codebook" if not cur.get("segments") else "first version"
    if _content(cur) != _content(prev):
        for old in reversed(earlier[:-1]):  # restore: the content of an older version
            if _content(old) == _content(cur):
                return f"restored v{old['version']}"
    prev_segs = {s["path"] for s in prev["segments"]}
    new_segs = [s for s in cur["segments"] if s["path"] not in prev_segs]
    dropped_keys = [s for s in prev["segments"] if s["kind"] == "keys" and s not in cur["segments"]]
    prev_tomb = {t["edit_id"] for t in prev["removed_edits"]}
    tomb = [t["edit_id"] for t in cur["removed_edits"] if t["edit_id"] not in prev_tomb]
    added = sum(int(s.get("rows", 0)) for s in new_segs if s["kind"] == "edits")
    parts = []
    if added:
        parts.append(f"added {added} edit{'s' if added != 1 else ''}")
    if tomb:
        names = ", ".join(sorted(tomb)[:5]) + (" ..." if len(tomb) > 5 else "")
        parts.append(("replaced " if added else "removed ") + names)
    cfg, pcfg = cur["config"], prev["config"]
    if dropped_keys and not added:
        before = sum(int(s.get("rows", 0)) for s in prev["segments"] if s["kind"] == "keys")
        after = sum(int(s.get("rows", 0)) for s in cur["segments"] if s["kind"] == "keys")
        if cfg.get("calibrated") and (
            cfg.get("layer") != pcfg.get("layer") or cfg.get("w") != pcfg.get("w")
        ):
            w = cfg.get("w")
            parts.append(
                f"calibrated: layer {cfg.get('layer')}, w = {w:.4g}"
                if isinstance(w, (int, float))
                else "calibrated"
            )
        else:
            parts.append(f"merged keys ({before} -> {after})")
    elif cfg.get("calibrated") and not pcfg.get("calibrated"):
        parts.append(f"calibrated: layer {cfg.get('layer')}")
    changed = sorted(
        k for k in set(cfg) | set(pcfg) if cfg.get(k) != pcfg.get(k) and k not in ("dim",)
    )
    if not parts and changed:
        parts.append("set " + ", ".join(changed))
    if not parts:
        parts.append("rewrote the index (compact or repair)")
    return "; ".join(parts)


def version_actions(cb: Codebook) -> dict[int, str]:
    """Per kept version, what it did ("added 3 edits", "removed b1", "calibrated: ...",
    "restored v4", "merged keys (41 -> 38)"), inferred from consecutive manifests, so
    codebooks written before this existed get one too."""
    from reasonedit_cli.store import read_codebook_file

    manifests: list[dict] = []
    for f in sorted((cb.path / "versions").glob("v*.json")):
        try:
            m = json.loads(read_codebook_file(f, cb.path))  # no FIFO can block history
            int(m["version"]), m["segments"], m["removed_edits"], m["config"]  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError):
            continue
        manifests.append(m)
    manifests.sort(key=lambda m: int(m["version"]))
    out: dict[int, str] = {}
    prev = None
    for i, m in enumerate(manifests):
        try:
            out[int(m["version"])] = _describe_change(prev, m, manifests[:i])
        except (KeyError, TypeError, ValueError):
            out[int(m["version"])] = "?"
        prev = m
    return out
