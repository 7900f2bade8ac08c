"""How much a job holds when it is queued: its estimated cost with a margin, capped by its `max_cost`.

The estimate is the dearest among the workers that could run the job now (placement may give it any of
them); with none available, the slowest GPU class that fits the model at the job's max price (or a default
price). A running job whose cost nears its hold gets more (`budgets.py`), so the estimate only has to be
sensible, not exact.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from coordinator.db.tables import JobKind, JobModel, utcnow
from coordinator.services import billing, replicas
from coordinator.services.placement import candidate, eligible, placeable_workers, requirements
from coordinator.settings import CoordinatorSettings
from shared.catalog import get_base_model
from shared.errors import Conflict
from shared.memory import GIB
from shared.money import micros_to_usd
from shared.pricing import (
    BPS, CPU, GPU_CLASSES, cost_for_seconds, cpu_can_train, expected_tokens_per_s, export_seconds, get_gpu_class,
    inference_seconds, training_seconds,
)

ESTIMATE_WORKERS = 500  # idle workers looked at when sizing a hold


def estimated_cost(session: Session, job: JobModel, settings: CoordinatorSettings) -> int:
    req = requirements(job)
    assert req is not None
    base, tokens = get_base_model(job.model), job.estimated_tokens
    exporting = job.kind == JobKind.export  # bounded by disk and uplink, not by the GPU: the same on any worker
    export_s = export_seconds(base, list((job.export or {}).get("formats") or ())) if exporting else 0
    costs = []
    for worker in session.scalars(placeable_workers(utcnow(), settings).limit(ESTIMATE_WORKERS)):
        c = candidate(worker, platform_fee_bps=settings.platform_fee_bps)
        if eligible(req, c):
            tps = expected_tokens_per_s(base, get_gpu_class(worker.gpu_class), speed_factor=worker.speed_factor)
            costs.append(cost_for_seconds(c.price, export_s if exporting else _seconds(job, tokens, tps)))
    if costs:
        return max(costs)
    fitting = [g for g in GPU_CLASSES if g.typical_vram_gb * GIB >= req.memory_bytes]
    if cpu_can_train(base):
        fitting.append(CPU)
    slowest = min(fitting or GPU_CLASSES, key=lambda g: g.relative_throughput)
    price = job.max_price_per_gpu_hour or settings.hold_fallback_price
    if exporting:
        return cost_for_seconds(price, export_s)
    return cost_for_seconds(price, _seconds(job, tokens, expected_tokens_per_s(base, slowest)))


def _seconds(job: JobModel, tokens: int, tokens_per_s: float) -> int:
    """Training's seconds for a fine-tuning job, generation's for a batch."""
    if job.kind == JobKind.batch:
        return inference_seconds(tokens, tokens_per_s)
    return training_seconds(tokens, tokens_per_s)


def hold_for_queue(*, session: Session, job: JobModel, settings: CoordinatorSettings) -> int:
    """Place the hold a job needs to be queued (at create, or on resume); 429 (`InsufficientQuota`) when the balance is short. A
    redundant job holds for each training still to come, and for its confirmed ones waiting to settle."""
    pending = replicas.pending_charge(job)
    to_train = max(replicas.trainings(job.verification_mode) - len(replicas.waiting(job)), 1)
    estimate = estimated_cost(session, job, settings) * to_train
    amount = max(-(-estimate * settings.hold_margin_bps // BPS), settings.min_hold) + pending
    if job.max_cost is not None:
        remaining = job.max_cost - job.billed_micros
        if remaining <= 0:
            raise Conflict(f"Job {job.id} has already cost its max_cost of ${micros_to_usd(job.max_cost)}.",
                           code="max_cost_reached")
        amount = min(amount, remaining)
    amount -= job.held_micros
    billing.place_hold(session=session, job=job, amount=amount,
                       reason=f"estimated ${micros_to_usd(estimate)} plus margin")
    return job.held_micros
