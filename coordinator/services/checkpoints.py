"""A job's checkpoints: what an upload must be (rules from the job's spec and what its lease reported), recording
the ones that pass, refusing the rest (counted against the uploader), keeping only the newest content, and the
verdict when a later worker says the checkpoint it was handed is bad.

An upload is checked in three steps so that no database connection waits on a large archive: the rules under
the lease's lock, the archive alone (`shared.checkpoint.check_file`), then the record under the lock again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    LIVE_LEASE, JobCheckpointModel, JobEventModel, JobModel, LeaseModel, LeaseStatus, WorkerModel, utcnow,
)
from coordinator.services import continuation, replicas
from coordinator.services.job_states import record_event
from coordinator.services.lease_states import end_and_requeue, release_suspended
from coordinator.services.worker_states import count_failed_check
from coordinator.services.fencing import FencedLease, already_ended, fenced, training_only
from coordinator.services.leases import (
    job_spec, step_bound,
)
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore, StoredBlob, checkpoint_key
from shared.checkpoint import CheckpointRejected, CheckpointRules, check_file
from shared.digests import sha256_file
from shared.errors import NotFound, UploadRejected
from shared.pricing import CPU
from shared.protocol import LeaseFail, PreferenceMetrics

# What a checkpoint lists of the metrics reported at its step (OpenAI's names; DPO's figures beside them).
CHECKPOINT_METRICS = frozenset({"train_loss", "valid_loss", *PreferenceMetrics.model_fields,
                                *(f"valid_{name}" for name in PreferenceMetrics.model_fields)})

log = logging.getLogger(__name__)


def _rules(session: Session, settings: CoordinatorSettings, job: JobModel, worker: WorkerModel, max_step: int) -> CheckpointRules:
    spec = job_spec(job, checkpoint_every_steps=settings.checkpoint_every_steps)
    return CheckpointRules.for_spec(spec, max_step=min(max_step, step_bound(session, job)),
                                    gpu=worker.gpu_class != CPU.id)


def upload_rules(
    *, session: Session, settings: CoordinatorSettings, worker: WorkerModel, lease_id: str, fencing_token: int,
) -> CheckpointRules:
    """What this lease's next checkpoint may be: the job's shapes, no step past what the lease reported."""
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token)
    training_only(f, "upload checkpoints")
    rules = _rules(session, settings, f.job, f.worker, f.lease.last_step or 0)
    session.commit()
    return rules


def check_upload(store: BlobStore, blob: StoredBlob, rules: CheckpointRules, step: int) -> str | None:
    """Why the stored upload is refused, or None when it passes (no database work: run it outside a session)."""
    try:
        with store.local(blob.key) as path:
            check_file(path, rules, step=step)
    except CheckpointRejected as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a check that breaks on a stranger's bytes refuses them, never a 500
        log.warning("checkpoint check failed unexpectedly: %r", exc)
        return f"the archive could not be checked ({exc.__class__.__name__})"
    return None


def refuse(
    *, session: Session, settings: CoordinatorSettings, worker: WorkerModel, lease_id: str, step: int, reason: str,
) -> UploadRejected:
    """An upload that failed its checks (its bytes already deleted): it counts against the worker, the job's
    events say so, and a worker suspended by it loses its lease. The error to answer with."""
    row = session.get(WorkerModel, worker.id, with_for_update=True, populate_existing=True)
    assert row is not None
    lease = session.get(LeaseModel, lease_id)
    suspended = count_failed_check(session=session, worker=row, max_failed_checks=settings.suspend_after_failed_checks)
    if lease is not None and lease.worker_id == row.id:
        job = session.get(JobModel, lease.job_id)
        assert job is not None
        record_event(session=session, job=job, level="warn",
                     message=f"Worker {row.id} uploaded a checkpoint for step {step} that failed its checks "
                             f"({reason}); it was not stored",
                     data={"lease_id": lease_id, "step": step, "code": "checkpoint_rejected"})
    session.commit()
    if suspended:
        log.warning("worker %s suspended after %d failed checks", row.id, row.failed_checks)
        release_suspended(session=session, settings=settings, provider_ids=[row.account_id],
                          why=f"suspended after {row.failed_checks} uploads that failed their checks")
        session.commit()
    return UploadRejected(f"The checkpoint was refused and not stored: {reason}.", param="checkpoint")


def record(
    *, session: Session, store: BlobStore, settings: CoordinatorSettings, worker: WorkerModel, lease_id: str,
    fencing_token: int, step: int, checkpoint_id: str, blob: StoredBlob,
) -> JobCheckpointModel:
    """Record an uploaded checkpoint that passed its checks (stored under `checkpoint_key(checkpoint_id)`)."""
    try:
        f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token)
        if step > (f.lease.last_step or 0):  # checked before the upload too; progress only grows
            raise UploadRejected(f"Step {step} is past the {f.lease.last_step or 0} steps this lease reported.",
                                 param="step")
        last = session.scalars(
            select(JobEventModel).where(JobEventModel.job_id == f.job.id, JobEventModel.type == "metrics")
            .order_by(JobEventModel.id.desc()).limit(1)
        ).first()
        metrics = {k: v for k, v in (last.data or {}).items() if k in CHECKPOINT_METRICS} if last else {}
        checkpoint = JobCheckpointModel(
            id=checkpoint_id, job=f.job, step_number=step, metrics={"step": step, **metrics},
            fine_tuned_model_checkpoint=continuation.checkpoint_name(f.job, step),
            blob_sha256=blob.sha256, blob_bytes=blob.bytes, lease_id=f.lease.id,
        )
        session.add(checkpoint)
        record_event(session=session, job=f.job, message=f"Checkpoint saved at step {step}",
                     data={"checkpoint_id": checkpoint_id, "step": step, "lease_id": f.lease.id})
        session.flush()
        pruned = _prune(session, f.job, keep=settings.max_checkpoints_per_job)
        session.commit()
    except BaseException:
        store.delete(blob.key)
        raise
    for old in pruned:
        store.delete(checkpoint_key(old))
    return checkpoint


def _prune(session: Session, job: JobModel, *, keep: int) -> list[str]:
    """Past the newest `keep` checkpoints a job's older ones lose their content (the rows stay, listed with
    their metrics), so an untrusted worker cannot fill the disk; one a live lease resumes from is kept."""
    resuming = set(session.scalars(select(LeaseModel.resume_checkpoint_id).where(
        LeaseModel.job_id == job.id, LeaseModel.status.in_(LIVE_LEASE), LeaseModel.resume_checkpoint_id.is_not(None))))
    stored = session.scalars(
        select(JobCheckpointModel).where(JobCheckpointModel.job_id == job.id, JobCheckpointModel.resumable())
        .order_by(JobCheckpointModel.step_number.desc(), JobCheckpointModel.id.desc())
    ).all()
    pruned = []
    for checkpoint in stored[keep:]:
        if checkpoint.id not in resuming:
            checkpoint.blob_sha256 = checkpoint.blob_bytes = None
            pruned.append(checkpoint.id)
    return pruned


def resume_content(
    *, session: Session, worker: WorkerModel, lease_id: str, fencing_token: int, checkpoint_id: str,
) -> JobCheckpointModel:
    """The checkpoint this lease resumes from, for the worker holding it; never a quarantined one."""
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token)
    if f.lease.resume_checkpoint_id != checkpoint_id:
        raise NotFound(f"Checkpoint {checkpoint_id} is not this lease's to resume from.", param="checkpoint_id")
    checkpoint = session.get(JobCheckpointModel, checkpoint_id)
    assert checkpoint is not None
    if checkpoint.quarantined_at is not None or checkpoint.blob_sha256 is None:
        raise NotFound(f"Checkpoint {checkpoint_id} is no longer available.", param="checkpoint_id")
    session.commit()
    return checkpoint


# --- a worker says the checkpoint it was handed is bad ------------------------------------------------

@dataclass(frozen=True, slots=True)
class Handed:
    """The checkpoint a lease was handed, and the rules it passed when its uploader sent it."""

    checkpoint_id: str
    key: str
    sha256: str
    step: int
    rules: CheckpointRules


def handed(session: Session, settings: CoordinatorSettings, lease: LeaseModel, job: JobModel) -> Handed | None:
    if lease.resume_checkpoint_id is None:
        return None
    checkpoint = session.get(JobCheckpointModel, lease.resume_checkpoint_id)
    if checkpoint is None or checkpoint.blob_sha256 is None or checkpoint.quarantined_at is not None:
        return None
    uploader_lease = session.get(LeaseModel, checkpoint.lease_id) if checkpoint.lease_id else None
    uploader = session.get(WorkerModel, uploader_lease.worker_id) if uploader_lease else None
    gpu = uploader.gpu_class != CPU.id if uploader is not None else True
    spec = job_spec(job, checkpoint_every_steps=settings.checkpoint_every_steps)
    rules = CheckpointRules.for_spec(spec, max_step=min(checkpoint.step_number, step_bound(session, job)), gpu=gpu)
    return Handed(checkpoint_id=checkpoint.id, key=checkpoint_key(checkpoint.id), sha256=checkpoint.blob_sha256,
                  step=checkpoint.step_number, rules=rules)


def recheck(store: BlobStore, handed: Handed) -> str | None:
    """The coordinator's own verdict on a checkpoint a worker called bad: why it is bad, or None (it is fine)."""
    try:
        with store.local(handed.key) as path:
            if sha256_file(path) != handed.sha256:
                return "its stored content no longer matches its sha256"
            check_file(path, handed.rules, step=handed.step)
    except FileNotFoundError:
        return "its content is missing from storage"
    except CheckpointRejected as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - as in check_upload
        return f"the archive could not be checked ({exc.__class__.__name__})"
    return None


