"""`verification: "redundant"` on a real database (`services/replicas.py`, `verification._replicated`): the job
trains twice, from scratch, on two independent providers; each adapter is verified; the held-out losses are
compared; the customer pays both trainings only when they agree, and a worse one beyond the tolerance is neither
billed nor paid."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, Book, JobCheckpointModel, JobModel, JobStatus, LeaseModel, utcnow
from coordinator.services import files, jobs, ledger, quotes, replicas
from coordinator.services.metering import until_end_charge
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import InvalidRequest
from shared.schemas.jobs import JobCreate
from shared.schemas.quotes import QuoteCreate
from tests.conftest import chat_lines, jsonl
from tests.coordinator.services.test_verification import (
    AGREE, REPORTED, Agents, fresh, preempted_with_checkpoint, usage, verifier,
)


def train(agent, job: JobModel, *, checkpoint: bool = False) -> str:  # type: ignore[no-untyped-def]
    """One training of the job by `agent`, ten minutes long, from scratch; its lease id."""
    a = agent.claim()
    assert a is not None and a.job_id == job.id and a.kind == "train"
    assert a.resume_from is None  # a training never starts from another training's checkpoints
    agent.progress(a.lease_id)
    agent.session.execute(update(LeaseModel).where(LeaseModel.id == a.lease_id).values(
        training_started_at=utcnow() - timedelta(seconds=600)))
    agent.session.commit()
    if checkpoint:
        agent.upload_checkpoint(a.lease_id, 1, agent.checkpoint_for(a.lease_id, 1))
    agent.finish(a.lease_id, eval_loss=REPORTED)
    return a.lease_id


def checked(service_agent: Agents, new_provider, *names: str, **figures: float) -> list[str]:  # type: ignore[no-untyped-def]
    """The training under verification checked by a worker of a new provider per name, each measuring `figures`
    (over `AGREE`); their verification lease ids. Two that concur confirm a redundant training."""
    checks = []
    for name in names:
        agent, check = verifier(service_agent, new_provider, name)
        agent.verify(check, **{**AGREE, **figures})
        checks.append(check)
    return checks


def confirmed(service_agent: Agents, new_provider, job: JobModel) -> str:  # type: ignore[no-untyped-def]
    """The job's first training, by `trainer-pc`, confirmed by two verifiers of other providers; its lease id."""
    first = train(service_agent("trainer-pc"), job)
    checked(service_agent, new_provider, "vera", "vic")
    return first


def outcomes(job: JobModel) -> dict[str, str]:
    return {r["lease_id"]: r["outcome"] for r in replicas.of(job)}


def test_two_agreeing_trainings_are_both_paid_and_the_better_adapter_is_delivered(
    session: Session, big_job, service_agent: Agents, new_provider, provider_account: AccountModel,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="redundant")
    first_trainer = service_agent("trainer-pc")
    first = train(first_trainer, job, checkpoint=True)
    vera, check_first = verifier(service_agent, new_provider, "vera")
    vera.verify(check_first, **AGREE)
    assert fresh(session, job).stage == "verify" and usage(session, check_first) is None  # one measure is not enough
    checked(service_agent, new_provider, "vic")
    again = fresh(session, job)
    assert (again.status, again.stage, again.result_files) == (JobStatus.queued, "train", [])
    assert outcomes(again) == {first: "confirmed"}
    assert usage(session, first) is None  # waits for the other training
    assert usage(session, check_first) is not None  # the verifier is paid as usual
    pending = replicas.pending_charge(again)
    assert pending > 0 and again.held_micros >= pending
    assert all(c.blob_sha256 is None for c in session.query(JobCheckpointModel).filter_by(job_id=job.id))
    assert service_agent("trainer-pc-2").claim() is None  # the first trainer's provider never trains it again
    assert vera.claim() is None  # the verifier saw the held-out sample
    second = train(service_agent("bob-pc", provider=new_provider("bob")), job)
    assert fresh(session, job).stage == "verify"
    assert service_agent("trainer-pc-3").claim(kinds=["train", "verify"]) is None  # a rival does not judge it
    checked(service_agent, new_provider, "otto", "olga", heldout_adapter_loss=2.03)
    done = fresh(session, job)
    assert done.status is JobStatus.succeeded and done.verification["status"] == "passed"  # type: ignore[index]
    assert outcomes(done) == {first: "delivered", second: "settled"}
    assert done.result_files and replicas.pending_charge(done) == 0 and done.held_micros == 0
    for lease_id in (first, second):
        record = usage(session, lease_id)
        assert record is not None and record.rule == "until_end" and record.charge_micros > 0
    assert done.billed_micros == usage(session, first).charge_micros + usage(session, second).charge_micros  # type: ignore[union-attr]
    assert ledger.audit(session).ok


