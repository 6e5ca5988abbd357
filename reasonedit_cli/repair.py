"""Self-repair from what survives: `reasonedit doctor --repair` (issue 23).

The codebook's sources of truth overlap: a key row names its edit, image, question or
sentence and value; an edit row names its image, question, answer and reasoning; images
are content-addressed and self-verifying; versions/ holds every committed manifest. So
most single damages can be rebuilt from the rest:

1. a damaged or missing `manifest.json`: the newest versions/ copy whose segments all
   verify (`store.restore_manifest`);
2. a damaged edits segment: its edits rebuilt from their keys (question and answer from
   the answer key, reasoning from the sentence keys, the image from any key); what
   keys cannot hold (`source`, the time added, a box that is not a patch crop) is named;
3. a damaged keys segment: the keys of the edits it served re-embedded from the edits and
   the stored images with the codebook's model and settings (layer, w), key layouts
   (patch crops) taken from older segments that still verify;
4. derived files: rebuilt and compacted as before (`Codebook.check(repair=True)`).

Every rebuild is committed as a new version; no file is deleted (a damaged manifest is
moved to damaged/, damaged segments stay for the versions that list them).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CodebookError
from .store import (
    CheckReport,
    Codebook,
    EditRecord,
    KeyRecord,
    key_entries,
    key_record,
    restore_manifest,
)

_ANSWER_RE = re.compile(r"The answer to '(.*)' is (.*)\.", re.S)  # editor.answer_value


def repair_codebook(
    path: str | Path,
    *,
    lock_timeout: float = 10.0,
    editor_factory: Callable[[Path], Any] | None = None,
) -> CheckReport:
    """Repair what can be rebuilt, then check; every step is a `repaired` line.

    editor_factory(path) gives the `Editor` that re-embeds keys (default: one on the
    codebook, with its model and settings); it is only made when a keys segment is lost.
    """
    steps = restore_manifest(path, lock_timeout)
    cb = Codebook.open(path)
    lost: list[str] = []
    bad = cb.segment_problems()
    if bad:
        steps += [f"damaged: {err.split(': ', 1)[-1]}" for _, err in bad]
        edits_bad = [e for e, _ in bad if e["kind"] == "edits"]
        keys_bad = [e for e, _ in bad if e["kind"] == "keys"]
        skip = {e["path"] for e, _ in bad}
        replacements: list[tuple[dict, list]] = []
        recovered_edits: list[EditRecord] = []
        if edits_bad:
            recovered_edits, notes = edits_from_keys(cb, skip)
            steps += notes
            lost += [n for n in notes if "not recoverable (" in n]
            lost += _unaccounted_edits(cb, edits_bad, skip, recovered_edits)
            replacements += _spread(edits_bad, recovered_edits)
        if keys_bad:
            editor = (editor_factory or _default_editor)(cb.path)
            keys, notes, missing = keys_from_edits(cb, editor, skip, recovered_edits)
            steps += notes
            lost += missing
            replacements += [(keys_bad[0], keys)] + [(e, []) for e in keys_bad[1:]]
        with cb.writer(lock_timeout) as w:
            version = w.rebuild_segments(replacements)
        steps.append(f"committed the rebuilt segments as version {version}")
        rows = sum(int(e["rows"]) for e in keys_bad)
        if keys_bad and len(keys) > rows:
            # the lost segment held fewer keys than its edits make: merged keys
            # (docs/method.md#merging). The same merge plan over the same re-embedded keys merges
            # them again.
            from .editor import Editor

            plan, version = Editor(cb.path, lock_timeout=lock_timeout).merge_keys()
            merged = len(plan.merged_into)
            steps.append(
                f"keys: the lost segment held {rows} keys, its edits make {len(keys)}: "
                f"re-ran merge-keys ({merged} keys merged, version {version})"
            )
            if len(keys) - merged != rows:
                steps.append(
                    f"keys: {len(keys) - merged} keys after merging, {rows} before the "
                    f"damage (merges made on insert are replanned over all keys)"
                )
        cb.refresh()
    rep = cb.check(repair=True, lock_timeout=lock_timeout)
    rep.repaired[:0] = steps
    rep.problems += lost
    return rep


def _unaccounted_edits(
    cb: Codebook, bad: list[dict], skip: set[str], recovered: list[EditRecord]
) -> list[str]:
    """A problem line when the damaged edits segments held more edits than keys could
    rebuild (edits whose keys are lost too): their count from the manifest, and the
    images no surviving edit or key uses, which are all that is left of them."""
    held = sum(int(e["rows"]) for e in bad)
    first = min(int(e["version"]) for e in bad)
    have = set(cb.surviving_table("edits", skip).column("edit_id").to_pylist())
    removed = {
        t["edit_id"]
        for t in cb.manifest["removed_edits"]
        if int(t["version"]) >= first and t["edit_id"] not in have
    }
    missing = held - len(recovered) - len(removed)
    if missing <= 0:
        return []
    used = set(cb.surviving_table("edits", skip).column("image_sha256").to_pylist())
    used |= set(cb.surviving_table("keys", skip).column("image_sha256").to_pylist())
    used |= {e.image_sha256 for e in recovered}
    orphans = sorted(
        f"images/{p.parent.name}/{p.name}"
        for p in (cb.path / "images").glob("*/*")
        if ".tmp-" not in p.name and p.name.split(".")[0] not in used
    )
    where = ", ".join(e["path"] for e in bad)
    return [
        f"{missing} edit(s) of {where} are not recoverable: their keys are lost too (their "
        f"ids are unknown; add them again)"
        + (
            f"; images no live edit uses (theirs, or of removed edits): {', '.join(orphans[:5])}"
            if orphans
            else ""
        )
    ]


def _default_editor(path: Path) -> Any:
    """An Editor with the codebook's model, text model, layer and w that never reads the
    (damaged) keys: opened without a codebook, given the settings like a Ray worker."""
    from .editor import Editor
    from .embedding import DEFAULT_LAYER
    from .presets import preset_of

    cfg = Codebook.open(path).config
    editor = Editor(
        None,
        model=cfg.get("model"),
        text_model=cfg.get("text_model"),
        device="cpu",
        preset=preset_of(cfg).name,  # key texts and layouts as the codebook's preset made them
    )
    try:
        revision = editor.vlm.revision
    except Exception as e:  # noqa: BLE001 - any loading failure: one clear line
        why = " ".join(str(e).split())[:200]
        raise CodebookError(
            f"codebook {path}: cannot re-embed the lost keys: its model "
            f"{cfg.get('model')!r} does not load ({type(e).__name__}: {why})"
        ) from None
    stored = cfg.get("model_revision")
    if stored and revision != stored:
        raise CodebookError(
            f"codebook {path}: its keys were embedded with {cfg.get('model')} revision "
            f"{stored}, but that model now has revision {revision}; "
            f"cannot re-embed the lost keys"
        )
    editor.use_embedding(cfg.get("layer") or DEFAULT_LAYER, cfg.get("w"))
    return editor


def _spread(entries: list[dict], records: list[EditRecord]) -> list[tuple[dict, list]]:
    """Every rebuilt edit goes into the first damaged edits segment's place; the other
    damaged ones are dropped from the new version (their files stay)."""
    return [(entries[0], records)] + [(e, []) for e in entries[1:]]


def edits_from_keys(cb: Codebook, skip: set[str]) -> tuple[list[EditRecord], list[str]]:
    """Edit records of every edit whose keys survive but whose edit row is lost.

    Returns the records (keys order) and one line per edit saying what was rebuilt and
    what could not be.
    """
    have = set(cb.surviving_table("edits", skip).column("edit_id").to_pylist())
    keys = cb.surviving_table("keys", skip).drop_columns(["vector"]).to_pylist()
    own: dict[str, list[dict]] = {}
    values: dict[str, list[str]] = {}
    for r in keys:
        for value, eid in key_entries(r):
            if eid not in have:
                values.setdefault(eid, []).append(value)
        if r["edit_id"] not in have:
            own.setdefault(r["edit_id"], []).append(r)
    out: list[EditRecord] = []
    notes: list[str] = []
    for eid in values:
        rows = own.get(eid, [])
        question = answer = None
        for v in values[eid]:
            m = _ANSWER_RE.fullmatch(v)
            if m:
                question, answer = m.group(1), m.group(2)
                break
        reasoning: list[str] = []
        boxes: list[list[int] | None] = []
        for r in rows:
            if r["kind"] == "sentence" and r["key_text"] not in reasoning:
                reasoning.append(r["key_text"])
                boxes.append(None)
            elif r["kind"] == "patch" and r["key_text"] in reasoning:
                j = reasoning.index(r["key_text"])
                if boxes[j] is None and r["box"]:
                    boxes[j] = list(r["box"])
        if not reasoning:  # sentence keys merged into others: their values are sentences
            reasoning = [v for v in dict.fromkeys(values[eid]) if not _ANSWER_RE.fullmatch(v)]
            boxes = [None] * len(reasoning)
        shas = {r["image_sha256"] for r in rows}
        if question is None or len(shas) != 1:
            why = "no answer key" if question is None else "no key of its own names its image"
            notes.append(f"edit {eid}: not recoverable ({why}); add it again")
            continue
        (sha,) = shas
        try:
            cb.read_image_bytes(sha)
        except CodebookError:
            notes.append(f"edit {eid}: not recoverable (its image {sha[:12]} is missing)")
            continue
        out.append(
            EditRecord(
                edit_id=eid,
                image_sha256=sha,
                question=question,
                answer=answer or "",
                reasoning=reasoning,
                boxes=boxes if any(b is not None for b in boxes) else None,
                source="",
            )
        )
        notes.append(
            f"edit {eid}: rebuilt from its keys (question, answer, {len(reasoning)} "
            f"reasoning sentences, image); not recoverable: source, time added"
            + (", boxes (taken from patch crops)" if any(boxes) else "")
        )
    return out, notes


def keys_from_edits(
    cb: Codebook, editor: Any, skip: set[str], extra_edits: list[EditRecord]
) -> tuple[list[KeyRecord], list[str], list[str]]:
    """Re-embedded keys of every live edit no surviving key serves.

    Key layouts (kinds, texts, patch crops) come from the newest older keys segment that
    holds the edit and still verifies; without one they are made as add-edit does with
    the codebook's `patches` setting (manual boxes only when it has none). Returns the
    keys, one line per step, and problems (edits whose keys could not be rebuilt).
    """
    from .editor import _seed, crop
    from .edits import decode_image

    edits = cb.surviving_table("edits", skip).to_pylist()
    known = {e["edit_id"] for e in edits}
    edits += [
        {
            "edit_id": e.edit_id,
            "image_sha256": e.image_sha256,
            "question": e.question,
            "answer": e.answer,
            "reasoning": e.reasoning,
            "boxes": e.boxes,
        }
        for e in extra_edits
        if e.edit_id not in known
    ]
    served = {
        eid
        for r in cb.surviving_table("keys", skip).drop_columns(["vector"]).to_pylist()
        for _, eid in key_entries(r)
    }
    todo = [e for e in edits if e["edit_id"] not in served]
    if not todo:
        return [], ["keys: every live edit still has its keys"], []
    want = {e["edit_id"] for e in todo}
    # per edit, the segment holding most of its own keys (a segment written after a
    # merge lacks the merged-away ones; the add's own segment has them all), newest on ties
    layouts: dict[str, list[dict]] = {}
    for _, table in cb.kept_key_tables(skip):  # newest first
        got: dict[str, list[dict]] = {}
        for r in table.drop_columns(["vector"]).to_pylist():
            if r["edit_id"] in want:
                got.setdefault(r["edit_id"], []).append(r)
        for eid, rows in got.items():
            if len(rows) > len(layouts.get(eid, [])):
                layouts[eid] = rows
    specs: list[dict] = []
    fresh = [e for e in todo if e["edit_id"] not in layouts]
    if fresh:
        specs_fresh = _fresh_specs(cb, editor, fresh)
    for e in todo:
        if e["edit_id"] in layouts:
            for r in layouts[e["edit_id"]]:
                specs.append(
                    {
                        k: r[k]
                        for k in ("edit_id", "kind", "value", "key_text", "box", "image_sha256")
                    }
                )
        else:
            specs += specs_fresh[e["edit_id"]]
    images: dict[str, Any] = {}
    problems: list[str] = []
    usable = []
    for s in specs:
        sha = s["image_sha256"]
        if sha not in images:
            try:
                images[sha] = decode_image(cb.read_image_bytes(sha), f"image {sha[:12]}")
            except Exception as e:  # noqa: BLE001 - reported, the other keys go on
                images[sha] = None
                problems.append(f"keys of edit {s['edit_id']}: image unusable ({e})")
        if images[sha] is not None:
            usable.append(s)
    imgs = [
        crop(images[s["image_sha256"]], s["box"]) if s["box"] else images[s["image_sha256"]]
        for s in usable
    ]
    seeds = [_seed(s["edit_id"], s["kind"], s["key_text"], s["box"]) for s in usable]
    vectors, radii = editor.embed_with_radii(imgs, [s["key_text"] for s in usable], seeds)
    keys = [key_record({**s, "radius": float(radii[i])}, vectors[i]) for i, s in enumerate(usable)]
    cfg = cb.config
    notes = [
        f"keys: re-embedded {len(keys)} keys of {len(todo)} edits with {cfg.get('model')} "
        f"(layer {cfg.get('layer')}, w {cfg.get('w')}); layouts from older segments for "
        f"{len(todo) - len(fresh)}, made afresh for {len(fresh)}"
    ]
    return keys, notes, problems


def _fresh_specs(cb: Codebook, editor: Any, todo: list[dict]) -> dict[str, list[dict]]:
    """Key specs made as add-edit makes them (editor.key_specs), per edit id."""
    from .edits import Edit, decode_image

    patches = cb.config.get("patches", "none")
    top_k = int(cb.config.get("top_k_patches", 1))
    edits, images = [], []
    for e in todo:
        ed = Edit(
            image_path=Path(e["image_sha256"]),
            question=e["question"],
            answer=e["answer"],
            reasoning=list(e["reasoning"] or []),
            boxes=e["boxes"],
            id=e["edit_id"],
        )
        edits.append(ed)
        images.append(decode_image(cb.read_image_bytes(e["image_sha256"]), e["edit_id"]))
    specs = editor.key_specs(
        edits,
        images,
        patches=patches if patches in ("auto", "none") else "none",
        top_k_patches=top_k,
    )
    out: dict[str, list[dict]] = {e["edit_id"]: [] for e in todo}
    for s in specs:
        e = todo[s.edit_index]
        out[e["edit_id"]].append(
            {
                "edit_id": e["edit_id"],
                "kind": s.kind,
                "value": s.value,
                "key_text": s.key_text,
                "box": list(s.box) if s.box else None,
                "image_sha256": e["image_sha256"],
            }
        )
    return out
