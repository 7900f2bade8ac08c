"""Fine-tuning jobs: create (files, model and hyperparameters checked), read, list, cancel, pause, resume, events, checkpoints."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import (
    AccountModel, FileModel, FileStatus, JobCheckpointModel, JobEventModel, JobKind, JobModel, JobStatus, utcnow,
)
from coordinator.services import (
    continuation, files, held_out, holds, integrations, lease_states, market, verification,
)
from coordinator.services.placement import check_placeable, requirements
from coordinator.services.job_states import TERMINAL, change_status, record_event
from coordinator.services.paging import page
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.catalog import CATALOG, BaseModelSpec, get_base_model
from shared.errors import InvalidRequest, NotFound
from shared.money import micros_to_usd, usd_to_micros
from shared.pricing import training_tokens
from shared.schemas.jobs import DpoHyperparameters, Hyperparameters, JobCreate, LoraConfig
from shared.schemas.quotes import QuoteCreate
from shared.weights import check_formats

DEFAULT_EPOCHS = 3
# The trainer takes a tenth of the training file for validation when there is no validation file: this many
# examples leave it at least two to watch.
MIN_EXAMPLES_FOR_EARLY_STOPPING = 20


def usable_file(*, session: Session, account: AccountModel, file_id: str, param: str) -> FileModel:
    try:
        file = files.get(session=session, account=account, file_id=file_id, lock="share")
    except NotFound:
        raise InvalidRequest(f"File {file_id} not found.", param=param, code="file_not_found") from None
    if file.purpose != "fine-tune":
        raise InvalidRequest(f"File {file_id} has purpose {file.purpose!r}, not 'fine-tune'.", param=param)
    if file.status is not FileStatus.processed:
        raise InvalidRequest(f"File {file_id} is not ready for fine-tuning ({file.status.value}).", param=param)
    return file


def method_of(request: JobCreate | QuoteCreate) -> str:
    method = request.method
    if method is not None and method.type not in ("supervised", "dpo"):
        raise InvalidRequest(
            f"Fine-tuning method {method.type!r} is not supported; tunegrid trains with 'supervised' (SFT) or 'dpo' "
            "(preference pairs), both as QLoRA.", param="method.type", code="unsupported_method",
        )
    return method.type if method is not None else "supervised"


def hyperparameters_of(request: JobCreate | QuoteCreate) -> Hyperparameters:
    """The method's hyperparameters, or the top-level ones (OpenAI's older place); DPO's carry `beta`."""
    method = request.method
    if method_of(request) == "dpo":
        chosen = method.dpo.hyperparameters if method and method.dpo else None
        if chosen is None and request.hyperparameters is not None:
            chosen = DpoHyperparameters(**request.hyperparameters.model_dump())
        return chosen or DpoHyperparameters()
    chosen = (method.supervised.hyperparameters if method and method.supervised else None) or request.hyperparameters
    return chosen or Hyperparameters()


def lora_of(request: JobCreate | QuoteCreate) -> dict[str, Any]:
    lora = (request.lora or LoraConfig()).model_dump()
    lora["alpha"] = lora["alpha"] or 2 * lora["r"]
    return lora


def check_files_fit(*, method: str, base: BaseModelSpec, training: FileModel, validation: FileModel | None) -> None:
    """The data's format is the method's, and a model trains on tool calls only if its template expresses them."""
    for file, param in ((training, "training_file"), (validation, "validation_file")):
        if file is None:
            continue
        if method == "dpo" and file.format != "preference":
            raise InvalidRequest(
                f"File {file.id} is in {file.format} format; the 'dpo' method trains on preference pairs "
                "({\"input\", \"preferred_output\", \"non_preferred_output\"} per line).", param=param,
                code="invalid_file_format")
        if method != "dpo" and file.format == "preference":
            raise InvalidRequest(
                f"File {file.id} holds preference pairs, which train with method {{\"type\": \"dpo\"}}.",
                param=param, code="invalid_file_format")
        if file.uses_tools and not base.tools:
            able = ", ".join(m.id for m in CATALOG if m.tools)
            raise InvalidRequest(
                f"Model {base.id!r} cannot train on file {file.id}: its examples use tools, and {base.id}'s chat "
                f"template cannot express tool definitions or calls. Models that can: {able}.", param="model",
                code="model_cannot_use_tools")
    if validation is not None and training.format != validation.format:
        raise InvalidRequest(f"The validation file is in {validation.format} format, the training file in "
                             f"{training.format}; use one format for both.", param="validation_file",
                             code="invalid_file_format")


