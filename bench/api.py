"""API benchmark: job create and job list against a live coordinator, on SQLite and PostgreSQL.

For each backend it starts `tunegrid-coordinator serve`, then for each operation
runs (1) a closed loop at the given concurrency for the top throughput and
(2) an open loop at a fixed offered rate, whose latency is measured from each
request's scheduled start (so queueing is counted, not hidden). Prints figures;
never passes or fails.

    python bench/api.py [--backends sqlite,postgresql] [--rate 200] [--duration 15] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    POSTGRES_URL, RawClient, analyze as _analyze, new_key, percentile, start_coordinator as start_server,
)


def training_file(url: str, key: str) -> str:
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
             for i in range(50)]
    response = httpx.post(f"{url}/v1/files", headers={"Authorization": f"Bearer {key}"}, data={"purpose": "fine-tune"},
                          files={"file": ("train.jsonl", io.BytesIO("\n".join(lines).encode()))}, timeout=30)
    response.raise_for_status()
    return response.json()["id"]


async def closed_loop(client: RawClient, request, duration: float, concurrency: int) -> dict:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    async def one_user() -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            start = time.perf_counter()
            status = await request(client)
            latencies.append(time.perf_counter() - start)
            errors += status >= 400

    began = time.perf_counter()
    await asyncio.gather(*(one_user() for _ in range(concurrency)))
    return {"rps": len(latencies) / (time.perf_counter() - began), "latencies": latencies, "errors": errors}


async def open_loop(client: RawClient, request, duration: float, rate: float, concurrency: int) -> dict:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    errors = 0
    slots = asyncio.Semaphore(concurrency)
    began = time.perf_counter()

    async def fire(scheduled: float) -> None:
        nonlocal errors
        async with slots:
            status = await request(client)
        latencies.append(time.perf_counter() - scheduled)
        errors += status >= 400

    tasks = []
    for i in range(int(duration * rate)):
        scheduled = began + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        tasks.append(asyncio.create_task(fire(scheduled)))
    await asyncio.gather(*tasks)
    return {"rps": len(latencies) / (time.perf_counter() - began), "latencies": latencies, "errors": errors}


def row(backend: str, op: str, mode: str, result: dict) -> str:
    lat = sorted(result["latencies"])
    return (f"{backend:<11} {op:<11} {mode:<18} {result['rps']:>8.1f} {percentile(lat, 50) * 1000:>8.1f} "
            f"{percentile(lat, 99) * 1000:>8.1f} {result['errors']:>6}")


async def bench_backend(backend: str, url: str, key: str, args: argparse.Namespace) -> list[str]:
    file_id = training_file(url, key)
    headers = {"Authorization": f"Bearer {key}"}
    body = json.dumps({"model": "tunegrid/tiny-llama", "training_file": file_id, "metadata": {"bench": "1"}}).encode()
    ops = {
        "job create": lambda c: c.request("POST", "/v1/fine_tuning/jobs", body),
        "job list": lambda c: c.request("GET", "/v1/fine_tuning/jobs?limit=20"),
    }
    lines = []
    async with RawClient(url, headers, args.concurrency) as client:
        for op, request in ops.items():
            await open_loop(client, request, 2, args.rate / 2, args.concurrency)  # warm-up; seeds rows to list
            if backend == "postgresql":
                # Thousands of rows were just inserted; autovacuum would analyze them within its naptime
                # (a minute), and until then the planner sorts every row of the account for a LIMIT 21.
                _analyze(POSTGRES_URL)
            lines.append(row(backend, op, f"open {args.rate:.0f}/s",
                             await open_loop(client, request, args.duration, args.rate, args.concurrency)))
            await asyncio.sleep(1)
            lines.append(row(backend, op, f"closed c={args.concurrency}",
                             await closed_loop(client, request, args.duration, args.concurrency)))
            await asyncio.sleep(1)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--rate", type=float, default=200.0, help="offered requests/s in the open loop")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2,
                        help="uvicorn worker processes on PostgreSQL; SQLite (embedded mode) always runs one, since "
                             "several processes writing one SQLite file only wait on each other's locks")
    args = parser.parse_args()

    print(f"cpus={os.cpu_count()} workers: sqlite=1 postgresql={args.workers} concurrency={args.concurrency} duration={args.duration}s")
    print(f"{'backend':<11} {'operation':<11} {'mode':<18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            workers = 1 if backend == "sqlite" else args.workers
            process, url, env = start_server(backend, Path(tmp), workers)
            try:
                for line in asyncio.run(bench_backend(backend, url, new_key(env), args)):
                    print(line, flush=True)
            finally:
                process.terminate()
                process.wait(timeout=15)


if __name__ == "__main__":
    main()
