"""Regenerate tests/data/codebook-format1 with the format-1 code of reasonedit.

The fixture must be written by the OLD code, not by today's, so it really is format 1:

    git archive 619284d reasonedit_cli | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/data/make_codebook_format1.py tests/data/codebook-format1

Version 1 adds edits e1..e5 (two keys each), version 2 adds e6, version 3 removes e3.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np

from reasonedit_cli.store import FORMAT_VERSION, Codebook, EditRecord, KeyRecord

assert FORMAT_VERSION == 1, "run this with the format-1 code (see the docstring)"
out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
rng = np.random.default_rng(7)


def edit(i: int) -> tuple[bytes, EditRecord, list[KeyRecord]]:
    data = f"fake image {i}".encode()
    sha = hashlib.sha256(data).hexdigest()
    q, a, s = f"question {i}?", f"answer{i}", f"Fact {i}."
    e = EditRecord(f"e{i}", sha, q, a, [s], None, "fixture")
    keys = [
        KeyRecord(
            f"e{i}", kind, value, text, sha, None, rng.normal(size=8).astype(np.float32), 0.25
        )
        for kind, value, text in (("answer", f"The answer to '{q}' is {a}.", q), ("sentence", s, s))
    ]
    return data, e, keys


cb = Codebook.open(out, create=True)
with cb.writer() as w:
    items = [edit(i) for i in range(1, 6)]
    for data, _, _ in items:
        w.store_image(data, "png")
    w.add([e for _, e, _ in items], [k for _, _, ks in items for k in ks])
with cb.writer() as w:
    data, e, ks = edit(6)
    w.store_image(data, "png")
    w.add([e], ks)
with cb.writer() as w:
    w.remove_edits(["e3"])
print(cb.version, cb.n_keys)
