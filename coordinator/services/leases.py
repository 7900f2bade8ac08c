"""A worker's side of a lease: claim an assignment, report events, fetch inputs, upload the adapter (checkpoints:
`checkpoints.py`), and finish (`complete`, `fail`, `preempted`). How a lease starts, renews and ends, and the
endings the coordinator decides itself (cancel, revoke, the reaper), are `lease_states.py`.

Every call names the lease and presents its fencing token. A token that is not the lease's, or a lease
that is no longer the job's live one, is `409 lease_lost`: the agent stops that container. Finishing
is idempotent on the token: the same report twice answers the same.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import (
    LIVE_LEASE, FileModel, LeaseKind, JobCheckpointModel, JobEventModel, JobModel, JobStatus, LeaseModel,
    LeaseStatus, WorkerModel, WorkerState, utcnow,
)
from coordinator.services import batch_leases, export_leases, files, held_out, replicas, results, verification
from coordinator.services.adapters import AdapterRejected, adapter_limit, verify_adapter
from coordinator.services.job_states import change_status, exclude, record_event
from coordinator.services import worker_states
from coordinator.services.fencing import FencedLease, already_ended, fenced, training_only
from coordinator.services.lease_states import end_and_requeue, end_lease, fail_check, release_suspended, renew
from coordinator.services.placement import place_for_worker, seq_len_for
from coordinator.services.workers import free_vram
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore, StoredBlob
from coordinator.stores import open_store
from shared.catalog import get_base_model
from shared.digests import sha256_file
from shared.errors import Conflict, InvalidRequest, NotFound
from shared.jobspec import JobSpec, LoraSpec, TrainingHyperparameters
from shared.money import micros_to_usd
from shared.protocol import (
    Assignment, ClaimRequest, LeaseComplete, LeaseEvent, LeaseFail, LeasePreempted, ResumeFrom,
)

log = logging.getLogger(__name__)
BASE_LEARNING_RATE = 2e-4
# DPO moves a policy away from its reference; a smaller step than SFT's is the usual choice (TRL's default
# for LoRA DPO is 5e-6 on full models; with LoRA adapters 5e-5 is common), and OpenAI's documented default beta.
DPO_LEARNING_RATE = 5e-5
DPO_BETA = 0.1
SPEED_EMA = 0.3  # weight of the newest lease in a worker's speed factor
STARTED = {"train": "Training started", "verify": "Verification started", "export": "Export started",
           "batch": "Batch started"}
UNKNOWN_EXAMPLES = 10_000_000  # a file validated before examples were counted: a loose bound


# --- claiming -------------------------------------------------------------------------------------

def _live_lease_of(session: Session, worker: WorkerModel) -> LeaseModel | None:
    return session.scalars(
        select(LeaseModel).where(LeaseModel.worker_id == worker.id, LeaseModel.status.in_(LIVE_LEASE))
        .order_by(LeaseModel.id.desc()).limit(1).with_for_update()
    ).first()


def pending_assignment(*, session: Session, settings: CoordinatorSettings, worker: WorkerModel) -> Assignment | None:
    """The worker's live lease, marked picked up, as an assignment; None when it has none."""
    lease = _live_lease_of(session, worker)
    if lease is None:
        session.rollback()
        return None
    job = session.get(JobModel, lease.job_id)
    assert job is not None
    renew(lease=lease, now=utcnow())
    assignment = build_assignment(session=session, settings=settings, lease=lease, job=job)
    session.commit()
    return assignment


def claim(*, session: Session, settings: CoordinatorSettings, worker: WorkerModel, request: ClaimRequest) -> Assignment | None:
    """Hand the worker its assignment, or make it placeable and let it take the oldest job it can run."""
    found = pending_assignment(session=session, settings=settings, worker=worker)
    if found is not None:
        return found
    worker = session.get(WorkerModel, worker.id, with_for_update=True, populate_existing=True)  # type: ignore[assignment]
    if worker.state is WorkerState.working:  # a placement pass took it while we looked
        session.commit()
        found = pending_assignment(session=session, settings=settings, worker=worker)
        if found is not None:
            return found
        worker = session.get(WorkerModel, worker.id, with_for_update=True, populate_existing=True)  # type: ignore[assignment]
    if worker.suspended_at is not None:
        session.commit()
        return None
    now = utcnow()
    worker.vram_free_bytes = free_vram(worker, request.gpus)
    if request.cached_models is not None:
        worker.cached_models = list(request.cached_models)
    if sorted(request.kinds) != sorted(worker.lease_kinds or ["train"]):
        worker.lease_kinds = sorted(set(request.kinds))
    worker.last_heartbeat_at = now
    # A worker asking for work holds no live lease (we just looked), whatever its row said.
    worker_states.asking_for_work(worker, now=now, wait_s=request.wait_s)
    lease = place_for_worker(session=session, settings=settings, worker=worker)
    if lease is None:
        return None
    return pending_assignment(session=session, settings=settings, worker=worker)


