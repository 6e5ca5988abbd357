"""What counts as a valid value, in one place, for the CLI and the input readers alike.

The functions here return a problem description (or None) instead of raising, so each
caller can phrase it for its context: the CLI turns it into a usage error naming the
flag (exit 2, checked while parsing, before any model loads), the JSONL and dataset
readers into an input error naming the file and line (exit 1). Nothing here imports
more than the standard library, so option callbacks stay cheap.
"""

from __future__ import annotations

import re
import unicodedata

#: Choices of the model options; the model code checks them again for library callers.
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")

#: Words that stand in for a reason rather than give one (compared case-insensitively,
#: without surrounding punctuation or brackets).
PLACEHOLDERS = frozenset(
    {
        "todo",
        "tbd",
        "tba",
        "n/a",
        "na",
        "none",
        "null",
        "nil",
        "xxx",
        "reason",
        "reasoning",
        "placeholder",
        "lorem ipsum",
    }
)


def has_word(text: str) -> bool:
    """True when `text` holds at least one letter or digit (in any script)."""
    return any(unicodedata.category(c)[0] in ("L", "N") for c in text)


def text_problem(text: str) -> str | None:
    """Why a question or answer is not usable, or None: empty, or no letter or digit."""
    stripped = text.strip()
    if not stripped:
        return "is empty"
    if not has_word(stripped):
        return f"{stripped!r} has no letter or digit"
    return None


def sentence_problem(sentence: str) -> str | None:
    """Why one reasoning sentence is not a reason, or None.

    A reason is a statement: it must contain a letter or digit (so `...`, `…`, `-` or `?`
    are rejected) and must not be a placeholder word such as `TODO`, `N/A` or `<reason>`.
    """
    stripped = sentence.strip()
    if not stripped:
        return "is empty"
    if not has_word(stripped):
        return f"{stripped!r} is a placeholder, not a reason (no letter or digit)"
    core = re.sub(r"^[\s<\[{(\"'.]+|[\s>\]})\"'.!?:;,]+$", "", stripped).lower()
    if core in PLACEHOLDERS:
        return f"{stripped!r} is a placeholder, not a reason"
    return None


def choice_problem(value: str, choices: tuple[str, ...]) -> str | None:
    """Why `value` is not one of `choices`, or None."""
    if value in choices:
        return None
    return f"{value!r} is not one of {', '.join(choices)}"
