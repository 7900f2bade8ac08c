"""A job's integrations: its metrics forwarded to the customer's Weights & Biases project by the coordinator.

The customer's W&B key stays with the coordinator (in the job's `integrations`, never in a response, never in an
assignment): the provider's worker reports metrics as for any job, and a periodic task (`tasks.py`) logs the
ones it has not forwarded yet to a run named by the job's id, resumed each pass and finished when the job is.
Forwarding is bounded (events a pass, attempts a job) and a failure is an event on the job, never a lost job.
A run's steps only grow: after a job resumes elsewhere from an earlier checkpoint, the steps it trains again
are not logged twice.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from coordinator.db.tables import JobEventModel, JobModel, JobStatus, utcnow
from coordinator.services.job_states import TERMINAL, record_event
from coordinator.settings import CoordinatorSettings
from shared.errors import InvalidRequest
from shared.schemas.jobs import Integration

EVENTS_PER_PASS = 1000
JOBS_PER_PASS = 50
MAX_FAILURES = 3
NOT_LOGGED = frozenset({"step", "total_steps", "lease_id"})
RECENT = timedelta(days=1)  # a finished job's last metrics are still forwarded for this long


def stored(integrations: list[Integration] | None) -> list[dict[str, Any]] | None:
    """What a job keeps of the requested integrations: the settings, the key, and the forwarding state."""
    if not integrations:
        return None
    kept = []
    for integration in integrations:
        settings = integration.wandb.model_dump(exclude={"api_key"})
        if not integration.wandb.api_key:
            raise InvalidRequest(
                "A wandb integration needs your W&B API key in wandb.api_key: the coordinator keeps it and forwards "
                "the job's metrics itself (no worker ever sees it).", param="integrations.0.wandb.api_key",
                code="wandb_api_key_required")
        kept.append({"type": "wandb", "wandb": settings, "api_key": integration.wandb.api_key,
                     "forwarded_through": None, "last_step": 0, "failures": 0, "finished": False})
    return kept


def public(job: JobModel) -> list[dict[str, Any]] | None:
    """OpenAI's shape of the job's integrations, without the key or our bookkeeping."""
    if not job.integrations:
        return None
    return [{"type": i["type"], "wandb": {k: v for k, v in i["wandb"].items() if v is not None}}
            for i in job.integrations]


def forward(*, session: Session, settings: CoordinatorSettings) -> int:
    """Forward new metrics of jobs with an unfinished integration; how many events were logged."""
    candidates = session.scalars(
        select(JobModel).where(JobModel.integrations.is_not(None))
        .where(or_(JobModel.finished_at.is_(None), JobModel.finished_at > utcnow() - RECENT))
        .order_by(JobModel.id).limit(JOBS_PER_PASS * 4)
    ).all()
    logged = 0
    for job in [j for j in candidates if any(not i.get("finished") for i in j.integrations or ())][:JOBS_PER_PASS]:
        logged += _forward_job(session, settings, job)
        session.commit()
    return logged


def _forward_job(session: Session, settings: CoordinatorSettings, job: JobModel) -> int:
    state = dict(job.integrations[0])  # type: ignore[index]
    after = state.get("forwarded_through")
    stmt = select(JobEventModel).where(JobEventModel.job_id == job.id, JobEventModel.type == "metrics")
    if after:
        stmt = stmt.where(JobEventModel.id > after)
    events = session.scalars(stmt.order_by(JobEventModel.id).limit(EVENTS_PER_PASS)).all()
    finishing = job.status in TERMINAL and len(events) < EVENTS_PER_PASS
    if not events and not finishing:
        return 0
    rows = []
    last_step = state.get("last_step") or 0
    for event in events:
        step = (event.data or {}).get("step")
        if isinstance(step, int) and step > last_step:
            rows.append((step, {k: v for k, v in (event.data or {}).items()
                                if k not in NOT_LOGGED and isinstance(v, int | float) and not isinstance(v, bool)}))
            last_step = step
    try:
        _log_to_wandb(settings, job, state, rows, finish=finishing)
    except Exception as exc:  # noqa: BLE001 - whatever W&B raises is the integration's failure, not the job's
        state["failures"] = state.get("failures", 0) + 1
        gave_up = state["failures"] >= MAX_FAILURES
        state["finished"] = gave_up
        record_event(session=session, job=job, level="warn",
                     # The error's class only: W&B's messages can quote the key in any spelling (a URL, a prefix).
                     message=f"Forwarding metrics to Weights & Biases failed{' (giving up)' if gave_up else ''}: "
                             f"{exc.__class__.__name__}; check the project, entity and key")
        job.integrations = [state, *job.integrations[1:]]  # type: ignore[index]
        return 0
    state.update(forwarded_through=events[-1].id if events else after, last_step=last_step, failures=0,
                 finished=finishing)
    job.integrations = [state, *job.integrations[1:]]  # type: ignore[index]
    if finishing:
        record_event(session=session, job=job, message=f"Metrics forwarded to Weights & Biases project "
                                                       f"{state['wandb']['project']!r} (run {job.id})")
    return len(rows)


def _log_to_wandb(settings: CoordinatorSettings, job: JobModel, state: dict[str, Any],
                  rows: list[tuple[int, dict[str, float]]], *, finish: bool) -> None:
    import wandb  # noqa: PLC0415 - only a coordinator that forwards needs it loaded

    options = state["wandb"]
    directory = Path(settings.data_dir) / "wandb"
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=options["project"], entity=options.get("entity"), name=options.get("name") or job.id, id=job.id,
        resume="allow", mode=settings.wandb_mode, dir=str(directory), reinit="create_new",
        tags=["tunegrid", f"tunegrid/{job.model}", f"tunegrid/{job.id}", *(options.get("tags") or [])],
        config={"model": job.model, "method": job.method, "hyperparameters": job.hyperparameters, "lora": job.lora,
                "training_file": job.training_file_id, "validation_file": job.validation_file_id},
        settings=wandb.Settings(api_key=state["api_key"], silent=True, x_disable_stats=True,
                                init_timeout=60.0),
    )
    try:
        for step, values in rows:
            run.log(values, step=step)
        if finish:
            run.summary.update({"status": job.status.value, "fine_tuned_model": job.fine_tuned_model,
                                "trained_tokens": job.trained_tokens})
    finally:
        run.finish(exit_code=0 if not finish or job.status is JobStatus.succeeded else 1)