def job_spec(job: JobModel, *, checkpoint_every_steps: int = 100, kind: str = "train") -> JobSpec:
    base = get_base_model(job.model)
    hp = job.hyperparameters
    multiplier = hp.get("learning_rate_multiplier", "auto")
    return JobSpec(
        job_id=job.id, kind=kind, base_model=base.id, model_dir=f"models/{base.id}",  # type: ignore[arg-type]
        method=job.method,  # type: ignore[arg-type]
        hyperparameters=TrainingHyperparameters(
            n_epochs=hp["n_epochs"], batch_size=hp.get("batch_size", "auto"),
            learning_rate=(BASE_LEARNING_RATE if job.method != "dpo" else DPO_LEARNING_RATE)
            * (1.0 if multiplier == "auto" else float(multiplier)),
            beta=DPO_BETA if hp.get("beta", "auto") == "auto" else float(hp["beta"]),
        ),
        lora=LoraSpec(**job.lora), seed=job.seed, max_seq_len=seq_len_for(base),
        checkpoint_every_steps=checkpoint_every_steps, eval_every_steps=checkpoint_every_steps,
        initial_adapter=job.initial_adapter is not None,
        early_stopping_patience=(job.early_stopping or {}).get("patience"),
        export=list((job.export or {}).get("formats") or ()) if kind == LeaseKind.export else [],
        export_name=(job.export or {}).get("model", "") if kind == LeaseKind.export else "",
    )


def step_bound(session: Session, job: JobModel) -> int:
    """The most optimizer steps the job can take: epochs times its examples in batches of at least one (packing
    and a held-out share only lower it)."""
    training = session.get(FileModel, job.training_file_id)
    examples = (training.examples if training is not None else None) or UNKNOWN_EXAMPLES
    batch = job.hyperparameters.get("batch_size", "auto")
    per_epoch = math.ceil(examples / batch) if isinstance(batch, int) and batch > 0 else examples
    return int(job.hyperparameters.get("n_epochs", 1)) * per_epoch


def build_assignment(*, session: Session, settings: CoordinatorSettings, lease: LeaseModel, job: JobModel) -> Assignment:
    exporting = lease.kind == LeaseKind.export  # trains nothing: only the adapter to export is an input
    training = None if exporting else session.get(FileModel, job.training_file_id)
    validation = session.get(FileModel, job.validation_file_id) if job.validation_file_id and not exporting else None
    assert training is not None or exporting
    resume = None
    if lease.resume_checkpoint_id:
        checkpoint = session.get(JobCheckpointModel, lease.resume_checkpoint_id)
        if checkpoint is not None and checkpoint.blob_sha256 and checkpoint.quarantined_at is None:
            resume = ResumeFrom(
                checkpoint_id=checkpoint.id, step=checkpoint.step_number, sha256=checkpoint.blob_sha256,
                bytes=checkpoint.blob_bytes or 0,
                url=f"/v1/workers/leases/{lease.id}/checkpoints/{checkpoint.id}/content",
            )
    base = get_base_model(job.model)
    inputs = f"/v1/workers/leases/{lease.id}/files"
    verifying: dict[str, Any] = {}
    if lease.kind == LeaseKind.verify:
        adapter = _adapter_under_test(session, job)
        sample = held_out.sample_input(job)
        verifying = {"adapter_url": f"{inputs}/adapter", "adapter_sha256": adapter.sha256 if adapter else None,
                     "held_out_url": f"{inputs}/held_out" if sample else None,
                     "held_out_sha256": sample.sha256 if sample else None}
    if lease.kind == LeaseKind.batch:
        done = batch_leases.done_input(session=session, store=open_store(settings), lease=lease,
                                       job=job)
        verifying.update(batch_done_url=f"{inputs}/batch_done", batch_done_sha256=done.sha256)
    initial = job.initial_adapter
    if initial:
        verifying.update(initial_adapter_url=f"{inputs}/initial", initial_adapter_sha256=initial["sha256"],
                         initial_adapter_member=initial["member"])
    return Assignment(
        lease_id=lease.id, fencing_token=lease.fencing_token, job_id=job.id, kind=lease.kind,
        spec=job_spec(job, checkpoint_every_steps=settings.checkpoint_every_steps, kind=lease.kind),
        base_model_repo=base.hf_repo, gpu_uuid=lease.gpu_uuid,
        training_file_url=None if training is None else f"{inputs}/training",
        training_file_sha256=None if training is None else held_out.training_input(job, training).sha256,
        validation_file_url=f"{inputs}/validation" if validation else None,
        validation_file_sha256=validation.sha256 if validation else None, resume_from=resume,
        ask_price_per_gpu_hour=micros_to_usd(lease.ask_price_per_gpu_hour), lease_ttl_s=settings.lease_ttl_s,
        lease_grace_s=settings.lease_grace_s, heartbeat_interval_s=settings.heartbeat_interval_s, **verifying,
    )


