"""`reasonedit serve` as real processes and under load (slow: `make test-serve`).

- `reasonedit serve` started by its console command, `reasonedit add-edit` run by another
  process while it serves: the next answer changes, and `ask --server` prints what the
  local `ask` prints.
- A bounded loopback load test with the official openai client: 8 clients x 50 requests,
  no errors; p50/p95 and throughput printed (the figures in benchmarks/README.md come from
  benchmarks/bench_serve.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from reasonedit_cli.datasets import read_edits

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_edits"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reasonedit_cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        check=check,
        timeout=600,
    )


def codebook_version(url: str) -> int:
    with urllib.request.urlopen(url + "/v1/codebook", timeout=10) as r:
        return json.loads(r.read())["version"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`reasonedit serve` in its own process over the first three sample edits."""
    tmp = tmp_path_factory.mktemp("serve-slow")
    rows = (SAMPLES / "edits.jsonl").read_text().splitlines()
    first = tmp / "first.jsonl"
    first.write_text(
        "".join(
            json.dumps({**json.loads(r), "image": str(SAMPLES / json.loads(r)["image"])}) + "\n"
            for r in rows[:3]
        )
    )
    cb = tmp / "cb"
    cli("add-edit", "-c", str(cb), "--from", str(first), "--patches", "none")
    # --port 0 --json: the server picks a free port and prints its URL once listening
    proc = subprocess.Popen(
        [sys.executable, "-m", "reasonedit_cli", "serve", "-c", str(cb), "--port", "0"]
        + ["--poll-interval", "0.2", "--json"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    assert line, "the server exited before listening"
    url = json.loads(line)["url"]
    yield url, cb
    proc.terminate()
    proc.wait(timeout=30)


def test_add_edit_in_another_process_changes_the_next_answer(server):
    url, cb = server
    edits = str(SAMPLES / "edits.jsonl")
    before = cli("ask", "--server", url, "--from", edits, "--json").stdout.splitlines()
    local = cli("ask", "-c", str(cb), "--from", edits, "--json").stdout.splitlines()
    assert [json.loads(x)["answer"] for x in before] == [json.loads(x)["answer"] for x in local]
    assert [list(json.loads(x)) for x in before] == [list(json.loads(x)) for x in local]
    old = codebook_version(url)
    added = json.loads(cli("add-edit", "-c", str(cb), "--from", edits, "--json").stdout)
    deadline = time.monotonic() + 60
    while codebook_version(url) != added["version"]:
        assert time.monotonic() < deadline, "the server did not pick up the new version"
        time.sleep(0.2)
    after = [
        json.loads(x)
        for x in cli("ask", "--server", url, "--from", edits, "--json").stdout.splitlines()
    ]
    expected, _ = read_edits(edits, "jsonl")
    # every sample edit now applies, including the three added while serving
    assert [a["answer"] for a in after] == [e.answer for e in expected]
    assert added["version"] > old and all(not a["rejected"] for a in after)
    text = cli("ask", "--server", url, "--from", edits).stdout.split()
    assert text == [e.answer for e in expected]


def test_load_8_clients_x_50_requests_without_errors(server):
    url, _ = server
    rows = [json.loads(x) for x in (SAMPLES / "edits.jsonl").read_text().splitlines()]
    import base64

    bodies = [
        [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": "data:image/png;base64,"
                            + base64.b64encode((SAMPLES / r["image"]).read_bytes()).decode()
                        },
                    },
                    {"type": "text", "text": r["question"]},
                ],
            }
        ]
        for r in rows
    ]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)
        for j in range(50):
            t0 = time.perf_counter()
            try:
                r = c.chat.completions.create(model="reasonedit", messages=bodies[(i + j) % 6])
                err = None if r.choices[0].message.content else "empty"
            except openai.OpenAIError as exc:
                err = type(exc).__name__
            with lock:
                latencies.append(time.perf_counter() - t0)
                if err:
                    errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - t0
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(
        f"\n8 clients x 50 requests: {len(errors)} errors, p50 {1000 * p50:.0f} ms, "
        f"p95 {1000 * p95:.0f} ms, {400 / wall:.1f} requests/s"
    )
    assert len(latencies) == 400 and errors == []
