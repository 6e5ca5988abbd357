"""The Ray engine against the local one, on a local Ray instance and the bundled model.

Slow (a Ray instance and several passes of the demo VLM): `make test-ray`, or
`python -m pytest -q -m slow tests/test_ray.py`. Skipped without the `ray` extra.

* a codebook built with `add-edit --engine ray` equals the local one: same key ids,
  values, boxes and edits, vectors and radii up to float noise (workers run torch on one
  thread), same w and config; adding the same edits again changes nothing;
* adding to a codebook that already has keys (w fixed) gives the local result too;
* a worker crashing midway, or Ctrl-C in the driver, leaves the codebook byte for byte
  as it was, with no staging folder; a SIGKILLed driver leaves only a stale staging
  folder, which nothing reads and which is removed like `doctor --repair` does;
* `evaluate --engine ray` reports the same metrics as the local engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from reasonedit_cli.cli import app  # noqa: E402
from reasonedit_cli.datasets import read_edits  # noqa: E402
from reasonedit_cli.distributed import RayOptions, add_edits_ray  # noqa: E402
from reasonedit_cli.editor import Editor  # noqa: E402
from reasonedit_cli.errors import ReasonEditError  # noqa: E402
from reasonedit_cli.store import Codebook  # noqa: E402
from reasonedit_cli.store.staging import STAGING, remove_stale  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_edits"
BATCH = "2"  # 6 sample edits: 3 batches, so the first-batch w and 2 workers both happen
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """A local 2-CPU Ray without network, dashboard or usage statistics."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def edits_file(tmp_path_factory) -> Path:
    """The sample edits plus one invalid line, to check errors are reported alike."""
    d = tmp_path_factory.mktemp("edits")
    shutil.copytree(SAMPLE / "images", d / "images")
    lines = (SAMPLE / "edits.jsonl").read_text().splitlines()
    lines.insert(3, '{"image": "images/missing.png", "question": "q?", "answer": "a"}')
    (d / "edits.jsonl").write_text("\n".join(lines) + "\n")
    return d / "edits.jsonl"