def _adapter_under_test(session: Session, job: JobModel) -> held_out.Input | None:
    """The adapter a verification lease checks: the upload of the training lease that produced it."""
    lease_id = (job.verification or {}).get("lease_id")
    lease = session.get(LeaseModel, lease_id) if lease_id else None
    if lease is None or lease.adapter_key is None or lease.adapter_sha256 is None:
        return None
    return held_out.Input(lease.adapter_key, lease.adapter_sha256)


def adapter_upload_limit(*, session: Session, worker: WorkerModel, lease_id: str, fencing_token: int) -> int:
    """Before accepting an adapter upload: the lease is still current (checked again when the upload is recorded),
    and the most bytes an adapter of its job can take."""
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token)
    training_only(f, "upload an adapter")
    limit = adapter_limit(get_base_model(f.job.model), dict(f.job.lora))
    session.commit()
    return limit


def _metrics_message(event: LeaseEvent) -> str:
    parts = [f"Step {event.step}" + (f"/{event.total_steps}" if event.total_steps else "")]
    if event.train_loss is not None:
        parts.append(f"training loss={event.train_loss:.4f}")
    if event.eval_loss is not None:
        parts.append(f"validation loss={event.eval_loss:.4f}")
    if event.preference is not None:
        parts.append(f"reward margin={event.preference.reward_margin:.4f}, "
                     f"reward accuracy={event.preference.reward_accuracy:.2f}")
    if event.tokens_per_s is not None:
        parts.append(f"{event.tokens_per_s:.0f} tokens/s")
    return ", ".join(parts)


def _start_training(f: FencedLease, now: datetime) -> None:
    """Billing counts from the lease's first progress, on the coordinator's clock (metering.py). A training, export
    or batch lease accrues to the customer's cost (and the budgets sweep watches it); a verification lease is the
    platform's."""
    if f.lease.training_started_at is None:
        f.lease.training_started_at = now
        if f.lease.kind in (LeaseKind.train, LeaseKind.export, LeaseKind.batch):
            f.job.accruing_since, f.job.accruing_price = now, f.lease.price_per_gpu_hour


