"""Interactive latency beside a running batch, and a batch's throughput against Locust's maximum.

Against a running gateway (``make demo``, or the perf stack), for one endpoint (``embeddings`` or ``chat``), with
the Locust suite's own request bodies (``vlmserve.loadtests.payloads``), it measures, in alternating rounds:

1. **interactive alone**: ``--users`` closed-loop clients with ``--think`` seconds between requests, for
   ``--duration`` s: latency p50/p95;
2. **interactive beside a batch**: the same, while a batch of the same requests (larger than the round can
   finish) runs; the batch's lines finished meanwhile are counted too (it uses the idle capacity);

then, once each:

3. **a batch alone**: ``--batch-lines`` lines, lines/s from ``in_progress`` to ``completed``;
4. **Locust's maximum**: Locust headless on the same endpoint's user class with ``--locust-users`` users, no
   think time, requests/s.

Run: ``python -m vlmserve.loadtests.batch_bench --base-url http://127.0.0.1:8080 --endpoint embeddings``. Writes
``loadtests/reports/batch-<endpoint>.{md,json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from vlmserve.host import serving_cpu
from vlmserve.loadtests.payloads import Config, chat_body, v1_embeddings_body

ENDPOINTS = {
    "embeddings": ("/v1/embeddings", "v1_embeddings"),
    "chat": ("/v1/chat/completions", "chat_completions"),
}
REPORTS = Path(__file__).parent / "reports"


def body_for(endpoint: str, config: Config, rng: random.Random) -> dict[str, Any]:
    if endpoint == "chat":
        return chat_body(config, rng, stream=False)
    return v1_embeddings_body(config, rng, "float")


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def interactive(url: str, endpoint: str, users: int, think_s: float, duration_s: float,
                      config: Config) -> dict[str, Any]:
    path = ENDPOINTS[endpoint][0]
    latencies: list[float] = []
    failures = 0
    stop = time.monotonic() + duration_s

    async def user(index: int) -> None:
        nonlocal failures
        rng = random.Random(index)
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            await asyncio.sleep(think_s * index / max(users, 1))  # staggered starts
            while time.monotonic() < stop:
                start = time.perf_counter()
                response = await client.post(path, json=body_for(endpoint, config, rng))
                if response.status_code == 200:
                    latencies.append((time.perf_counter() - start) * 1000)
                else:
                    failures += 1
                await asyncio.sleep(think_s)

    await asyncio.gather(*(user(i) for i in range(users)))
    return {"requests": len(latencies), "failures": failures, "p50_ms": round(p(latencies, 0.5), 1),
            "p95_ms": round(p(latencies, 0.95), 1)}


def submit_batch(client: httpx.Client, endpoint: str, lines: int, config: Config, seed: int) -> str:
    path = ENDPOINTS[endpoint][0]
    rng = random.Random(seed)
    text = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": path,
                               "body": body_for(endpoint, config, rng)}) + "\n" for i in range(lines))
    upload = client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("bench.jsonl", text.encode())})
    upload.raise_for_status()
    batch = client.post("/v1/batches", json={"input_file_id": upload.json()["id"], "endpoint": path,
                                             "completion_window": "24h"})
    batch.raise_for_status()
    return str(batch.json()["id"])


def wait_status(client: httpx.Client, batch_id: str, statuses: tuple[str, ...], timeout_s: float = 3600,
                ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}").raise_for_status().json()
        if batch["status"] in statuses:
            return dict(batch)
        time.sleep(0.2)
    raise TimeoutError(f"batch {batch_id} not {statuses} after {timeout_s}s")


def batch_alone(client: httpx.Client, endpoint: str, lines: int, config: Config) -> dict[str, Any]:
    batch_id = submit_batch(client, endpoint, lines, config, seed=7)
    wait_status(client, batch_id, ("in_progress", "completed"))
    start = time.perf_counter()
    done = wait_status(client, batch_id, ("completed", "failed", "cancelled", "expired"))
    elapsed = time.perf_counter() - start
    return {"lines": lines, "status": done["status"], "completed": done["request_counts"]["completed"],
            "seconds": round(elapsed, 2), "lines_per_s": round(done["request_counts"]["completed"] / elapsed, 2)}


def locust_max(url: str, endpoint: str, users: int, duration_s: float) -> dict[str, Any]:
    tag = ENDPOINTS[endpoint][1]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"{tmp}/locust"
        subprocess.run([sys.executable, "-m", "locust", "-f", str(Path(__file__).parent / "locustfile.py"),
                        "--headless", "-u", str(users), "-r", str(users), "-t", f"{int(duration_s)}s",
                        "--host", url, "--tags", tag, "--csv", prefix, "--only-summary"],
                       check=False, capture_output=True, text=True, timeout=duration_s + 120)
        with open(f"{prefix}_stats.csv", newline="") as handle:
            rows = {r["Name"]: r for r in csv.DictReader(handle)}
    total = rows["Aggregated"]
    return {"users": users, "requests": int(total["Request Count"]), "failures": int(total["Failure Count"]),
            "requests_per_s": round(float(total["Requests/s"]), 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="embeddings")
    parser.add_argument("--users", type=int, default=2, help="interactive clients")
    parser.add_argument("--think", type=float, default=0.5, help="interactive think time (s)")
    parser.add_argument("--duration", type=float, default=30, help="seconds per interactive round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-lines", type=int, default=400, help="lines of the batch-alone run")
    parser.add_argument("--beside-lines", type=int, default=2000,
                        help="lines of the batch beside interactive traffic (more than a round finishes)")
    parser.add_argument("--locust-users", type=int, default=16)
    parser.add_argument("--name", default=None, help="report name (default batch-<endpoint>)")
    args = parser.parse_args(argv)
    config = Config.from_env()
    url = args.base_url.rstrip("/")
    rounds = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for repeat in range(args.repeats):
            alone = asyncio.run(interactive(url, args.endpoint, args.users, args.think, args.duration, config))
            # Enough lines that the batch outlasts the round; cancelled after it.
            batch_id = submit_batch(client, args.endpoint, args.beside_lines, config, seed=repeat)
            wait_status(client, batch_id, ("in_progress",))
            before = client.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"]
            beside = asyncio.run(interactive(url, args.endpoint, args.users, args.think, args.duration, config))
            after = client.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"]
            client.post(f"/v1/batches/{batch_id}/cancel").raise_for_status()
            wait_status(client, batch_id, ("cancelled", "completed"))
            beside["batch_lines_per_s"] = round((after - before) / args.duration, 2)
            rounds.append({"alone": alone, "beside_batch": beside,
                           "p95_ratio": round(beside["p95_ms"] / alone["p95_ms"], 2)})
            print(json.dumps(rounds[-1]), flush=True)
        throughput = batch_alone(client, args.endpoint, args.batch_lines, config)
    locust = locust_max(url, args.endpoint, args.locust_users, args.duration)
    report = {
        "endpoint": ENDPOINTS[args.endpoint][0], "cpu": serving_cpu().summary, "users": args.users,
        "think_s": args.think, "duration_s": args.duration, "rounds": rounds,
        "p95_ratio_median": statistics.median(r["p95_ratio"] for r in rounds),
        "batch_alone": throughput, "locust_max": locust,
        "batch_vs_locust": round(throughput["lines_per_s"] / locust["requests_per_s"], 2),
    }
    name = args.name or f"batch-{args.endpoint}"
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (REPORTS / f"{name}.md").write_text(render(report, " ".join(["python -m vlmserve.loadtests.batch_bench",
                                                                   *(argv or sys.argv[1:])])))
    print(json.dumps(report, indent=2))
    return report


def render(report: dict[str, Any], command: str) -> str:
    lines = [f"# Batch beside interactive traffic: `{report['endpoint']}`", "",
             f"Host: {report['cpu']}. Command: `{command}`.", "",
             f"Interactive: {report['users']} closed-loop users, {report['think_s']} s think time, "
             f"{report['duration_s']:g} s per round.", "",
             "| round | p50 alone (ms) | p95 alone (ms) | p50 beside batch | p95 beside batch | p95 ratio | "
             "batch lines/s meanwhile |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(report["rounds"], start=1):
        a, b = r["alone"], r["beside_batch"]
        lines.append(f"| {i} | {a['p50_ms']} | {a['p95_ms']} | {b['p50_ms']} | {b['p95_ms']} | {r['p95_ratio']} | "
                     f"{b['batch_lines_per_s']} |")
    t, m = report["batch_alone"], report["locust_max"]
    lines += ["", f"Median p95 ratio: **{report['p95_ratio_median']}** (target ≤ 1.5).", "",
              f"Batch alone: {t['completed']} lines in {t['seconds']} s = **{t['lines_per_s']} lines/s**; "
              f"Locust with {m['users']} users: **{m['requests_per_s']} requests/s** ({m['failures']} failures); "
              f"batch / Locust = **{report['batch_vs_locust']}** (target ≥ 0.9).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
