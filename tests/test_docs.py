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


ROOT = Path(__file__).resolve().parent.parent


def test_sample_files_the_readme_names_exist():
    """`sample_edits/` is rebuilt when the bundled model changes; the README must follow."""
    named = set(re.findall(r"sample_edits/[\w./-]+\.(?:png|jsonl)", README))
    assert named, "the README names no sample file"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README names missing sample files: {missing}"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The 'Using it from Python' example, as written, on a codebook in a temp dir."""
    section = README[README.index("## Using it from Python") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'Editor("cb"' in code
    monkeypatch.chdir(ROOT)  # the example uses paths relative to the checkout
    code = code.replace('Editor("cb"', f"Editor({str(tmp_path / 'cb')!r}")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    answer = namespace["answer"]
    assert answer.answer == "triangle" and answer.facts