def record_events(
    *, session: Session, worker: WorkerModel, lease_id: str, fencing_token: int, events: list[LeaseEvent],
) -> FencedLease:
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token)
    if f.lease.kind != LeaseKind.train and any(e.type in ("progress", "eval", "checkpoint") for e in events):
        training_only(f, "report training progress")
    bound = step_bound(session, f.job)
    for event in events:  # a step is the worker's claim: never past what the job can have
        for value in (event.step, event.total_steps):
            if value is not None and value > bound:
                raise InvalidRequest(f"Step {value} is past the {bound} steps job {f.job.id} can have.",
                                     param="events.step", code="implausible_step")
    now = utcnow()
    renew(lease=f.lease, now=now)
    for event in events:
        if event.seq is not None:  # delivery is at least once: an event sent again after an agent's restart is dropped
            if event.seq <= (f.lease.events_seq or 0):
                continue
            f.lease.events_seq = event.seq
        if event.type == "started":
            _start_training(f, now)
            record_event(session=session, job=f.job, message=event.message or STARTED.get(f.lease.kind, "Started"),
                         data={"lease_id": f.lease.id, "total_steps": event.total_steps, "step": event.step})
        elif event.type in ("progress", "eval"):
            _start_training(f, now)
            data = {k: v for k, v in {
                "step": event.step, "total_steps": event.total_steps, "train_loss": event.train_loss,
                "valid_loss": event.eval_loss, "tokens_per_s": event.tokens_per_s, "epoch": event.epoch,
                "trained_tokens": event.trained_tokens, "lease_id": f.lease.id,
            }.items() if v is not None}
            if event.preference is not None:
                prefix = "valid_" if event.type == "eval" else ""
                data.update({prefix + k: v for k, v in event.preference.model_dump().items()})
            if event.eta_s is not None and f.lease.kind == LeaseKind.train:  # the trainer's estimate, shown only
                f.job.estimated_finish = now + timedelta(seconds=event.eta_s)
            record_event(session=session, job=f.job, type="metrics", message=_metrics_message(event), data=data)
            if event.step is not None:
                f.lease.last_step = max(f.lease.last_step or 0, event.step)
            if event.tokens_per_s:
                f.lease.tokens_per_s = event.tokens_per_s
            if event.trained_tokens is not None:
                f.job.trained_tokens = max(f.job.trained_tokens or 0, event.trained_tokens)
        else:
            level = "warn" if event.type == "log" and (event.message or "").lower().startswith("warn") else "info"
            record_event(session=session, job=f.job, message=(event.message or event.type)[:2000], level=level,
                         data={"lease_id": f.lease.id})
    session.commit()
    return f


# --- inputs and uploads ---------------------------------------------------------------------------

def lease_input(*, session: Session, worker: WorkerModel, lease_id: str, fencing_token: int, which: str) -> held_out.Input:
    """A blob the live lease downloads, for the worker holding it only: `training` (without the held-out sample),
    `validation`, the `initial` adapter a continued job starts from; and for a verification lease only, the
    `held_out` sample and the `adapter` under test."""
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token)
    found: held_out.Input | None = None
    if which in ("training", "validation") and f.lease.kind == LeaseKind.export:
        found = None  # an export trains nothing: it gets only the adapter to export
    elif which == "training":
        training = session.get(FileModel, f.job.training_file_id)
        assert training is not None
        found = held_out.training_input(f.job, training)
    elif which == "validation" and f.job.validation_file_id:
        validation = session.get(FileModel, f.job.validation_file_id)
        assert validation is not None
        found = held_out.Input(files.blob_key(validation.id), validation.sha256)
    elif which in ("held_out", "adapter") and f.lease.kind == LeaseKind.verify:
        found = held_out.sample_input(f.job) if which == "held_out" else _adapter_under_test(session, f.job)
    elif which == "batch_done" and f.lease.kind == LeaseKind.batch and (f.lease.result or {}).get("done"):
        done = f.lease.result["done"]  # type: ignore[index]
        found = held_out.Input(done["key"], done["sha256"])
    elif which == "initial" and f.job.initial_adapter:
        found = held_out.Input(f.job.initial_adapter["key"], f.job.initial_adapter["sha256"])
    session.commit()
    if found is None:
        raise NotFound(f"This lease has no {which} input.", param="which")
    return found


def adapter_upload_key(lease_id: str) -> str:
    """Each upload its own blob: a second upload can never swap the bytes under a completion being checked."""
    return f"adapters/{lease_id}/{new_id('upload-')}"


def record_adapter(
    *, session: Session, store: BlobStore, worker: WorkerModel, lease_id: str, fencing_token: int, blob: StoredBlob,
) -> LeaseModel:
    try:
        f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token)
        training_only(f, "upload an adapter")
        previous = f.lease.adapter_key
        f.lease.adapter_key, f.lease.adapter_sha256, f.lease.adapter_bytes = blob.key, blob.sha256, blob.bytes
        session.commit()
    except BaseException:
        store.delete(blob.key)
        raise
    if previous and previous != blob.key:
        store.delete(previous)
    return f.lease


# --- finishing ------------------------------------------------------------------------------------

def _metrics(session: Session, lease_id: str, job_id: str, *, started: bool = False) -> list[dict[str, Any]]:
    """The lease's metrics events (with `started`, its "Training started" events too), oldest first."""
    kinds = ("metrics", "message") if started else ("metrics",)
    rows = session.scalars(
        select(JobEventModel.data).where(JobEventModel.job_id == job_id, JobEventModel.type.in_(kinds))
        .order_by(JobEventModel.id)
    ).all()
    return [d for d in rows if d and d.get("lease_id") == lease_id]


