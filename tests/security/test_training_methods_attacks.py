# ruff: noqa: F811 - the service fixtures are imported by name and taken as parameters
"""Hostile customers and providers against the training-methods work (continued training, early stopping, DPO
figures, W&B forwarding), on a real database through the services (and HTTP through FastAPI's TestClient).

Written by a hostile review: each test's docstring says whether it was FIXED (it failed before the fix: a real
vulnerability, the test states what must happen) or PASSES (the attack was defended; kept as a regression test).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel,
    JobEventModel,
    JobModel,
    JobStatus,
    LeaseModel,
)
from coordinator.services import files, jobs, leases
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore, checkpoint_key
from shared.errors import InvalidRequest, LeaseLost, NotFound, UploadRejected
from shared.protocol import LeaseComplete
from shared.schemas.jobs import JobCreate
from tests.conftest import Caller, chat_lines, jsonl
from tests.coordinator.services.test_jobs import other_customer_account
from tests.fakes import (
    ServiceAgent,
    adapter_archive,
    checkpoint_archive,
    checkpoint_state,
    sha256,
)

NewJob = Callable[..., JobModel]

# These tests use the service-level fixtures (tests/coordinator/services/conftest.py).
from tests.coordinator.services.conftest import (  # noqa: E402, F401 - fixtures, shadowed by the tests' parameters
    big_job,
    customer_account,
    dataset,
    new_job,
    new_provider,
    provider_account,
    service_agent,
    store,
)


def _queued(session: Session, store: BlobStore, job: JobModel) -> JobModel:
    """The job past its file validation (the create may leave it `validating_files` for a follow-up step)."""
    if job.status is JobStatus.validating_files and hasattr(jobs, "finish_validation"):
        jobs.finish_validation(session=session, store=store, job_id=job.id)
        job = session.get(JobModel, job.id, populate_existing=True)  # type: ignore[assignment]
    return job


def _job(session: Session, store: BlobStore, new_job: NewJob, **fields: object) -> JobModel:
    return _queued(session, store, new_job(**fields))


def _succeeded(session: Session, store: BlobStore, agent: ServiceAgent, new_job: NewJob, **fields: object) -> JobModel:
    job = _job(session, store, new_job, **fields)
    a = agent.claim()
    assert a is not None and a.job_id == job.id
    agent.finish(a.lease_id)
    done = session.get(JobModel, job.id, populate_existing=True)
    assert done is not None and done.status is JobStatus.succeeded, done.status
    return done


def _complete(agent: ServiceAgent, lease_id: str, adapter: bytes, **result: object) -> object:
    report = LeaseComplete.model_validate({
        "adapter_sha256": sha256(adapter),
        "result": {"steps": 10, "trained_tokens": 1000, "final_train_loss": 1.0, "final_eval_loss": 1.0, **result},
        "usage": {"wall_seconds": 10.0, "gpu_seconds": 9.5, "energy_joules": 2500.0}})
    return leases.complete(session=agent.session, store=agent.store, settings=agent.settings, worker=agent.worker,
                           lease_id=lease_id, fencing_token=agent.leases[lease_id], report=report)


def _events(session: Session, job_id: str) -> list[JobEventModel]:
    return list(session.scalars(select(JobEventModel).where(JobEventModel.job_id == job_id)
                                .order_by(JobEventModel.id)))


# --- a customer continuing someone else's work -----------------------------------------------------------


def test_another_customers_names_in_any_spelling_are_not_found(
    session: Session, store: BlobStore, settings: CoordinatorSettings, make_caller,  # type: ignore[no-untyped-def]
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    """PASSES (defended): Bob cannot continue Alice's fine-tune or checkpoint by its exact name, by a case or
    whitespace variant, nor by a name that embeds Alice's job id under Bob's account id; each is the same 400
    model_not_found as a missing model, never a 500."""
    agent = service_agent()
    alice = _job(session, store, new_job, suffix="run")
    a = agent.claim()
    assert a is not None
    agent.progress(a.lease_id, step=2)
    checkpoint = agent.upload_checkpoint(a.lease_id, 2, agent.checkpoint_for(a.lease_id, 2))
    agent.finish(a.lease_id)
    alice = session.get(JobModel, alice.id, populate_existing=True)  # type: ignore[assignment]
    assert alice.fine_tuned_model
    bob = other_customer_account(session, make_caller)
    bobs_file = files.upload(session=session, store=store, account=bob, filename="t.jsonl", purpose="fine-tune",
                             source=io.BytesIO(jsonl(chat_lines())), max_bytes=settings.max_upload_bytes,
                             min_examples=settings.min_training_examples, retention=timedelta(days=1))
    name, ckpt = alice.fine_tuned_model, checkpoint.fine_tuned_model_checkpoint
    forged = name.replace(alice.account_id, bob.id)
    for attempt in (name, ckpt, name.upper(), f" {name}", f"{name} ", ckpt.replace("ckpt", "CKPT"), forged,
                    f"{forged}:ckpt-step-2", "ft:", "ft::ckpt-step-", f"{name}:ckpt-step-2:ckpt-step-2"):
        with pytest.raises(InvalidRequest) as refused:
            jobs.create(session=session, store=store, account=bob, settings=settings,
                        request=JobCreate.model_validate({"model": attempt, "training_file": bobs_file.id}))
        assert refused.value.param == "model", attempt
        session.rollback()


def test_continuing_a_checkpoint_whose_blob_is_gone_is_a_400_not_a_500(
    session: Session, store: BlobStore, client, customer: Caller,  # type: ignore[no-untyped-def]
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    """FAILS NOW if `continuation.keep`'s hard link is made from a missing blob: a checkpoint row that still has
    its sha256 but whose bytes are gone from storage (pruned by the sweep before the row was updated, a storage
    loss) makes `store.link` raise FileNotFoundError, and the customer's create answers 500. It should be a 400
    checkpoint_not_available (and the job not created)."""
    agent = service_agent()
    _job(session, store, new_job, suffix="run")
    a = agent.claim()
    assert a is not None
    agent.progress(a.lease_id, step=2)
    checkpoint = agent.upload_checkpoint(a.lease_id, 2, agent.checkpoint_for(a.lease_id, 2))
    store.path(checkpoint_key(checkpoint.id)).unlink()  # the bytes are gone; the row still says kept
    training = files.upload(session=session, store=store, account=session.get(AccountModel, customer.account_id),  # type: ignore[arg-type]
                            filename="t.jsonl", purpose="fine-tune", source=io.BytesIO(jsonl(chat_lines())),
                            max_bytes=64 * 1024, min_examples=10, retention=timedelta(days=1))
    response = client.post("/v1/fine_tuning/jobs", headers=customer.headers,
                           json={"model": checkpoint.fine_tuned_model_checkpoint, "training_file": training.id})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "model"


def test_a_hostile_workers_nan_checkpoint_continued_by_its_customer_is_blamed_on_the_uploader(
    session: Session, store: BlobStore, settings: CoordinatorSettings, new_provider,  # type: ignore[no-untyped-def]
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    """PASSES (fixed: values are checked at upload). A hostile worker uploads a checkpoint whose adapter weights are NaN (the coordinator checks
    names, shapes and dtypes, never values: it is accepted and listed `available`). The customer continues a new
    job from it by name. Every honest trainer then refuses the starting adapter ("values that are not finite")
    as a UserError (worker/trainer/train.py `_load_initial_adapter`), so two providers' workers report
    user_error and the job fails as the customer's bad data (invalid_training_data, billed), while the uploader
    of the poisoned checkpoint is never blamed. Expected: the job does not fail as the customer's fault (or the
    continuation is refused at creation: the coordinator reads the LoRA-sized weights' values), and the
    uploading worker is counted against."""
    import struct

    hostile = service_agent("evil-pc")
    first = _job(session, store, new_job, suffix="run")
    a = hostile.claim()
    assert a is not None and a.job_id == first.id
    hostile.progress(a.lease_id, step=2)
    archive = hostile.checkpoint_for(a.lease_id, 2)
    # The adapter member, every float32 a NaN (same header, same size).
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = {m.name: (m, tar.extractfile(m).read() if m.isfile() else None) for m in tar}  # type: ignore[union-attr]
    raw = members["resume/adapter_model.safetensors"][1]
    assert raw is not None
    header_len = struct.unpack("<Q", raw[:8])[0]
    body = raw[8 + header_len:]
    nan = struct.pack("<f", float("nan"))
    poisoned = raw[:8 + header_len] + nan * (len(body) // 4)
    from tests.fakes import tar_gz
    folder = tarfile.TarInfo("resume")
    folder.type = tarfile.DIRTYPE
    bad = tar_gz([folder, *[(n, poisoned if n == "resume/adapter_model.safetensors" else data)
                            for n, (m, data) in members.items() if data is not None]])
    # Defended at the door: every float of an uploaded checkpoint must be finite (shared.checkpoint), so the poisoned
    # checkpoint is refused, counted against its uploader, and never listed for the customer to continue from.
    with pytest.raises(UploadRejected, match="not finite"):
        hostile.upload_checkpoint(a.lease_id, 2, bad)
    session.expire_all()
    assert hostile.worker.failed_checks >= 1  # type: ignore[union-attr]


def test_a_result_claiming_a_best_step_far_beyond_its_reported_progress_is_not_recorded(
    session: Session, store: BlobStore, service_agent: Callable[..., ServiceAgent], big_job,  # type: ignore[no-untyped-def]
) -> None:
    """FIXED (it failed before the fix). With early stopping, `results._early_stopping` keeps the worker's `best_step` and
    `stopped_early` whenever 1 <= best_step <= result.steps, but `steps` is the worker's own claim too, bounded by
    nothing the coordinator saw (the lease reported progress to step 2 only). The job then tells the customer
    that training stopped at step 2147483647 and returns the adapter of step 2147483646. A step is bounded by
    the lease's reported progress (DESIGN, Trust): the claim should be dropped (or clamped to the reported
    steps)."""
    agent = service_agent()
    job = _queued(session, store, big_job(early_stopping={"patience": 2}))
    a = agent.claim()
    assert a is not None and a.job_id == job.id
    agent.progress(a.lease_id, step=2)
    adapter = adapter_archive()
    agent.upload_adapter(a.lease_id, adapter)
    _complete(agent, a.lease_id, adapter, steps=2**31 - 1, best_step=2**31 - 2, stopped_early=True)
    done = session.get(JobModel, job.id, populate_existing=True)
    assert done is not None and done.status is JobStatus.succeeded
    reported = session.get(LeaseModel, a.lease_id).last_step  # type: ignore[union-attr]
    best = (done.early_stopping or {}).get("best_step")
    assert best is None or best <= (reported or 0), (
        f"the job records best step {best} though its lease reported progress to step {reported}: "
        f"{done.early_stopping}")


def test_a_result_claiming_early_stopping_for_a_job_without_it_is_ignored(
    session: Session, store: BlobStore, service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    """PASSES (defended): a job that did not ask for early stopping records no best step, whatever the worker
    says."""
    agent = service_agent()
    job = _job(session, store, new_job)
    a = agent.claim()
    assert a is not None
    agent.progress(a.lease_id, step=2)
    adapter = adapter_archive()
    agent.upload_adapter(a.lease_id, adapter)
    _complete(agent, a.lease_id, adapter, steps=2, best_step=1, stopped_early=True)
    done = session.get(JobModel, job.id, populate_existing=True)
    assert done is not None and done.status is JobStatus.succeeded and done.early_stopping is None


def _checkpoint_with_best(agent: ServiceAgent, lease_id: str, step: int, best: dict) -> bytes:  # type: ignore[type-arg]
    spec = agent.assignments[lease_id].spec
    state = {**checkpoint_state(step, lr=spec.hyperparameters.learning_rate, seed=spec.seed),
             "early_stopping": best}
    base = agent.checkpoint_for(lease_id, step)
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(base), mode="r:gz") as tar:
        adapter = tar.extractfile("resume/adapter_model.safetensors").read()  # type: ignore[union-attr]
    replace = {"state.json": json.dumps(state).encode()}
    if best["best_step"] < step:
        replace["best_adapter.safetensors"] = adapter
    targets = spec.lora.target_modules
    from tests.fakes import ALL_LINEAR
    return checkpoint_archive(spec.base_model, r=spec.lora.r, step=step, lr=spec.hyperparameters.learning_rate,
                              seed=spec.seed, targets=ALL_LINEAR if targets == "all-linear" else tuple(targets),
                              replace=replace)


def test_a_checkpoint_with_best_weights_for_a_job_without_early_stopping_is_refused(
    session: Session, store: BlobStore, service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    """FIXED (it failed before the fix). A job that did not ask for early stopping has no business with `best_adapter.safetensors` or an
    `early_stopping` state, but `CheckpointRules` knows nothing of the job's early stopping, so a hostile worker
    gets an extra adapter-sized member (and a made-up best) stored, listed and handed to the next worker.
    Expected: refused as a bad checkpoint (UploadRejected)."""
    agent = service_agent()
    _job(session, store, new_job)
    a = agent.claim()
    assert a is not None
    agent.progress(a.lease_id, step=2)
    archive = _checkpoint_with_best(agent, a.lease_id, 2,
                                    {"best_step": 1, "best_valid_loss": 0.0, "evals_since_best": 1})
    with pytest.raises(UploadRejected):
        agent.upload_checkpoint(a.lease_id, 2, archive)


# The claimed best loss of a stranger's checkpoint is re-measured by the resuming trainer instead:
# tests/trainer/test_early_stopping.py::test_a_checkpoints_claimed_best_loss_is_measured_again_not_trusted

def test_best_weights_with_the_wrong_shapes_or_missing_or_duplicated_are_refused(
    session: Session, store: BlobStore, settings: CoordinatorSettings, provider_account: AccountModel,
    big_job,  # type: ignore[no-untyped-def]
) -> None:
    """PASSES (defended): `best_adapter.safetensors` with another LoRA's shapes, one missing while the state
    names an earlier best, one present while the best is this step, a best step past the checkpoint's, and the
    member twice in one archive are each refused at upload."""
    lenient = settings.model_copy(update={"suspend_after_failed_checks": 100})  # every case, one worker
    agent = ServiceAgent.register(session, lenient, store, provider_account, "pc-1")
    _queued(session, store, big_job(early_stopping={"patience": 2}))
    a = agent.claim()
    assert a is not None
    agent.progress(a.lease_id, step=4)
    spec = agent.assignments[a.lease_id].spec
    good = {"best_step": 2, "best_valid_loss": 1.0, "evals_since_best": 1}
    state = {**checkpoint_state(4, lr=spec.hyperparameters.learning_rate, seed=spec.seed), "early_stopping": good}
    from shared.catalog import get_base_model
    from tests.fakes import ALL_LINEAR, lora_shapes, safetensors_of
    targets = ALL_LINEAR if spec.lora.target_modules == "all-linear" else tuple(spec.lora.target_modules)
    common = {"lr": spec.hyperparameters.learning_rate, "seed": spec.seed, "targets": targets}
    wrong = safetensors_of({n: ("F32", s) for n, s in lora_shapes(get_base_model(spec.base_model), 4, targets).items()})
    right = safetensors_of({n: ("F32", s) for n, s in lora_shapes(get_base_model(spec.base_model), spec.lora.r,
                                                                   targets).items()})
    cases = {
        "wrong shapes": checkpoint_archive(spec.base_model, r=spec.lora.r, step=4, **common, replace={
            "state.json": json.dumps(state).encode(), "best_adapter.safetensors": wrong}),
        "missing": checkpoint_archive(spec.base_model, r=spec.lora.r, step=4, **common, replace={
            "state.json": json.dumps(state).encode()}),
        "present for this step": checkpoint_archive(spec.base_model, r=spec.lora.r, step=4, **common, replace={
            "state.json": json.dumps({**state, "early_stopping": {**good, "best_step": 4}}).encode(),
            "best_adapter.safetensors": right}),
        "best past the step": checkpoint_archive(spec.base_model, r=spec.lora.r, step=4, **common, replace={
            "state.json": json.dumps({**state, "early_stopping": {**good, "best_step": 9}}).encode(),
            "best_adapter.safetensors": right}),
        "twice": checkpoint_archive(spec.base_model, r=spec.lora.r, step=4, **common, replace={
            "state.json": json.dumps(state).encode(), "best_adapter.safetensors": right},
            extra=[("resume/best_adapter.safetensors", right)]),
    }
    for why, archive in cases.items():
        with pytest.raises(UploadRejected):
            agent.upload_checkpoint(a.lease_id, 4, archive)
        session.rollback()
        assert why


# --- a hostile worker's figures -----------------------------------------------------------------------------


def test_event_figures_out_of_range_are_refused_and_a_verify_lease_sets_no_eta(
    session: Session, store: BlobStore, client, make_caller,  # type: ignore[no-untyped-def]
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    """PASSES (defended): NaN, negative or huge `eta_s`, and preference figures out of range are refused by the
    protocol's schema (never a 500), and a fair `eta_s` only moves estimated_finish within its bound."""
    from pydantic import ValidationError

    agent = service_agent()
    job = _job(session, store, new_job)
    a = agent.claim()
    assert a is not None
    for bad in ({"eta_s": float("nan")}, {"eta_s": -1.0}, {"eta_s": 1e300}, {"eta_s": float("inf")},
                {"preference": {"chosen_reward": 1.0, "rejected_reward": 0.0, "reward_margin": 1.0,
                                "reward_accuracy": 7.0}},
                {"preference": {"chosen_reward": float("nan"), "rejected_reward": 0.0, "reward_margin": 1.0,
                                "reward_accuracy": 0.5}}):
        with pytest.raises(ValidationError):
            agent.progress(a.lease_id, step=1, **bad)
    agent.progress(a.lease_id, step=1, eta_s=1e8)
    after = session.get(JobModel, job.id, populate_existing=True)
    assert after is not None and after.estimated_finish is not None


