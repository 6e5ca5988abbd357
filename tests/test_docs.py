"""Docs that cannot drift: every command is documented in the README with an example,
and every option of every command appears in its `--help`."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from typer.testing import CliRunner

from reasonedit_cli.cli import app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _commands() -> list[str]:
    group = typer.main.get_command(app)
    return sorted(group.commands)  # type: ignore[attr-defined]


def test_every_command_has_a_readme_example():
    missing = [c for c in _commands() if not re.search(rf"reasonedit {c}\b", README)]
    assert not missing, f"commands without a README example: {missing}"


def test_every_command_help_works_and_documents_json():
    runner = CliRunner()
    for command in _commands():
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "--json" in result.output, command