def check_early_stopping(request: JobCreate, *, training: FileModel, validation: FileModel | None) -> None:
    if request.early_stopping is not None and validation is None \
            and (training.examples or 0) < MIN_EXAMPLES_FOR_EARLY_STOPPING:
        raise InvalidRequest(
            "early_stopping watches validation loss: give a validation_file, or a training file of at least "
            f"{MIN_EXAMPLES_FOR_EARLY_STOPPING} examples to take a validation share from ({training.examples} given).",
            param="early_stopping", code="early_stopping_needs_validation")


def create(*, session: Session, store: BlobStore, account: AccountModel, request: JobCreate,
           settings: CoordinatorSettings) -> JobModel:
    """Check the request and hold its estimated cost on the customer's balance (429 insufficient_quota when short,
    as OpenAI answers); the job is `validating_files` until `finish_validation` queues it. `model` may name the
    caller's fine-tune or checkpoint (`continuation.py`): the job continues from its adapter, on its base model."""
    start = continuation.resolve(session=session, account=account, name=request.model) \
        if continuation.is_continuation(request.model) else None
    base = get_base_model(start.parent.model if start else request.model)
    method = method_of(request)
    hp = hyperparameters_of(request)
    training = usable_file(session=session, account=account, file_id=request.training_file, param="training_file")
    validation = (
        usable_file(session=session, account=account, file_id=request.validation_file, param="validation_file")
        if request.validation_file else None
    )
    check_files_fit(method=method, base=base, training=training, validation=validation)
    exports = check_formats(base, list(request.export), param="export") if request.export else None
    if request.evaluation is not None and validation is None:
        raise InvalidRequest("An evaluation answers the validation file's prompts: give a validation_file.",
                             param="evaluation", code="evaluation_needs_validation")
    check_early_stopping(request, training=training, validation=validation)
    if request.verification == "redundant" and not held_out.kept_back(training.examples or 0):
        raise InvalidRequest(
            f"verification 'redundant' compares two trainings on a held-out sample, which needs a training file "
            f"of at least {held_out.MIN_EXAMPLES} examples ({training.examples} given).", param="verification",
            code="too_few_examples_to_compare")
    n_epochs = DEFAULT_EPOCHS if hp.n_epochs == "auto" else hp.n_epochs
    lora = (continuation.lora_for(start, request.lora.model_dump(exclude_unset=True) if request.lora else None)
            if start else lora_of(request))
    job = JobModel(
        id=new_id("ftjob-"),
        account_id=account.id,
        model=base.id,
        method=method,
        initial_model=request.model if start else None,
        early_stopping=request.early_stopping.model_dump() if request.early_stopping else None,
        integrations=integrations.stored(request.integrations),
        training_file_id=training.id,
        validation_file_id=validation.id if validation else None,
        status=JobStatus.validating_files,
        hyperparameters={**hp.model_dump(), "n_epochs": n_epochs},
        lora=lora,
        suffix=request.suffix,
        seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
        job_metadata=request.metadata,
        max_price_per_gpu_hour=usd_to_micros(request.max_price_per_gpu_hour) if request.max_price_per_gpu_hour else None,
        max_cost=usd_to_micros(request.max_cost) if request.max_cost else None,
        min_vram_gb=request.min_vram_gb,
        gpu_filter=request.gpu_filter,
        trusted_hosts_only=request.trusted_hosts_only,
        estimated_tokens=training_tokens(training.estimated_tokens or 0, n_epochs=n_epochs, method=method),
        result_files=[],
        verification_mode=request.verification,
        export={"formats": exports} if exports else None,
        evaluation=request.evaluation.model_dump() if request.evaluation else None,
    )
    check_placeable(job)
    if start is not None:
        job.initial_adapter = continuation.keep(store=store, job=job, start=start)
    price_cap(session=session, job=job, settings=settings)
    session.add(job)
    record_event(session=session, job=job, message="Created fine-tuning job", data={"status": job.status.value})
    if start is not None:
        record_event(session=session, job=job, message=f"Continues from {request.model} (job {start.parent.id}"
                                                        + (f", step {start.step}" if start.step else "") + ")")
    session.flush()
    held = holds.hold_for_queue(session=session, job=job, settings=settings)
    record_event(session=session, job=job, message=f"${micros_to_usd(held)} held on your balance; validating files")
    session.commit()
    return job