def add(codebook: Path, edits: Path, *extra: str) -> tuple[int, dict]:
    args = ["add-edit", "-c", str(codebook), "--from", str(edits), "--batch-size", BATCH]
    result = runner.invoke(app, [*args, "--skip-invalid", "--json", *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def local(tmp_path_factory, edits_file) -> tuple[Path, dict]:
    cb = tmp_path_factory.mktemp("local") / "cb"
    code, report = add(cb, edits_file)
    assert code == 1 and len(report["added"]) == 6  # 1: an invalid line was skipped
    return cb, report


def assert_same_codebook(a: Path, b: Path) -> None:
    """Equal up to float noise: ids, values, boxes, edits, config; vectors and radii close."""
    ca, cb = Codebook.open(a), Codebook.open(b)
    cfg_a, cfg_b = dict(ca.config), dict(cb.config)
    assert cfg_a.pop("w") == pytest.approx(cfg_b.pop("w"), rel=1e-5)
    assert cfg_a == cfg_b
    ka, kb = ca.keys_table(), cb.keys_table()
    exact = [c for c in ka.column_names if c not in ("vector", "radius")]
    assert ka.select(exact).equals(kb.select(exact))
    np.testing.assert_allclose(ca.vectors(), cb.vectors(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        ka.column("radius").to_numpy(), kb.column("radius").to_numpy(), rtol=1e-3, atol=1e-4
    )
    assert ca.edits_table().drop_columns(["added"]).equals(cb.edits_table().drop_columns(["added"]))
    assert sorted(p.name for p in (a / "images").rglob("*.*")) == sorted(
        p.name for p in (b / "images").rglob("*.*")
    )


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder of a codebook directory."""
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
    }


def test_ray_codebook_equals_the_local_one(tmp_path, edits_file, local):
    local_cb, local_report = local
    cb = tmp_path / "cb"
    code, report = add(cb, edits_file, "--engine", "ray", "--workers", "2")
    assert code == 1  # the same invalid line, reported the same way
    assert report["invalid"] == local_report["invalid"]
    assert "edits.jsonl:4" in report["invalid"][0]
    for field in ("added", "skipped", "keys", "version", "boxes"):
        assert report[field] == local_report[field], field
    assert_same_codebook(local_cb, cb)
    assert not (cb / "staging").exists()
    # idempotent: the same edits again are all skipped and nothing is written
    before = snapshot(cb)
    code, again = add(cb, edits_file, "--engine", "ray")
    assert again["added"] == [] and len(again["skipped"]) == 6
    assert again["version"] == report["version"]
    assert snapshot(cb) == before


def test_ray_adds_to_a_codebook_with_keys_like_local(tmp_path, edits_file, local):
    """With w already fixed there is no first-batch step: every batch goes to the pool."""
    edits, _ = read_edits(str(edits_file), skip_invalid=True)
    base = tmp_path / "base"
    Editor(base, create=True).add_edits(edits[:3], batch_size=2)
    shutil.copytree(base, tmp_path / "ray")
    Editor(base).add_edits(edits, batch_size=2)
    report = add_edits_ray(
        Editor(tmp_path / "ray"), edits, options=RayOptions(workers=2), batch_size=2
    )
    assert report.added == [e.id for e in edits[3:]]
    assert report.skipped == [e.id for e in edits[:3]]
    assert_same_codebook(base, tmp_path / "ray")
    assert_same_codebook(local[0], tmp_path / "ray")


@pytest.fixture
def half_built(tmp_path, edits_file) -> tuple[Path, list]:
    edits, _ = read_edits(str(edits_file), skip_invalid=True)
    cb = tmp_path / "cb"
    Editor(cb, create=True).add_edits(edits[:2], batch_size=2)
    return cb, edits


def wait_for_idle_cluster(timeout: float = 60.0) -> None:
    """The aborted job's actors give their CPUs back (the next job needs them)."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= 2


def test_worker_crash_leaves_the_codebook_unchanged(half_built):
    cb, edits = half_built
    before = snapshot(cb)
    with pytest.raises(ReasonEditError, match="injected failure on batch 1"):
        add_edits_ray(Editor(cb), edits, options=RayOptions(), batch_size=1, fail_batch=1)
    assert snapshot(cb) == before  # byte for byte, and no staging folder left
    wait_for_idle_cluster()


def test_cancel_leaves_the_codebook_unchanged(half_built):
    cb, edits = half_built
    before = snapshot(cb)
    done = []

    def progress(n: int) -> None:
        done.append(n)
        if sum(done) > 2:  # the 2 skipped edits, then the first computed batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        add_edits_ray(Editor(cb), edits, options=RayOptions(), batch_size=1, progress=progress)
    assert snapshot(cb) == before
    wait_for_idle_cluster()
    # and the codebook takes the same edits afterwards
    report = add_edits_ray(Editor(cb), edits, options=RayOptions(), batch_size=2)
    assert len(report.added) == 4 and report.version == Codebook.open(cb).version


def test_killed_driver_leaves_the_codebook_unchanged(half_built, edits_file):
    """SIGKILL of the `reasonedit` process mid-job: only a stale staging folder remains,
    which nothing reads and the next job or `doctor --repair` removes."""
    cb, _ = half_built
    before = snapshot(cb)
    cmd = [sys.executable, "-m", "reasonedit_cli", "add-edit", "-c", str(cb)]
    cmd += ["--from", str(edits_file), "--skip-invalid", "--batch-size", "1"]
    cmd += ["--engine", "ray", "--workers", "1", "--json"]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    # its own session: the local Ray instance it starts can be killed with it (below)
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not any((cb / STAGING).glob("*/keys-*.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    # Ray's agents of the driver's local instance outlive a SIGKILL: end the job's group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    after = snapshot(cb)
    assert {k: v for k, v in after.items() if not k.startswith(STAGING)} == before
    assert any(k.startswith(STAGING) for k in after)  # it was killed midway
    rep = Codebook.open(cb).check()
    assert rep.ok and any("died" in n for n in rep.notes)
    assert remove_stale(cb)  # what `doctor --repair` and the next Ray job do
    assert snapshot(cb) == before
    wait_for_idle_cluster()


def test_evaluate_ray_reports_the_local_metrics():
    args = [
        "evaluate",
        "--edits",
        str(SAMPLE / "edits.jsonl"),
        "--probes",
        str(SAMPLE / "probes.jsonl"),
        "--methods",
        "unedited,reasonedit,ike,answer-lookup",
        "--no-sweep-p",
        "--json",
    ]
    local = runner.invoke(app, args)
    assert local.exit_code == 0, local.output
    remote = runner.invoke(app, [*args, "--engine", "ray", "--workers", "2"])
    assert remote.exit_code == 0, remote.output
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    for key in ("methods", "retrieval", "retrieval_by_method", "counts"):
        assert a[key] == b[key], key
    assert a["settings"].pop("w") == pytest.approx(b["settings"].pop("w"), rel=1e-5)
    assert a["settings"] == b["settings"]


def test_ray_flags_need_the_ray_engine(tmp_path):
    result = runner.invoke(
        app, ["add-edit", "-c", str(tmp_path / "cb"), "--from", "x.jsonl", "--workers", "2"]
    )
    assert result.exit_code == 2
    assert "--engine ray" in result.output
