"""The public API: `from reasonedit_cli import ...` names resolve, and importing the
package stays cheap (no torch, transformers or sentence-transformers)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import reasonedit_cli

ROOT = Path(__file__).resolve().parent.parent
INIT = ROOT / "reasonedit_cli" / "__init__.py"
HEAVY = ("torch", "transformers", "sentence_transformers", "pyarrow", "hnswlib", "matplotlib")


def _imported_after(code: str) -> set[str]:
    """Modules a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def _top(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_import_package_loads_no_heavy_library():
    loaded = _imported_after("import reasonedit_cli")
    assert not _top(loaded) & set(HEAVY), sorted(_top(loaded) & set(HEAVY))
    # nor any of our own modules: each name is imported on first use
    assert not [m for m in loaded if m.startswith("reasonedit_cli.")]


def test_importtime_shows_no_torch():
    """`python -X importtime -c "import reasonedit_cli"`: the check the issue names."""
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import reasonedit_cli"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stderr
    modules = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if "|" in line}
    assert "reasonedit_cli" in modules
    assert not {m.split(".")[0] for m in modules} & set(HEAVY)
    assert not [m for m in modules if m.startswith("reasonedit_cli.")], "eager submodule import"


def test_editor_and_codebook_import_without_torch():
    """The names a library user starts with do not pull in a model library either."""
    loaded = _imported_after("from reasonedit_cli import Editor, Codebook, read_edits, evaluate")
    assert not _top(loaded) & {"torch", "transformers", "sentence_transformers"}


@pytest.mark.parametrize("name", reasonedit_cli.__all__)
def test_every_public_name_resolves(name):
    value = getattr(reasonedit_cli, name)
    assert value is not None
    if name != "__version__" and hasattr(value, "__module__"):
        # defined in the module the map names, or in a submodule of that package (a
        # package such as `store` re-exporting `store.reader`), not re-exported from afar
        module = reasonedit_cli._EXPORTS[name]
        assert value.__module__ == module or value.__module__.startswith(module + "."), name


def test_star_import_and_dir():
    namespace: dict = {}
    exec("from reasonedit_cli import *", namespace)  # noqa: S102
    assert {"Editor", "Codebook", "ReasonEditError"} <= set(namespace)
    assert set(reasonedit_cli.__all__) <= set(dir(reasonedit_cli))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        reasonedit_cli.nope  # noqa: B018


def test_type_checking_imports_match_the_map():
    """Type checkers read the TYPE_CHECKING block and `__all__`, the runtime `_EXPORTS`:
    the three say the same."""
    tree = ast.parse(INIT.read_text())
    block = next(
        n
        for n in tree.body
        if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"
    )
    seen = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == reasonedit_cli._EXPORTS
    assert reasonedit_cli.__all__ == ["__version__", *reasonedit_cli._EXPORTS]


def test_no_public_name_shadows_a_submodule():
    """`import reasonedit_cli.x` sets attribute x on the package; a name x would clash."""
    submodules = {m.name for m in pkgutil.iter_modules(reasonedit_cli.__path__)}
    assert not submodules & set(reasonedit_cli.__all__)
