"""Heartbeats over real HTTP: simulated workers against uvicorn with Redis and PostgreSQL.

Registers N workers through the API, then each sends a heartbeat every `--interval` seconds at a random
phase (an open loop: latency is measured from each heartbeat's scheduled time, so queueing counts).
The offered rate is N / interval. Prints the sustained heartbeats/s, p50/p99 latency, errors, and how
many worker rows the batched flushes wrote. The load generator runs on the same machine. Never passes or fails.

    python bench/heartbeats.py [--simulated 5000] [--interval 5] [--duration 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import POSTGRES_URL, REDIS_URL, RawClient, flush_redis, new_key, percentile, start_coordinator  # noqa: E402

GIB = 1024**3


def registration(i: int) -> bytes:
    return json.dumps({
        "machine_id": f"bench-pc-{i}", "agent_version": "bench", "ask_price_per_gpu_hour": "0.25",
        "gpus": [{"uuid": f"GPU-{i}", "index": 0, "name": "NVIDIA GeForce RTX 4090", "memory_total_bytes": 24 * GIB,
                  "compute_capability": "8.9"}],
    }).encode()


def heartbeat(i: int, rng: random.Random) -> bytes:
    return json.dumps({"activity": "idle", "gpus": [{
        "uuid": f"GPU-{i}", "utilization_pct": rng.randint(0, 5), "memory_free_bytes": 23 * GIB,
        "temperature_c": rng.randint(35, 50), "power_w": rng.randint(20, 40), "foreign_processes": 0}]}).encode()


def database_writes() -> int:
    engine = create_engine(POSTGRES_URL)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
        value = conn.execute(text("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'workers'")).scalar()
        heard = conn.execute(text("SELECT count(*) FROM workers WHERE last_heartbeat_at IS NOT NULL")).scalar()
    engine.dispose()
    print(f"  workers heard of in the database: {heard}", flush=True)
    return int(value or 0)


async def register_all(url: str, provider_key: str, n: int, connections: int) -> list[str]:
    tokens: list[str] = [""] * n
    async with RawClient(url, {"Authorization": f"Bearer {provider_key}", "Tunegrid-Protocol": "1"}, connections) as client:
        async def one(i: int) -> None:
            status, body = await client.exchange("POST", "/v1/workers/register", registration(i))
            assert status == 200, body
            tokens[i] = json.loads(body)["worker_token"]
        for start in range(0, n, 500):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + 500))))
    return tokens


async def run_load(url: str, tokens: list[str], interval: float, duration: float, connections: int) -> dict:  # type: ignore[type-arg]
    rng = random.Random(1)
    bodies = [heartbeat(i, rng) for i in range(len(tokens))]
    auth = [f"Authorization: Bearer {t}\r\n" for t in tokens]
    schedule = sorted((rng.uniform(0, interval) + k * interval, i)
                      for i in range(len(tokens)) for k in range(int(duration / interval) + 1)
                      if rng.uniform(0, interval) + k * interval < duration)
    latencies: list[float] = []
    errors = 0
    async with RawClient(url, {"Tunegrid-Protocol": "1"}, connections) as client:
        slots = asyncio.Semaphore(connections)
        began = time.perf_counter()

        async def fire(at: float, i: int) -> None:
            nonlocal errors
            async with slots:
                status, _ = await client.exchange("POST", "/v1/workers/heartbeat", bodies[i], auth[i])
            latencies.append(time.perf_counter() - at)
            errors += status != 200

        tasks = []
        for offset, i in schedule:
            at = began + offset
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fire(at, i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - began
    return {"sent": len(latencies), "rate": len(latencies) / elapsed, "latencies": sorted(latencies), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulated", type=int, default=5000, help="simulated workers")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between one worker's heartbeats")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--connections", type=int, default=64, help="keep-alive connections of the load generator")
    parser.add_argument("--flush", type=float, default=5.0, help="TUNEGRID_HEARTBEAT_FLUSH_S: batch writes period")
    args = parser.parse_args()

    flush_redis(REDIS_URL)
    with tempfile.TemporaryDirectory() as tmp:
        process, url, env = start_coordinator("postgresql", Path(tmp), args.workers, {
            "TUNEGRID_REDIS_URL": REDIS_URL, "TUNEGRID_HEARTBEAT_FLUSH_S": str(args.flush)})
        try:
            tokens = asyncio.run(register_all(url, new_key(env, "provider"), args.simulated, args.connections))
            asyncio.run(run_load(url, tokens, args.interval, min(args.interval, 5.0), args.connections))  # warm-up
            before = database_writes()
            result = asyncio.run(run_load(url, tokens, args.interval, args.duration, args.connections))
            time.sleep(1)  # statistics reach pg_stat a moment later
            written = database_writes() - before
        finally:
            process.terminate()
            process.wait(timeout=15)
    lat = result["latencies"]
    print(f"cpus={os.cpu_count()} uvicorn workers={args.workers} simulated workers={args.simulated} "
          f"interval={args.interval}s flush every {args.flush}s duration={args.duration}s")
    print(f"offered {args.simulated / args.interval:.0f}/s  sustained {result['rate']:.0f} heartbeats/s  "
          f"p50 {percentile(lat, 50) * 1000:.1f} ms  p99 {percentile(lat, 99) * 1000:.1f} ms  "
          f"errors {result['errors']}  worker rows written {written} ({written / args.duration:.0f}/s, in batches)")


if __name__ == "__main__":
    main()
