"""docs/python-api.md runs as written: every ```python block, in order, in one namespace,
in a temp dir that sees the checkout's `sample_edits/`, on the bundled demo VLM."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "python-api.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_examples_import_only_the_public_api():
    """A user reads `from reasonedit_cli import ...`, never a submodule's path."""
    code = "\n".join(_blocks())
    assert "from reasonedit_cli import" in code
    assert not re.search(r"reasonedit_cli\.\w+ import", code)


def test_python_api_examples_run(tmp_path, monkeypatch):
    (tmp_path / "sample_edits").symlink_to(ROOT / "sample_edits", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "python_api_md"}
    for i, code in enumerate(_blocks()):
        exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)  # noqa: S102
    ns = namespace
    # what the text around the examples promises
    assert ns["report"].added == [*(e.id for e in ns["edits"][:3]), ns["one"].id]
    assert ns["edited"].answer == "circle" and ns["edited"].facts
    assert ns["unedited"].answer != "circle" and not ns["unedited"].facts
    assert not ns["found"].rejected
    assert ns["found"].hits[0].edit_id == "shape-circle-852"
    assert len(ns["nearest"]) == 3
    assert ns["removed"]["removed"] == ["shape-circle-852"]
    # the read-only reader opened before the removal catches up with the writers
    assert ns["codebook"].refresh()
    assert "shape-circle-852" in ns["codebook"].edit_ids()  # restored
    assert ns["result"]["methods"]["reasonedit"]["Acc"] == 1.0
    assert ns["result"]["methods"]["unedited"]["Acc"] == 0.0
    assert ns["calibration"].layer in ("vision.0", "projector")
    assert ns["version"] == ns["restored"]  # dry run: nothing written after the restore
