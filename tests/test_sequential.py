"""Long sequences of edits (issue 6): the codebook holds up over 1,000 sequential commits.

Generated data, no VLM: each edit is a cluster of keys (an answer key and two reasoning
keys near one centre, like the keys of one image), edits live in one "domain" of the
embedding space and locality probes come from another, as unrelated samples do. Every edit
is committed on its own, so the derived data (neighbour lists, sigma, tau, the hnswlib
index past 2,000 keys) is updated incrementally 1,000 times.
"""

from __future__ import annotations

import numpy as np
import pytest

from reasonedit_cli.editor import Editor
from reasonedit_cli.retrieval import retrieve
from reasonedit_cli.store import Codebook, EditRecord, KeyRecord

DIM = 48


def _edit(i: int, centre: np.ndarray, duplicate_of: int | None = None):
    """One edit: three keys around `centre`; a duplicate repeats another edit's facts."""
    src = duplicate_of if duplicate_of is not None else i
    values = [f"The answer to 'q{src}?' is a{src}.", f"Fact {src} one.", f"Fact {src} two."]
    edit = EditRecord(f"e{i}", f"{src:064x}", f"q{src}?", f"a{src}", values[1:], None, "test")
    # the offsets depend on the source edit, so a duplicate's keys land next to the original's
    offsets = 0.02 * np.random.default_rng(src).standard_normal((3, DIM))
    keys = [
        KeyRecord(
            f"e{i}",
            "answer" if j == 0 else "sentence",
            v,
            v,
            f"{src:064x}",
            None,
            (centre + offsets[j]).astype(np.float32),
            radius=0.3,
        )
        for j, v in enumerate(values)
    ]
    return edit, keys


def _run(tmp_path, n_edits: int, checkpoints: list[int]):
    rng = np.random.default_rng(0)
    domain = np.zeros(DIM)
    centres = domain + rng.standard_normal((n_edits, DIM))
    # every 10th edit repeats an earlier edit's facts (a duplicate correction)
    dup = {i: i - 5 for i in range(10, n_edits, 10)}
    for i in dup:
        centres[i] = centres[dup[i]] + 0.001 * rng.standard_normal(DIM)
    probes = 6.0 + rng.standard_normal((50, DIM))  # another domain: unrelated samples
    cb = Codebook.open(tmp_path / "cb", create=True)
    queries: list[tuple[str, np.ndarray, str]] = []
    report = {}
    for i in range(n_edits):
        edit, keys = _edit(i, centres[i], dup.get(i))
        with cb.writer() as w:
            w.add([edit], keys)
        queries.append((edit.edit_id, keys[0].vector, keys[0].value))
        if i + 1 in checkpoints:
            cb = Codebook.open(tmp_path / "cb")
            report[i + 1] = _measure(cb, queries, probes)
    # then merge-keys: each duplicate edit's keys fold into the original's, and every
    # edit's answer must stay retrievable from the merged keys
    plan, _ = Editor(tmp_path / "cb").merge_keys()
    cb = Codebook.open(tmp_path / "cb")
    report["merged"] = {**_measure(cb, queries, probes), **plan.summary()}
    return cb, report


def _measure(cb: Codebook, queries: list, probes: np.ndarray) -> dict:
    """Share of edits whose answer fact is retrieved, of locality probes rejected."""
    own = sum(value in retrieve(cb, vec, k=5).facts for _eid, vec, value in queries)
    loc = sum(retrieve(cb, p, k=5).rejected for p in probes)
    return {"retrievable": own / len(queries), "loc_rejected": loc / len(probes), "keys": cb.n_keys}


@pytest.mark.slow
def test_thousand_sequential_edits_stay_retrievable_and_local(tmp_path):
    cb, report = _run(tmp_path, 1000, [100, 500, 1000])
    assert cb.version == 1001 and len(cb.edit_ids()) == 1000  # 1,000 adds and one merge
    assert report[1000]["keys"] == 3000
    for n, r in report.items():
        assert r["retrievable"] == 1.0, (n, r)
        assert r["loc_rejected"] == 1.0, (n, r)
    # metrics after 1,000 edits stay within a few points of those after 100
    assert abs(report[1000]["retrievable"] - report[100]["retrievable"]) <= 0.03
    # each duplicate edit's three keys fold into the original's
    merged = report["merged"]
    assert merged["before"] == 3000 and merged["after"] == 3000 - 3 * len(range(10, 1000, 10))
    assert cb.n_keys == merged["after"]
    print(f"\nsequential: {report}; keys after merging: {merged['before']} -> {merged['after']}")


def test_two_hundred_sequential_edits(tmp_path):
    cb, report = _run(tmp_path, 200, [50, 200])
    assert report[50] == {"retrievable": 1.0, "loc_rejected": 1.0, "keys": 150}
    assert report[200] == {"retrievable": 1.0, "loc_rejected": 1.0, "keys": 600}
    merged = report["merged"]
    assert merged["after"] == merged["keys"] == 600 - 3 * len(range(10, 200, 10))
    assert merged["retrievable"] == 1.0 and merged["loc_rejected"] == 1.0
    # duplicates repeat their original's facts: no new value, but each edit is recorded
    assert merged["values_collected"] == 0
    entries = cb.keys_table().column("merged").to_pylist()
    assert sum(len(e) for e in entries) == 3 * len(range(10, 200, 10))
    assert cb.check(images=False).ok  # synthetic edits store no image files
