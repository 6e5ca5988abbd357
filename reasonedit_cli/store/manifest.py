"""The manifest, the codebook's single commit point: its bytes, validation and lookups.

`manifest.json` lists every segment, tombstone and derived file of the current version
with their checksums; versions/ keeps a copy of each committed one. Readers trust only
what a manifest that validates here lists (format, version, self-checksum, paths inside
the codebook). Restoring a damaged manifest is repair's job (store/repair.py).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CodebookError
from .files import MAX_MANIFEST_BYTES, read_regular
from .format import FORMAT, FORMAT_VERSION, LOCK, MANIFEST, SHA_RE, canonical, sha256_hex

#: Names a codebook directory may hold besides temp files.
KNOWN_NAMES = {
    MANIFEST,
    LOCK,
    "segments",
    "images",
    "index",
    "versions",
    "staging",
    "damaged",
    "objects",  # the object index (reasonedit_cli/objects.py)
}
REPAIR_HINT = "`reasonedit doctor --repair` rebuilds it from the rest of the codebook"
MANIFEST_HINT = "`reasonedit doctor --repair` restores it from versions/"
#: Anything a hand-made or damaged manifest entry can raise while being read.
ENTRY_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError)


def manifest_bytes(manifest: dict) -> bytes:
    """The bytes of a manifest as written: indented JSON with its self-checksum."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    full = dict(body, checksum="sha256:" + sha256_hex(canonical(body)))
    return (
        json.dumps(full, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    ).encode("utf-8")


def empty_manifest(now: str) -> dict:
    """Version 0 of a new codebook."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": 0,
        "created": now,
        "updated": now,
        "config": {},
        "segments": [],
        "removed_edits": [],
        "derived": None,
    }


def is_own_name(name: str) -> bool:
    """Whether a name in a codebook directory is one the store makes."""
    return name in KNOWN_NAMES or name.startswith(MANIFEST + ".tmp-") or name.startswith(LOCK + ".")


def read_manifest(path: Path) -> dict:
    """Parse and validate manifest.json (format, version, self-checksum, safe paths)."""
    f = path / MANIFEST
    where = f"codebook {path}: {MANIFEST}"
    try:
        raw = read_regular(f, path, MAX_MANIFEST_BYTES)
    except OSError as e:
        raise CodebookError(f"{where} cannot be read: {e.strerror or e}; {MANIFEST_HINT}") from e
    return validate_manifest(raw, path, where)


def validate_manifest(raw: bytes, path: Path, where: str) -> dict:
    """A manifest (manifest.json or a versions/ copy) parsed and validated, else raise."""
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CodebookError(f"{where} is damaged (not valid JSON); {MANIFEST_HINT}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CodebookError(
            f"{path} is not a reasonedit codebook ({MANIFEST} has format "
            f"{m.get('format') if isinstance(m, dict) else None!r})"
        )
    fv = m.get("format_version")
    if not isinstance(fv, int):
        raise CodebookError(f"{where} is damaged (format_version missing)")
    if fv > FORMAT_VERSION:
        raise CodebookError(
            f"codebook {path} has format_version {fv}; this reasonedit reads "
            f"up to {FORMAT_VERSION}: upgrade reasonedit"
        )
    body = {k: v for k, v in m.items() if k != "checksum"}
    try:
        ok = m.get("checksum") == "sha256:" + sha256_hex(canonical(body))
    except ValueError:
        ok = False
    if not ok:
        raise CodebookError(f"{where} is damaged (checksum mismatch); {MANIFEST_HINT}")
    try:
        assert isinstance(m["version"], int) and m["version"] >= 0
        assert isinstance(m["config"], dict)
        dim = m["config"].get("dim")
        assert dim is None or (type(dim) is int and 0 < dim <= 1_000_000), "config.dim"
        assert is_number(m["config"].get("percentile", 25.0)), "config.percentile"
        for s in m["segments"]:
            assert s["kind"] in ("keys", "edits") and isinstance(s["rows"], int)
            assert SHA_RE.fullmatch(s["sha256"]) and isinstance(s["version"], int)
            check_rel(s["path"])
        for t in m["removed_edits"]:
            assert isinstance(t["edit_id"], str) and isinstance(t["version"], int)
        d = m.get("derived")
        if d is not None:
            assert isinstance(d, dict) and isinstance(d.get("files", {}), dict), "derived"
            assert d.get("tau") is None or is_number(d["tau"]), "derived.tau"
            for e in d.get("files", {}).values():
                check_rel(e["path"])
            deltas = d.get("deltas") or {}
            assert isinstance(deltas, dict), "derived.deltas"
            for entries in deltas.values():
                assert isinstance(entries, list), "derived.deltas"
                for e in entries:
                    check_rel(e["path"])
    except (AssertionError, KeyError, TypeError, AttributeError) as e:
        raise CodebookError(f"{where} is malformed ({type(e).__name__} {e})") from None
    return m


def is_number(x: Any) -> bool:
    return type(x) in (int, float) and np.isfinite(x)


def check_rel(rel: str) -> None:
    # A shared codebook must not point outside its own directory.
    p = Path(rel)
    assert isinstance(rel, str) and not p.is_absolute() and ".." not in p.parts, rel


def version_files(path: Path) -> list[Path]:
    """versions/v*.json of a codebook, oldest first (by the number in the name)."""
    d = path / "versions"
    out = []
    if d.is_dir() and not d.is_symlink():
        for f in d.glob("v*.json"):
            if re.fullmatch(r"v\d{6,}\.json", f.name):
                out.append(f)
    return sorted(out, key=lambda f: int(f.stem[1:]))


def manifest_problem(path: str | os.PathLike) -> str | None:
    """Why manifest.json cannot be used (one line), or None when it reads fine."""
    p = Path(path).expanduser().absolute()
    if not os.path.lexists(p / MANIFEST):
        return f"{MANIFEST} is missing" if version_files(p) else None
    try:
        read_manifest(p)
    except CodebookError as e:
        return str(e)
    return None


def int_in(x: Any, lo: int, hi: int) -> int:
    """x if it is an int in [lo, hi] (manifest numbers sized arrays: never trust them)."""
    if type(x) is not int or not lo <= x <= hi:
        raise ValueError(f"{x!r} not in [{lo}, {hi}]")
    return x


def entry_path(entry: Any, what: str) -> str:
    """The path a manifest entry names, or `what` when it names none (for messages)."""
    p = entry.get("path") if isinstance(entry, dict) else None
    return p if isinstance(p, str) else what


def derived_paths(manifest: dict) -> set[str]:
    """Every index/ file a manifest lists: base files and deltas."""
    d = manifest.get("derived") or {}
    out = {e["path"] for e in (d.get("files") or {}).values()}
    for entries in (d.get("deltas") or {}).values():
        out |= {e["path"] for e in entries}
    return out | engine_paths(manifest)


def engine_entries(manifest: dict) -> Iterator[dict]:
    """Every file entry (a dict with a `path`) in the manifest's `derived.engine` section
    (store/engine.py), at any depth."""

    def walk(node: Any) -> Iterator[dict]:
        if isinstance(node, dict):
            if isinstance(node.get("path"), str):
                yield node
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    engine = (manifest.get("derived") or {}).get("engine")
    return walk(engine) if isinstance(engine, dict) else iter(())


def engine_paths(manifest: dict) -> set[str]:
    """Every file the manifest's `derived.engine` section lists (store/engine.py; the
    store's sigma files it searches by too)."""
    return {e["path"] for e in engine_entries(manifest)}
