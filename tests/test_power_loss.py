"""Power loss and readers under writes (issue 23), sub-minute subsets for the default
suite. The full harnesses (>= 1,000 crash states of a real workload on the tiny LLaVA,
200 commits under 4 readers) are in test_reliability_slow.py (`make reliability`)."""

from __future__ import annotations

import crash_harness
import readers_harness


def test_power_loss_subset_synthetic_workload(tmp_path):
    """40 sampled crash states of add, remove, recalibrate, merge, compact (no VLM)."""
    f = crash_harness.run("synthetic", tmp_path / "crash", 40, None)
    assert f["operations"] == ["add", "remove", "calibrate", "merge", "compact"]
    assert f["fs_ops"] > 100 and f["states"] >= 25, f
    assert f["engine_writes"] >= 20, f  # the engine's files are in the log (issue 22)
    assert f["violations"] == [], f["violations"][:3]


def test_readers_under_writes_subset(tmp_path):
    f = readers_harness.run(tmp_path / "rw", commits=12, readers=2)
    assert f["commits"] == 12 and f["reads"] > 20, f
    assert f["errors"] == [] and f["inconsistent"] == [], f
    assert f["versions_seen"] >= 3, f