def _reported_losses(session: Session, lease: LeaseModel) -> list[float]:
    """The training losses this lease reported. A lease that resumed from a checkpoint at the end of training
    (its step is the last the checkpoint's own lease announced) has no step left to report: the losses of the
    lease that trained up to that checkpoint stand for it."""
    losses = [d["train_loss"] for d in _metrics(session, lease.id, lease.job_id) if d.get("train_loss") is not None]
    checkpoint = session.get(JobCheckpointModel, lease.resume_checkpoint_id) if lease.resume_checkpoint_id else None
    if losses or checkpoint is None or checkpoint.lease_id is None or checkpoint.quarantined_at is not None:
        return losses
    earlier = [d for d in _metrics(session, checkpoint.lease_id, lease.job_id, started=True)
               if (d.get("step") or 0) <= checkpoint.step_number]
    announced = max((d.get("total_steps") or 0 for d in earlier), default=0)
    if announced == 0 or checkpoint.step_number < announced:
        return losses
    return [d["train_loss"] for d in earlier if d.get("train_loss") is not None]


SPEED_BOUNDS = (0.25, 3.0)  # no single lease moves a worker's ranking further than this


def _update_speed(worker: WorkerModel, lease: LeaseModel, job: JobModel, report: LeaseComplete) -> None:
    """Refine the worker's speed factor from this lease: tokens/s on the coordinator's clock (from the first
    progress it saw to now), never faster than the worker itself reported, bounded per lease."""
    from shared.pricing import expected_tokens_per_s, get_gpu_class  # noqa: PLC0415 - only on completion

    if lease.training_started_at is None or not report.result.trained_tokens:
        return
    seconds = max((utcnow() - lease.training_started_at).total_seconds(), 1.0)
    observed = report.result.trained_tokens / seconds
    if lease.tokens_per_s:
        observed = min(observed, lease.tokens_per_s)
    expected = expected_tokens_per_s(get_base_model(job.model), get_gpu_class(lease.gpu_class))
    ratio = min(max(observed / expected, SPEED_BOUNDS[0]), SPEED_BOUNDS[1])
    worker.speed_factor = round((1 - SPEED_EMA) * worker.speed_factor + SPEED_EMA * ratio, 6)


@dataclass(frozen=True, slots=True)
class _Submitted:
    """What `complete` checks outside any row lock: the adapter as it was when completion was reported."""

    key: str
    sha256: str
    model: str
    lora: dict[str, Any]
    losses: list[float]


def _submitted(*, session: Session, worker: WorkerModel, lease_id: str, fencing_token: int,
               report: LeaseComplete) -> FencedLease | _Submitted:
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token, allow_ended=True)
    if already_ended(f, LeaseStatus.completed):
        session.commit()
        return f
    if f.lease.adapter_key is None or f.lease.adapter_sha256 is None:
        raise Conflict("Upload the adapter (PUT .../adapter) before reporting completion.", code="adapter_missing")
    if report.adapter_sha256 != f.lease.adapter_sha256:
        raise InvalidRequest("adapter_sha256 does not match the uploaded adapter.", param="adapter_sha256",
                             code="sha256_mismatch")
    submitted = _Submitted(key=f.lease.adapter_key, sha256=f.lease.adapter_sha256, model=f.job.model,
                           lora=dict(f.job.lora), losses=_reported_losses(session, f.lease))
    session.commit()  # no row stays locked while a large archive is read
    return submitted


def _check(store: BlobStore, submitted: _Submitted, report: LeaseComplete, settings: CoordinatorSettings) -> tuple[int, str | None]:
    """(LoRA parameters, None) for a good adapter; (0, why) for a bad one."""
    try:
        with store.local(submitted.key) as path:
            if sha256_file(path) != submitted.sha256:
                raise AdapterRejected("the stored adapter no longer matches its sha256")
            facts = verify_adapter(
                path, base=get_base_model(submitted.model), lora=submitted.lora,
                final_loss=report.result.final_train_loss, reported_losses=submitted.losses,
                max_bytes=min(settings.max_adapter_bytes, adapter_limit(get_base_model(submitted.model), submitted.lora)),
            )
    except FileNotFoundError:
        return 0, "the uploaded adapter is missing from storage"
    except AdapterRejected as exc:
        return 0, str(exc)
    return facts.parameters, None


