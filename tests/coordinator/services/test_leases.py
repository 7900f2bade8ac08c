"""`services/leases.py`, the worker's side of a lease, called on a real database (no HTTP): claiming, events,
inputs, the adapter, and each way a worker finishes. Fencing: a stale token or someone else's lease is refused.
What the HTTP layer adds (headers, status codes, upload limits) is tests/coordinator/api/test_leases.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel, FileModel, JobCheckpointModel, JobEventModel, JobModel, JobStatus, LeaseModel, LeaseStatus, WorkerModel, WorkerState,
)
from coordinator.services import catalog, jobs, leases, worker_states
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import Conflict, InvalidRequest, LeaseLost, NotFound
from tests.fakes import ServiceAgent, adapter_archive, gpu, sha256

NewJob = Callable[..., JobModel]
Agents = Callable[..., ServiceAgent]


def placed(service_agent: Agents, new_job: NewJob, **fields: object) -> tuple[JobModel, ServiceAgent, str]:
    agent = service_agent()
    job = new_job(**fields)
    assignment = agent.claim()
    assert assignment is not None and assignment.job_id == job.id
    return job, agent, assignment.lease_id


def fresh(session: Session, job: JobModel) -> JobModel:
    session.expire_all()
    row = session.get(JobModel, job.id)
    assert row is not None
    return row


def test_a_claim_with_nothing_queued_hands_nothing_and_leaves_the_worker_placeable(service_agent: Agents, session: Session) -> None:
    agent = service_agent()
    assert agent.claim() is None
    worker = agent.worker
    assert worker.state is WorkerState.idle and worker.available_until is not None


def test_an_assignment_carries_the_spec_its_inputs_and_the_ask(service_agent: Agents, new_job: NewJob) -> None:
    job, agent, lease_id = placed(service_agent, new_job, suffix="demo", seed=7)
    a = agent.assignments[lease_id]
    assert a.fencing_token == 1 and a.resume_from is None and a.ask_price_per_gpu_hour == "0.300000"
    assert a.spec.job_id == job.id and a.spec.seed == 7 and a.spec.lora.alpha == 32
    assert a.spec.model_dir == "models/tunegrid/tiny-llama" and a.base_model_repo is None
    assert a.training_file_url == f"/v1/workers/leases/{lease_id}/files/training" and a.validation_file_url is None


def test_claiming_again_hands_the_same_assignment(service_agent: Agents, new_job: NewJob) -> None:
    _, agent, lease_id = placed(service_agent, new_job)
    again = agent.claim()
    assert again is not None and again.lease_id == lease_id and again.fencing_token == 1


def test_the_training_input_is_only_for_the_lease_holder(service_agent: Agents, new_job: NewJob, session: Session) -> None:
    job, agent, lease_id = placed(service_agent, new_job)
    found = leases.lease_input(session=session, worker=agent.worker, lease_id=lease_id, fencing_token=1, which="training")
    training = session.get(FileModel, job.training_file_id)
    assert training is not None and found.sha256 == training.sha256  # 12 examples: nothing kept back
    for which in ("validation", "held_out", "adapter"):  # the last two are a verification lease's only
        with pytest.raises(NotFound):
            leases.lease_input(session=session, worker=agent.worker, lease_id=lease_id, fencing_token=1, which=which)
    stranger = service_agent("pc-2")
    with pytest.raises(NotFound):
        leases.lease_input(session=session, worker=stranger.worker, lease_id=lease_id, fencing_token=1, which="training")


def test_events_become_the_jobs_metrics_events(service_agent: Agents, new_job: NewJob, session: Session) -> None:
    job, agent, lease_id = placed(service_agent, new_job)
    f = agent.events(lease_id, {"type": "started", "total_steps": 10},
                     {"type": "progress", "step": 3, "total_steps": 10, "train_loss": 2.5, "tokens_per_s": 180},
                     {"type": "eval", "step": 3, "eval_loss": 2.7})
    assert f.lease.status is LeaseStatus.running and f.lease.last_step == 3 and f.lease.training_started_at is not None
    metrics = session.scalars(select(JobEventModel).where(JobEventModel.job_id == job.id, JobEventModel.type == "metrics")
                              .order_by(JobEventModel.id)).all()
    assert {"step": 3, "total_steps": 10, "train_loss": 2.5, "tokens_per_s": 180.0}.items() <= metrics[0].data.items()
    assert metrics[1].data["valid_loss"] == 2.7


def test_events_sent_again_after_an_agent_restart_are_recorded_once(service_agent: Agents, new_job: NewJob,
                                                                      session: Session) -> None:
    """The agent cannot know whether its last call was recorded before it died: it sends from its last
    acknowledged place again, and the coordinator drops what it already has by `seq`."""
    job, agent, lease_id = placed(service_agent, new_job)
    agent.events(lease_id, {"type": "progress", "step": 1, "train_loss": 2.5, "seq": 40},
                 {"type": "progress", "step": 2, "train_loss": 2.4, "seq": 80})
    agent.events(lease_id, {"type": "progress", "step": 2, "train_loss": 2.4, "seq": 80},
                 {"type": "eval", "step": 2, "eval_loss": 2.6, "seq": 120},
                 {"type": "progress", "step": 3, "train_loss": 2.3, "seq": 160})
    f = agent.events(lease_id, {"type": "progress", "step": 1, "train_loss": 2.5, "seq": 40})
    metrics = session.scalars(select(JobEventModel).where(JobEventModel.job_id == job.id, JobEventModel.type == "metrics")
                              .order_by(JobEventModel.id)).all()
    assert [(m.data["step"], "valid_loss" in m.data) for m in metrics] == [(1, False), (2, False), (2, True), (3, False)]
    assert f.lease.events_seq == 160 and f.lease.last_step == 3


def test_a_step_past_what_the_job_can_have_is_refused(service_agent: Agents, new_job: NewJob) -> None:
    _, agent, lease_id = placed(service_agent, new_job)
    with pytest.raises(InvalidRequest) as refused:
        agent.progress(lease_id, step=10**9)
    assert refused.value.code == "implausible_step"


def test_a_good_checkpoint_is_recorded_with_the_metrics_of_its_step(service_agent: Agents, new_job: NewJob,
                                                                     session: Session) -> None:
    job, agent, lease_id = placed(service_agent, new_job)
    agent.progress(lease_id, step=5, loss=1.5)
    checkpoint = agent.upload_checkpoint(lease_id, 5, agent.checkpoint_for(lease_id, 5))
    assert checkpoint.step_number == 5 and checkpoint.metrics["train_loss"] == 1.5
    assert [c.step_number for c in session.scalars(select(JobCheckpointModel).where(
        JobCheckpointModel.job_id == job.id))] == [5]


def test_completion_makes_the_adapter_a_result_file_and_the_model_usable(
    service_agent: Agents, new_job: NewJob, session: Session, store: BlobStore, customer_account,  # type: ignore[no-untyped-def]
) -> None:
    job, agent, lease_id = placed(service_agent, new_job, suffix="sums")
    f = agent.finish(lease_id)
    assert f.lease.status is LeaseStatus.completed and f.job.status is JobStatus.succeeded
    done = fresh(session, job)
    assert done.fine_tuned_model == f"ft:tunegrid/tiny-llama:{job.account_id}:sums:{job.id}"
    [file_id] = done.result_files
    file = session.get(FileModel, file_id)
    assert file is not None and file.purpose == "fine-tune-results" and file.sha256 == sha256(adapter_archive())
    assert store.sha256(f"files/{file_id}") == file.sha256
    assert done.fine_tuned_model in [m.id for m in catalog.list_models(session=session, account=customer_account)]
    worker = agent.worker
    assert worker.completed_leases == 1 and worker.state is WorkerState.idle and worker.reliability > 0.9


def test_completion_reported_twice_answers_the_same(service_agent: Agents, new_job: NewJob) -> None:
    _, agent, lease_id = placed(service_agent, new_job)
    first = agent.finish(lease_id)
    second = agent.complete(lease_id, adapter_archive())
    assert (first.lease.id, first.lease.status) == (second.lease.id, second.lease.status)
    with pytest.raises(LeaseLost):  # a different ending of the same lease is not the same report
        agent.fail(lease_id)


def test_completion_without_an_adapter_is_a_conflict(service_agent: Agents, new_job: NewJob) -> None:
    _, agent, lease_id = placed(service_agent, new_job)
    with pytest.raises(Conflict) as conflict:
        agent.complete(lease_id, adapter_archive())
    assert conflict.value.code == "adapter_missing"


def test_a_completion_naming_another_adapter_is_refused(service_agent: Agents, new_job: NewJob) -> None:
    _, agent, lease_id = placed(service_agent, new_job)
    agent.progress(lease_id)
    agent.upload_adapter(lease_id, adapter_archive())
    with pytest.raises(InvalidRequest) as refused:
        agent.complete(lease_id, adapter_archive(r=8))
    assert refused.value.code == "sha256_mismatch"


def test_a_tampered_adapter_fails_the_lease_counts_against_the_worker_and_requeues(
    service_agent: Agents, new_job: NewJob, session: Session,
) -> None:
    job, agent, lease_id = placed(service_agent, new_job)
    wrong_rank = adapter_archive(r=8, alpha=32)
    agent.progress(lease_id)
    agent.upload_adapter(lease_id, wrong_rank)
    f = agent.complete(lease_id, wrong_rank)
    assert f.lease.status is LeaseStatus.failed and "r/alpha" in (f.lease.end_reason or "")
    assert fresh(session, job).status is JobStatus.queued
    worker = agent.worker
    assert worker.failed_checks == 1 and worker.reliability < 0.9


def test_an_adapter_without_any_progress_is_refused(service_agent: Agents, new_job: NewJob) -> None:
    _, agent, lease_id = placed(service_agent, new_job)
    adapter = adapter_archive()
    agent.upload_adapter(lease_id, adapter)
    f = agent.complete(lease_id, adapter)
    assert f.lease.status is LeaseStatus.failed and "no training progress" in (f.lease.end_reason or "")


def test_a_second_adapter_upload_replaces_the_first(service_agent: Agents, new_job: NewJob, store: BlobStore) -> None:
    _, agent, lease_id = placed(service_agent, new_job)
    first = agent.upload_adapter(lease_id, adapter_archive(r=8)).adapter_key
    second = agent.upload_adapter(lease_id, adapter_archive()).adapter_key
    assert first != second and not store.path(first).exists() and store.path(second).exists()


def test_a_user_error_is_a_claim_the_job_retries_on_another_providers_worker(
    service_agent: Agents, new_job: NewJob, new_provider, session: Session,  # type: ignore[no-untyped-def]
) -> None:
    job, agent, lease_id = placed(service_agent, new_job)
    f = agent.fail(lease_id, kind="user_error", message="line 3: no assistant message")
    assert f.lease.claim == "user_error" and f.job.status is JobStatus.queued and f.job.error is None
    worker = agent.worker
    assert worker.unconfirmed_claims == 1 and worker.reliability < worker_states.reliability(
        completed=0, lost=0, failed_checks=0)
    assert service_agent("pc-2").claim() is None  # the same provider's other machine is no second opinion
    other = service_agent("pc-3", provider=new_provider("quinn")).claim()
    assert other is not None and other.job_id == job.id


def test_a_user_error_a_second_provider_confirms_fails_the_job_as_the_customers(
    service_agent: Agents, new_job: NewJob, new_provider, session: Session,  # type: ignore[no-untyped-def]
) -> None:
    job, agent, lease_id = placed(service_agent, new_job)
    agent.fail(lease_id, kind="user_error", message="line 3: no assistant message")
    second = service_agent("pc-3", provider=new_provider("quinn"))
    a = second.claim()
    assert a is not None
    f = second.fail(a.lease_id, kind="user_error", message="line 3: no assistant message")
    assert f.job.status is JobStatus.failed and f.lease.claim is None
    error = fresh(session, job).error
    assert error is not None and error["code"] == "invalid_training_data" and "line 3" in error["message"]
    assert agent.worker.unconfirmed_claims == 0  # confirmed: the first claim no longer counts against it


def test_preempting_the_same_job_twice_strikes_and_takes_it_off_that_worker(
    service_agent: Agents, new_job: NewJob, session: Session,
) -> None:
    job, agent, lease_id = placed(service_agent, new_job)
    agent.preempted(lease_id)
    assert agent.worker.preemption_strikes == 0  # the owner's right, once
    again = agent.claim()
    assert again is not None and again.job_id == job.id
    agent.preempted(again.lease_id)
    worker = agent.worker
    assert worker.preempted_leases == 2 and worker.preemption_strikes == 1
    assert worker.reliability == pytest.approx(worker_states.reliability(completed=0, lost=1, failed_checks=0))
    assert fresh(session, job).excluded_workers == [worker.id]
    assert agent.claim() is None
    other = service_agent("pc-2").claim()
    assert other is not None and other.job_id == job.id


def test_a_worker_that_preempts_most_of_its_leases_is_struck(
    service_agent: Agents, new_job: NewJob, session: Session, customer_account: AccountModel,
) -> None:
    agent = service_agent()
    strikes = []
    for _ in range(worker_states.MOST_LEASES_AFTER + 1):
        job = new_job()
        a = agent.claim()
        assert a is not None and a.job_id == job.id
        agent.preempted(a.lease_id)
        jobs.cancel(session=session, account=customer_account, job_id=job.id)  # the next claim takes a new job
        strikes.append(agent.worker.preemption_strikes)
    assert strikes == [0, 0, 0, 1, 2]  # from its 4th lease, all preempted: each one more is a strike


def test_worker_errors_requeue_until_max_attempts(service_agent: Agents, new_job: NewJob, session: Session,
                                                  settings: CoordinatorSettings) -> None:
    job = new_job()
    for attempt in range(1, settings.max_attempts + 1):
        agent = service_agent(f"pc-{attempt}")
        a = agent.claim()
        assert a is not None and a.fencing_token == attempt
        agent.fail(a.lease_id, message="CUDA error: an illegal memory access")
        assert agent.worker.lost_leases == 1
    done = fresh(session, job)
    assert done.status is JobStatus.failed and done.error is not None and done.error["code"] == "worker_error"


def test_preemption_requeues_without_using_an_attempt(service_agent: Agents, new_job: NewJob, session: Session) -> None:
    job, agent, lease_id = placed(service_agent, new_job)
    f = agent.preempted(lease_id, reason="a game started")
    assert f.lease.status is LeaseStatus.preempted
    worker = agent.worker
    assert worker.state is WorkerState.paused and worker.pause_reason == "a game started" and worker.lost_leases == 0
    done = fresh(session, job)
    assert done.status is JobStatus.queued and done.attempts == 0


def test_a_stale_token_or_anothers_lease_is_refused(service_agent: Agents, new_job: NewJob) -> None:
    _, agent, lease_id = placed(service_agent, new_job)
    with pytest.raises(LeaseLost):
        agent.events(lease_id, {"type": "log", "message": "hi"}, token=2)
    other = service_agent("pc-9")
    other.leases[lease_id] = 1
    with pytest.raises(NotFound):
        other.events(lease_id, {"type": "log", "message": "x"})
    with pytest.raises(NotFound):
        other.complete(lease_id, adapter_archive())


def test_too_big_a_job_waits_for_a_card_that_holds_it(service_agent: Agents, new_job: NewJob) -> None:
    small = service_agent("pc-small", gpus=[gpu("NVIDIA GeForce RTX 3070", 8, "8.6")])
    job = new_job(model="llama-3.1-8b-instruct")
    assert small.claim() is None
    big = service_agent("pc-big", gpus=[gpu("NVIDIA GeForce RTX 4090", 24, "8.9", uuid="GPU-big")])
    a = big.claim()
    assert a is not None and a.job_id == job.id


def test_a_lease_keeps_the_prices_fixed_at_placement(service_agent: Agents, new_job: NewJob, session: Session) -> None:
    _, _, lease_id = placed(service_agent, new_job)
    lease = session.get(LeaseModel, lease_id)
    assert lease is not None and lease.ask_price_per_gpu_hour == 300_000 and lease.price_per_gpu_hour == 360_000
    assert lease.status is LeaseStatus.running and lease.claimed_at is not None


def test_a_suspended_worker_is_handed_nothing(service_agent: Agents, new_job: NewJob, session: Session) -> None:
    agent = service_agent()
    worker = session.get(WorkerModel, agent.worker_id)
    assert worker is not None
    worker_states.suspend(session, worker, reason="testing")
    session.commit()
    new_job()
    assert agent.claim() is None


@pytest.mark.parametrize("saved,completes", [(4, True), (2, False)], ids=["at the end", "mid-training"])
def test_a_lease_resumed_from_the_last_checkpoint_completes_with_the_progress_that_led_to_it(
    session: Session, settings: CoordinatorSettings, service_agent: Agents, new_job: NewJob, saved: int,
    completes: bool,
) -> None:
    """The checkpoint at the last step its lease announced leaves the next lease nothing to train: its adapter
    is checked against the earlier lease's losses. A checkpoint short of the end leaves steps to report."""
    from coordinator.services.lease_states import reap  # noqa: PLC0415
    from tests.coordinator.services.test_lease_states import silence  # noqa: PLC0415

    job, first, lease_id = placed(service_agent, new_job)
    first.events(lease_id, {"type": "started", "total_steps": 4})
    first.progress(lease_id, step=saved, loss=2.0, total_steps=4)
    first.upload_checkpoint(lease_id, saved, first.checkpoint_for(lease_id, saved))
    silence(session, lease_id, settings.lease_grace_s + 1)
    assert reap(session=session, settings=settings)["lost"] == 1
    second = service_agent("pc-2")
    b = second.claim()
    assert b is not None and b.resume_from is not None and b.resume_from.step == saved
    second.events(b.lease_id, {"type": "started", "total_steps": 4, "step": saved})
    adapter = adapter_archive()
    second.upload_adapter(b.lease_id, adapter)
    f = second.complete(b.lease_id, adapter, loss=2.0)
    assert (f.lease.status is LeaseStatus.completed) is completes, f.lease.end_reason
    assert (fresh(session, job).status is JobStatus.succeeded) is completes


def test_the_trainers_eta_becomes_the_jobs_estimated_finish_until_the_lease_ends(
    service_agent: Agents, new_job: NewJob, session: Session,
) -> None:
    from datetime import timedelta  # noqa: PLC0415

    from coordinator.db.tables import JobModel, utcnow  # noqa: PLC0415

    job = new_job()
    agent = service_agent()
    a = agent.claim()
    assert a is not None
    before = utcnow()
    agent.progress(a.lease_id, step=1, eta_s=600.0)
    row = session.get(JobModel, job.id, populate_existing=True)
    assert row is not None and row.estimated_finish is not None
    finish = row.estimated_finish if row.estimated_finish.tzinfo else row.estimated_finish.replace(tzinfo=before.tzinfo)
    assert before + timedelta(seconds=599) <= finish <= utcnow() + timedelta(seconds=601)
    agent.preempted(a.lease_id)
    assert session.get(JobModel, job.id, populate_existing=True).estimated_finish is None  # type: ignore[union-attr]
