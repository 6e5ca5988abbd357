"""Exceptions for expected failures.

The CLI catches `ReasonEditError`, prints its message on one line (no traceback) and exits
with `exit_code`, so library code raises these instead of letting low-level exceptions
(pyarrow, json, OSError) escape.
"""


class ReasonEditError(Exception):
    """An expected failure: the CLI prints the message on one line and exits with exit_code."""

    exit_code = 1


class UsageError(ReasonEditError):
    """The command line itself is wrong (exit code 2, like Click's usage errors)."""

    exit_code = 2


class CodebookError(ReasonEditError):
    """A codebook file is missing, damaged, foreign or of an unsupported format version."""


class CodebookLockedError(CodebookError):
    """Another writer holds the codebook lock and did not release it within the timeout."""


class InputError(ReasonEditError):
    """Bad user input (JSONL records, images)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what a
    one-line error quotes of a low-level failure (transformers, Ray)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
