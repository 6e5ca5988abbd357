"""reasonedit: correct vision-language models with human reasoning, without retraining.

The package is usable as a library; the `reasonedit` command is a thin layer over it.
The names a library user needs are importable from here (docs/python-api.md):

    from reasonedit_cli import Editor, read_edits

    editor = Editor("my-codebook", create=True)   # the bundled demo VLM by default
    edits, _ = read_edits("sample_edits/edits.jsonl")
    editor.add_edits(edits)

Importing this package stays cheap: each name below is imported from its module on
first use (PEP 562 `__getattr__`), and heavy libraries (torch, transformers,
sentence-transformers) are imported only inside the functions that run a model.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0.dev0"

#: public name -> the module that defines it (one line per name, so moving a class to
#: another module is a one-line change here; tests/test_public_api.py checks that the
#: TYPE_CHECKING imports and `__all__` below say the same)
_EXPORTS: dict[str, str] = {
    # the editor: add edits, ask, merge, calibrate, manage the codebook
    "Editor": "reasonedit_cli.editor",
    "Answer": "reasonedit_cli.editor",
    "AddReport": "reasonedit_cli.editor",
    "Query": "reasonedit_cli.editor",
    "check_codebook": "reasonedit_cli.editor",
    # the codebook on disk (docs/codebook-format.md)
    "Codebook": "reasonedit_cli.store",
    "CodebookWriter": "reasonedit_cli.store",
    "KeyRecord": "reasonedit_cli.store",
    "EditRecord": "reasonedit_cli.store",
    "AddResult": "reasonedit_cli.store",
    "CheckReport": "reasonedit_cli.store",
    # edits and the input readers (README, Input formats)
    "Edit": "reasonedit_cli.edits",
    "edit_from_record": "reasonedit_cli.edits",
    "split_sentences": "reasonedit_cli.edits",
    "read_edits_jsonl": "reasonedit_cli.edits",
    "read_edits": "reasonedit_cli.datasets",
    "read_questions": "reasonedit_cli.datasets",
    "read_calibration_items": "reasonedit_cli.datasets",
    "FORMATS": "reasonedit_cli.datasets",
    # retrieval and its results
    "Retrieval": "reasonedit_cli.retrieval",
    "Hit": "reasonedit_cli.retrieval",
    "retrieve": "reasonedit_cli.retrieval",
    "build_prompt": "reasonedit_cli.retrieval",
    "MergePlan": "reasonedit_cli.merging",
    # calibration and its check
    "CalibrationResult": "reasonedit_cli.calibration",
    "plot_calibration": "reasonedit_cli.calibration",
    "RetrievalCheck": "reasonedit_cli.selfcheck",
    "CalibrationRefused": "reasonedit_cli.selfcheck",
    # evaluation (docs/evaluation.md)
    "evaluate": "reasonedit_cli.evaluation",
    "Probe": "reasonedit_cli.evaluation",
    "read_probes": "reasonedit_cli.evaluation",
    "exact_match": "reasonedit_cli.evaluation",
    "markdown_table": "reasonedit_cli.evaluation",
    "write_report": "reasonedit_cli.evaluation",
    "build_easyvqa": "reasonedit_cli.easyvqa",
    "EvaluationRun": "reasonedit_cli.evaluation",
    "EvaluationInputs": "reasonedit_cli.evaluation",
    # the models and the dual key, for callers that drive them directly
    "VLM": "reasonedit_cli.vlm",
    "VLMBackend": "reasonedit_cli.backend",
    "TextBackend": "reasonedit_cli.backend",
    "TextEncoder": "reasonedit_cli.text",
    "DualEmbedder": "reasonedit_cli.embedding",
    "Preset": "reasonedit_cli.presets",
    "get_preset": "reasonedit_cli.presets",
    "PRESET_NAMES": "reasonedit_cli.presets",
    # expected failures (the CLI prints them on one line and exits with exit_code)
    "ReasonEditError": "reasonedit_cli.errors",
    "UsageError": "reasonedit_cli.errors",
    "InputError": "reasonedit_cli.errors",
    "CodebookError": "reasonedit_cli.errors",
    "CodebookLockedError": "reasonedit_cli.errors",
}

# the same names, spelled out so that linters and type checkers see them
__all__ = [
    "__version__",
    "Editor",
    "Answer",
    "AddReport",
    "Query",
    "check_codebook",
    "Codebook",
    "CodebookWriter",
    "KeyRecord",
    "EditRecord",
    "AddResult",
    "CheckReport",
    "Edit",
    "edit_from_record",
    "split_sentences",
    "read_edits_jsonl",
    "read_edits",
    "read_questions",
    "read_calibration_items",
    "FORMATS",
    "Retrieval",
    "Hit",
    "retrieve",
    "build_prompt",
    "MergePlan",
    "CalibrationResult",
    "plot_calibration",
    "RetrievalCheck",
    "CalibrationRefused",
    "evaluate",
    "Probe",
    "read_probes",
    "exact_match",
    "markdown_table",
    "write_report",
    "build_easyvqa",
    "EvaluationRun",
    "EvaluationInputs",
    "VLM",
    "VLMBackend",
    "TextBackend",
    "TextEncoder",
    "DualEmbedder",
    "Preset",
    "get_preset",
    "PRESET_NAMES",
    "ReasonEditError",
    "UsageError",
    "InputError",
    "CodebookError",
    "CodebookLockedError",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; the same names as _EXPORTS
    from reasonedit_cli.backend import TextBackend, VLMBackend
    from reasonedit_cli.calibration import CalibrationResult, plot_calibration
    from reasonedit_cli.datasets import (
        FORMATS,
        read_calibration_items,
        read_edits,
        read_questions,
    )
    from reasonedit_cli.easyvqa import build_easyvqa
    from reasonedit_cli.editor import AddReport, Answer, Editor, Query, check_codebook
    from reasonedit_cli.edits import Edit, edit_from_record, read_edits_jsonl, split_sentences
    from reasonedit_cli.embedding import DualEmbedder
    from reasonedit_cli.errors import (
        CodebookError,
        CodebookLockedError,
        InputError,
        ReasonEditError,
        UsageError,
    )
    from reasonedit_cli.evaluation import (
        EvaluationInputs,
        EvaluationRun,
        Probe,
        evaluate,
        exact_match,
        markdown_table,
        read_probes,
        write_report,
    )
    from reasonedit_cli.merging import MergePlan
    from reasonedit_cli.presets import PRESET_NAMES, Preset, get_preset
    from reasonedit_cli.retrieval import Hit, Retrieval, build_prompt, retrieve
    from reasonedit_cli.selfcheck import CalibrationRefused, RetrievalCheck
    from reasonedit_cli.store import (
        AddResult,
        CheckReport,
        Codebook,
        CodebookWriter,
        EditRecord,
        KeyRecord,
    )
    from reasonedit_cli.text import TextEncoder
    from reasonedit_cli.vlm import VLM


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use, then keep it here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