def complete(
    *, session: Session, store: BlobStore, settings: CoordinatorSettings, worker: WorkerModel, lease_id: str,
    fencing_token: int, report: LeaseComplete,
) -> FencedLease:
    """Check the adapter (without holding locks), then settle the lease: the job succeeds with the adapter as a
    result file (or waits for its verification: `verification.py`), or the lease fails its check and the job
    resumes elsewhere. A verification lease reports its figures instead."""
    peek = session.get(LeaseModel, lease_id)
    if peek is not None and peek.kind == LeaseKind.verify and peek.worker_id == worker.id:
        return _verified(session=session, store=store, settings=settings, worker=worker, lease_id=lease_id,
                         fencing_token=fencing_token, report=report)
    if peek is not None and peek.kind == LeaseKind.batch and peek.worker_id == worker.id:
        return batch_leases.complete(session=session, store=store, settings=settings, worker=worker,
                                     lease_id=lease_id, fencing_token=fencing_token, report=report)
    if peek is not None and peek.kind == LeaseKind.export and peek.worker_id == worker.id:
        return export_leases.complete(session=session, store=store, settings=settings, worker=worker,
                                      lease_id=lease_id, fencing_token=fencing_token, report=report)
    if report.adapter_sha256 is None or report.result is None:
        raise InvalidRequest("A training lease completes with `adapter_sha256` and `result`.", param="result",
                             code="result_missing")
    submitted = _submitted(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token, report=report)
    if isinstance(submitted, FencedLease):
        return submitted
    parameters, rejected = _check(store, submitted, report, settings)
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token, allow_ended=True)
    if already_ended(f, LeaseStatus.completed):  # a concurrent duplicate report settled it first
        session.commit()
        return f
    if f.lease.adapter_key != submitted.key:
        raise Conflict("The adapter was uploaded again while its completion was checked; report completion again.",
                       code="adapter_replaced")
    usage = report.usage.model_dump()
    if rejected is not None:
        fail_check(session=session, settings=settings, lease=f.lease, job=f.job, worker=f.worker,
                   reason=f"Adapter rejected: {rejected}", usage=usage)
        store.delete(submitted.key)
        return f
    f.lease.result = {**report.result.model_dump(), "lora_parameters": parameters}
    why = verification.chosen(f.job, f.worker, settings)
    if why is not None and not verification.verifiable(f.job):
        verification.skipped(session=session, job=f.job, reason=f"{why}, but the job has no data its trainer "
                                                                "did not see")
    elif why is not None and f.job.verification_mode == "auto" and not verification.verifier_exists(
            session, f.worker.account_id):
        verification.skipped(session=session, job=f.job, reason=f"{why}, but no worker of another provider "
                                                                "runs verification")
    elif why is not None:
        end_lease(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.completed,
                  reason="completed; adapter checked, verification pending", usage=usage, settle_later=True)
        _update_speed(f.worker, f.lease, f.job, report)
        verification.begin(session=session, job=f.job, lease=f.lease, worker=f.worker, reason=why)
        session.commit()  # the upload stays the adapter under test (`lease.adapter_key`) until the verdict
        return f
    end_lease(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.completed,
              reason="completed; adapter checked", usage=usage)
    _update_speed(f.worker, f.lease, f.job, report)
    file = results.deliver(session=session, store=store, job=f.job, lease=f.lease,
                           how=f"; the adapter passed the checks ({parameters} LoRA parameters)",
                           data={"lease_id": f.lease.id})
    # The result file's name is linked before the commit and the upload's name dropped after it: whatever
    # fails in between, a retried completion still finds its adapter, and a committed file its bytes.
    try:
        session.commit()
    except BaseException:
        store.delete(files.blob_key(file.id))
        raise
    store.delete(submitted.key)
    return f


