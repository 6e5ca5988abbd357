"""Evaluation sets built from a dataset file: A-OKVQA probes and locality, answer choices.

`evaluate --format aokvqa` builds everything the official A-OKVQA layout supports
(`question_id, image_id, question, choices, correct_choice_idx, direct_answers,
rationales`; COCO images `val2017/<image_id:012d>.jpg`):

* edits: the records the unedited model answers wrong (exact match with the correct
  choice, else the most frequent direct answer);
* T-Gen: a record's first `rephrasings` entry, same image and answer. The official
  files have no rephrasings, so T-Gen is empty unless the file adds that field;
* I-Gen: another record, on another image, with the same question (normalised) and the
  same answer as an edit (at most one per edit);
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
    edits = [r for r, ok in zip(records, right) if not ok]
    if not edits:
        raise InputError(f"{path}: the unedited model answers every question right; no edits")
    for e in edits:
        e.ensure_id()
    item_of = {id(r): raw[i] for i, r in enumerate(records)}
    choices = {
        e.id or "": c for e in edits if (c := _choices(item_of[id(e)].get("choices"))) is not None
    }
    edit_images = {e.image_sha256: e for e in edits}
    edit_questions = {normalize_answer(e.question) for e in edits}
    probes: list[Probe] = []
    for e in edits:
        reph = item_of[id(e)].get("rephrasings")
        if isinstance(reph, list) and reph and isinstance(reph[0], str) and reph[0].strip():
            probes.append(
                Probe(
                    e.image_bytes,
                    reph[0].strip(),
                    e.answer,
                    "t_gen",
                    e.id,
                    f"{e.where} rephrasing",
                    choices.get(e.id or ""),
                )
            )
    i_gen_done: set[str] = set()
    edit_objs = {id(e) for e in edits}
    for r, ok in zip(records, right):
        c = _choices(item_of[id(r)].get("choices"))
        if id(r) in edit_objs:
            continue
        if r.image_sha256 not in edit_images:
            same = [
                e
                for e in edits
                if normalize_answer(e.question) == normalize_answer(r.question)
                and normalize_answer(e.answer) == normalize_answer(r.answer)
                and e.id not in i_gen_done
            ]
            if same:
                i_gen_done.add(same[0].id or "")
                probes.append(
                    Probe(r.image_bytes, r.question, r.answer, "i_gen", same[0].id, r.where, c)
                )
                continue
        if not ok:
            continue  # neither an edit's probe nor locality: a mistake left unedited
        if r.image_sha256 in edit_images:
            e = edit_images[r.image_sha256]
            probes.append(Probe(r.image_bytes, r.question, r.answer, "hard_loc", e.id, r.where, c))
        elif normalize_answer(r.question) not in edit_questions:
            probes.append(Probe(r.image_bytes, r.question, r.answer, "loc", None, r.where, c))
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
