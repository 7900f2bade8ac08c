"""Placement throughput: 10,000 queued jobs onto 2,000 idle workers on PostgreSQL, end to end with commits.

Seeds the database directly (jobs, workers with a mix of GPU classes and prices), then runs placement
passes (`coordinator.services.placement.place_queued_jobs`, the code the dispatcher and Celery run) until
every worker is busy; between rounds, untimed, the leases end and the workers idle again, until all jobs
are placed. Prints placements/s per round and overall. Never passes or fails.

    python bench/scheduler.py [--jobs 10000] [--workers 2000] [--batch 1000] [--passes 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, text, update

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from coordinator.db.engine import make_engine, make_sessionmaker  # noqa: E402
from coordinator.db.ids import new_id  # noqa: E402
from coordinator.db.migrate import upgrade_head  # noqa: E402
from coordinator.db.tables import (  # noqa: E402
    AccountModel, FileModel, FileStatus, JobModel, JobStatus, LeaseModel, LeaseStatus, Role, WorkerModel, WorkerState,
    utcnow,
)
from coordinator.services.placement import place_queued_jobs  # noqa: E402
from coordinator.settings import CoordinatorSettings  # noqa: E402
from harness import POSTGRES_URL, reset_postgres  # noqa: E402
from shared.pricing import gpu_class_for  # noqa: E402

GIB = 1024**3
CARDS = [("NVIDIA GeForce RTX 3060", 12, "8.6"), ("NVIDIA GeForce RTX 3080", 10, "8.6"),
         ("NVIDIA GeForce RTX 3090", 24, "8.6"), ("NVIDIA GeForce RTX 4070", 12, "8.9"),
         ("NVIDIA GeForce RTX 4080", 16, "8.9"), ("NVIDIA GeForce RTX 4090", 24, "8.9")]
MODELS = ["tunegrid/tiny-llama", "qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct", "llama-3.1-8b-instruct"]


def reset(url: str) -> None:
    reset_postgres(url)
    upgrade_head(url)


def seed(url: str, *, jobs: int, workers: int) -> None:
    rng = random.Random(7)
    engine = create_engine(url)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(insert(AccountModel), [{"id": "acct-bench-customer", "name": "c", "role": Role.customer, "created_at": now},
                                            {"id": "acct-bench-provider", "name": "p", "role": Role.provider, "created_at": now}])
        conn.execute(insert(FileModel), [{"id": "file-bench", "account_id": "acct-bench-customer", "filename": "t.jsonl",
                                          "purpose": "fine-tune", "bytes": 1, "sha256": "0" * 64, "status": FileStatus.processed,
                                          "created_at": now}])
        conn.execute(insert(JobModel), [{
            "id": new_id("ftjob-"), "account_id": "acct-bench-customer", "model": rng.choice(MODELS),
            "training_file_id": "file-bench", "status": JobStatus.queued, "held_micros": 1_000_000,
            "hyperparameters": {"n_epochs": 1, "batch_size": "auto", "learning_rate_multiplier": "auto"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}, "seed": 1,
            "trusted_hosts_only": False, "estimated_tokens": 100_000, "result_files": [], "created_at": now,
            "updated_at": now, "version": 1, "fencing_token": 0, "attempts": 0,
            "max_price_per_gpu_hour": rng.choice([None, None, 600_000]),
        } for _ in range(jobs)])
        rows = []
        for i in range(workers):
            name, gb, cc = rng.choice(CARDS)
            rows.append({
                "id": new_id("wrk-"), "account_id": "acct-bench-provider", "machine_id": f"pc-{i}", "name": f"pc-{i}",
                "token_prefix": f"{i:012d}", "token_sha256": "0" * 64, "agent_version": "bench", "protocol_version": 1,
                "gpus": [{"uuid": f"GPU-{i}", "index": 0, "name": name, "memory_total_bytes": gb * GIB, "compute_capability": cc}],
                "gpu_class": gpu_class_for(name).id, "gpu_name": name, "vram_total_bytes": gb * GIB,
                "vram_free_bytes": gb * GIB - rng.randint(0, 2) * GIB, "compute_capability": cc,
                "ask_price_per_gpu_hour": rng.randint(8, 60) * 10_000, "policy": {}, "cached_models": rng.sample(MODELS, 1),
                "state": WorkerState.idle, "available_until": now + timedelta(hours=1), "trusted": False,
                "reliability": rng.uniform(0.6, 1.0), "speed_factor": rng.uniform(0.8, 1.2), "completed_leases": 0,
                "lost_leases": 0, "failed_checks": 0, "created_at": now,
            })
        conn.execute(insert(WorkerModel), rows)
        conn.execute(text("ANALYZE"))
    engine.dispose()


def free_everyone(url: str) -> None:
    """Untimed, between rounds: every lease ends and every worker is idle and long-polling again."""
    engine = create_engine(url)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(update(LeaseModel).where(LeaseModel.status == LeaseStatus.assigned)
                     .values(status=LeaseStatus.completed, ended_at=now))
        conn.execute(update(WorkerModel).values(state=WorkerState.idle, available_until=now + timedelta(hours=1)))
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=1_000, help="queued jobs one pass takes")
    parser.add_argument("--passes", type=int, default=1, help="concurrent passes (threads, each its own connection)")
    args = parser.parse_args()

    reset(POSTGRES_URL)
    seed(POSTGRES_URL, jobs=args.jobs, workers=args.workers)
    settings = CoordinatorSettings(database_url=POSTGRES_URL, placement_batch=args.batch, db_pool_size=args.passes)
    sessions = make_sessionmaker(make_engine(settings))
    print(f"placement: {args.jobs} queued jobs, {args.workers} idle workers, batch {args.batch}, "
          f"{args.passes} concurrent pass(es), PostgreSQL")

    def one_pass(_: int) -> int:
        with sessions() as session:
            return place_queued_jobs(session=session, settings=settings)

    total, busy_s, rounds = 0, 0.0, []
    with ThreadPoolExecutor(args.passes) as pool:
        while total < args.jobs:
            placed_round, started = 0, time.perf_counter()
            while True:
                placed = sum(pool.map(one_pass, range(args.passes)))
                if placed == 0:
                    break
                placed_round += placed
            elapsed = time.perf_counter() - started
            if placed_round == 0:
                break
            total += placed_round
            busy_s += elapsed
            rounds.append(placed_round / elapsed)
            print(f"  round {len(rounds)}: {placed_round:5d} placed in {elapsed:6.3f} s = {placed_round / elapsed:7.0f} placements/s")
            free_everyone(POSTGRES_URL)
    print(f"total: {total} placed in {busy_s:.2f} s of passes = {total / busy_s:.0f} placements/s "
          f"(rounds: median {statistics.median(rounds):.0f}/s)")
    with sessions() as session:
        twice = session.execute(text("SELECT count(*) FROM (SELECT job_id FROM leases GROUP BY job_id HAVING count(*) > 1) t")).scalar()
        print(f"jobs with more than one lease: {twice}")


if __name__ == "__main__":
    main()