def _verified(*, session: Session, store: BlobStore, settings: CoordinatorSettings, worker: WorkerModel, lease_id: str,
              fencing_token: int, report: LeaseComplete) -> FencedLease:
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token, allow_ended=True)
    if already_ended(f, LeaseStatus.completed):
        session.commit()
        return f
    unused = verification.report(session=session, store=store, settings=settings, f=f, figures=report.verification,
                                 usage=report.usage.model_dump())
    judged = verification.judged(f.job)
    session.commit()
    for key in unused:
        store.delete(key)
    # A provider the verdict suspended (its adapter refuted, its figures contradicted) loses every live lease of
    # its machines, as a suspension by a refused checkpoint does.
    providers = select(WorkerModel.account_id).where(WorkerModel.id.in_(judged)).scalar_subquery()
    suspended = session.scalars(select(WorkerModel.account_id).where(
        WorkerModel.account_id.in_(providers), WorkerModel.suspended_at.is_not(None)).distinct()).all()
    release_suspended(session=session, settings=settings, provider_ids=list(suspended),
                      why="suspended after work that failed independent verification")
    session.commit()
    return f


def fail(
    *, session: Session, settings: CoordinatorSettings, worker: WorkerModel, lease_id: str, fencing_token: int,
    report: LeaseFail,
) -> FencedLease:
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token, allow_ended=True)
    if already_ended(f, LeaseStatus.failed):
        session.commit()
        return f
    usage = report.usage.model_dump()
    if report.kind == "user_error" and f.lease.kind == LeaseKind.train:
        _user_error(session=session, settings=settings, f=f, message=report.message, usage=usage)
    else:
        end_and_requeue(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.failed,
                        reason=f"worker error: {report.message}",
                        job_reason=f"Worker {f.worker.id} failed: {report.message}", settings=settings,
                        count_attempt=True, usage=usage, counts_against_worker=True)
    session.commit()
    return f


USER_ERROR = "user_error"


def _user_error(*, session: Session, settings: CoordinatorSettings, f: FencedLease, message: str,
                usage: dict[str, Any]) -> None:
    """A worker says the customer's data is bad. The coordinator validated it, so that is a claim: the lease is
    neither billed nor paid, counts against the worker, and the job retries on another provider's worker. Only
    when a worker of a second provider claims the same does the job fail as the customer's, billed until the end
    (`metering`), and the first claim stops counting against its worker. A redundant job one of whose trainings
    its verifiers confirmed trained on that data: no claim about it is ever confirmed."""
    earlier = None if replicas.of(f.job) else session.execute(
        select(LeaseModel.id, LeaseModel.worker_id).join(WorkerModel, WorkerModel.id == LeaseModel.worker_id)
        .where(LeaseModel.job_id == f.job.id, LeaseModel.claim == USER_ERROR, LeaseModel.id != f.lease.id,
               WorkerModel.account_id != f.worker.account_id)
        .order_by(LeaseModel.id).limit(1)
    ).first()
    if earlier is None:
        end_and_requeue(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.failed,
                        reason=f"user error claimed: {message}", settings=settings, count_attempt=False, usage=usage,
                        claim=USER_ERROR,
                        job_reason=f"Worker {f.worker.id} reported a problem with the training data ({message}); "
                                   "the files were validated, so another provider's worker checks it before it "
                                   "counts (this attempt is not billed)")
        exclude(f.job, provider=f.worker.account_id)
        return
    end_lease(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.failed,
              reason=f"user error: {message} (confirms lease {earlier.id})", usage=usage)
    first = session.get(WorkerModel, earlier.worker_id, with_for_update=True, populate_existing=True)
    assert first is not None
    worker_states.claim_confirmed(first)
    change_status(session=session, job=f.job, to=JobStatus.failed,
                  message=f"Training failed: {message} (reported by workers of two providers)",
                  error={"code": "invalid_training_data", "message": message, "param": "training_file"},
                  data={"lease_id": f.lease.id, "confirms_lease_id": earlier.id})


def preempted(
    *, session: Session, worker: WorkerModel, lease_id: str, fencing_token: int, report: LeasePreempted,
    settings: CoordinatorSettings,
) -> FencedLease:
    """The owner needed the PC back: the job resumes elsewhere from its last checkpoint, at no cost to anyone's
    attempts budget."""
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token, allow_ended=True)
    if already_ended(f, LeaseStatus.preempted):
        session.commit()
        return f
    end_and_requeue(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.preempted,
                    reason=f"preempted by the owner: {report.reason}",
                    job_reason=f"The worker's owner needed it back ({report.reason})", settings=settings,
                    count_attempt=False, usage=report.usage.model_dump())
    worker_states.paused_by_owner(f.worker, reason=report.reason)
    session.commit()
    return f