def finish_validation(*, session: Session, store: BlobStore, job_id: str) -> JobModel | None:
    """A `validating_files` job's job-time checks (its held-out sample kept back: `held_out.py`), then queued; run
    just after the create answered (so a client sees `validating_files`), and by a sweep for any a crash left.
    A job cancelled meanwhile is left as it is; one whose files cannot be read fails with its hold released."""
    job = session.get(JobModel, job_id, with_for_update=True)
    if job is None or job.status is not JobStatus.validating_files:
        session.rollback()
        return job
    training = session.get(FileModel, job.training_file_id)
    assert training is not None
    # Uploads are validated line by line when they arrive, so the files are already known good.
    record_event(
        session=session, job=job,
        message=f"Validated training file {training.id}: {training.examples} "
                f"{'preference pairs' if job.method == 'dpo' else 'examples'}, about {training.estimated_tokens} "
                "tokens per epoch" + (", with tool calls" if training.uses_tools else ""),
    )
    try:
        job.held_out = held_out.keep_back(store=store, job=job, training=training)
    except OSError as exc:  # the stored file is unreadable: the platform's fault, said as such, nothing billed
        change_status(session=session, job=job, to=JobStatus.failed, message="The training file could not be read",
                      error={"code": "file_unreadable", "message": f"The training file could not be read "
                                                                   f"({exc.__class__.__name__}).", "param": None})
        session.commit()
        return job
    if job.held_out:
        record_event(session=session, job=job,
                     message=f"Kept back {job.held_out['examples']} examples as a held-out sample for independent "
                             "verification; no trainer receives them")
    change_status(session=session, job=job, to=JobStatus.queued,
                  message=f"Fine-tuning job queued; ${micros_to_usd(job.held_micros)} held on your balance")
    session.commit()
    return job


def validate_waiting(*, session: Session, store: BlobStore, older_than: timedelta, limit: int = 100) -> int:
    """`finish_validation` for jobs left in `validating_files` longer than `older_than` (a process that stopped
    between the create and its validation); how many were validated."""
    waiting = session.scalars(select(JobModel.id).where(
        JobModel.status == JobStatus.validating_files, JobModel.created_at < utcnow() - older_than,
    ).order_by(JobModel.id).limit(limit)).all()
    session.rollback()
    for job_id in waiting:
        finish_validation(session=session, store=store, job_id=job_id)
    return len(waiting)


def price_cap(*, session: Session, job: JobModel, settings: CoordinatorSettings) -> None:
    """The customer's cap stands; a job that names none gets the market's default (services/market.py)."""
    if job.max_price_per_gpu_hour is not None:
        job.max_price_source = "customer"
        return
    req = requirements(job)
    assert req is not None
    job.max_price_per_gpu_hour, job.max_price_source = market.default_price_cap(session, req, settings), "market"


def get(*, session: Session, account: AccountModel, job_id: str, for_update: bool = False) -> JobModel:
    """The caller's job; someone else's id is the same 404 as a missing one.

    `for_update` locks the row on PostgreSQL; on SQLite the job's version column catches a concurrent change.
    """
    job = session.get(JobModel, job_id, with_for_update=for_update or None)
    if job is None or job.account_id != account.id or job.kind != JobKind.fine_tuning:
        raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return job


