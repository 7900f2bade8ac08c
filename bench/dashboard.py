"""Dashboard page timings with a big marketplace: 1,000 workers (each heartbeating a few times, so the fleet's
sparklines have data) and 10,000 jobs with their leases and usage over 30 days, on PostgreSQL.

Starts `tunegrid-coordinator serve`, seeds the database in bulk, logs in as an admin, then requests every
admin page (and a customer's dashboard) repeatedly, printing the server-side render time of each (the
`Server-Timing` header: from the request reaching the page to its HTML being ready) and the client's wall
time. The target is <= 200 ms server-side per page. Never passes or fails.

    python bench/dashboard.py [--workers 1000] [--jobs 10000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import create_engine, insert, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from coordinator.db.ids import new_id  # noqa: E402
from coordinator.db.tables import (  # noqa: E402
    AccountModel, ApiKeyModel, FileModel, FileStatus, JobEventModel, JobModel, JobStatus, LeaseModel, LeaseStatus, Role,
    UsageRecordModel, WorkerModel, WorkerState, utcnow,
)
from harness import POSTGRES_URL, analyze, new_key, start_coordinator  # noqa: E402
from shared.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION  # noqa: E402

CARDS = [("NVIDIA GeForce RTX 3060", "rtx-3060", 12), ("NVIDIA GeForce RTX 3090", "rtx-3090", 24),
         ("NVIDIA GeForce RTX 4070", "rtx-4070", 12), ("NVIDIA GeForce RTX 4090", "rtx-4090", 24)]
STATUSES = [JobStatus.succeeded] * 6 + [JobStatus.failed, JobStatus.cancelled, JobStatus.queued, JobStatus.running]


def seed(url: str, *, workers: int, jobs: int, customer_id: str) -> tuple[list[str], str]:
    """Bulk rows; the workers' bearer tokens and the id of one job with a long loss curve."""
    rng = random.Random(5)
    now = utcnow()
    engine = create_engine(url)
    providers = [f"acct-prov{i:04d}" for i in range(100)]
    customers = [customer_id] + [f"acct-cust{i:04d}" for i in range(49)]
    tokens, worker_rows, job_rows, lease_rows, usage_rows, events = [], [], [], [], [], []
    for i in range(workers):
        prefix, secret = f"{i:012d}", f"secret{i}"
        tokens.append(f"tgw_{prefix}_{secret}")
        name, gpu_class, gb = CARDS[i % len(CARDS)]
        worker_rows.append({
            "id": f"wrk-{i:06d}", "account_id": providers[i % len(providers)], "machine_id": f"pc-{i}",
            "name": f"gaming-pc-{i:04d}", "token_prefix": prefix, "token_sha256": hashlib.sha256(secret.encode()).hexdigest(),
            "agent_version": "bench", "protocol_version": 1,
            "gpus": [{"uuid": f"GPU-{i}", "name": name, "memory_total_bytes": gb << 30}], "gpu_class": gpu_class,
            "gpu_name": name, "vram_total_bytes": gb << 30, "vram_free_bytes": gb << 30, "compute_capability": "8.6",
            "ask_price_per_gpu_hour": rng.choice([150_000, 250_000, 300_000, 450_000]), "policy": {}, "cached_models": [],
            "state": rng.choice(list(WorkerState)), "trusted": False, "reliability": round(rng.uniform(0.5, 1.0), 3),
            "speed_factor": 1.0, "completed_leases": 0, "lost_leases": 0, "failed_checks": 0, "created_at": now,
            "last_heartbeat_at": now,
        })
    for i in range(jobs):
        job_id, status = new_id("ftjob-"), rng.choice(STATUSES)
        customer = customers[i % len(customers)]
        created = now - timedelta(days=rng.uniform(0, 29.5))
        job_rows.append({
            "id": job_id, "account_id": customer, "model": "qwen2.5-1.5b-instruct", "training_file_id": "file-bench",
            "status": status, "hyperparameters": {"n_epochs": 3}, "lora": {"r": 16}, "seed": 1,
            "trusted_hosts_only": False, "estimated_tokens": 1_000_000, "result_files": [], "created_at": created,
            "updated_at": created, "version": 1, "fencing_token": 1, "attempts": 0, "held_micros": 0,
            "billed_micros": 0, "hold_seq": 1})
        if status is JobStatus.queued:
            continue
        worker = worker_rows[rng.randrange(workers)]
        lease_id, seconds = new_id("lease-"), rng.randint(300, 7200)
        price = worker["ask_price_per_gpu_hour"] * 12 // 10
        lease_rows.append({
            "id": lease_id, "job_id": job_id, "worker_id": worker["id"], "fencing_token": 1,
            "status": LeaseStatus.running if status is JobStatus.running else LeaseStatus.completed,
            "gpu_class": worker["gpu_class"], "ask_price_per_gpu_hour": worker["ask_price_per_gpu_hour"],
            "price_per_gpu_hour": price, "created_at": created, "training_started_at": created,
            "last_renewed_at": created + timedelta(seconds=seconds)})
        if status is JobStatus.running:
            continue
        charge, earned = -(-price * seconds // 3600), worker["ask_price_per_gpu_hour"] * seconds // 3600
        job_rows[-1]["billed_micros"] = charge
        usage_rows.append({
            "lease_id": lease_id, "job_id": job_id, "customer_id": customer, "provider_id": worker["account_id"],
            "worker_id": worker["id"], "gpu_class": worker["gpu_class"], "price_per_gpu_hour": price,
            "ask_price_per_gpu_hour": worker["ask_price_per_gpu_hour"], "rule": "until_end", "started_at": created,
            "billed_until": created + timedelta(seconds=seconds), "observed_seconds": float(seconds),
            "reported_seconds": float(seconds), "billable_seconds": seconds, "charge_micros": charge,
            "provider_micros": earned, "fee_micros": charge - earned, "usage_day": (created + timedelta(seconds=seconds)).date(),
            "created_at": created + timedelta(seconds=seconds)})
    curve_job = next(j["id"] for j in job_rows if j["status"] is JobStatus.succeeded and j["account_id"] == customer_id)
    for step in range(1, 501):
        events.append({"id": new_id("ftevent-"), "job_id": curve_job, "created_at": now, "level": "info", "type": "metrics",
                       "message": f"Step {step}", "data": {"step": step, "train_loss": 2.5 * 0.995**step}})
    with engine.begin() as conn:
        conn.execute(insert(AccountModel), [{"id": a, "name": a, "role": Role.provider, "created_at": now} for a in providers]
                     + [{"id": a, "name": a, "role": Role.customer, "created_at": now} for a in customers[1:]])
        conn.execute(insert(FileModel), [{"id": "file-bench", "account_id": customer_id, "filename": "t.jsonl",
                                          "purpose": "fine-tune", "bytes": 1, "sha256": "0" * 64,
                                          "status": FileStatus.processed, "created_at": now}])
        conn.execute(insert(WorkerModel), worker_rows)
        conn.execute(insert(JobModel), job_rows)
        conn.execute(insert(LeaseModel), lease_rows)
        conn.execute(insert(UsageRecordModel), usage_rows)
        conn.execute(insert(JobEventModel), events)
    engine.dispose()
    return tokens, curve_job


def heartbeats(url: str, tokens: list[str], rounds: int) -> None:
    rng = random.Random(9)
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(rounds):
            for i, token in enumerate(tokens):
                response = http.post("/v1/workers/heartbeat", headers={"Authorization": f"Bearer {token}",
                                                            PROTOCOL_HEADER: str(PROTOCOL_VERSION)},
                          json={"activity": "idle", "gpus": [{"uuid": f"GPU-{i}", "utilization_pct": rng.uniform(0, 100),
                                                              "temperature_c": rng.uniform(40, 85)}]})
                assert response.status_code == 200, response.text


def login(http: httpx.Client, key: str) -> None:
    token = re.search(r'name="csrf_token" value="([^"]+)"', http.get("/login").text).group(1)  # type: ignore[union-attr]
    response = http.post("/login", data={"api_key": key, "csrf_token": token, "next": "/admin"})
    assert response.status_code == 303, response.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--heartbeat-rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        process, url, env = start_coordinator("postgresql", Path(workdir), workers=1)
        try:
            admin, customer = new_key(env, "admin"), new_key(env, "customer")
            engine = create_engine(POSTGRES_URL)
            with engine.connect() as conn:
                customer_id = conn.execute(select(ApiKeyModel.account_id).where(
                    ApiKeyModel.prefix == customer.split("_")[1])).scalar_one()
            engine.dispose()
            tokens, curve_job = seed(POSTGRES_URL, workers=args.workers, jobs=args.jobs, customer_id=customer_id)
            analyze(POSTGRES_URL)
            started = time.perf_counter()
            heartbeats(url, tokens, args.heartbeat_rounds)
            print(f"dashboard: {args.workers} workers ({args.heartbeat_rounds} heartbeats each, "
                  f"{time.perf_counter() - started:.0f} s), {args.jobs} jobs over 30 days, PostgreSQL, 1 process")
            pages = {
                "costs (30 days)": "/admin/costs",
                "costs CSV (jobs)": "/admin/costs.csv?table=jobs",
                "fleet, page 1": "/admin/fleet",
                "fleet, idle, by reliability": "/admin/fleet?state=idle&sort=reliability&desc=true",
                "fleet, page 10": "/admin/fleet?page=10",
                "jobs, page 1": "/admin/jobs",
                "jobs, failed": "/admin/jobs?status=failed",
                "jobs, page 100": "/admin/jobs?page=100",
                "jobs of one worker": "/admin/jobs?worker=wrk-000007",
                "job with 500-step loss curve": f"/admin/jobs/{curve_job}",
            }
            with httpx.Client(base_url=url, timeout=30) as http:
                login(http, admin)
                results = {name: time_page(http, path, args.repeat) for name, path in pages.items()}
                sparklines = http.get("/admin/fleet").text.count('<svg class="spark"')
                print(f"sparklines drawn on the fleet's first page: {sparklines}")
            with httpx.Client(base_url=url, timeout=30) as http:
                login(http, customer)
                results["customer dashboard (200 jobs)"] = time_page(http, "/dashboard", args.repeat)
            print(f"{'page':34s} {'server p50':>10s} {'server max':>10s} {'client p50':>10s}")
            for name, (server, client) in results.items():
                print(f"{name:34s} {statistics.median(server):8.1f}ms {max(server):8.1f}ms {statistics.median(client):8.1f}ms")
        finally:
            process.terminate()
            process.wait(timeout=15)


def time_page(http: httpx.Client, path: str, repeat: int) -> tuple[list[float], list[float]]:
    server, client = [], []
    http.get(path)  # warm
    for _ in range(repeat):
        started = time.perf_counter()
        response = http.get(path)
        client.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (path, response.status_code)
        timing = response.headers.get("server-timing")
        server.append(float(timing.split("dur=")[1]) if timing else client[-1])
    return server, client


if __name__ == "__main__":
    main()
