"""`reasonedit doctor`: verify every file a codebook version lists, rebuild derived data.

Problems with Parquet segments or images are only reported here: they are the source of
truth, and repair.py (`doctor --repair`) rebuilds them from the rest first. Damaged or
missing derived files are rebuilt by a compaction committed as a new version.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..errors import CodebookError
from .engine import engine_section, verify_engine
from .files import MAX_MANIFEST_BYTES, read_regular, tmp_files
from .format import LOCK, MANIFEST, CheckReport, canonical
from .index.derived import NO_GRAPH
from .lock import lock_owner
from .staging import check_staging
from .taucache import verify as verify_tau_cache

if TYPE_CHECKING:
    from .reader import Codebook


def check_codebook(
    cb: Codebook, repair: bool = False, *, lock_timeout: float = 10.0, images: bool = True
) -> CheckReport:
    """Verify every file the manifest lists (`Codebook.check`).

    With repair=True, damaged or missing derived files are rebuilt and committed as a
    new version (and stale staging folders of dead Ray jobs removed).
    """
    cb.refresh()
    rep = CheckReport(cb.path, cb.version)
    vfile = cb.path / "versions" / f"v{cb.version:06d}.json"
    try:
        raw = read_regular(vfile, cb.path, MAX_MANIFEST_BYTES)
        if canonical(json.loads(raw)) != canonical(cb.manifest):
            rep.problems.append(f"versions/{vfile.name} differs from {MANIFEST}")
    except (OSError, ValueError):
        rep.problems.append(f"versions/{vfile.name} is missing or damaged")
    segments_ok = True
    for _, err in cb.segment_problems():
        segments_ok = False
        rep.problems.append(err)
    if not segments_ok:
        return rep
    health = cb.index.health(cb.hnsw_min_keys)
    derived_bad, lift_missing = health.bad, health.lift_missing
    # the engine's mapped files (store/engine.py): rehashed in full, mtimes re-stamped
    engine_bad = verify_engine(cb.path, cb.manifest)
    if not engine_bad and engine_section(cb.manifest) is not None and NO_GRAPH in derived_bad:
        # readers search through the engine: a missing full-width graph (a synthetic
        # codebook, store/synthetic.py) is no problem, and the next writer builds it
        derived_bad = [b for b in derived_bad if b != NO_GRAPH]
        rep.notes.append("the full-width hnsw graph is not persisted (the engine searches)")
    derived_bad = derived_bad + engine_bad
    d = cb.manifest.get("derived") or {}
    if d.get("keys") == cb.n_keys:  # the per-key tau measurements (store/taucache.py)
        derived_bad += verify_tau_cache(cb.path, (d.get("files") or {}).get("tau_other"), cb.n_keys)
    if lift_missing and not repair:
        rep.notes.append(
            "the lifted graph of large-sigma keys is not persisted (a codebook written "
            "before it; `doctor --repair` builds it)"
        )
    if images:
        shas = set(cb.edits_table().column("image_sha256").to_pylist())
        shas |= set(cb.keys_table().column("image_sha256").to_pylist())
        for sha in sorted(shas):
            try:
                cb.read_image_bytes(sha)
            except CodebookError as e:
                rep.problems.append(str(e))
    leftovers = [str(p.relative_to(cb.path)) for p in tmp_files(cb.path)]
    if leftovers:
        rep.notes.append(
            f"{len(leftovers)} temp files of an interrupted writer (removed by the next writer)"
        )
    if (cb.path / LOCK).exists():
        rep.notes.append(f"{LOCK} is present: {lock_owner(cb.path / LOCK)}")
    # staging/ of Ray jobs: never read, notes only (repair removes those of dead jobs)
    check_staging(cb.path, rep, repair=repair)
    if (derived_bad or health.n_deltas or lift_missing) and repair:
        # rebuild what is damaged and fold every delta into new base files
        with cb.writer(lock_timeout) as w:
            w.compact()
        rep.repaired.extend(derived_bad)
        if lift_missing:
            rep.repaired.append("built the lifted graph of large-sigma keys")
        if health.n_deltas:
            rep.notes.append(f"derived index compacted ({health.n_deltas} delta files folded in)")
        rep.version = cb.version
    else:
        rep.problems.extend(f"derived cache: {x}" for x in derived_bad)
    return rep