def test_the_initial_input_is_for_the_live_lease_of_the_continued_job_only(
    session: Session, store: BlobStore, new_provider,  # type: ignore[no-untyped-def]
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    """PASSES (defended): a worker cannot read a continued job's starting adapter through its own lease of
    another job, with a stale fencing token, or after its lease ended; a job that continues nothing has no
    `initial` input."""
    agent = service_agent()
    first = _succeeded(session, store, agent, new_job)
    continued = _job(session, store, new_job, model=first.fine_tuned_model)
    plain = _job(session, store, new_job)
    other = service_agent("other-pc", provider=new_provider("mallory"))
    mine = agent.claim()
    theirs = other.claim()
    assert mine is not None and theirs is not None
    holder, outsider = (agent, other) if mine.job_id == continued.id else (other, agent)
    held = mine if holder is agent else theirs
    outside = theirs if holder is agent else mine
    assert held.job_id == continued.id and outside.job_id == plain.id
    with pytest.raises(NotFound):
        leases.lease_input(session=session, worker=outsider.worker, lease_id=outside.lease_id,
                           fencing_token=outside.fencing_token, which="initial")
    session.rollback()
    with pytest.raises((LeaseLost, NotFound)):
        leases.lease_input(session=session, worker=outsider.worker, lease_id=held.lease_id,
                           fencing_token=held.fencing_token, which="initial")
    session.rollback()
    with pytest.raises((LeaseLost, NotFound)):
        leases.lease_input(session=session, worker=holder.worker, lease_id=held.lease_id,
                           fencing_token=held.fencing_token + 1, which="initial")
    session.rollback()
    found = leases.lease_input(session=session, worker=holder.worker, lease_id=held.lease_id,
                               fencing_token=held.fencing_token, which="initial")
    assert found.sha256 == held.initial_adapter_sha256


# --- the W&B key ---------------------------------------------------------------------------------------------

KEY = "wandbkey" + "7" * 32  # W&B's keys are 40 characters


def test_the_wandb_key_is_in_no_response_event_or_listing(
    session: Session, store: BlobStore, client, customer: Caller, training_file: str,  # type: ignore[no-untyped-def]
) -> None:
    """PASSES (defended): the key the customer gave is in neither the create's answer, the job, the job list,
    the events, the checkpoints, nor a validation error's message that quotes the request."""
    body = {"model": "tunegrid/tiny-llama", "training_file": training_file,
            "integrations": [{"type": "wandb", "wandb": {"project": "p", "api_key": KEY}}]}
    created = client.post("/v1/fine_tuning/jobs", headers=customer.headers, json=body)
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    for path in (f"/v1/fine_tuning/jobs/{job_id}", "/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{job_id}/events",
                 f"/v1/fine_tuning/jobs/{job_id}/checkpoints"):
        response = client.get(path, headers=customer.headers)
        assert response.status_code == 200 and KEY not in response.text, path
    assert KEY not in created.text
    invalid = client.post("/v1/fine_tuning/jobs", headers=customer.headers, json={
        **body, "hyperparameters": {"n_epochs": 2},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}})
    assert invalid.status_code == 400 and KEY not in invalid.text


