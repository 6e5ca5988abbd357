"""Keys that hold several values (docs/method.md#merging): merging, removal, restore, old codebooks.

Synthetic vectors, no model: the geometry is chosen so that which keys merge is known.
The end-to-end path through the CLI and a VLM is in test_cli.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from reasonedit_cli.editor import Editor
from reasonedit_cli.errors import CodebookError
from reasonedit_cli.merging import may_merge, plan_merges
from reasonedit_cli.retrieval import retrieve
from reasonedit_cli.store import FORMAT_VERSION, Codebook, EditRecord, KeyRecord

DIM = 8
FORMAT1 = Path(__file__).parent / "data" / "codebook-format1"


def answer(q: str, a: str) -> str:
    return f"The answer to '{q}' is {a}."


def unit(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i % DIM] = 10.0 * (1 + i // DIM)  # far apart from one another
    return v


def make_edit(eid: str, keys: list[tuple[str, str, np.ndarray]]):
    """An edit whose keys are (kind, value, vector), all with radius 0.1."""
    sha = hashlib.sha256(eid.encode()).hexdigest()
    edit = EditRecord(
        eid, sha, f"q {eid}?", eid, [v for k, v, _ in keys if k != "answer"], None, "t"
    )
    recs = [KeyRecord(eid, k, v, v, sha, None, vec.astype(np.float32), 0.1) for k, v, vec in keys]
    return edit, recs


def entries_of(cb: Codebook) -> list[tuple[str, list[tuple[str, str]]]]:
    """Per live key: key id and its (value, edit_id) entries, own first."""
    rows = cb.keys_table().drop_columns(["vector"]).to_pylist()
    return [
        (
            r["key_id"],
            [(r["value"], r["edit_id"])] + [(m["value"], m["edit_id"]) for m in r["merged"]],
        )
        for r in rows
    ]


A_ANS, B_ANS, C_ANS = answer("q", "a"), answer("q", "b"), answer("Q", "c")
A_SENT = "The shape has no corners."


@pytest.fixture
def merged_cb(tmp_path):
    """Edits A, B, C on one "image" plus 6 unrelated fillers, then merge-keys.

    B's answer key duplicates A's exactly (a different answer); C's answer key is a
    near-duplicate (d = 0.001 < 0.1 r) with a third value, and C's sentence key a
    near-duplicate of A's with the SAME value. Returns (codebook, plan, query vectors).
    """
    base, sent = unit(0), unit(1)
    near = base.copy()
    near[3] += 0.001
    sent_near = sent.copy()
    sent_near[4] += 0.001
    edits = [
        make_edit("A", [("answer", A_ANS, base), ("sentence", A_SENT, sent)]),
        make_edit("B", [("answer", B_ANS, base), ("sentence", "The outline is round.", unit(2))]),
        make_edit("C", [("answer", C_ANS, near), ("sentence", A_SENT, sent_near)]),
    ]
    edits += [make_edit(f"F{i}", [("answer", answer(f"f{i}", "x"), unit(3 + i))]) for i in range(6)]
    cb = Codebook.open(tmp_path / "cb", create=True)
    with cb.writer() as w:
        w.add([e for e, _ in edits], [k for _, ks in edits for k in ks])
    assert cb.n_keys == 12
    plan, version = Editor(tmp_path / "cb").merge_keys()
    queries = {e.edit_id: ks[0] for e, ks in edits}
    return Codebook.open(tmp_path / "cb"), plan, queries


# ---------------------------------------------------------------------------
# the plan


def test_plan_merges_keys_with_different_values_and_collects_them():
    v = np.stack([unit(0), unit(0) + 0.001, unit(1), unit(0)])
    entries = [[("a", "A")], [("b", "B")], [("c", "C")], [("a", "D")]]
    plan = plan_merges(v, [0.1] * 4, entries)
    assert plan.merged_into == {1: 0, 3: 0} and plan.n_after == 2
    # D repeats A's value: kept as provenance, but no new value collected
    assert plan.entries[0] == [("a", "A"), ("b", "B"), ("a", "D")]
    assert plan.values_collected == 1 and plan.multi_value_keys() == 1
    assert plan.radius[0] == pytest.approx(0.1 + np.linalg.norm(v[1] - v[0]), rel=1e-6)
    summary = plan.summary(groups=True)
    assert summary["before"] == 4 and summary["after"] == 2 and summary["values_collected"] == 1
    assert summary["groups"][0]["values"] == ["a", "b"]
    assert summary["groups"][0]["edit_ids"] == ["A", "B", "D"]


def test_plan_rules_overlap_and_distance():
    assert may_merge(0.05, 1.0, 1.0)  # balls overlap by 97.5% of both
    assert not may_merge(0.5, 1.0, 1.0)  # 75%: neither near-duplicate nor overlapping
    assert not may_merge(0.05, 1.0, 0.1)  # a small ball inside a big one: not 90% of it
    assert may_merge(0.009, 0.1, 0.1)  # near-duplicate
    assert not may_merge(0.001, 0.0, 0.1) and may_merge(0.0, 0.0, 0.0)


def test_a_long_run_of_duplicates_joins_the_first_key():
    # more duplicates than candidates per key: merged-away keys must not hide the survivor
    v = np.stack([unit(0)] * 20 + [unit(1)])
    plan = plan_merges(v, [0.1] * 21, [[(f"v{i}", f"e{i}")] for i in range(21)])
    assert set(plan.merged_into.values()) == {0} and plan.n_after == 2
    assert plan.values_collected == 19


def test_plan_on_insert_merges_only_the_new_keys():
    v = np.stack([unit(0), unit(0), unit(1), unit(1)])
    entries = [[(f"v{i}", f"e{i}")] for i in range(4)]
    plan = plan_merges(v, [0.1] * 4, entries, new_from=2)
    assert plan.merged_into == {3: 2}  # rows 0 and 1 are old: left alone
    plan = plan_merges(v, [0.1] * 4, entries, new_from=1)
    assert plan.merged_into == {1: 0, 3: 2}


# ---------------------------------------------------------------------------
# merging a codebook


def test_merge_keys_reduces_keys_and_keeps_every_answer(merged_cb):
    cb, plan, queries = merged_cb
    # B's and C's answer keys into A's; C's sentence key into A's (same value, provenance)
    assert plan.n_before == 12 and plan.n_after == 9 and cb.n_keys == 9
    assert plan.values_collected == 2 and plan.multi_value_keys() == 1
    assert cb.manifest["format_version"] == FORMAT_VERSION == 2
    got = dict(entries_of(cb))
    assert [(A_ANS, "A"), (B_ANS, "B"), (C_ANS, "C")] in got.values()
    assert [(A_SENT, "A"), (A_SENT, "C")] in got.values()
    # every edit's answer fact is still retrieved by its own question
    for eid, key in queries.items():
        r = retrieve(cb, key.vector, k=5)
        assert not r.rejected and key.value in r.facts, (eid, r.facts)
    # the merged key's facts: all its values, its own (nearest) last in the prompt
    r = retrieve(cb, queries["B"].vector, k=5)
    hit = r.hits[0]
    assert hit.values == [A_ANS, B_ANS, C_ANS] and hit.edit_ids == ["A", "B", "C"]
    assert r.facts[-3:] == [C_ANS, B_ANS, A_ANS]
    assert {"A", "B", "C"} <= set(r.edit_ids)
    # a second merge finds nothing more
    again, version = Editor(cb.path).merge_keys()
    assert again.n_after == again.n_before == 9 and version == cb.version


def test_remove_edit_after_a_multi_value_merge(merged_cb):
    cb, _, queries = merged_cb
    merged_version = cb.version
    with cb.writer() as w:
        w.remove_edits(["B"])
    # B's value left the merged key; the key stays for A and C; B's own sentence key went
    assert cb.n_keys == 8
    got = dict(entries_of(cb))
    assert [(A_ANS, "A"), (C_ANS, "C")] in got.values()
    assert all(e != "B" for ents in got.values() for _, e in ents)
    r = retrieve(cb, queries["B"].vector, k=5)
    assert B_ANS not in r.facts and A_ANS in r.facts and C_ANS in r.facts
    # the incremental view equals a fresh read of the segments and tombstones
    fresh = Codebook.open(cb.path)
    assert entries_of(fresh) == entries_of(cb)
    assert np.array_equal(fresh.sigma(), cb.sigma()) and fresh.tau == cb.tau

    # removing the key's OWN edit keeps the key for C: C's entry becomes its first
    with cb.writer() as w:
        w.remove_edits(["A"])
    assert cb.n_keys == 8  # both of A's keys also hold C's values
    got = entries_of(cb)
    assert [(C_ANS, "C")] in [e for _, e in got] and [(A_SENT, "C")] in [e for _, e in got]
    assert entries_of(Codebook.open(cb.path)) == got
    r = retrieve(cb, queries["A"].vector, k=5)
    assert r.facts[-1] == C_ANS and A_ANS not in r.facts
    assert r.hits[0].edit_id == "C" and r.hits[0].edit_ids == ["C"]

    # and when no value is left, the key goes
    with cb.writer() as w:
        w.remove_edits(["C"])
    assert cb.n_keys == 6 and all(e[0][1].startswith("F") for _, e in entries_of(cb))
    assert cb.check(images=False).ok

    # restore round-trips: the merged version comes back exactly
    before = entries_of(Codebook.open(cb.path, create=False))
    with cb.writer() as w:
        w.restore(merged_version)
    assert entries_of(cb) == entries_of(Codebook.open(cb.path)) != before
    assert cb.n_keys == 9
    r = retrieve(cb, queries["B"].vector, k=5)
    assert r.facts[-3:] == [C_ANS, B_ANS, A_ANS]


def test_restore_before_the_merge_and_readd(merged_cb):
    cb, _, queries = merged_cb
    with cb.writer() as w:
        w.restore(cb.version - 1)  # before merge-keys
    assert cb.n_keys == 12 and all(len(e) == 1 for _, e in entries_of(cb))
    # merge on insert: a new duplicate of A's answer joins the merged key with a 4th value
    with cb.writer() as w:
        w.restore(cb.version - 1)  # the merged version again
    assert cb.n_keys == 9
    d_ans = answer("q", "d")
    edit, keys = make_edit("D", [("answer", d_ans, queries["A"].vector)])
    with cb.writer() as w:
        n_old = cb.n_keys
        w.add([edit], keys)
    from reasonedit_cli.editor import _merge_in

    with cb.writer() as w:
        plan, _ = _merge_in(w, new_from=n_old)
    assert plan.merged_into and plan.n_after == 9 and cb.n_keys == 9
    r = retrieve(cb, queries["A"].vector, k=5)
    assert r.hits[0].values == [A_ANS, B_ANS, C_ANS, d_ans]


def test_rewrite_keys_refuses_changed_vectors(merged_cb):
    cb, _, _ = merged_cb
    rows = cb.keys_table().drop_columns(["vector"]).to_pylist()
    from reasonedit_cli.editor import _records_from_rows

    recs = _records_from_rows(rows, cb.vectors() + 1.0)
    with cb.writer() as w, pytest.raises(CodebookError, match="keep the key vectors"):
        w.rewrite_keys([(r["key_id"], k) for r, k in zip(rows, recs)], np.ones(len(rows), bool))


def test_parquet_keys_hold_the_merged_entries(merged_cb):
    cb, _, _ = merged_cb
    seg = next(s for s in cb.manifest["segments"] if s["kind"] == "keys")
    f = pq.ParquetFile(cb.path / seg["path"])
    assert f.schema_arrow.metadata[b"reasonedit.schema_version"] == b"2"
    assert str(f.schema_arrow.field("merged").type) == (
        "list<element: struct<value: string not null, edit_id: string not null> not null>"
    )
    # nested columns are compressed too (leaf paths), the vector column is not
    comp = {
        f.metadata.row_group(0).column(i).path_in_schema: f.metadata.row_group(0)
        .column(i)
        .compression
        for i in range(f.metadata.num_columns)
    }
    assert comp["merged.list.element.value"] == "ZSTD" and comp["box.list.element"] == "ZSTD"
    assert comp["vector.list.element"] == "UNCOMPRESSED"


# ---------------------------------------------------------------------------
# codebooks written before keys held several values (format_version 1)


@pytest.fixture
def format1(tmp_path) -> Path:
    path = tmp_path / "old"
    shutil.copytree(FORMAT1, path)
    return path


def test_format1_codebook_reads(format1):
    m = json.loads((format1 / "manifest.json").read_text())
    assert m["format_version"] == 1
    cb = Codebook.open(format1)
    assert cb.version == 3 and cb.n_keys == 10  # 6 edits x 2 keys, e3 removed
    assert cb.edit_ids() == {"e1", "e2", "e4", "e5", "e6"}
    t = cb.keys_table()
    assert t.column("merged").to_pylist() == [[]] * 10
    assert cb.check().ok  # checksums, schemas (version 1), derived files, images
    # its derived files are still used (not rebuilt): sigma equals the stored one
    stored = np.load(format1 / m["derived"]["files"]["sigma"]["path"])
    assert np.array_equal(cb.sigma(), stored) and cb.tau == m["derived"]["tau"]
    for i, row in enumerate(t.drop_columns(["vector"]).to_pylist()):
        r = retrieve(cb, cb.vectors()[i], k=3)
        assert r.hits[0].values == [row["value"]] and r.hits[0].edit_ids == [row["edit_id"]]
    # an older version of it, with e3 still there
    with cb.writer() as w:
        w.restore(2)
    assert cb.n_keys == 12 and "e3" in cb.edit_ids()


def test_format1_codebook_takes_new_writes(format1):
    cb = Codebook.open(format1)
    v1 = cb.vectors()[0]
    value = cb.keys_table().column("value")[0].as_py()
    edit, keys = make_edit("new", [("answer", answer("q", "new"), v1)])
    with cb.writer() as w:
        w.add([edit], keys)
    assert cb.manifest["format_version"] == 2  # new writes use the new schema
    plan, _ = Editor(format1).merge_keys()
    cb = Codebook.open(format1)
    assert plan.n_after == 10 and cb.n_keys == 10
    r = retrieve(cb, v1, k=3)
    assert r.hits[0].values == [value, answer("q", "new")]
    with cb.writer() as w:
        w.remove_edits(["e1"])  # the old key's own edit: the new edit keeps the key
    r = retrieve(Codebook.open(format1), v1, k=3)
    assert r.hits[0].values == [answer("q", "new")] and r.hits[0].edit_ids == ["new"]
    # and the format-1 versions still restore, segments and all
    with cb.writer() as w:
        w.restore(3)
    assert cb.n_keys == 10 and "new" not in cb.edit_ids()
    assert Codebook.open(format1).check().ok