def test_a_training_worse_beyond_the_tolerance_is_not_paid_and_a_third_one_decides(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="redundant")
    first = confirmed(service_agent, new_provider, job)
    bob = service_agent("bob-pc", provider=new_provider("bob"))
    lazy = train(bob, job)  # a tenth of the steps: it improves on the base, but less
    checked(service_agent, new_provider, "otto", "olga", heldout_adapter_loss=2.5)
    again = fresh(session, job)
    assert (again.status, again.stage) == (JobStatus.queued, "train")
    assert outcomes(again) == {first: "confirmed", lazy: "refuted"}
    refused = usage(session, lazy)
    assert refused is not None and refused.rule == "not_billed" and refused.charge_micros == refused.provider_micros == 0
    session.refresh(bob.worker)
    assert bob.worker.failed_checks == 1
    third = train(service_agent("carl-pc", provider=new_provider("carl")), job)
    checked(service_agent, new_provider, "val", "vlad", heldout_adapter_loss=1.98)
    done = fresh(session, job)
    assert done.status is JobStatus.succeeded
    assert outcomes(done) == {first: "settled", lazy: "refuted", third: "delivered"}
    assert usage(session, first).rule == usage(session, third).rule == "until_end"  # type: ignore[union-attr]
    assert ledger.audit(session).ok


def test_a_cancel_while_the_second_training_runs_pays_the_confirmed_one(
    session: Session, big_job, service_agent: Agents, new_provider, customer_account: AccountModel,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="redundant")
    first = confirmed(service_agent, new_provider, job)
    a = service_agent("bob-pc", provider=new_provider("bob")).claim()
    assert a is not None
    jobs.cancel(session=session, account=customer_account, job_id=job.id)
    done = fresh(session, job)
    assert done.status is JobStatus.cancelled and outcomes(done) == {first: "settled"}
    assert usage(session, first).rule == "until_end" and done.held_micros == 0  # type: ignore[union-attr]
    assert ledger.balance(session, Book.customer_held, customer_account.id) == 0
    assert ledger.audit(session).ok


def test_redundant_needs_a_held_out_sample_and_is_quoted_twice(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Agents,
) -> None:
    service_agent("trainer-pc").claim()  # idle and placeable, so the quote has prices
    small = files.upload(session=session, store=store, account=customer_account, filename="small.jsonl",
                         purpose="fine-tune", source=io.BytesIO(jsonl(chat_lines(12))),
                         max_bytes=settings.max_upload_bytes, min_examples=settings.min_training_examples,
                         retention=timedelta(days=1))
    with pytest.raises(InvalidRequest) as refused:
        jobs.create(session=session, store=store, account=customer_account, settings=settings,
                    request=JobCreate(model="tunegrid/tiny-llama", training_file=small.id, verification="redundant"))
    assert refused.value.code == "too_few_examples_to_compare" and refused.value.param == "verification"
    asked = {"model": "tunegrid/tiny-llama", "training_tokens": 100_000}
    once = quotes.quote(session=session, account=customer_account, settings=settings, request=QuoteCreate(**asked))
    twice = quotes.quote(session=session, account=customer_account, settings=settings,
                         request=QuoteCreate(**asked, verification="redundant"))
    assert (once.trainings, twice.trainings) == (1, 2)
    assert once.cheapest is not None and twice.cheapest is not None
    assert float(twice.cheapest.estimated_cost) == pytest.approx(2 * float(once.cheapest.estimated_cost), abs=2e-6)
    priced = [(a, b) for a, b in zip(once.gpu_classes, twice.gpu_classes, strict=True) if a.estimated_cost_min]
    assert priced
    for a, b in priced:
        assert float(b.estimated_cost_min) == pytest.approx(2 * float(a.estimated_cost_min), abs=2e-6)  # type: ignore[arg-type]