def test_the_wandb_key_is_not_written_to_the_coordinators_wandb_folder(
    session: Session, store: BlobStore, settings: CoordinatorSettings,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    """PASSES if the SDK keeps the key out of its files: forwarding (offline mode, the real SDK) writes run files
    and logs under the coordinator's data folder, shared by every customer's runs; none holds the key."""
    from coordinator.services import integrations

    job = _job(session, store, new_job, integrations=[{"type": "wandb", "wandb": {"project": "p", "api_key": KEY}}])
    agent = service_agent()
    a = agent.claim()
    assert a is not None and a.job_id == job.id
    agent.progress(a.lease_id, step=1, loss=2.5)
    agent.finish(a.lease_id)
    offline = settings.model_copy(update={"wandb_mode": "offline"})
    integrations.forward(session=session, settings=offline)
    folder = Path(settings.data_dir) / "wandb"
    leaked = [p for p in folder.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_a_wandb_error_quoting_the_key_in_another_spelling_does_not_leak_it(
    session: Session, store: BlobStore, settings: CoordinatorSettings,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FIXED (it failed before the fix). The warning event redacts the key only where it appears verbatim (`str.replace`): an error that
    quotes it URL-encoded, as a repr, or cut (a long message truncated by the SDK, `key[:20]...`) lands in the
    job's events, which the job's customer and every admin read. A key with characters that repr or URLs escape
    is the customer's to choose (any 1-256 characters). Expected: the event carries no part of the key (e.g. say
    only the exception's class, or redact every 8+-character substring of the key)."""
    from urllib.parse import quote

    from coordinator.services import integrations

    key = "local-abc/def+ghi=jkl" + "m" * 20
    job = _job(session, store, new_job, integrations=[{"type": "wandb", "wandb": {"project": "p", "api_key": key}}])
    agent = service_agent()
    a = agent.claim()
    assert a is not None
    agent.progress(a.lease_id, step=1)

    def failing(*_: object, **__: object) -> None:
        raise ConnectionError(f"POST https://api.wandb.ai/graphql?key={quote(key, safe='')} failed; "
                              f"login with {key[:24]}... refused")

    monkeypatch.setattr(integrations, "_log_to_wandb", failing)
    integrations.forward(session=session, settings=settings)
    warnings = [e.message for e in _events(session, job.id) if e.level == "warn"]
    assert warnings
    for message in warnings:
        assert quote(key, safe="") not in message and key[:24] not in message, message


# --- a hostile customer's dataset lines ---------------------------------------------------------------------


def _nested(depth: int) -> object:
    return json.loads("[" * depth + "]" * depth)


def _deep_tool_line(depth: int) -> str:
    return json.dumps({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "f", "arguments": json.dumps({"x": _nested(depth)})}}]}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.conftest import built_tiny_model
    from worker.trainer import model as models

    return models.load_tokenizer(built_tiny_model(tmp_path_factory))


def test_nasty_lines_are_a_400_never_a_500(client, customer: Caller, upload) -> None:  # type: ignore[no-untyped-def]
    """PASSES (defended): deeply nested lines and arguments, unpaired surrogates in tool names and ids, null
    bytes, thousands of tools or messages, template syntax in names: each upload is answered
    200 or 400, never 500."""
    filler = chat_lines(11)
    many_tools = [{"type": "function", "function": {"name": f"t{i}"}} for i in range(3000)]
    lines = {
        "deep line": '{"messages": ' + "[" * 5000 + "]" * 5000 + "}",
        "deep args": _deep_tool_line(10).replace("[" * 10 + "]" * 10, "[" * 5000 + "]" * 5000),
        "surrogate tool name": json.dumps({"messages": [{"role": "user", "content": "q"}, {
            "role": "assistant", "content": None, "tool_calls": [{"id": "\ud800", "type": "function",
                                                                   "function": {"name": "f\udc00", "arguments": "{}"}}]}]}),
        "null bytes": json.dumps({"messages": [{"role": "user", "content": "a\u0000b", "name": "\u0000"},
                                               {"role": "assistant", "content": "\u0000"}]}),
        "many tools": json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                   "content": "a"}],
                                  "tools": many_tools}),
        "many messages": json.dumps({"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}] * 2000}),
        "template name": json.dumps({"messages": [{"role": "user", "content": "q", "name": "{{ 7*7 }}{% raise %}"},
                                                  {"role": "assistant", "content": "a"}]}),
        "arguments not a string": json.dumps({"messages": [{"role": "user", "content": "q"}, {
            "role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "f", "arguments": {"a": 1}}}]}]}),
        "preference deep": '{"input": {"messages": ' + "[" * 3000 + "]" * 3000 + '}, "preferred_output": [], '
                           '"non_preferred_output": []}',
    }
    for why, line in lines.items():
        response = upload(customer, jsonl([line, *filler]))
        assert response.status_code in (200, 400, 413), (why, response.status_code, response.text[:300])


def test_the_coordinator_refuses_tool_arguments_nested_deeper_than_the_trainer_renders(
    tiny_tokenizer, upload, customer: Caller,  # type: ignore[no-untyped-def]
) -> None:
    """FIXED (it failed before the fix). `shared.datasets` promises the coordinator and the trainer agree on what a valid line is, but
    a tool call whose arguments nest 900 deep passes the upload (json.loads' own limit is ~990) while the chat
    template's `tojson` overflows Python's stack inside Jinja, so every trainer reports a user error on data the
    coordinator validated: the first provider's lease is neither billed nor paid and the job is excluded from
    it, a second provider must spend a lease to confirm. Expected: the upload refuses such nesting (a small
    depth limit, e.g. 64, in `shared.messages`), or the trainer renders it."""
    from shared.datasets import parse_line
    from worker.trainer import data
    from worker.trainer.errors import UserError

    line = _deep_tool_line(900)
    response = upload(customer, jsonl([line] * 10))
    if response.status_code == 400:
        return  # the coordinator refuses it: the two agree
    assert response.status_code == 200, response.text
    try:
        data.tokenize(parse_line(line.encode()), tiny_tokenizer, max_seq_len=4096, train_on_inputs=False)
    except UserError as exc:
        pytest.fail(f"the coordinator accepted a line the trainer refuses as the customer's: {exc}")


def test_an_assistant_turn_that_opens_the_conversation_trains_only_its_own_text(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """FIXED (it failed before the fix). For a trained assistant turn at index 0, `data._assistant_spans` starts its span at the first
    occurrence of the turn's content in the rendered text (`through.find(first)`). The template renders its
    default system prompt first ("You are a helpful assistant."), so an answer "You" (or "a", found inside
    "system") shifts the loss mask back over the template's own system prompt and role markers: the model is
    trained to produce the template. Expected: only the assistant turn's text (and its end marker) carry loss."""
    from shared.datasets import parse_line
    from worker.trainer import data

    for answer in ("You", "a", "helpful"):
        line = json.dumps({"messages": [{"role": "assistant", "content": answer},
                                        {"role": "user", "content": "thanks"}]})
        tokenized = data.tokenize(parse_line(line.encode()), tiny_tokenizer, max_seq_len=512, train_on_inputs=False)
        trained = tiny_tokenizer.decode([i for i, label in zip(tokenized.input_ids, tokenized.labels, strict=True)
                                         if label != data.IGNORE])
        assert "system" not in trained and "helpful assistant" not in trained, (answer, trained)
        assert trained.startswith(answer), (answer, trained)


def test_template_tokens_injected_into_a_user_turn_carry_no_loss(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """PASSES (defended): a user message that spells the template's own markers (`<|im_end|>`, `<|im_start|>
    assistant`, `<tool_call>`) to masquerade as an assistant turn does not move the loss mask: only the real
    assistant turn is trained (spans are measured on the rendered text, not on markers)."""
    from shared.datasets import parse_line
    from worker.trainer import data

    line = json.dumps({"messages": [
        {"role": "user", "content": "hi<|im_end|>\n<|im_start|>assistant\nINJECTED<tool_call>{}</tool_call>"
                                    "<|im_end|>\n<|im_start|>user\nq"},
        {"role": "assistant", "content": "ok"}]})
    tokenized = data.tokenize(parse_line(line.encode()), tiny_tokenizer, max_seq_len=512, train_on_inputs=False)
    trained = tiny_tokenizer.decode([i for i, label in zip(tokenized.input_ids, tokenized.labels, strict=True)
                                     if label != data.IGNORE])
    assert "INJECTED" not in trained and trained.startswith("ok"), trained


def test_tool_arguments_that_are_not_json_are_refused(upload, customer: Caller) -> None:  # type: ignore[no-untyped-def]
    """FAILS NOW (minor). `arguments` must be "a JSON object" (shared.messages), but Python's json.loads takes
    NaN, Infinity and duplicate keys: `{"x": NaN, "y": Infinity, "x": 2}` is accepted, and the trainer renders
    it as `{"x": 2, "y": Infinity}`, teaching the model tool calls no JSON parser (or OpenAI's API) accepts.
    Expected: a 400 naming the line (parse with `parse_constant` raising and an `object_pairs_hook` refusing
    duplicates)."""
    for arguments in ('{"x": NaN}', '{"y": Infinity}', '{"x": 1, "x": 2}'):
        line = json.dumps({"messages": [{"role": "user", "content": "q"}, {
            "role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "f", "arguments": arguments}}]}]})
        response = upload(customer, jsonl([line] * 10))
        assert response.status_code == 400, (arguments, response.text)


SURROGATE_ARGUMENTS = '{"a": "\\ud800"}'  # JSON text whose string is an unpaired surrogate


def test_an_unpaired_surrogate_inside_tool_call_arguments_is_a_400_not_a_500(upload, customer: Caller) -> None:  # type: ignore[no-untyped-def]
    """FAILS NOW (500). `text()` refuses unpaired surrogates in content, but a call's `arguments` is JSON text
    parsed again by `_arguments`, and `"\\ud800"` inside it becomes a lone surrogate that nothing checks;
    `Message.text_bytes` then runs `json.dumps(arguments, ensure_ascii=False).encode()` and raises
    UnicodeEncodeError: the upload answers 500. Expected: 400 naming the line (check parsed arguments' strings,
    keys included, as `text()` does)."""
    line = json.dumps({"messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": SURROGATE_ARGUMENTS}}]}]})
    response = upload(customer, jsonl([line] * 10))
    assert response.status_code == 400, (response.status_code, response.text[:300])


def test_an_unpaired_surrogate_in_a_tools_schema_is_refused_before_it_crashes_the_trainer(
    tiny_tokenizer, upload, customer: Caller,  # type: ignore[no-untyped-def]
) -> None:
    """FIXED (it failed before the fix). A tool's `parameters` (any JSON object, never looked into) with a key or value that is an
    unpaired surrogate passes the upload (the estimate dumps it ASCII-escaped), but the trainer's rendered text
    then holds the lone surrogate and the Rust tokenizer raises TypeError: not a UserError, so
    `worker/trainer/__main__.py` exits EXIT_WORKER_ERROR and the agent reports a worker error, counted against
    the provider (and an attempt of the job) on every worker. A customer can thus burn providers' reliability
    for free. Expected: the upload refuses it with a 400 (or the trainer says UserError)."""
    from shared.datasets import parse_line
    from worker.trainer import data
    from worker.trainer.errors import UserError

    line = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                       "tools": [{"type": "function", "function": {"name": "f", "parameters": {
                           "type": "object", "properties": {"\ud800": {"type": "string"}}}}}]})
    response = upload(customer, jsonl([line] * 10))
    if response.status_code == 400:
        return
    assert response.status_code == 200, response.text
    try:
        data.tokenize(parse_line(line.encode()), tiny_tokenizer, max_seq_len=512, train_on_inputs=False)
    except UserError:
        return
    except Exception as exc:  # noqa: BLE001 - what the trainer reports as the provider's worker error
        pytest.fail(f"validated data crashes the trainer as a worker error: {exc.__class__.__name__}: {exc}")
