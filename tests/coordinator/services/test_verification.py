"""`services/verification.py` on a real database: which jobs are verified, the verification lease (another
provider's worker, the held-out sample and the adapter as its inputs), the quorum of verifiers, and the money of
each outcome (training metered at the verdict, verifiers paid from the platform's verification book)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel, Book, JobCheckpointModel, JobModel, JobStatus, LeaseModel, UsageRecordModel, utcnow,
)
from coordinator.services import jobs, leases, ledger, reports, verification
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import NotFound
from shared.protocol import VerificationResult
from tests.fakes import ServiceAgent

Agents = Callable[..., ServiceAgent]
AGREE = {"heldout_base_loss": 3.0, "heldout_adapter_loss": 2.0, "heldout_tokens": 40, "valid_base_loss": 3.1,
         "valid_adapter_loss": 1.01, "valid_tokens": 30}
DISAGREE = {**AGREE, "valid_adapter_loss": 2.5}
REPORTED = 1.0  # the trainer's final validation loss


def fresh(session: Session, job: JobModel) -> JobModel:
    session.expire_all()
    row = session.get(JobModel, job.id)
    assert row is not None
    return row


def usage(session: Session, lease_id: str) -> UsageRecordModel | None:
    session.expire_all()
    return session.get(UsageRecordModel, lease_id)


def trained(service_agent: Agents, job: JobModel) -> tuple[ServiceAgent, str]:
    trainer = service_agent("trainer-pc")
    a = trainer.claim()
    assert a is not None and a.job_id == job.id and a.kind == "train" and a.held_out_url is None
    trainer.finish(a.lease_id, eval_loss=REPORTED)
    return trainer, a.lease_id


def verifier(service_agent: Agents, new_provider, name: str) -> tuple[ServiceAgent, str]:  # type: ignore[no-untyped-def]
    """A worker of a new provider holding the job's verification lease, ten minutes into it."""
    agent = service_agent(f"{name}-pc", provider=new_provider(name))
    a = agent.claim(kinds=["train", "verify"])
    assert a is not None and a.kind == "verify" and a.spec.kind == "verify"
    assert a.held_out_url and a.held_out_sha256 and a.adapter_url and a.adapter_sha256
    agent.events(a.lease_id, {"type": "started", "total_steps": 0})
    agent.session.execute(update(LeaseModel).where(LeaseModel.id == a.lease_id).values(
        training_started_at=utcnow() - timedelta(seconds=600)))
    agent.session.commit()
    return agent, a.lease_id


def test_the_held_out_sample_never_reaches_a_trainer(session: Session, big_job, store: BlobStore,  # type: ignore[no-untyped-def]
                                                     service_agent: Agents) -> None:
    job = big_job()
    assert job.held_out is not None and job.held_out["examples"] == 2 and job.held_out["training_examples"] == 38
    trainer = service_agent("trainer-pc")
    a = trainer.claim()
    assert a is not None and a.training_file_sha256 == job.held_out["training_sha256"]
    shipped = leases.lease_input(session=session, worker=trainer.worker, lease_id=a.lease_id, fencing_token=1,
                                 which="training")
    held = set(store.path(verification_key := f"jobs/{job.id}/held-out.jsonl").read_bytes().splitlines())
    assert len(held) == 2 and not held & set(store.path(shipped.key).read_bytes().splitlines())
    assert verification_key != shipped.key
    for which in ("held_out", "adapter"):
        with pytest.raises(NotFound):
            leases.lease_input(session=session, worker=trainer.worker, lease_id=a.lease_id, fencing_token=1, which=which)


