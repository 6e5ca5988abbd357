"""Pieces the `reasonedit` commands share: the command group, and option callbacks that
validate while parsing.

- `Group` prints every usage error (Click's own and ours) as one `Error: ...` line with
  exit code 2; help renders boolean flags as plain flags (`--json`, not `--json <bool>`);
  `inherit_codebook` lets commands take the global `-c/--codebook` given before the
  command name.
- The callbacks check a value while the command line is parsed, so a bad value is a
  usage error (exit 2) before any model loads, with the same wording in every command.
  What is valid is decided in `reasonedit_cli.validation`, shared with the file readers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperGroup, TyperOption

from reasonedit_cli import validation

#: Where the root callback keeps the global `--codebook` (in `ctx.meta`, shared by every
#: context of one invocation).
GLOBAL_CODEBOOK = "reasonedit.codebook"


class Group(TyperGroup):
    """The root command group of `reasonedit`."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Run the command; a usage error becomes one `Error:` line (exit 2)."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.exceptions.TyperException as exc:  # Click's usage errors
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # the help text itself
            else:
                ctx = getattr(exc, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                message = exc.format_message().replace("\n", " ")
                typer.echo(f"Error: {message}{hint}", err=True)
            sys.exit(getattr(exc, "exit_code", 2))
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _flag_aware(display_type_rich: Callable[..., Any]) -> Callable[..., Any]:
    """Typer 0.29 renders every option's type in help, flags too (`--json <bool>`); a flag
    takes no value, so it shows none."""

    def display(self: Any, ctx: Any) -> Any:
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return display_type_rich(self, ctx)

    display.__doc__ = display_type_rich.__doc__
    return display


if not getattr(TyperOption.display_type_rich, "_reasonedit", False):
    TyperOption.display_type_rich = _flag_aware(TyperOption.display_type_rich)  # type: ignore[method-assign]
    TyperOption.display_type_rich._reasonedit = True  # type: ignore[attr-defined]


# ------------------------------------------------------------------ callbacks
def choice(*choices: str) -> Callable[[Any], Any]:
    """A callback accepting only `choices` (for plain string options)."""

    def check(value: Any) -> Any:
        if value is None:
            return value
        problem = validation.choice_problem(value, choices)
        if problem:
            raise typer.BadParameter(problem)
        return value

    return check


def device_choice(value: str) -> str:
    return choice(*validation.DEVICES)(value)


def dtype_choice(value: str) -> str:
    return choice(*validation.DTYPES)(value)


def engine_choice(value: str) -> str:
    from reasonedit_cli.distributed import ENGINES

    return choice(*ENGINES)(value)


def text_value(value: str | None) -> str | None:
    """A question or answer given as a flag: not empty, not only punctuation."""
    if value is None:
        return value
    problem = validation.text_problem(value)
    if problem:
        raise typer.BadParameter(problem)
    return value.strip()


def reasoning_value(value: list[str] | None) -> list[str] | None:
    """Reasoning flags: every sentence a statement, not `...` or a placeholder."""
    if not value:
        return value
    from reasonedit_cli.edits import split_sentences

    for i, text in enumerate(value, start=1):
        sentences = split_sentences(text)
        if not sentences:
            raise typer.BadParameter(f"reasoning {i} is empty")
        for sentence in sentences:
            problem = validation.sentence_problem(sentence)
            if problem:
                raise typer.BadParameter(problem)
    return value


def max_image_pixels(value: int | None) -> int | None:
    """Apply `--max-image-pixels` (or its environment variable) to this process."""
    from reasonedit_cli.edits import set_max_image_pixels

    set_max_image_pixels(value)
    return value


def verbose(value: bool) -> bool:
    """Library logging on stderr with `--verbose`; otherwise errors only."""
    from reasonedit_cli.hub import configure_library_logging

    configure_library_logging(verbose=value)
    return value


def global_codebook(ctx: typer.Context, value: Any) -> Any:
    """The root's `-c`: remembered for the command that follows."""
    if value is not None:
        ctx.meta[GLOBAL_CODEBOOK] = value
    return value


def inherit_codebook(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
    """A command's `--codebook`, else the one given before the command name."""
    source = ctx.get_parameter_source(param.name or "codebook")
    inherited = ctx.meta.get(GLOBAL_CODEBOOK)
    if inherited is not None and (source is None or source.name != "COMMANDLINE"):
        return inherited
    return value


def one_of_aliases(value: Any, alias: Any, name: str, old: str) -> Any:
    """The value of an option given under its name or its older, hidden alias."""
    if value is not None and alias is not None:
        from reasonedit_cli.errors import UsageError

        raise UsageError(f"{old} is another name for {name}: give one of them")
    return value if value is not None else alias