def quarantine(
    *, session: Session, store: BlobStore, settings: CoordinatorSettings, handed: Handed, reason: str,
    blame_uploader: bool,
) -> str | None:
    """Never resume from it again; with `blame_uploader`, count it against the worker that uploaded it (and
    forfeit its withheld pay). Returns the uploader's provider when this suspended it."""
    checkpoint = session.get(JobCheckpointModel, handed.checkpoint_id, with_for_update=True)
    assert checkpoint is not None
    checkpoint.quarantined_at, checkpoint.quarantine_reason = utcnow(), reason[:2000]
    uploader_lease = session.get(LeaseModel, checkpoint.lease_id) if checkpoint.lease_id and blame_uploader else None
    if uploader_lease is not None:
        job = session.get(JobModel, checkpoint.job_id)
        if job is not None:
            replicas.forfeit(job, uploader_lease.id)  # confirmed bad: its withheld pay is never paid
        uploader = session.get(WorkerModel, uploader_lease.worker_id, with_for_update=True)
        if uploader is not None and count_failed_check(session=session, worker=uploader,
                                                       max_failed_checks=settings.suspend_after_failed_checks):
            log.warning("worker %s suspended: its checkpoint %s was bad", uploader.id, checkpoint.id)
            return uploader.account_id
    return None