def list_jobs(
    *, session: Session, account: AccountModel, after: str | None, limit: int, metadata: dict[str, str] | None,
) -> tuple[list[JobModel], bool]:
    stmt = select(JobModel).where(JobModel.account_id == account.id, JobModel.kind == JobKind.fine_tuning.value)
    sqlite = session.get_bind().dialect.name == "sqlite"
    for key, value in (metadata or {}).items():
        if sqlite:  # a JSON path cannot quote every key (`k"`): match the object's members instead
            members = func.json_each(JobModel.job_metadata).table_valued("key", "value")
            stmt = stmt.where(select(1).select_from(members).where(members.c.key == key, members.c.value == value)
                              .exists())
        else:
            stmt = stmt.where(JobModel.job_metadata[key].as_string() == value)  # `->>` binds the key
    return page(session=session, stmt=stmt, id_column=JobModel.id, after=after, limit=limit)


def cancel(*, session: Session, account: AccountModel, job_id: str) -> JobModel:
    job = get(session=session, account=account, job_id=job_id, for_update=True)
    if job.status is JobStatus.cancelled:
        return job
    if job.status in TERMINAL:
        # OpenAI answers a request its job's state forbids with a 400 invalid_request_error (not a 409).
        raise InvalidRequest(f"Job {job_id} has already {job.status.value}; it cannot be cancelled.",
                             param="fine_tuning_job_id", code="invalid_job_state")
    if job.stage == "verify":  # the verifier's lease and the training under test settle together
        verification.lock_books(session, job, *lease_states.live_providers(session, job))
    lease_states.end_for_customer(session=session, job=job, paused=False)
    verification.abandon(session=session, job=job)
    change_status(session=session, job=job, to=JobStatus.cancelled, message="Fine-tuning job cancelled by the customer")
    session.commit()
    return job


def pause(*, session: Session, account: AccountModel, job_id: str) -> JobModel:
    job = get(session=session, account=account, job_id=job_id, for_update=True)
    if job.status is JobStatus.paused:
        return job
    if job.status not in (JobStatus.queued, JobStatus.running):
        raise InvalidRequest(f"Job {job_id} is {job.status.value}; only queued or running jobs can be paused.",
                             param="fine_tuning_job_id", code="invalid_job_state")
    if job.stage == "verify":
        raise InvalidRequest(f"Job {job_id} has finished training and its adapter is being verified; it cannot be "
                             "paused (cancel it to stop, which bills the training done).", param="fine_tuning_job_id",
                             code="invalid_job_state")
    lease_states.end_for_customer(session=session, job=job, paused=True)
    change_status(session=session, job=job, to=JobStatus.paused,
                  message="Fine-tuning job paused; it keeps its last checkpoint and resumes from it")
    session.commit()
    return job


def resume(*, session: Session, account: AccountModel, job_id: str, settings: CoordinatorSettings) -> JobModel:
    job = get(session=session, account=account, job_id=job_id, for_update=True)
    if job.status is not JobStatus.paused:
        raise InvalidRequest(f"Job {job_id} is {job.status.value}; only paused jobs can be resumed.",
                             param="fine_tuning_job_id", code="invalid_job_state")
    held = holds.hold_for_queue(session=session, job=job, settings=settings)
    change_status(session=session, job=job, to=JobStatus.queued,
                  message=f"Fine-tuning job resumed and queued; ${micros_to_usd(held)} held on your balance")
    session.commit()
    return job


def list_events(
    *, session: Session, account: AccountModel, job_id: str, after: str | None, limit: int,
) -> tuple[list[JobEventModel], bool]:
    get(session=session, account=account, job_id=job_id)
    stmt = select(JobEventModel).where(JobEventModel.job_id == job_id)
    return page(session=session, stmt=stmt, id_column=JobEventModel.id, after=after, limit=limit)


def list_checkpoints(
    *, session: Session, account: AccountModel, job_id: str, after: str | None, limit: int,
) -> tuple[list[JobCheckpointModel], bool]:
    get(session=session, account=account, job_id=job_id)
    stmt = select(JobCheckpointModel).where(JobCheckpointModel.job_id == job_id)
    return page(session=session, stmt=stmt, id_column=JobCheckpointModel.id, after=after, limit=limit)
