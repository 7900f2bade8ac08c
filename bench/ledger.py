"""Settlement throughput on PostgreSQL, each settlement its own committed transaction.

Seeds customers with granted credit, providers with one worker each, and running jobs, each holding credit
and training on a lease (seeded in bulk, balanced). Then several processes settle the leases, two ways:

- `settle` (the figure the target is about): what billing a lease takes: lock the job, meter the lease
  (`metering.meter_lease`: the usage record, the ledger transaction with its postings and kept balances,
  the job's held and billed amounts), commit;
- `end` : the whole end of a lease as the API does it (`lease_states.end_lease`: job, lease and worker
  locked, lease state, worker reputation, then the settlement), commit.

Prints settlements per second (timed from the first settlement to the last, without process start-up),
the latency of one, and a full ledger audit afterwards. Never passes or fails.

    python bench/ledger.py [--mode settle|end] [--settlements 10000] [--processes 2] [--customers 200] [--providers 500]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, func, insert, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from coordinator.db.engine import make_engine, make_sessionmaker  # noqa: E402
from coordinator.db.ids import new_id  # noqa: E402
from coordinator.db.migrate import upgrade_head  # noqa: E402
from coordinator.db.tables import (  # noqa: E402
    AccountModel, Book, FileModel, FileStatus, JobModel, JobStatus, LeaseModel, LeaseStatus, LedgerBalanceModel,
    LedgerPostingModel, LedgerTransactionModel, Role, WorkerModel, WorkerState, utcnow,
)
from coordinator.services import ledger  # noqa: E402
from coordinator.services.lease_states import end_lease  # noqa: E402
from coordinator.services.metering import meter_lease  # noqa: E402
from coordinator.settings import CoordinatorSettings  # noqa: E402
from harness import POSTGRES_URL, reset_postgres  # noqa: E402

GRANT = 1_000_000_000  # $1,000 per customer
HOLD = 5_000_000  # $5 per job
ASK, PRICE = 300_000, 360_000  # $0.30 and $0.36 per GPU-hour


def seed(url: str, *, settlements: int, customers: int, providers: int) -> list[str]:
    """Everything in bulk, balanced as the services would have posted it; the lease ids to settle."""
    rng = random.Random(11)
    now = utcnow()
    engine = create_engine(url)
    customer_ids = [f"acct-c{i:05d}" for i in range(customers)]
    provider_ids = [f"acct-p{i:05d}" for i in range(providers)]
    worker_ids = [f"wrk-{i:05d}" for i in range(providers)]
    lease_ids = []
    with engine.begin() as conn:
        conn.execute(insert(AccountModel), [{"id": a, "name": a, "role": Role.customer, "created_at": now} for a in customer_ids]
                     + [{"id": a, "name": a, "role": Role.provider, "created_at": now} for a in provider_ids])
        conn.execute(insert(FileModel), [{"id": "file-bench", "account_id": customer_ids[0], "filename": "t.jsonl",
                                          "purpose": "fine-tune", "bytes": 1, "sha256": "0" * 64,
                                          "status": FileStatus.processed, "created_at": now}])
        conn.execute(insert(WorkerModel), [{
            "id": w, "account_id": p, "machine_id": w, "name": w, "token_prefix": w[-12:], "token_sha256": "0" * 64,
            "agent_version": "bench", "protocol_version": 1, "gpus": [], "gpu_class": "rtx-4090",
            "gpu_name": "NVIDIA GeForce RTX 4090", "vram_total_bytes": 24 << 30, "vram_free_bytes": 24 << 30,
            "compute_capability": "8.9", "ask_price_per_gpu_hour": ASK, "policy": {}, "cached_models": [],
            "state": WorkerState.working, "trusted": False, "reliability": 0.9, "speed_factor": 1.0,
            "completed_leases": 0, "lost_leases": 0, "failed_checks": 0, "created_at": now,
        } for w, p in zip(worker_ids, provider_ids)])
        jobs, leases, txns, postings = [], [], [], []
        held: dict[str, int] = {c: 0 for c in customer_ids}
        for c in customer_ids:
            txn = new_id("ltx-")
            txns.append({"id": txn, "business_key": f"grant:{c}", "kind": "grant", "account_id": c,
                         "description": "bench credit", "created_at": now})
            postings += [{"transaction_id": txn, "book": Book.platform_grants, "owner_id": "", "amount": -GRANT},
                         {"transaction_id": txn, "book": Book.customer_available, "owner_id": c, "amount": GRANT}]
        for i in range(settlements):
            customer, w = customer_ids[i % customers], i % providers
            job_id, lease_id, txn = new_id("ftjob-"), new_id("lease-"), new_id("ltx-")
            started = now - timedelta(seconds=rng.randint(60, 7200))
            jobs.append({"id": job_id, "account_id": customer, "model": "tunegrid/tiny-llama",
                         "training_file_id": "file-bench", "status": JobStatus.running, "hyperparameters": {"n_epochs": 1},
                         "lora": {"r": 16}, "seed": 1, "trusted_hosts_only": False, "estimated_tokens": 1000,
                         "result_files": [], "created_at": now, "updated_at": now, "version": 1, "fencing_token": 1,
                         "attempts": 0, "held_micros": HOLD, "billed_micros": 0, "hold_seq": 1,
                         "accruing_since": started, "accruing_price": PRICE})
            leases.append({"id": lease_id, "job_id": job_id, "worker_id": worker_ids[w], "fencing_token": 1,
                           "status": LeaseStatus.running, "gpu_class": "rtx-4090", "ask_price_per_gpu_hour": ASK,
                           "price_per_gpu_hour": PRICE, "created_at": started, "claimed_at": started,
                           "training_started_at": started, "last_renewed_at": now})
            txns.append({"id": txn, "business_key": f"hold:{job_id}:1", "kind": "hold", "account_id": customer,
                         "job_id": job_id, "description": "bench hold", "created_at": now})
            postings += [{"transaction_id": txn, "book": Book.customer_available, "owner_id": customer, "amount": -HOLD},
                         {"transaction_id": txn, "book": Book.customer_held, "owner_id": customer, "amount": HOLD}]
            held[customer] += HOLD
            lease_ids.append(lease_id)
        conn.execute(insert(JobModel), jobs)
        conn.execute(insert(LeaseModel), leases)
        conn.execute(insert(LedgerTransactionModel), txns)
        conn.execute(insert(LedgerPostingModel), postings)
        conn.execute(insert(LedgerBalanceModel), [
            {"book": Book.customer_available, "owner_id": c, "balance": GRANT - held[c], "updated_at": now}
            for c in customer_ids] + [
            {"book": Book.customer_held, "owner_id": c, "balance": held[c], "updated_at": now} for c in customer_ids])
    engine.dispose()
    rng.shuffle(lease_ids)
    return lease_ids


USAGE = {"wall_seconds": 10_000.0, "gpu_seconds": 10_000.0}


def settle_slice(args: tuple[str, str, list[str]]) -> tuple[float, float, list[float]]:
    url, mode, lease_ids = args
    settings = CoordinatorSettings(database_url=url, db_pool_size=1)
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    with sessions() as session:  # read what is settled (untimed), as a lease's end has it in hand
        leases = {lease.id: (lease.job_id, lease.worker_id) for lease in session.scalars(
            select(LeaseModel).where(LeaseModel.id.in_(lease_ids)))}
        workers = {w.id: w.account_id for w in session.scalars(select(WorkerModel))}
    latencies = []
    begin = time.time()
    with sessions() as session:
        for lease_id in lease_ids:
            started = time.perf_counter()
            job_id, worker_id = leases[lease_id]
            job = session.get(JobModel, job_id, with_for_update=True, populate_existing=True)
            assert job is not None
            if mode == "end":
                lease = session.get(LeaseModel, lease_id, with_for_update=True, populate_existing=True)
                worker = session.get(WorkerModel, worker_id, with_for_update=True, populate_existing=True)
                assert lease is not None and worker is not None
                end_lease(session=session, lease=lease, job=job, worker=worker, status=LeaseStatus.completed,
                          reason="bench", usage=USAGE)
            else:
                lease = session.get(LeaseModel, lease_id)
                assert lease is not None
                lease.status, lease.ended_at = LeaseStatus.completed, utcnow()
                meter_lease(session=session, lease=lease, job=job, worker=_Provider(workers[worker_id], worker_id),  # type: ignore[arg-type]
                            rule="until_end", ended_at=lease.ended_at, usage=USAGE)
            session.commit()
            session.expunge_all()
            latencies.append(time.perf_counter() - started)
    end = time.time()
    engine.dispose()
    return begin, end, latencies


class _Provider:
    """What metering reads of a worker: whose it is."""

    def __init__(self, account_id: str, worker_id: str) -> None:
        self.account_id, self.id = account_id, worker_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["settle", "end"], default="settle")
    parser.add_argument("--settlements", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=2, help="one per core is best here")
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--providers", type=int, default=500)
    args = parser.parse_args()

    reset_postgres(POSTGRES_URL)
    upgrade_head(POSTGRES_URL)
    lease_ids = seed(POSTGRES_URL, settlements=args.settlements, customers=args.customers, providers=args.providers)
    print(f"ledger ({args.mode}): {args.settlements} running leases ({args.customers} customers, "
          f"{args.providers} providers), {args.processes} settling processes, PostgreSQL")
    slices = [(POSTGRES_URL, args.mode, lease_ids[i::args.processes]) for i in range(args.processes)]
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        results = pool.map(settle_slice, slices)
    elapsed = max(r[1] for r in results) - min(r[0] for r in results)
    latencies = sorted(x for r in results for x in r[2])
    print(f"settled {len(latencies)} leases in {elapsed:.2f} s = {len(latencies) / elapsed:.0f} settlements/s")
    print(f"one settlement: p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms")
    engine = make_engine(CoordinatorSettings(database_url=POSTGRES_URL))
    with make_sessionmaker(engine)() as session:
        audit = ledger.audit(session)
        settled = session.scalar(select(func.count()).select_from(LedgerTransactionModel)
                                 .where(LedgerTransactionModel.kind == "settle"))
        revenue = ledger.balance(session, Book.platform_revenue)
    engine.dispose()
    print(f"audit: postings total {audit.total}, unbalanced {audit.unbalanced_transactions}, "
          f"drifted balances {len(audit.drifted_balances)}; settle transactions {settled}; "
          f"platform revenue ${revenue / 1e6:.2f}")


if __name__ == "__main__":
    main()