def report_bad(
    *, session: Session, store: BlobStore, settings: CoordinatorSettings, worker: WorkerModel, lease_id: str,
    fencing_token: int, report: LeaseFail,
) -> FencedLease:
    """A worker says the checkpoint its lease was handed failed its checks. The reporter is never blamed nor
    billed for it, and the job resumes from the checkpoint before (or from scratch) without using an attempt.
    The coordinator checks the stored checkpoint itself (without holding locks): if it agrees, the checkpoint
    counts against its uploader. If it does not (the trainer checks what the coordinator cannot: the job's
    exact step count, torch's own view of the RNG states), the claim cannot be confirmed either way, so nobody
    is blamed and the checkpoint is set aside all the same: a liar earns nothing, and an honest worker can
    never be framed with a checkpoint only its trainer could see was bad."""
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token, allow_ended=True)
    if already_ended(f, LeaseStatus.failed):
        session.commit()
        return f
    was_handed = handed(session, settings, f.lease, f.job)
    session.commit()
    verdict = recheck(store, was_handed) if was_handed is not None else None
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token, allow_ended=True)
    if already_ended(f, LeaseStatus.failed):
        session.commit()
        return f
    usage = report.usage.model_dump()
    if was_handed is None:  # nothing was handed: the claim is simply false
        reason = f"worker {f.worker.id} reported a bad checkpoint, but this lease was handed none: {report.message}"
        end_and_requeue(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.failed,
                        reason=reason[:2000], settings=settings, count_attempt=True, usage=usage,
                        counts_against_worker=True)
        count_failed_check(session=session, worker=f.worker, max_failed_checks=settings.suspend_after_failed_checks)
        session.commit()
        return f
    where = f"checkpoint {was_handed.checkpoint_id} (step {was_handed.step})"
    if verdict is not None:
        reason = f"{where} failed its checks: {verdict}; it is quarantined and its uploader blamed"
    else:
        reason = (f"{where} could not be resumed by worker {f.worker.id} ({report.message[:300]}), though it passes "
                  f"the coordinator's checks; it is set aside and nobody is blamed")
    suspended = quarantine(session=session, store=store, settings=settings, handed=was_handed, reason=reason,
                           blame_uploader=verdict is not None)
    end_and_requeue(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.failed,
                    reason=reason[:2000], job_reason=f"The {reason}"[:2000], settings=settings, count_attempt=False,
                    usage=usage, unbilled=True)
    session.commit()
    if suspended is not None:
        release_suspended(session=session, settings=settings, provider_ids=[suspended],
                          why="suspended after a checkpoint the coordinator confirmed bad")
        session.commit()
    return f
