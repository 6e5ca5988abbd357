"""Links into the docs cannot drift: every `file.md#anchor` link in the README and docs/
(Markdown links, also `(#anchor)` within a file) and every `docs/x.md#anchor` the package
cites names a heading (or an explicit `<a id>`) that the target file has."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MD_LINK = re.compile(r"\]\(((?:[\w.-]+/)*[\w.-]+\.md)?#([\w-]+)\)")  # [text](file.md#a)
CITED = re.compile(r"((?:[\w.-]+/)*[\w.-]+\.md)#([\w-]+)")  # docs/method.md#merging


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # no headings inside code blocks
    found = set(re.findall(r'<a id="([\w-]+)"></a>', text))
    found |= {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}
    return found


def _sources() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "reasonedit_cli").rglob("*.py")),
    ]


def _links(source: Path) -> list[tuple[Path, str]]:
    """(target file, anchor) of each link: Markdown links are relative to their file (no
    file: the file itself), the package cites paths from the repository root."""
    text = source.read_text(encoding="utf-8")
    if source.suffix == ".md":
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        return [
            ((source.parent / name).resolve() if name else source, anchor)
            for name, anchor in MD_LINK.findall(text)
        ]
    return [((ROOT / name).resolve(), anchor) for name, anchor in CITED.findall(text)]


def test_every_doc_anchor_link_resolves():
    broken = []
    cache: dict[Path, set[str]] = {}
    for source in _sources():
        for target, anchor in _links(source):
            where = f"{source.relative_to(ROOT)}: {target.relative_to(ROOT)}#{anchor}"
            if not target.exists():
                broken.append(f"{where} (no such file)")
                continue
            if target not in cache:
                cache[target] = _anchors(target)
            if anchor not in cache[target]:
                broken.append(where)
    assert not broken, "links to missing anchors:\n" + "\n".join(broken)


def test_slug_is_githubs():
    assert _slug("1.6 Inserting keys: radii and merging") == "16-inserting-keys-radii-and-merging"
    assert _slug("Beyond one machine: Ray") == "beyond-one-machine-ray"
    assert _slug("Serving over HTTP: `reasonedit serve`") == "serving-over-http-reasonedit-serve"
