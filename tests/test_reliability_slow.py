"""Reliability harnesses that take minutes (issue 8): run with `make reliability`.

- crash safety: `add-edit` SIGKILLed at random moments, >= 100 runs on one codebook;
- the full damage fuzz (>= 500 cases, a 2,000-key codebook with a persisted hnsw index,
  `ask` through the CLI on some cases) and crafted manifests with more value types;
- concurrency: 4 processes x 50 separate `add-edit` calls on one codebook.

Each test writes its figures to $RELIABILITY_REPORT (default: reliability-report.json in
the pytest temp dir) so docs/reliability.md can quote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers_reliability import (
    build_synthetic_codebook,
    damage_cases,
    edit_line,
    run_fuzz,
    summarize,
)
from typer.testing import CliRunner

from reasonedit_cli.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
HELPER = Path(__file__).resolve().parent / "helpers_reliability.py"
REPORT = Path(os.environ.get("RELIABILITY_REPORT", "reliability-report.json"))


def _report(name: str, figures: dict) -> None:
    data = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    data[name] = figures
    REPORT.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _env() -> dict:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )


def _verify_committed_state(cb: Path, confirmed: set[str]) -> Counter:
    """The invariants after any kill: opens, every reported edit once, manifest honest."""
    from reasonedit_cli.store import Codebook

    book = Codebook.open(cb)
    ids = book.edits_table().column("edit_id").to_pylist()
    counts = Counter(ids)
    assert all(c == 1 for c in counts.values()), [e for e, c in counts.items() if c > 1]
    assert confirmed <= set(counts), confirmed - set(counts)
    key_ids = book.keys_table().column("key_id").to_pylist()
    assert len(key_ids) == len(set(key_ids))
    assert set(book.keys_table().column("edit_id").to_pylist()) == set(counts)
    m = book.manifest
    listed = [s for s in m["segments"]] + list(
        ((m.get("derived") or {}).get("files") or {}).values()
    )
    for entry in listed:
        data = (cb / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
    res = runner.invoke(app, ["doctor", "-c", str(cb)])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    return counts


def _tmp_files(cb: Path) -> set[Path]:
    return {p for p in cb.rglob("*") if ".tmp-" in p.name}


def test_crash_safety_sigkill_during_add_edit(tmp_path, tiny_llava):
    from conftest import shape_image

    runs = int(os.environ.get("RELIABILITY_KILL_RUNS", "110"))
    rng = random.Random(20261122)
    d = tmp_path
    imgs = [
        shape_image(d / f"img{i}.png", shape, color)
        for i, (shape, color) in enumerate(
            [("circle", "red"), ("triangle", "blue"), ("rectangle", "green")]
        )
    ]
    cb = d / "cb"
    base = [sys.executable, "-m", "reasonedit_cli", "add-edit", "-c", str(cb)]
    base += ["--model", str(tiny_llava), "--device", "cpu", "--patches", "none", "--json"]
    env = _env()

    def run(lines: list[str], delay: float | None):
        f = d / "in.jsonl"
        f.write_text("".join(x + "\n" for x in lines))
        proc = subprocess.Popen(
            base + ["--from", str(f)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        killed = False
        try:
            out, err = proc.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate()
            killed = True
        return proc.returncode, out, err, killed

    t0 = time.monotonic()
    rc, out, err, _ = run([edit_line("first", imgs[0].name)], None)
    runtime = time.monotonic() - t0
    assert rc == 0, err
    confirmed = set(json.loads(out)["added"])
    attempted = ["first"]
    outcomes = Counter()
    stale_tmp: set[Path] = set()
    cleaned_checks = 0
    start = time.monotonic()
    for i in range(runs):
        ids = [f"e{i:03d}"]
        if rng.random() < 0.5:
            ids.append(f"e{i:03d}b")
        if attempted and rng.random() < 0.3:
            ids.append(rng.choice(attempted))  # a repeat: must stay stored once
        lines = [edit_line(e, imgs[sum(map(ord, e)) % 3].name) for e in ids]
        # kills spread over start-up, model load, embedding and commit; ~1/3 complete
        delay = rng.uniform(0.05, 1.5 * runtime)
        if i % 10 == 0:  # leftovers of a writer that died mid-write, at every level
            for sub in ("", "segments/", "index/", "versions/", "images/00/"):
                (cb / sub).mkdir(parents=True, exist_ok=True)
                (cb / f"{sub}x.parquet.tmp-999999-dead{i:04d}").write_bytes(b"partial")
            stale_tmp |= _tmp_files(cb)
        before = set(_verify_committed_state(cb, confirmed))
        rc, out, err, killed = run(lines, delay)
        assert "Traceback" not in err, err
        counts = _verify_committed_state(cb, confirmed)
        attempted += [e for e in ids if e not in attempted]
        new = set(counts) - before
        if killed:
            outcomes["killed, nothing committed" if not new else "killed after commit"] += 1
            assert new in (set(), set(ids) - before), (new, ids)
            stale_tmp |= _tmp_files(cb)
        else:
            assert rc == 0, err
            report = json.loads(out)
            assert set(report["added"]) == set(ids) - before
            confirmed |= set(report["added"])
            outcomes["completed"] += 1
            if report["added"] and stale_tmp:
                assert not (stale_tmp & _tmp_files(cb)), "temp files of a crash survived"
                cleaned_checks += 1
                stale_tmp = set()
            if report["added"]:
                assert not (cb / "LOCK").exists()
    elapsed = time.monotonic() - start
    assert sum(outcomes.values()) >= 100
    assert outcomes["completed"] >= 10 and cleaned_checks >= 1, (outcomes, cleaned_checks)
    from reasonedit_cli.store import Codebook

    final = Codebook.open(cb)
    _report(
        "crash_safety",
        {
            "runs": runs,
            "single_run_seconds": round(runtime, 2),
            "elapsed_seconds": round(elapsed, 1),
            "outcomes": dict(outcomes),
            "confirmed_edits": len(confirmed),
            "final_edits": len(final.edit_ids()),
            "final_version": final.version,
            "temp_cleanup_checks": cleaned_checks,
            "stale_temp_files_seen": len(stale_tmp),
        },
    )


def test_full_damage_fuzz(tmp_path, tiny_llava, monkeypatch):
    from conftest import shape_image

    from reasonedit_cli.store import Codebook

    img = shape_image(tmp_path / "q.png", "circle", "red")
    t0 = time.monotonic()
    # the store's own index (a full-width hnsw graph) is what a codebook below the
    # engine's threshold has; above it the engine's files replace it: one of each
    monkeypatch.setenv("REASONEDIT_ENGINE_MIN_KEYS", str(10**9))
    big = build_synthetic_codebook(tmp_path / "big", n_edits=250, keys_per_edit=9, dim=16)
    monkeypatch.delenv("REASONEDIT_ENGINE_MIN_KEYS")
    eng = build_synthetic_codebook(tmp_path / "eng", n_edits=250, keys_per_edit=9, dim=16)
    small = build_synthetic_codebook(  # with derived-index deltas (sigma, lists, graph)
        tmp_path / "small", n_edits=40, keys_per_edit=4, hnsw_min_keys=100, keep_deltas=True
    )
    assert Codebook.open(big).manifest["derived"]["files"].get("hnsw")
    assert Codebook.open(eng).manifest["derived"].get("engine")
    cli_cb = tmp_path / "cli"
    f = tmp_path / "e.jsonl"
    f.write_text("".join(edit_line(f"c{i}", img.name) + "\n" for i in range(4)))
    model = ["--model", str(tiny_llava), "--device", "cpu"]
    res = runner.invoke(app, ["add-edit", "--from", str(f), "-c", str(cli_cb), *model])
    assert res.exit_code == 0, res.output
    cases = []
    ask = {"image": str(img), "model_args": model}
    sources = ((big, 160, None), (eng, 120, None), (small, 200, 100), (cli_cb, 180, None))
    for src, n, hmk in sources:
        for j, c in enumerate(damage_cases(src, n, seed=5)):
            c.update(id=len(cases), src=str(src), work=str(tmp_path / "work"), hnsw_min_keys=hmk)
            if src == cli_cb and j % 4 == 0:
                c["ask"] = ask
            c["repair_sources"] = True  # doctor --repair on source damage (issue 23)
            cases.append(c)
    results = run_fuzz(cases)
    s = summarize(results)
    elapsed = time.monotonic() - t0
    _report(
        "damage_fuzz",
        {
            "cases": s["cases"],
            "ask_cases": sum(1 for c in cases if c.get("ask")),
            "outcomes": s["outcomes"],
            "by_kind": s["by_kind"],
            "failures": len(s["failures"]),
            "elapsed_seconds": round(elapsed, 1),
        },
    )
    assert s["cases"] >= 500
    assert not s["failures"], json.dumps(s["failures"][:3], indent=1)[:3000]
    assert not any(o.startswith("CRASH") for o in s["outcomes"])


def test_crafted_manifests_all_value_types(tmp_path):
    from test_reliability import crafted_manifest_cases

    t0 = time.monotonic()
    n = crafted_manifest_cases(tmp_path, ["x", -1, 10**30, None, [], {}, 1.5, True], 300)
    _report("crafted_manifests", {"cases": n, "elapsed_seconds": round(time.monotonic() - t0, 1)})


def test_four_writers_fifty_edits_each(tmp_path, tiny_llava):
    from conftest import shape_image

    from reasonedit_cli.store import Codebook

    shape_image(tmp_path / "img.png", "triangle", "blue")
    cb = tmp_path / "cb"
    per = int(os.environ.get("RELIABILITY_EDITS_PER_WRITER", "50"))
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HELPER), "add-loop", str(cb), str(tiny_llava)]
            + [str(tmp_path / "img.png"), f"w{w}_", str(per)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for w in range(4)
    ]
    outs = [p.communicate(timeout=3000) for p in procs]
    elapsed = time.monotonic() - t0
    reports = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert all(not r["failed"] for r in reports), [r["failed"] for r in reports]
    book = Codebook.open(cb)
    ids = book.edits_table().column("edit_id").to_pylist()
    assert len(ids) == 4 * per == len(set(ids))
    assert set(ids) == {e for r in reports for e in r["ok"]}
    # version history: v0 (create) + one version per add-edit call, each appending one edit
    versions = sorted((cb / "versions").glob("v*.json"))
    assert [int(v.stem[1:]) for v in versions] == list(range(book.version + 1))
    assert book.version == 4 * per
    prev_segments: list = []
    for v in versions[1:]:
        m = json.loads(v.read_text())
        assert m["segments"][: len(prev_segments)] == prev_segments  # append-only
        assert m["derived"]["edits"] == int(v.stem[1:])
        prev_segments = m["segments"]
    res = runner.invoke(app, ["doctor", "-c", str(cb)])
    assert res.exit_code == 0, res.output
    _report(
        "concurrency",
        {
            "writers": 4,
            "edits_per_writer": per,
            "separate_add_edit_calls": 4 * per,
            "final_edits": len(ids),
            "final_version": book.version,
            "elapsed_seconds": round(elapsed, 1),
        },
    )


# ---------------------------------------------------------------- issue 23


def test_power_loss_real_workload_every_crash_state(tmp_path, tiny_llava):
    """Every crash point of add-edit, remove-edit, calibrate, merge-keys and compaction on
    the tiny LLaVA, under every persistence variant (tests/crash_harness.py)."""
    import crash_harness

    limit = os.environ.get("RELIABILITY_CRASH_STATES")
    f = crash_harness.run(
        "real", tmp_path / "crash", int(limit) if limit else None, str(tiny_llava)
    )
    _report("power_loss_real", f)
    ops = ["add-edit", "remove-edit", "calibrate", "merge-keys", "compaction", "add-edit --merge"]
    ops += ["remove-edit", "compaction"]
    assert f["operations"] == ops
    assert f["states"] >= (int(limit) // 2 if limit else 1000), f
    assert f["violations"] == [], f["violations"][:5]


def test_power_loss_synthetic_every_crash_state(tmp_path):
    import crash_harness

    f = crash_harness.run("synthetic", tmp_path / "crash", None, None)
    _report("power_loss_synthetic", f)
    assert f["violations"] == [], f["violations"][:5]


def test_power_loss_harness_catches_missing_directory_fsync(tmp_path, monkeypatch):
    """A planted bug (no directory fsync after renames) must show up as violations."""
    import crash_harness

    monkeypatch.setenv("CRASH_HARNESS_MUTATION", "no-dir-fsync")
    f = crash_harness.run("synthetic", tmp_path / "crash", 150, None)
    _report("power_loss_mutation", {k: v for k, v in f.items() if k != "violations"})
    assert len(f["violations"]) >= 10, f


def test_four_readers_under_two_hundred_commits(tmp_path):
    import readers_harness

    commits = int(os.environ.get("RELIABILITY_READER_COMMITS", "200"))
    f = readers_harness.run(tmp_path / "rw", commits=commits, readers=4)
    _report("readers_under_writes", f)
    assert f["commits"] == commits and f["reads"] >= 100, f
    assert f["errors"] == [] and f["inconsistent"] == [], f
    assert f["max_read_s"] < 30, f
