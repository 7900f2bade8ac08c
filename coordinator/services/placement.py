"""Placement: which queued job runs on which idle worker, at what price.

A worker can take a job when the QLoRA memory estimate fits its free VRAM, its GPU has the compute
capability for 4-bit kernels (or it is a CPU worker and the model is tiny), its price with our fee is
within the job's `max_price_per_gpu_hour`, it meets the job's trust, VRAM and GPU-name requirements,
it is idle and long-polling (its owner's policy allows work now), and neither it nor its provider is off the
job (`jobs.excluded_workers`, `excluded_providers`) or suspended. Only jobs with a hold on their
customer's balance are placed (billing.py; `budgets.py` renews a hold a lease used up). Among those the best expected
throughput per dollar wins, weighted by reliability, preferring a worker that already holds the model.

Two ways in, both atomic: a pass over the queue (`place_queued_jobs`, run when jobs become queued and
periodically) and a newly idle worker looking for work (`place_for_worker`). Jobs and workers are
locked with `FOR UPDATE SKIP LOCKED` on PostgreSQL, so concurrent passes in any number of processes
take disjoint rows. SQLite (embedded mode) has one writer at a time and the coordinator one connection,
so transactions never interleave there; the jobs' version column would catch it if they did.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session, aliased

from coordinator.db.tables import (
    JobCheckpointModel, JobModel, JobStatus, LeaseKind, LeaseModel, WorkerModel, WorkerState, utcnow,
)
from coordinator.effects import effects
from coordinator.services import held_out, worker_states
from coordinator.services.job_states import Move, change_status_many
from coordinator.services.lease_states import start_lease
from coordinator.settings import CoordinatorSettings
from shared.catalog import BaseModelSpec, find_base_model
from shared.memory import (
    GIB, estimate_evaluation, estimate_export, estimate_generation, estimate_qlora, micro_batch,
)
from shared.money import micros_to_usd
from shared.errors import InvalidRequest
from shared.pricing import (
    CPU, GPU_CLASSES, REFERENCE_TOKENS_PER_S_7B, cpu_can_train, customer_price, get_gpu_class, supports_4bit,
    throughput_per_dollar,
)

DEFAULT_SEQ_LEN = 2048
CACHED_MODEL_BONUS = 1.25  # skipping a multi-GB download is worth about this much throughput
CONSIDERED = 8  # eligible workers compared per job, best ranked first
PULL_SCAN = 200  # queued jobs a newly idle worker looks through
PLACED = {LeaseKind.verify.value: "Verification placed", LeaseKind.export.value: "Export placed",
          LeaseKind.batch.value: "Batch placed"}


def seq_len_for(base: BaseModelSpec) -> int:
    return min(DEFAULT_SEQ_LEN, base.max_seq_len)


@dataclass(frozen=True, slots=True)
class Requirements:
    base: BaseModelSpec
    memory_bytes: int
    max_price: int | None
    min_vram_bytes: int
    gpu_filter: tuple[str, ...]
    trusted_only: bool
    excluded_providers: frozenset[str] = frozenset()
    excluded_workers: frozenset[str] = frozenset()
    kind: str = LeaseKind.train.value  # the lease the job is queued for (its stage)


@lru_cache(maxsize=4096)
def _memory(model: str, r: int, targets: str | tuple[str, ...], batch: int, kind: str) -> int:
    base = find_base_model(model)
    assert base is not None
    target_modules = targets if isinstance(targets, str) else list(targets)
    if kind == LeaseKind.export:
        return estimate_export(base, lora_r=r, target_modules=target_modules).total
    if kind == LeaseKind.batch:  # generation: its own groups, bounded in tokens, whatever the job's batch_size
        return estimate_generation(base, lora_r=r, target_modules=target_modules).total
    estimate = estimate_evaluation if kind == LeaseKind.verify else estimate_qlora
    return estimate(base, seq_len=seq_len_for(base), batch_size=batch, lora_r=r, target_modules=target_modules).total


def requirements(job: JobModel, *, off: frozenset[str] = frozenset()) -> Requirements | None:
    """What a worker must be and have to take the job's next lease; `off`: providers that placement found off
    the job's held-out sample for this lease (`held_out.viewers` for a training, `held_out.training` for a
    verification)."""
    base = find_base_model(job.model)
    if base is None:
        return None
    targets = job.lora.get("target_modules", "all-linear")
    batch = job.hyperparameters.get("batch_size", "auto")
    kind = job.stage or LeaseKind.train.value
    sequences = 2 if job.method == "dpo" else 1  # a preference pair is two sequences in one batch
    rows = micro_batch(batch, max_seq_len=seq_len_for(base), sequences=sequences) * sequences  # as the trainer will
    memory = _memory(base.id, int(job.lora.get("r", 16)), targets if isinstance(targets, str) else tuple(targets),
                     rows, kind)
    excluded = set(job.excluded_providers or ()) | off
    if kind == LeaseKind.verify:  # never the adapter's own trainer, nor a provider that verified it already
        excluded.update((job.verification or {}).get("not_by", ()))
    else:  # a provider that held a verification lease (the held-out sample, an adapter to copy) never trains it
        excluded.update((job.verification or {}).get("never_trains", ()))
    return Requirements(
        base=base, memory_bytes=memory, max_price=job.max_price_per_gpu_hour,
        min_vram_bytes=(job.min_vram_gb or 0) * GIB,
        gpu_filter=tuple(f.lower() for f in (job.gpu_filter or ())), trusted_only=job.trusted_hosts_only,
        excluded_providers=frozenset(excluded), excluded_workers=frozenset(job.excluded_workers or ()), kind=kind,
    )


LARGEST_GPU_GB = max(c.typical_vram_gb for c in GPU_CLASSES)


def check_placeable(job: JobModel) -> None:
    """A job no GPU on the market could hold is refused when it is asked for (400), never left queued for ever."""
    base = find_base_model(job.model)
    need = requirements(job)
    if base is None or need is None or need.memory_bytes <= LARGEST_GPU_GB * GIB:
        return
    batch = job.hyperparameters.get("batch_size", "auto")
    raise InvalidRequest(
        f"This job needs about {need.memory_bytes / GIB:.0f} GiB of GPU memory (a micro-batch of batch_size={batch} "
        f"at {seq_len_for(base)} tokens on {base.id}), more than the largest GPU tunegrid places on "
        f"({LARGEST_GPU_GB} GB). Lower hyperparameters.batch_size.",
        param="hyperparameters.batch_size", code="job_too_large_for_any_gpu")


@dataclass(slots=True)
class Candidate:
    """An idle worker as placement sees it, scored once per pass."""

    worker: WorkerModel
    price: int  # what the customer would pay per GPU-hour
    score: float
    cached: frozenset[str]


def candidate(worker: WorkerModel, *, platform_fee_bps: int) -> Candidate:
    price = customer_price(worker.ask_price_per_gpu_hour, platform_fee_bps=platform_fee_bps)
    # Throughput scales alike for every model, so rank with the reference size; jobs differ only by the cache bonus.
    tokens_per_s = REFERENCE_TOKENS_PER_S_7B * get_gpu_class(worker.gpu_class).relative_throughput * worker.speed_factor
    return Candidate(worker=worker, price=price, score=throughput_per_dollar(tokens_per_s, price) * worker.reliability,
                     cached=frozenset(worker.cached_models or ()))


def eligible(req: Requirements, c: Candidate) -> bool:
    w = c.worker
    if w.account_id in req.excluded_providers or w.id in req.excluded_workers:
        return False
    if req.kind != LeaseKind.train and req.kind not in (w.lease_kinds or ()):
        return False
    if w.gpu_class == CPU.id:
        if not cpu_can_train(req.base):
            return False
    elif not supports_4bit(w.compute_capability):
        return False
    if w.vram_free_bytes < req.memory_bytes or w.vram_total_bytes < req.min_vram_bytes:
        return False
    if req.max_price is not None and c.price > req.max_price:
        return False
    if req.trusted_only and not w.trusted:
        return False
    if req.gpu_filter:
        name = w.gpu_name.lower()
        if not any(f in name or f == w.gpu_class for f in req.gpu_filter):
            return False
    return True


def _pick(req: Requirements, ranked: list[Candidate]) -> int | None:
    """Index of the best worker for the job among the first few eligible ones in rank order."""
    best, best_score, seen = None, 0.0, 0
    for i, c in enumerate(ranked):
        if not eligible(req, c):
            continue
        score = c.score * (CACHED_MODEL_BONUS if req.base.id in c.cached else 1.0)
        if best is None or score > best_score:
            best, best_score = i, score
        seen += 1
        if seen >= CONSIDERED:
            break
    return best


def _provider_suspended():  # type: ignore[no-untyped-def]
    """A worker whose provider has a suspended machine (suspension belongs to the provider: worker_states)."""
    other = aliased(WorkerModel)
    return exists().where(other.account_id == WorkerModel.account_id, other.suspended_at.is_not(None))


def placeable_workers(now: datetime, settings: CoordinatorSettings):  # type: ignore[no-untyped-def]
    return select(WorkerModel).where(
        WorkerModel.state == WorkerState.idle, WorkerModel.available_until > now,
        WorkerModel.revoked_at.is_(None), WorkerModel.suspended_at.is_(None),
        WorkerModel.reliability >= settings.min_reliability, ~_provider_suspended(),
    )


def _funded():  # type: ignore[no-untyped-def]
    """A job placement may take: one with a hold on its customer's balance, or one waiting for verification
    (the platform pays verifiers; the customer's hold still covers the training under test)."""
    return or_(JobModel.held_micros > 0, JobModel.stage == LeaseKind.verify.value)


def _latest_checkpoints(session: Session, job_ids: list[str]) -> dict[str, str]:
    if not job_ids:
        return {}
    rows = session.execute(
        select(JobCheckpointModel.job_id, JobCheckpointModel.id)
        .where(JobCheckpointModel.job_id.in_(job_ids), JobCheckpointModel.resumable())
        .order_by(JobCheckpointModel.job_id, JobCheckpointModel.step_number.desc(), JobCheckpointModel.id.desc())
    ).all()
    latest: dict[str, str] = {}
    for job_id, checkpoint_id in rows:
        latest.setdefault(job_id, checkpoint_id)
    return latest


def _assign(session: Session, matches: list[tuple[JobModel, Candidate]], now: datetime) -> list[LeaseModel]:
    """Leases for the matched pairs and their jobs moved to running, in a few statements for the whole batch."""
    resume = _latest_checkpoints(session, [job.id for job, _ in matches])
    leases, moves = [], []
    for job, c in matches:
        checkpoint = resume.get(job.id)
        if job.stage != LeaseKind.train:
            checkpoint = None  # only training resumes
        lease = start_lease(session=session, job=job, worker=c.worker, price_per_gpu_hour=c.price,
                            resume_checkpoint_id=checkpoint, now=now, kind=job.stage)
        leases.append(lease)
        moves.append(Move(
            job=job, values={"fencing_token": lease.fencing_token},
            message=PLACED.get(job.stage, "Placed")
                    + f" on {c.worker.gpu_name} on worker {c.worker.id} at ${micros_to_usd(c.price)}/GPU-hour "
                    f"(lease {lease.id}, attempt {lease.fencing_token})"
                    + (f", resuming from checkpoint {checkpoint}" if checkpoint else ""),
            data={"lease_id": lease.id, "worker_id": c.worker.id, "gpu_class": c.worker.gpu_class,
                  "price_per_gpu_hour": micros_to_usd(c.price)},
        ))
    session.flush()  # the leases exist before the jobs point at their tokens
    change_status_many(session=session, moves=moves, frm=JobStatus.queued, to=JobStatus.running)
    return leases


def place_queued_jobs(*, session: Session, settings: CoordinatorSettings, limit: int | None = None) -> int:
    """One placement pass: the oldest queued jobs onto the best idle workers. Returns how many were placed."""
    now = utcnow()
    jobs = session.scalars(
        select(JobModel).where(JobModel.status == JobStatus.queued, _funded()).order_by(JobModel.id)
        .limit(limit or settings.placement_batch).with_for_update(skip_locked=True)
    ).all()
    if not jobs:
        session.rollback()
        return 0
    workers = session.scalars(placeable_workers(now, settings).with_for_update(skip_locked=True)).all()
    ranked = sorted((candidate(w, platform_fee_bps=settings.platform_fee_bps) for w in workers),
                    key=lambda c: c.score, reverse=True)
    matches: list[tuple[JobModel, Candidate]] = []
    candidates = [c.worker.account_id for c in ranked]
    seen, busy = _held_out_sides(session, jobs, candidates)
    for job in jobs:
        if not ranked:
            break
        sample = held_out.sample_of(job)
        req = requirements(job, off=_off(seen, busy, job, sample))
        if req is None:
            continue
        index = _pick(req, ranked)
        if index is not None:
            matches.append((job, ranked.pop(index)))
            if sample is not None:  # what this pass hands out counts for the rest of it
                (seen if job.stage == LeaseKind.verify else busy).setdefault(sample, set()).add(
                    matches[-1][1].worker.account_id)
    held_out.lock_providers(session, [c.worker.account_id for job, c in matches if job.held_out])
    if any(job.held_out for job, _ in matches):  # what another process placed meanwhile, now that it cannot
        seen, busy = _held_out_sides(session, [job for job, _ in matches], [c.worker.account_id for _, c in matches])
        matches = [(job, c) for job, c in matches if c.worker.account_id not in _off(seen, busy, job,
                                                                                     held_out.sample_of(job))]
    _assign(session, matches, now)
    session.commit()
    return len(matches)


def _held_out_sides(session: Session, jobs: list[JobModel],
                    providers: list[str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Per held-out sample of the jobs: the providers that may have seen it (never train it) and those of
    `providers` (the pass's candidates) training a job that holds it back now (never verify it)."""
    return (held_out.viewers(session, [job for job in jobs if job.stage == LeaseKind.train]),
            held_out.training(session, [job for job in jobs if job.stage == LeaseKind.verify], providers))


def _off(seen: dict[str, set[str]], busy: dict[str, set[str]], job: JobModel, sample: str | None) -> frozenset[str]:
    if sample is None:
        return frozenset()
    return frozenset((seen if job.stage == LeaseKind.train else busy).get(sample, ()))


def place_for_worker(*, session: Session, settings: CoordinatorSettings, worker: WorkerModel) -> LeaseModel | None:
    """A newly idle worker takes the oldest queued job it can run (jobs no idle worker could take wait here).

    The caller has locked `worker` and set it idle; this commits.
    """
    now = utcnow()
    if (worker.state is not WorkerState.idle or worker.suspended_at is not None or worker.revoked_at is not None
            or worker.reliability < settings.min_reliability
            or worker_states.provider_suspended(session, worker.account_id) is not None):
        session.commit()
        return None
    c = candidate(worker, platform_fee_bps=settings.platform_fee_bps)
    # Look without locks, then lock only the chosen job: fifty claimers must not queue on the same rows.
    jobs = session.scalars(
        select(JobModel).where(JobModel.status == JobStatus.queued, _funded()).order_by(JobModel.id)
        .limit(PULL_SCAN)
    ).all()
    provider = worker.account_id
    seen = held_out.viewed_by(session, provider)  # samples its provider may have seen: never trains them
    busy = held_out.trained_by(session, provider)  # samples its provider trains now: never verifies them

    def needs(job: JobModel) -> Requirements | None:
        off = (seen if job.stage == LeaseKind.train else busy)
        return requirements(job, off=frozenset({provider}) if held_out.sample_of(job) in off else frozenset())

    for job in jobs:
        req = needs(job)
        if req is None or not eligible(req, c):
            continue
        locked = session.scalars(
            select(JobModel).where(JobModel.id == job.id, JobModel.status == JobStatus.queued, _funded())
            .with_for_update(skip_locked=True).execution_options(populate_existing=True)
        ).first()
        if locked is None:
            # A placement pass holds it, and that pass skipped this (locked) worker: run another after us.
            effects(session).placeable = True
            continue
        if locked.held_out:  # another machine of the provider may be placed on the same sample meanwhile
            held_out.lock_providers(session, [provider])
            seen, busy = held_out.viewed_by(session, provider), held_out.trained_by(session, provider)
        again = needs(locked)  # it may have changed since the look (its stage, who it excludes)
        if again is None or not eligible(again, c):
            continue
        [lease] = _assign(session, [(locked, c)], now)
        session.commit()
        return lease
    session.commit()
    return None
