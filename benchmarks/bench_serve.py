"""Throughput of `reasonedit serve` at 1, 4 and 16 concurrent clients, batched vs not.

Starts `reasonedit serve` twice as its own process on a free loopback port, over one
codebook of the bundled sample edits: once batching (`--max-batch 16`, the default) and
once answering one request at a time (`--max-batch 1`). Clients are threads of this
process with keep-alive HTTP connections, each sending the sample questions in turn;
every point is the median of `--runs` runs of `--requests` requests. Then a load test
with the official `openai` client: `--load-clients` clients x `--load-requests` requests
each on the batching server, counting errors and reporting p50/p95 latency.

    python benchmarks/bench_serve.py [--requests 96] [--runs 3] [--json]

Only loopback traffic; every loop is bounded by its request count.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 4, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bodies() -> list[bytes]:
    rows = [json.loads(x) for x in (ROOT / "sample_edits" / "edits.jsonl").read_text().splitlines()]
    out = []
    for r in rows:
        data = base64.b64encode((ROOT / "sample_edits" / r["image"]).read_bytes()).decode()
        msg = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                    {"type": "text", "text": r["question"]},
                ],
            }
        ]
        out.append(json.dumps({"model": "reasonedit", "messages": msg}).encode())
    return out


class Server:
    """`reasonedit serve` in its own process; ready when /healthz answers."""

    def __init__(self, codebook: Path, *extra: str) -> None:
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reasonedit_cli", "serve", "-c", str(codebook)]
            + ["--port", str(self.port), *extra],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    why = self.proc.stderr.read().decode()
                    raise SystemExit(f"server did not start: {why}") from None
                time.sleep(0.2)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=10) as r:
            return json.loads(r.read())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_clients(port: int, clients: int, total: int, payloads: list[bytes]) -> dict:
    """`total` requests spread over `clients` threads; throughput and latencies."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    per = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for j in range(per[i]):
            body = payloads[(i + j) % len(payloads)]
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if resp.status != 200:
                    errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"rps": total / wall, "errors": errors[0], "latencies": latencies}


def percentile(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def load_test(port: int, clients: int, requests: int, payloads: list[bytes]) -> dict:
    """The official openai client: `clients` threads x `requests` each."""
    import openai

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    decoded = [json.loads(p) for p in payloads]

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        for j in range(requests):
            body = decoded[(i + j) % len(decoded)]
            t0 = time.perf_counter()
            try:
                r = c.chat.completions.create(model=body["model"], messages=body["messages"])
                error = None if r.choices[0].message.content else "empty answer"
            except openai.OpenAIError as exc:
                error = type(exc).__name__
            with lock:
                latencies.append(time.perf_counter() - t0)
                if error:
                    errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": clients * requests,
        "errors": len(errors),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p95_ms": round(1000 * percentile(latencies, 95), 1),
        "rps": round(clients * requests / wall, 2),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=96, help="requests per point")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--load-clients", type=int, default=8)
    ap.add_argument("--load-requests", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    payloads = bodies()

    with tempfile.TemporaryDirectory() as tmp:
        cb = Path(tmp) / "cb"
        subprocess.run(
            [sys.executable, "-m", "reasonedit_cli", "add-edit", "-c", str(cb)]
            + ["--from", str(ROOT / "sample_edits" / "edits.jsonl"), "--json"],
            env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        results: dict = {"throughput": {}, "batches": {}}
        servers = {"batched": Server(cb), "one at a time": Server(cb, "--max-batch", "1")}
        try:
            for server in servers.values():
                run_clients(server.port, 4, 16, payloads)  # warm-up
            rps: dict[str, list[float]] = {}
            calls: dict[str, list[int]] = {}
            # interleaved (run, clients, server), so load from other jobs hits both alike
            for _ in range(args.runs):
                for c in CONCURRENCY:
                    for name, server in servers.items():
                        key = f"{name}, {c} clients"
                        before = server.stats()
                        r = run_clients(server.port, c, args.requests, payloads)
                        after = server.stats()
                        assert r["errors"] == 0, r
                        rps.setdefault(key, []).append(r["rps"])
                        calls.setdefault(key, []).append(after["batches"] - before["batches"])
            for name in servers:
                for c in CONCURRENCY:
                    key = f"{name}, {c} clients"
                    results["throughput"][key] = round(statistics.median(rps[key]), 2)
                    # requests per generate call at this concurrency
                    results["batches"][key] = round(
                        args.requests * args.runs / max(1, sum(calls[key])), 2
                    )
            results["load"] = load_test(
                servers["batched"].port, args.load_clients, args.load_requests, payloads
            )
        finally:
            for server in servers.values():
                server.close()
    base = results["throughput"]["one at a time, 1 clients"]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| server | clients | requests/s | vs one at a time, 1 client | requests per call |")
    print("|---|---:|---:|---:|---:|")
    for key, rps in results["throughput"].items():
        name, clients = key.rsplit(", ", 1)
        per_call = results["batches"][key]
        print(f"| {name} | {clients.split()[0]} | {rps:.2f} | {rps / base:.2f}x | {per_call} |")
    load = results["load"]
    print(
        f"\nload test (openai client): {load['clients']} clients x "
        f"{load['requests'] // load['clients']} requests: {load['errors']} errors, "
        f"p50 {load['p50_ms']} ms, p95 {load['p95_ms']} ms, {load['rps']} requests/s"
    )


if __name__ == "__main__":
    main()
