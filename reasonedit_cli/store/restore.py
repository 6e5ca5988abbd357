"""Bringing back a damaged or missing manifest.json from versions/ (`doctor --repair`).

The first step of repair (reasonedit_cli/repair.py rebuilds segments next): pick the
newest versions/ copy worth restoring, move the damaged manifest aside (never delete
it) and commit the copy without overwriting any kept version.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from ..errors import CodebookError
from . import files as fs
from .files import MAX_MANIFEST_BYTES, atomic_write, mkdirs, read_regular, rename
from .format import DAMAGED, MANIFEST, now_iso
from .lock import WriterLock
from .manifest import manifest_bytes, manifest_problem, validate_manifest, version_files
from .reader import Codebook


def restore_manifest(path: str | os.PathLike, lock_timeout: float = 10.0) -> list[str]:
    """Bring back a damaged or missing manifest.json from versions/ (doctor --repair).

    Takes the newest versions/ copy that validates and whose segments all verify
    (sha256). One exception: when a newer copy validates but names damaged or missing
    segments, that newer copy is taken (the segment repair that follows rebuilds them
    from what survives, instead of losing whole versions) and the older, fully verified
    copy is named as the fallback (`reasonedit restore N`). When the chosen copy is the
    newest one kept, manifest.json becomes a byte-identical copy of it; otherwise its
    content is committed as a new version after every kept number, so no versions/ file
    is overwritten or cleaned away. The damaged manifest.json is moved to damaged/,
    never deleted. Returns the steps taken, one line each.
    """
    p = Path(path).expanduser().absolute()
    problem = manifest_problem(p)
    if problem is None:
        return []
    steps = [f"{MANIFEST}: {problem.split(': ', 1)[-1]}"]
    with WriterLock(p, lock_timeout):
        files = version_files(p)
        newest = int(files[-1].stem[1:]) if files else -1
        chosen: tuple[Path, bytes, dict, list[str]] | None = None
        for f in reversed(files):
            try:
                raw = read_regular(f, p, MAX_MANIFEST_BYTES)
                m = validate_manifest(raw, p, f"versions/{f.name}")
            except (CodebookError, OSError) as e:
                steps.append(f"versions/{f.name} passed over: {str(e).split(': ')[-1]}")
                continue
            bad = [s["path"] for s, _ in Codebook(p, m).segment_problems()]
            if chosen is None:
                chosen = (f, raw, m, bad)
            if not bad:
                if chosen[0] != f:
                    steps.append(
                        f"versions/{chosen[0].name} lists {len(chosen[3])} damaged segments "
                        f"({chosen[3][0]}), rebuilt below; versions/{f.name} is the newest "
                        f"copy whose files all verify (fallback: `reasonedit restore "
                        f"{int(f.stem[1:])}`)"
                    )
                break
        if chosen is None:
            raise CodebookError(
                f"codebook {p}: {MANIFEST} is damaged and no versions/ copy is intact; "
                f"restore the codebook from a backup"
            )
        f, raw, m, _ = chosen
        if os.path.lexists(p / MANIFEST):
            mkdirs(p / DAMAGED)
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            aside = p / DAMAGED / f"{MANIFEST}.{stamp}"
            rename(p / MANIFEST, aside)
            fs.fsync_dir(p / DAMAGED)
            steps.append(f"moved the damaged {MANIFEST} to {aside.relative_to(p)}")
        if int(m["version"]) == newest:
            atomic_write(p / MANIFEST, raw)
            steps.append(f"restored {MANIFEST} from versions/{f.name} (version {newest})")
        else:
            m = {**m, "version": newest + 1, "updated": now_iso()}
            data = manifest_bytes(m)
            atomic_write(p / "versions" / f"v{newest + 1:06d}.json", data)
            atomic_write(p / MANIFEST, data)
            steps.append(
                f"restored {MANIFEST} from versions/{f.name}, committed as version "
                f"{newest + 1}: the changes of later versions are lost (their copies are "
                f"damaged)"
            )
        return steps
