"""Evaluation sets built from a dataset file: A-OKVQA probes and locality, answer choices.

`evaluate --format aokvqa` builds everything the official A-OKVQA layout supports
(`question_id, image_id, question, choices, correct_choice_idx, direct_answers,
rationales`; COCO images `val2017/<image_id:012d>.jpg`):

* edits: the records the unedited model answers wrong (exact match with the correct
  choice, else the most frequent direct answer), in file order;
* T-Gen: a record's first `rephrasings` entry, same image and answer. The official
  files have no rephrasings, so T-Gen is empty unless the file adds that field;
* I-Gen: another record, on another image, with the same question (normalised) and the
  same answer as an edit (at most one per edit; a later mistake of that kind becomes the
  earlier edit's I-Gen probe rather than an edit of its own);
* R-Gen and CoE-Gen: none (the file has no question implied by a rationale, and no
  record of a repeated mistake in another context);
* Loc: records the unedited model answers right whose image no edit uses and whose
  question no edit asks (the reference's unrelated set, without its sampling);
* Hard-Loc: records the unedited model answers right on an edited image (another
  question about the same picture), which the edit must leave unchanged.

Every probe and edited sample keeps its record's `choices`, so `evaluate` also reports
multiple-choice accuracy (`MC-*`). For RationaleVQA, `rationalevqa_choices` gives the
`choices` column per edit id.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reasonedit_cli.edits import Edit, InputError


def _choices(value: Any) -> list[str] | None:
    if isinstance(value, list) and len(value) >= 2 and all(isinstance(c, str) for c in value):
        return [c for c in value]
    return None


def build_aokvqa(
    path: str,
    images_root: Path | None,
    ask: Callable[[Sequence[bytes], Sequence[str]], list[str]],
) -> tuple[list[Edit], list[Any], dict[str, list[str]], dict[str, Any]]:
    """(edits, probes, choices by edit id, info) from an A-OKVQA JSON file.

    `ask(image_bytes, questions)` gives the unedited model's answers (cached by the caller).
    """
    from reasonedit_cli.datasets import read_edits
    from reasonedit_cli.evaluation import Probe, exact_match, normalize_answer

    records, _ = read_edits(path, "aokvqa", images_root=images_root)
    raw = json.loads(Path(path).read_text(encoding="utf-8"))  # readable: parsed above
    if not records:
        raise InputError(f"{path}: no A-OKVQA questions found")
    preds = ask([r.image_bytes for r in records], [r.question for r in records])
    right = [exact_match(p, r.answer) for p, r in zip(preds, records)]
    item_of = {id(r): raw[i] for i, r in enumerate(records)}

    def qa(r: Edit) -> tuple[str, str]:
        return normalize_answer(r.question), normalize_answer(r.answer)

    def options(r: Edit) -> list[str] | None:
        return _choices(item_of[id(r)].get("choices"))

    # 1. edits: the mistakes, in file order; a mistake repeating an earlier edit's
    # question and answer on another image is that edit's I-Gen probe instead
    edits: list[Edit] = []
    i_gen: dict[str, Edit] = {}  # edit id -> its I-Gen record
    first_of: dict[tuple[str, str], Edit] = {}
    for r, ok in zip(records, right):
        if ok:
            continue
        r.ensure_id()
        e = first_of.get(qa(r))
        if e is not None and e.image_sha256 != r.image_sha256 and e.id not in i_gen:
            i_gen[e.id or ""] = r
            continue
        first_of.setdefault(qa(r), r)
        edits.append(r)
    if not edits:
        raise InputError(f"{path}: the unedited model answers every question right; no edits")
    choices = {e.id or "": c for e in edits if (c := options(e)) is not None}
    edit_images = {e.image_sha256: e for e in edits}
    edit_questions = {normalize_answer(e.question) for e in edits}
    used = {id(r) for r in edits} | {id(r) for r in i_gen.values()}
    # 2. the right answers: I-Gen of an edit still without one, Hard-Loc, or Loc
    for r, ok in zip(records, right):
        if not ok or id(r) in used:
            continue
        e = first_of.get(qa(r))
        if e is not None and e.image_sha256 != r.image_sha256 and e.id not in i_gen:
            i_gen[e.id or ""] = r
            used.add(id(r))
    probes: list[Probe] = []
    for e in edits:
        reph = item_of[id(e)].get("rephrasings")
        if isinstance(reph, list) and reph and isinstance(reph[0], str) and reph[0].strip():
            where = f"{e.where} rephrasing"
            probes.append(
                Probe(e.image_bytes, reph[0].strip(), e.answer, "t_gen", e.id, where, options(e))
            )
        if e.id in i_gen:
            r = i_gen[e.id or ""]
            probes.append(
                Probe(r.image_bytes, r.question, r.answer, "i_gen", e.id, r.where, options(r))
            )
    for r, ok in zip(records, right):
        if not ok or id(r) in used:
            continue  # a mistake left unedited is neither a probe nor locality
        if r.image_sha256 in edit_images:
            e = edit_images[r.image_sha256]
            probes.append(
                Probe(r.image_bytes, r.question, r.answer, "hard_loc", e.id, r.where, options(r))
            )
        elif normalize_answer(r.question) not in edit_questions:
            probes.append(
                Probe(r.image_bytes, r.question, r.answer, "loc", None, r.where, options(r))
            )
    info = {
        "dataset": "aokvqa",
        "file": path,
        "records": len(records),
        "unedited_right": sum(right),
        "edits": len(edits),
        "probes": {k: sum(p.kind == k for p in probes) for k in sorted({p.kind for p in probes})},
    }
    return edits, probes, choices, info


def rationalevqa_choices(path: str, edits: Sequence[Edit]) -> dict[str, list[str]]:
    """The `choices` column of a RationaleVQA file per edit id (rows in file order)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "choices" not in table.column_names:
        return {}
    out: dict[str, list[str]] = {}
    for e, c in zip(edits, table.column("choices").to_pylist()):
        ch = _choices(c)
        if ch is not None and e.ensure_id():
            out[e.id or ""] = ch
    return out
