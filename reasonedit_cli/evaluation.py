"""The evaluation protocol (DESIGN 2): edit, then probe reliability, generality, locality.

Input is an edit JSONL and a probe JSONL. Each probe is `{image, question, answer, kind,
edit_id?}` with kind one of `t_gen`, `i_gen`, `r_gen`, `coe_gen` (tied to an edit by
`edit_id`) or `loc` (unrelated). The edited samples themselves are the `acc` probes.

Metrics are exact-match accuracies after normalisation (lower case, no punctuation or
articles). Retrieval diagnostics: for generality probes, the share that retrieved a fact
of their own edit (recall); for locality probes, the share that retrieved nothing.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonedit_cli.errors import InputError

PROBE_KINDS = ("acc", "t_gen", "i_gen", "r_gen", "coe_gen", "loc")
METRIC_NAMES = {
    "acc": "Acc",
    "t_gen": "T-Gen",
    "i_gen": "I-Gen",
    "r_gen": "R-Gen",
    "coe_gen": "CoE-Gen",
    "loc": "Loc",
}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, squeeze spaces (VQA-style matching)."""
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


@dataclass
class Probe:
    """One question to ask after editing, with its expected answer."""

    image_bytes: bytes
    question: str
    answer: str
    kind: str
    edit_id: str | None = None
    where: str = ""


def read_probes(path: str) -> list[Probe]:
    """Probes from JSONL; `kind` must be one of the protocol's probe kinds."""
    from reasonedit_cli.datasets import read_questions

    probes = []
    for item in read_questions(path):
        where = item["where"]
        kind = item.get("kind")
        if kind not in PROBE_KINDS:
            raise InputError(
                f"{where}: 'kind' must be one of {', '.join(PROBE_KINDS)}, got {kind!r}"
            )
        if not isinstance(item.get("answer"), str) or not item["answer"].strip():
            raise InputError(f"{where}: a probe needs a non-empty string 'answer'")
        edit_id = item.get("edit_id")
        if kind not in ("loc",) and not isinstance(edit_id, str):
            raise InputError(f"{where}: a {kind} probe needs the 'edit_id' of its edit")
        probes.append(
            Probe(item["image_bytes"], item["question"], item["answer"], kind, edit_id, where)
        )
    return probes


def evaluate(
    editor: Any,
    edits: Sequence[Any],
    probes: Sequence[Probe],
    *,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Add `edits` to the editor's codebook, ask every probe edited and unedited.

    Returns `{"methods": {name: {metric: value}}, "retrieval": {...}, "counts": {...}}`.
    """
    from reasonedit_cli.edits import decode_image

    editor.add_edits(list(edits), batch_size=batch_size)
    all_probes = [
        Probe(e.image_bytes, e.question, e.answer, "acc", e.id, e.where) for e in edits
    ] + list(probes)
    images = [decode_image(p.image_bytes, p.where or "probe") for p in all_probes]
    questions = [p.question for p in all_probes]
    results: dict[str, list[Any]] = {}
    for method, no_edit in (("unedited", True), ("reasonedit", False)):
        answers = []
        for start in range(0, len(all_probes), batch_size):
            answers.extend(
                editor.ask(
                    images[start : start + batch_size],
                    questions[start : start + batch_size],
                    no_edit=no_edit,
                    batch_size=batch_size,
                )
            )
            if progress:
                progress(min(batch_size, len(all_probes) - start))
        results[method] = answers
    return summarize(all_probes, results)


def summarize(probes: Sequence[Probe], results: dict[str, list[Any]]) -> dict[str, Any]:
    """Per-method accuracies by probe kind, and retrieval recall/rejection per kind."""
    counts: dict[str, int] = defaultdict(int)
    for p in probes:
        counts[p.kind] += 1
    methods: dict[str, dict[str, float | None]] = {}
    for method, answers in results.items():
        correct: dict[str, int] = defaultdict(int)
        for p, a in zip(probes, answers):
            correct[p.kind] += exact_match(a.answer, p.answer)
        methods[method] = {
            METRIC_NAMES[k]: (correct[k] / counts[k] if counts.get(k) else None)
            for k in PROBE_KINDS
        }
        gen = [methods[method][METRIC_NAMES[k]] for k in ("t_gen", "i_gen", "r_gen")]
        gen = [g for g in gen if g is not None]
        methods[method]["Gen-mean"] = sum(gen) / len(gen) if gen else None
    retrieval: dict[str, float | None] = {}
    edited = results.get("reasonedit", [])
    for kind in PROBE_KINDS:
        pairs = [(p, a) for p, a in zip(probes, edited) if p.kind == kind]
        if not pairs:
            retrieval[kind] = None
        elif kind == "loc":
            retrieval[kind] = sum(a.rejected for _, a in pairs) / len(pairs)
        else:
            hit = sum(
                any(h.edit_id == p.edit_id for h in (a.retrieval.hits if a.retrieval else []))
                for p, a in pairs
            )
            retrieval[kind] = hit / len(pairs)
    return {"methods": methods, "retrieval": retrieval, "counts": dict(counts)}


def markdown_table(report: dict[str, Any]) -> str:
    """The metrics table as Markdown (README, --report)."""
    cols = [METRIC_NAMES[k] for k in PROBE_KINDS] + ["Gen-mean"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, metrics in report["methods"].items():
        cells = ["-" if metrics.get(c) is None else f"{metrics[c]:.3f}" for c in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], directory: Path) -> list[Path]:
    """metrics.json and metrics.md in `directory`."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    out = [directory / "metrics.json", directory / "metrics.md"]
    out[0].write_text(json.dumps(report, indent=2) + "\n")
    out[1].write_text(markdown_table(report))
    return out