def test_a_second_training_that_keeps_failing_delivers_the_confirmed_one_uncompared(
    session: Session, big_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
    store: BlobStore,
) -> None:
    job = big_job(verification="redundant")
    first = confirmed(service_agent, new_provider, job)
    for n in range(settings.max_attempts):
        flaky = service_agent(f"flaky-pc-{n}", provider=new_provider(f"flaky-{n}"))
        a = flaky.claim()
        assert a is not None and a.kind == "train"
        flaky.progress(a.lease_id)
        flaky.fail(a.lease_id)
    done = fresh(session, job)
    assert done.status is JobStatus.succeeded and done.error is None and done.fine_tuned_model
    assert outcomes(done) == {first: "delivered"} and done.verification["compared"] is False  # type: ignore[index]
    result = done.result_files[0]
    assert store.sha256(files.blob_key(result)) == session.get(LeaseModel, first).adapter_sha256  # type: ignore[union-attr]
    record = usage(session, first)
    assert record is not None and record.rule == "until_end" and record.charge_micros == until_end_charge(
        session.get(LeaseModel, first))  # type: ignore[arg-type]
    assert done.held_micros == 0 and ledger.audit(session).ok


def test_max_cost_reached_by_the_second_training_delivers_the_first_paid_in_full(
    session: Session, big_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    from coordinator.services import budgets  # noqa: PLC0415

    job = big_job(verification="redundant")
    first = confirmed(service_agent, new_provider, job)
    owed = replicas.pending_charge(fresh(session, job))
    budget = owed + owed // 4  # room for a quarter of the second training only
    session.execute(update(JobModel).where(JobModel.id == job.id).values(max_cost=budget))
    session.commit()
    bob = service_agent("bob-pc", provider=new_provider("bob"))
    a = bob.claim()
    assert a is not None
    bob.progress(a.lease_id)
    long_ago = utcnow() - timedelta(seconds=600)  # as long as the first: past the budget, no sweep having run
    session.execute(update(LeaseModel).where(LeaseModel.id == a.lease_id).values(training_started_at=long_ago))
    session.execute(update(JobModel).where(JobModel.id == job.id).values(accruing_since=long_ago))
    session.commit()
    assert budgets.enforce_budgets(session=session, settings=settings)["stopped"] == 1
    done = fresh(session, job)
    assert done.status is JobStatus.succeeded and outcomes(done) == {first: "delivered"}
    paid = usage(session, first)
    assert paid is not None and paid.charge_micros == owed and paid.provider_micros > 0  # the confirmed work in full
    cut = usage(session, a.lease_id)
    assert cut is not None and cut.charge_micros <= budget - owed
    assert done.billed_micros <= budget and ledger.audit(session).ok


def test_no_claim_of_bad_data_is_confirmed_once_a_training_on_it_was_confirmed(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="redundant")
    first = confirmed(service_agent, new_provider, job)
    for name in ("mallory", "mike"):  # two providers agree the data that just trained is bad
        liar = service_agent(f"{name}-pc", provider=new_provider(name))
        a = liar.claim()
        assert a is not None
        liar.progress(a.lease_id)
        liar.fail(a.lease_id, kind="user_error", message="the data is bad")
        record = usage(session, a.lease_id)
        assert record is not None and record.rule == "not_billed" and record.provider_micros == 0
    again = fresh(session, job)
    assert (again.status, again.error) == (JobStatus.queued, None)
    assert outcomes(again) == {first: "confirmed"} and usage(session, first) is None
    assert ledger.audit(session).ok


def test_a_verifier_that_fetched_only_the_adapter_never_trains_the_job_to_hand_in_a_copy(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    from coordinator.services import leases  # noqa: PLC0415

    job = big_job(verification="redundant")
    train(service_agent("trainer-pc"), job)
    rival = new_provider("copycat")
    copycat = service_agent("copycat-pc", provider=rival)
    a = copycat.claim(kinds=["train", "verify"])
    assert a is not None and a.kind == "verify"
    leases.lease_input(session=session, worker=copycat.worker, lease_id=a.lease_id, fencing_token=a.fencing_token,
                       which="adapter")  # the adapter, not the held-out sample: enough to hand in a copy
    copycat.preempted(a.lease_id)
    checked(service_agent, new_provider, "vera", "vic")
    assert fresh(session, job).stage == "train"  # the second training waits for a worker
    assert copycat.claim(kinds=["train", "verify"]) is None
    assert service_agent("copycat-pc-2", provider=rival).claim(kinds=["train", "verify"]) is None


def test_a_provider_that_trained_part_of_the_adapter_never_verifies_it(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    part = new_provider("early")
    early = service_agent("early-pc", provider=part)
    a = early.claim(kinds=["train"])
    assert a is not None and a.kind == "train"
    early.progress(a.lease_id)
    early.upload_checkpoint(a.lease_id, 1, early.checkpoint_for(a.lease_id, 1))
    early.preempted(a.lease_id)
    finisher = service_agent("trainer-pc")
    b = finisher.claim()
    assert b is not None and b.resume_from is not None  # it goes on from the early worker's checkpoint
    finisher.finish(b.lease_id, eval_loss=REPORTED)
    assert fresh(session, job).stage == "verify"
    assert early.claim(kinds=["train", "verify"]) is None
    assert service_agent("early-pc-2", provider=part).claim(kinds=["train", "verify"]) is None
    assert part.id in (fresh(session, job).verification or {})["not_by"]


def test_one_verifier_s_held_out_figure_alone_never_refutes_the_other_training(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="redundant")
    honest = confirmed(service_agent, new_provider, job)  # held-out loss 2.0, measured by two
    rival = train(service_agent("rival-pc", provider=new_provider("rival")), job)
    (flatterer,) = checked(service_agent, new_provider, "flatterer", heldout_adapter_loss=1.5)  # the rival's friend
    waiting = fresh(session, job)
    assert waiting.stage == "verify" and outcomes(waiting) == {honest: "confirmed"}  # nothing decided on one figure
    checked(service_agent, new_provider, "fair", heldout_adapter_loss=2.02)
    assert fresh(session, job).stage == "verify"  # 1.5 against 2.02: a third measures
    checked(service_agent, new_provider, "third", heldout_adapter_loss=2.03)
    done = fresh(session, job)
    assert done.status is JobStatus.succeeded and outcomes(done) == {honest: "delivered", rival: "settled"}
    overruled = usage(session, flatterer)
    assert overruled is not None and overruled.rule == "not_billed" and overruled.provider_micros == 0
    assert usage(session, honest).rule == "until_end"  # type: ignore[union-attr]
    assert ledger.audit(session).ok


def test_a_training_that_loses_the_comparison_is_not_paid_for_its_preempted_checkpoints(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="redundant")
    first = confirmed(service_agent, new_provider, job)
    bob = service_agent("bob-pc", provider=new_provider("bob"))
    early = preempted_with_checkpoint(bob, job)
    assert usage(session, early) is None
    a = bob.claim()
    assert a is not None and a.resume_from is not None  # its own checkpoint, of this training
    bob.finish(a.lease_id, eval_loss=REPORTED)
    lazy = a.lease_id
    checked(service_agent, new_provider, "otto", "olga", heldout_adapter_loss=2.5)
    again = fresh(session, job)
    assert outcomes(again) == {first: "confirmed", lazy: "refuted"}
    for lease_id in (early, lazy):
        refused = usage(session, lease_id)
        assert refused is not None and refused.rule == "not_billed" and refused.provider_micros == 0
    assert replicas.pending_charge(again) == replicas.waiting(again)[0]["charge"]
    assert ledger.audit(session).ok