def test_an_agreeing_verifier_releases_the_payment_and_the_job_succeeds_verified(
    session: Session, big_job, service_agent: Agents, new_provider, provider_account: AccountModel,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    _, training = trained(service_agent, job)
    waiting = fresh(session, job)
    assert (waiting.status, waiting.stage, waiting.result_files) == (JobStatus.queued, "verify", [])
    assert usage(session, training) is None  # metered at the verdict
    assert service_agent("other-pc").claim(kinds=["train", "verify"]) is None  # the trainer's own provider: never
    assert service_agent("old-agent", provider=new_provider("old")).claim() is None  # an agent that only trains
    agent, lease_id = verifier(service_agent, new_provider, "vera")
    agent.verify(lease_id, **AGREE)
    done = fresh(session, job)
    assert done.status is JobStatus.succeeded and done.verification["status"] == "passed"  # type: ignore[index]
    assert len(done.result_files) == 1 and done.fine_tuned_model
    charged = usage(session, training)
    assert charged is not None and charged.rule == "until_end"
    paid = usage(session, lease_id)
    assert paid is not None and (paid.charge_micros, paid.fee_micros) == (0, 0) and paid.provider_micros > 0
    assert ledger.balance(session, Book.verification, "") == -paid.provider_micros
    today = utcnow().date()
    report = reports.costs(session=session, start=today, end=today)
    assert report.verification == paid.provider_micros  # /admin/costs, "Verification (platform cost)"
    assert report.revenue == charged.fee_micros  # the platform's fee is not reduced by what verification cost
    assert ledger.audit(session).ok


def test_a_split_vote_asks_another_verifier_and_the_one_two_others_contradict_loses(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    trained(service_agent, job)
    liar, first = verifier(service_agent, new_provider, "liar")
    liar.verify(first, **DISAGREE)
    assert fresh(session, job).status is JobStatus.queued and usage(session, first) is None
    assert liar.claim(kinds=["train", "verify"]) is None  # it verified this adapter already
    honest, second = verifier(service_agent, new_provider, "honest")
    honest.verify(second, **AGREE)
    assert fresh(session, job).status is JobStatus.queued  # one against one: a single agreement does not overrule
    assert usage(session, second) is None
    third, last = verifier(service_agent, new_provider, "third")
    third.verify(last, **AGREE)
    assert fresh(session, job).status is JobStatus.succeeded
    overruled = usage(session, first)
    assert overruled is not None and (overruled.rule, overruled.provider_micros) == ("not_billed", 0)
    assert (liar.worker.failed_checks, liar.worker.completed_leases) == (1, 0)
    for lease_id in (second, last):
        paid = usage(session, lease_id)
        assert paid is not None and paid.provider_micros > 0
    assert ledger.audit(session).ok


def test_two_disagreeing_verifiers_refute_the_adapter_and_the_job_trains_again(
    session: Session, big_job, service_agent: Agents, new_provider, provider_account: AccountModel,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    trainer, training = trained(service_agent, job)
    session.execute(update(LeaseModel).where(LeaseModel.id == training).values(last_step=10))
    trainer_lease = session.get(LeaseModel, training)
    assert trainer_lease is not None
    verifiers = []
    for name in ("vera", "hugo"):
        agent, lease_id = verifier(service_agent, new_provider, name)
        agent.verify(lease_id, **DISAGREE)
        verifiers.append(agent)
    again = fresh(session, job)
    assert (again.status, again.stage, again.attempts) == (JobStatus.queued, "train", 1)
    assert again.verification["status"] == "failed" and again.excluded_providers == [provider_account.id]  # type: ignore[index]
    refuted = usage(session, training)
    assert refuted is not None and (refuted.rule, refuted.charge_micros, refuted.provider_micros) == ("not_billed", 0, 0)
    assert (trainer.worker.failed_checks, trainer.worker.completed_leases) == (1, 0)
    for lease_id in [v["lease_id"] for v in again.verification["verdicts"]]:  # type: ignore[index]
        paid = usage(session, lease_id)
        assert paid is not None and paid.provider_micros > 0  # both verifiers were right
    assert service_agent("trainer-2").claim() is None  # the refuted trainer's provider is off the job
    for agent in verifiers:  # they saw the held-out sample: they never train this job
        assert agent.claim(kinds=["train", "verify"]) is None
    assert ledger.audit(session).ok
    assert not session.scalars(select(JobCheckpointModel).where(
        JobCheckpointModel.lease_id == training, JobCheckpointModel.quarantined_at.is_(None))).all()


def test_which_jobs_are_chosen(session: Session, big_job, service_agent: Agents,  # type: ignore[no-untyped-def]
                               settings: CoordinatorSettings) -> None:
    job, worker = big_job(), service_agent().worker
    assert verification.chosen(job, worker, settings) is None  # share 0 here (tests/conftest.py), reliable worker
    assert verification.chosen(big_job(verification="always"), worker, settings) == "its customer asked for verification"
    worker.reliability = settings.verify_below_reliability - 0.01
    assert "below" in (verification.chosen(job, worker, settings) or "")
    worker.reliability = 0.99
    everything = settings.model_copy(update={"verify_share_bps": 10_000})
    assert "sampled" in (verification.chosen(job, worker, everything) or "")


def test_a_chosen_job_without_a_verifier_is_released_unverified_after_the_wait(
    session: Session, big_job, service_agent: Agents, settings: CoordinatorSettings, store: BlobStore,  # type: ignore[no-untyped-def]
    new_provider,
) -> None:
    sampled = settings.model_copy(update={"verify_share_bps": 10_000, "verify_wait_s": 1})
    away = service_agent("away-pc", provider=new_provider("vera"))
    assert away.claim(kinds=["train", "verify"]) is None  # another provider verifies, but never comes for this job
    job = big_job()
    trainer = service_agent("trainer-pc")
    a = trainer.claim()
    assert a is not None
    from tests.fakes import adapter_archive  # noqa: PLC0415

    trainer.settings = sampled
    trainer.progress(a.lease_id)
    trainer.upload_adapter(a.lease_id, adapter := adapter_archive())
    trainer.complete(a.lease_id, adapter, eval_loss=REPORTED)
    assert fresh(session, job).stage == "verify"
    assert verification.stop_waiting(session=session, store=store, settings=sampled) == 0  # not yet
    state = dict(fresh(session, job).verification or {})
    session.execute(update(JobModel).where(JobModel.id == job.id).values(
        verification={**state, "since": "2000-01-01T00:00:00+00:00"}))
    session.commit()
    assert verification.stop_waiting(session=session, store=store, settings=sampled) == 1
    done = fresh(session, job)
    assert done.status is JobStatus.succeeded and done.verification["status"] == "unverified"  # type: ignore[index]
    record = usage(session, a.lease_id)
    assert record is not None and record.rule == "until_end"


def test_a_platform_chosen_job_with_no_other_provider_verifying_goes_on_unverified(
    session: Session, big_job, service_agent: Agents, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    sampled = settings.model_copy(update={"verify_share_bps": 10_000})
    job = big_job()
    trainer = service_agent("trainer-pc")
    trainer.settings = sampled
    a = trainer.claim()
    assert a is not None
    trainer.finish(a.lease_id, eval_loss=REPORTED)
    done = fresh(session, job)
    assert done.status is JobStatus.succeeded and done.verification["status"] == "skipped"  # type: ignore[index]
    assert "no worker of another provider" in done.verification["reason"]  # type: ignore[index]


def test_cancelling_during_verification_bills_the_training_done(
    session: Session, big_job, service_agent: Agents, new_provider, customer_account: AccountModel,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    _, training = trained(service_agent, job)
    verifier(service_agent, new_provider, "vera")  # its lease is live when the customer cancels
    jobs.cancel(session=session, account=customer_account, job_id=job.id)
    assert fresh(session, job).status is JobStatus.cancelled
    record = usage(session, training)
    assert record is not None and record.rule == "until_end"
    assert ledger.audit(session).ok


def test_the_verdict_rule(settings: CoordinatorSettings) -> None:
    figures = VerificationResult.model_validate(AGREE)
    assert verification.compare({"final_eval_loss": REPORTED}, figures, settings) is None
    assert "no validation loss" in (verification.compare({}, figures, settings) or "")
    flat = VerificationResult.model_validate({**AGREE, "heldout_adapter_loss": 2.99})
    assert "does not improve" in (verification.compare({"final_eval_loss": REPORTED}, flat, settings, held_out=True)
                                  or "")
    # With a held-out sample, the validation rows (which the trainer had) never stand in for it.
    blind = VerificationResult.model_validate({**AGREE, "heldout_base_loss": None, "heldout_adapter_loss": None})
    assert "held-out sample are missing" in (verification.compare({"final_eval_loss": REPORTED}, blind, settings,
                                                                  held_out=True) or "")
    assert verification.compare({"final_eval_loss": REPORTED}, blind, settings) is None  # no sample: the rows
    gap = VerificationResult.model_validate({**AGREE, "valid_adapter_loss": None})
    assert "validation rows are missing" in (verification.compare({"final_eval_loss": REPORTED}, gap, settings,
                                                                  held_out=True) or "")
    assert "measured no loss" in (verification.compare({"final_eval_loss": REPORTED}, VerificationResult(), settings)
                                  or "")


def test_a_verifier_uploads_nothing_and_reports_no_training(session: Session, big_job, service_agent: Agents,  # type: ignore[no-untyped-def]
                                                            new_provider) -> None:
    from shared.errors import Conflict  # noqa: PLC0415
    from tests.fakes import adapter_archive  # noqa: PLC0415

    job = big_job(verification="always")
    trained(service_agent, job)
    agent, lease_id = verifier(service_agent, new_provider, "vera")
    for attempt in (lambda: agent.upload_adapter(lease_id, adapter_archive()),
                    lambda: agent.upload_checkpoint(lease_id, 1, b"x"),
                    lambda: agent.progress(lease_id, step=3)):
        with pytest.raises(Conflict) as refused:
            attempt()
        assert refused.value.code == "wrong_lease_kind"
    assert fresh(session, job).trained_tokens is None  # set when the adapter is confirmed, never by a verifier
    failed = agent.fail(lease_id, kind="user_error", message="your data is bad")  # a verifier has no such claim
    assert failed.lease.claim is None and fresh(session, job).excluded_providers is None


def test_a_failing_verifier_uses_no_attempt_and_is_off_the_job(session: Session, big_job, service_agent: Agents,  # type: ignore[no-untyped-def]
                                                              new_provider, settings: CoordinatorSettings) -> None:
    job = big_job(verification="always")
    _, training = trained(service_agent, job)
    for attempt in range(settings.max_attempts + 1):  # more failures than the job has attempts
        agent, lease_id = verifier(service_agent, new_provider, f"flaky{attempt}")
        agent.fail(lease_id, message="CUDA error")
        assert agent.claim(kinds=["train", "verify"]) is None
    waiting = fresh(session, job)
    assert (waiting.status, waiting.stage, waiting.attempts) == (JobStatus.queued, "verify", 0)
    assert usage(session, training) is None  # still waiting for a verdict, not lost


def test_a_verifier_neither_accrues_to_the_customer_nor_is_paid_past_what_verifying_takes(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    _, training = trained(service_agent, job)
    agent = service_agent("greedy-pc", provider=new_provider("greedy"), price="8.00")
    a = agent.claim(kinds=["train", "verify"])
    assert a is not None and a.kind == "verify"
    agent.events(a.lease_id, {"type": "started", "total_steps": 0})
    assert fresh(session, job).accruing_since is None  # the customer's cost does not run
    session.execute(update(LeaseModel).where(LeaseModel.id == a.lease_id).values(
        training_started_at=utcnow() - timedelta(hours=10)))
    session.commit()
    agent.verify(a.lease_id, wall_seconds=36_000.0, **AGREE)
    paid = usage(session, a.lease_id)
    trainer_ask = session.get(LeaseModel, training).ask_price_per_gpu_hour  # type: ignore[union-attr]
    from coordinator.services.metering import VERIFY_MIN_S  # noqa: PLC0415
    from shared.pricing import provider_earnings  # noqa: PLC0415

    assert paid is not None and paid.billable_seconds == VERIFY_MIN_S  # not ten hours: the tiny job's cap
    assert paid.provider_micros == provider_earnings(trainer_ask, VERIFY_MIN_S)  # at the trainer's ask, not $8


def test_figures_without_the_held_out_losses_disagree_and_never_fail_the_request(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    trained(service_agent, job)
    agent, lease_id = verifier(service_agent, new_provider, "vera")
    agent.verify(lease_id, **{**AGREE, "heldout_base_loss": None, "heldout_adapter_loss": None})
    [verdict] = fresh(session, job).verification["verdicts"]  # type: ignore[index]
    assert not verdict["agrees"] and "held-out sample are missing" in verdict["why"]


def test_a_job_under_verification_cannot_be_paused(session: Session, big_job, service_agent: Agents,  # type: ignore[no-untyped-def]
                                                   customer_account: AccountModel) -> None:
    from shared.errors import InvalidRequest  # noqa: PLC0415

    job = big_job(verification="always")
    trained(service_agent, job)
    with pytest.raises(InvalidRequest) as refused:
        jobs.pause(session=session, account=customer_account, job_id=job.id)
    assert "being verified" in refused.value.message


def test_a_verifier_that_fetched_the_held_out_sample_and_walked_away_never_verifies_nor_trains_the_job(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    trained(service_agent, job)
    leaker = new_provider("leaker")
    agent = service_agent("leaker-pc", provider=leaker)
    a = agent.claim(kinds=["train", "verify"])
    assert a is not None and a.kind == "verify"
    leases.lease_input(session=session, worker=agent.worker, lease_id=a.lease_id, fencing_token=a.fencing_token,
                       which="held_out")
    agent.preempted(a.lease_id)  # not a failure: still, it saw the sample and delivered nothing
    state = fresh(session, job).verification or {}
    assert leaker.id in state["never_trains"] and leaker.id in state["not_by"]
    assert service_agent("leaker-pc-2", provider=leaker).claim(kinds=["train", "verify"]) is None


def test_a_disputed_verification_is_not_released_by_the_wait_and_a_cancel_bills_nothing_of_it(
    session: Session, big_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
    store: BlobStore, customer_account: AccountModel,
) -> None:
    job = big_job()
    trainer = service_agent("trainer-pc")
    trainer.settings = sampled = settings.model_copy(update={"verify_share_bps": 10_000, "verify_wait_s": 1})
    away = service_agent("away-pc", provider=new_provider("away"))
    a = trainer.claim()
    assert a is not None
    assert away.claim(kinds=["train", "verify"]) is None  # registered as a verifier, nothing for it yet
    trainer.finish(a.lease_id, eval_loss=REPORTED)
    liar, first = verifier(service_agent, new_provider, "liar")
    liar.verify(first, **DISAGREE)
    state = dict(fresh(session, job).verification or {})
    session.execute(update(JobModel).where(JobModel.id == job.id).values(
        verification={**state, "since": "2000-01-01T00:00:00+00:00"}))
    session.commit()
    assert verification.stop_waiting(session=session, store=store, settings=sampled) == 0  # disputed: it waits
    jobs.cancel(session=session, account=customer_account, job_id=job.id)
    training = usage(session, a.lease_id)
    assert training is not None and (training.rule, training.charge_micros, training.provider_micros) == ("not_billed", 0, 0)
    assert ledger.audit(session).ok


def preempted_with_checkpoint(agent: ServiceAgent, job: JobModel) -> str:
    """`agent` trains the job for ten minutes, uploads a checkpoint and is preempted; its lease id."""
    a = agent.claim(kinds=["train"])
    assert a is not None and a.job_id == job.id and a.kind == "train"
    agent.progress(a.lease_id)
    agent.session.execute(update(LeaseModel).where(LeaseModel.id == a.lease_id).values(
        training_started_at=utcnow() - timedelta(seconds=600)))
    agent.session.commit()
    agent.upload_checkpoint(a.lease_id, 1, agent.checkpoint_for(a.lease_id, 1))
    agent.preempted(a.lease_id)
    return a.lease_id


def test_a_refuted_trainer_is_not_paid_for_the_checkpoint_it_preempted_with_either(
    session: Session, big_job, service_agent: Agents, new_provider, provider_account: AccountModel,  # type: ignore[no-untyped-def]
) -> None:
    from coordinator.services import replicas  # noqa: PLC0415

    job = big_job(verification="always")
    cheat = service_agent("trainer-pc")
    early = preempted_with_checkpoint(cheat, job)  # junk, paid until its checkpoint if nothing checked it
    assert usage(session, early) is None  # withheld until the training built on it is checked
    waiting = fresh(session, job)
    assert replicas.pending_charge(waiting) > 0  # committed: budgets and holds count it
    a = cheat.claim()
    assert a is not None and a.resume_from is not None
    cheat.finish(a.lease_id, eval_loss=REPORTED)
    for name in ("vera", "hugo"):
        agent, lease_id = verifier(service_agent, new_provider, name)
        agent.verify(lease_id, **DISAGREE)
    again = fresh(session, job)
    assert (again.status, again.stage) == (JobStatus.queued, "train")
    for lease_id in (early, a.lease_id):
        refused = usage(session, lease_id)
        assert refused is not None and (refused.rule, refused.charge_micros, refused.provider_micros) == (
            "not_billed", 0, 0)
    assert again.billed_micros == 0 and replicas.pending_charge(again) == 0
    assert not session.scalars(select(JobCheckpointModel).where(
        JobCheckpointModel.lease_id == early, JobCheckpointModel.quarantined_at.is_(None))).all()
    assert ledger.balance(session, Book.provider_payable, provider_account.id) == 0
    assert ledger.audit(session).ok


def test_an_honest_checkpoint_is_paid_when_the_adapter_built_on_it_is_verified(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    early = preempted_with_checkpoint(service_agent("early-pc", provider=new_provider("early")), job)
    assert usage(session, early) is None
    finisher = service_agent("trainer-pc")
    b = finisher.claim()
    assert b is not None and b.resume_from is not None
    finisher.finish(b.lease_id, eval_loss=REPORTED)
    agent, check = verifier(service_agent, new_provider, "vera")
    agent.verify(check, **AGREE)
    done = fresh(session, job)
    assert done.status is JobStatus.succeeded
    paid = usage(session, early)
    assert paid is not None and paid.rule == "until_checkpoint" and paid.provider_micros > 0
    assert done.billed_micros == paid.charge_micros + usage(session, b.lease_id).charge_micros  # type: ignore[union-attr]
    assert done.held_micros == 0 and ledger.audit(session).ok


def test_a_withheld_checkpoint_is_paid_when_the_job_ends_otherwise(
    session: Session, big_job, service_agent: Agents, new_provider, customer_account: AccountModel,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    early = preempted_with_checkpoint(service_agent("early-pc", provider=new_provider("early")), job)
    jobs.cancel(session=session, account=customer_account, job_id=job.id)
    paid = usage(session, early)
    assert paid is not None and paid.rule == "until_checkpoint" and paid.charge_micros > 0
    done = fresh(session, job)
    assert done.billed_micros == paid.charge_micros and done.held_micros == 0
    assert ledger.balance(session, Book.customer_held, customer_account.id) == 0 and ledger.audit(session).ok


def test_a_cancel_of_a_disputed_training_pays_none_of_the_withheld_checkpoints_it_was_built_on(
    session: Session, big_job, service_agent: Agents, new_provider, customer_account: AccountModel,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    other = preempted_with_checkpoint(service_agent("early-pc", provider=new_provider("early")), job)
    trainer = service_agent("trainer-pc")
    own = preempted_with_checkpoint(trainer, job)  # resumed from the early worker's checkpoint
    a = trainer.claim()
    assert a is not None and a.resume_from is not None
    trainer.finish(a.lease_id, eval_loss=REPORTED)
    doubter, check = verifier(service_agent, new_provider, "doubter")
    doubter.verify(check, **DISAGREE)
    jobs.cancel(session=session, account=customer_account, job_id=job.id)
    for lease_id in (other, own, a.lease_id):  # its whole lineage: no quorum cleared any of it
        unpaid = usage(session, lease_id)
        assert unpaid is not None and (unpaid.rule, unpaid.charge_micros, unpaid.provider_micros) == ("not_billed", 0, 0)
    assert fresh(session, job).held_micros == 0 and ledger.audit(session).ok
