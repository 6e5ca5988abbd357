"""Write docs/cli.md, the command-line reference, from the `--help` of every command.

    python scripts/gen_cli_docs.py          # rewrite docs/cli.md (also: make docs)
    python scripts/gen_cli_docs.py --check  # exit 1 when docs/cli.md is stale (the tests)

The help is rendered as a user sees it in a terminal 100 columns wide, without colour,
so the file is the same on every machine: the environment variables that change Typer's
and Rich's output are set (or removed) below, before Typer is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "cli.md"
WIDTH = 100
REGENERATE = "python scripts/gen_cli_docs.py"

# Typer reads these when it is imported: a fixed width, never a terminal, no colour
os.environ["TERMINAL_WIDTH"] = str(WIDTH)
os.environ["_TYPER_FORCE_DISABLE_TERMINAL"] = "1"
os.environ["NO_COLOR"] = "1"
for name in ("FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS", "COLUMNS", "LINES", "TTY_COMPATIBLE"):
    os.environ.pop(name, None)
for name in [n for n in os.environ if n.startswith("REASONEDIT_")]:
    os.environ.pop(name)  # e.g. REASONEDIT_CODEBOOK, which options read as defaults
sys.path.insert(0, str(ROOT))  # the checkout's package, also when another is installed

import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from reasonedit_cli.cli import app  # noqa: E402

HEADER = f"""# Command-line reference

The `--help` of `reasonedit` and of each of its commands, as printed in a terminal
{WIDTH} columns wide. This file is generated: `{REGENERATE}` (or `make docs`)
rewrites it, and `tests/test_cli_docs.py` fails when it no longer matches the code. The
[README](../README.md#commands) explains the commands with examples; the JSON fields are
in [JSON output](../README.md#json-output).
"""


def command_names() -> list[str]:
    """The commands in the order `reasonedit --help` lists them."""
    group = typer.main.get_command(app)
    ctx = group.make_context("reasonedit", ["--help"], resilient_parsing=True)
    return list(group.list_commands(ctx))  # type: ignore[attr-defined]


def help_text(args: list[str]) -> str:
    """What `reasonedit ARGS --help` prints, without trailing blanks."""
    result = CliRunner().invoke(app, [*args, "--help"], prog_name="reasonedit", color=False)
    if result.exit_code != 0:
        raise SystemExit(f"reasonedit {' '.join(args)} --help failed: {result.output}")
    lines = [line.rstrip() for line in result.output.splitlines()]
    return "\n".join(lines).strip("\n")


def render() -> str:
    names = command_names()
    parts = [HEADER, "Commands: " + ", ".join(f"[`{n}`](#{n})" for n in names) + ".\n"]
    parts.append(f"## reasonedit\n\n```text\n{help_text([])}\n```\n")
    for name in names:
        parts.append(f"## {name}\n\n```text\n{help_text([name])}\n```\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--out", type=Path, default=OUT, help="the file (default docs/cli.md)")
    args = parser.parse_args(argv)
    text = render()
    out: Path = args.out
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else ""
        if current != text:
            print(f"{out} is stale: run `{REGENERATE}` and commit it", file=sys.stderr)
            return 1
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
