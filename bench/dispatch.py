"""Dispatch latency: from a job becoming queued to an idle, long-polling worker holding its assignment.

Starts the coordinator (PostgreSQL + Redis with two uvicorn processes, so the wake-up usually crosses
processes; and the embedded default, SQLite in one process), registers workers that long-poll
`/v1/workers/claim`, then creates jobs one at a time. For each job it measures from just before the
create request is sent (an upper bound on "became queued") to the moment a worker's claim reply holding
that job arrives. Workers release each job at once (they report a user error), so they are idle again;
nothing trains. Prints p50/p99. Never passes or fails.

    python bench/dispatch.py [--jobs 100] [--workers 10] [--gap 0.2] [--backends postgresql,sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REDIS_URL, flush_redis, new_key, percentile, start_coordinator  # noqa: E402

GIB = 1024**3
PROTOCOL = {"Tunegrid-Protocol": "1"}


async def register(client: httpx.AsyncClient, provider_key: str, i: int) -> str:
    response = await client.post("/v1/workers/register", headers={**PROTOCOL, "Authorization": f"Bearer {provider_key}"}, json={
        "machine_id": f"bench-pc-{i}", "agent_version": "bench", "ask_price_per_gpu_hour": "0.25",
        "gpus": [{"uuid": f"GPU-{i}", "index": 0, "name": "NVIDIA GeForce RTX 4090", "memory_total_bytes": 24 * GIB,
                  "compute_capability": "8.9"}]})
    response.raise_for_status()
    return response.json()["worker_token"]


async def worker(client: httpx.AsyncClient, token: str, received: dict[str, float], stop: asyncio.Event) -> None:
    headers = {**PROTOCOL, "Authorization": f"Bearer {token}"}
    while not stop.is_set():
        response = await client.post("/v1/workers/claim", headers=headers, json={"wait_s": 5}, timeout=30)
        assignment = response.json().get("assignment")
        if assignment is None:
            continue
        received[assignment["job_id"]] = time.perf_counter()
        await client.post(f"/v1/workers/leases/{assignment['lease_id']}/fail", json={
            "kind": "user_error", "message": "bench: released at once", "usage": {"wall_seconds": 0, "gpu_seconds": 0}},
            headers={**headers, "Tunegrid-Fencing-Token": str(assignment["fencing_token"])})


async def measure(url: str, customer: str, provider: str, args: argparse.Namespace) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=args.workers + 8)) as client:
        auth = {"Authorization": f"Bearer {customer}"}
        lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
                 for i in range(20)]
        upload = await client.post("/v1/files", headers=auth, data={"purpose": "fine-tune"},
                                   files={"file": ("t.jsonl", io.BytesIO("\n".join(lines).encode()))})
        file_id = upload.json()["id"]
        tokens = [await register(client, provider, i) for i in range(args.workers)]
        received: dict[str, float] = {}
        stop = asyncio.Event()
        pollers = [asyncio.create_task(worker(client, t, received, stop)) for t in tokens]
        await asyncio.sleep(1.0)  # every worker is long-polling
        latencies = []
        for _ in range(args.jobs):
            sent = time.perf_counter()
            created = await client.post("/v1/fine_tuning/jobs", headers=auth,
                                        json={"model": "tunegrid/tiny-llama", "training_file": file_id})
            job_id = created.json()["id"]
            deadline = sent + 30
            while job_id not in received and time.perf_counter() < deadline:
                await asyncio.sleep(0.001)
            if job_id in received:
                latencies.append(received[job_id] - sent)
            await asyncio.sleep(args.gap)
        stop.set()
        await asyncio.wait(pollers, timeout=10)
        return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=10, help="long-polling workers")
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between job creations")
    parser.add_argument("--backends", default="postgresql,sqlite")
    args = parser.parse_args()
    for backend in args.backends.split(","):
        extra = {"TUNEGRID_REDIS_URL": REDIS_URL} if backend == "postgresql" else {}
        processes = 2 if backend == "postgresql" else 1
        if backend == "postgresql":
            flush_redis(REDIS_URL)
        with tempfile.TemporaryDirectory() as tmp:
            process, url, env = start_coordinator(backend, Path(tmp), processes, extra)
            try:
                latencies = asyncio.run(measure(url, new_key(env, "customer"), new_key(env, "provider"), args))
            finally:
                process.terminate()
                process.wait(timeout=15)
        shape = "PostgreSQL + Redis, 2 API processes" if backend == "postgresql" else "SQLite embedded, 1 process"
        print(f"{shape}: {len(latencies)}/{args.jobs} jobs dispatched to {args.workers} long-polling workers; "
              f"queued -> assignment p50 {percentile(latencies, 50) * 1000:.1f} ms, "
              f"p99 {percentile(latencies, 99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
