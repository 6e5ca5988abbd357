"""docs/cli.md is the `--help` of every command: a test fails when it is stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen_cli_docs.py"


def _check(path: Path) -> subprocess.CompletedProcess:
    # a subprocess: the script fixes Typer's width and colour before Typer is imported
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_cli_reference_is_current():
    result = _check(ROOT / "docs" / "cli.md")
    assert result.returncode == 0, (
        "docs/cli.md does not match the commands' --help; regenerate it with "
        f"`python scripts/gen_cli_docs.py` (or `make docs`) and commit it.\n{result.stderr}"
    )


def test_stale_reference_is_caught(tmp_path):
    """The check can fail: one changed line of help is reported, with how to regenerate."""
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    stale = tmp_path / "cli.md"
    stale.write_text(current.replace("Show the version.", "Show the versoin."), encoding="utf-8")
    result = _check(stale)
    assert result.returncode == 1
    assert "stale: run `python scripts/gen_cli_docs.py`" in result.stderr


def test_reference_documents_every_command_and_option():
    """Each command has its section, and every option of it appears there (hidden ones,
    the older spellings such as `--pairs`, stay out of the help and of the reference)."""
    import typer

    from reasonedit_cli.cli import app

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        section = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in section, (name, opt)
