"""Attacks by cheating providers on verification (`services/verification.py`, `replicas.py`, `placement.py`),
found by a hostile review, each failing before its fix: the held-out sample shared by jobs on the same data, a
junk checkpoint that honest finishers build on, a checkpoint nothing was built on, a verifier that makes its
figures up, a race between placement's look and its lock, a worker a verdict suspends; and attacks that were
already defended."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel,
    Book,
    JobCheckpointModel,
    JobModel,
    JobStatus,
    LeaseModel,
    LeaseStatus,
    utcnow,
)
from coordinator.services import jobs, leases, ledger, replicas
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.protocol import VerificationResult
from tests.coordinator.services.test_replicas import checked, confirmed, outcomes, train
from tests.coordinator.services.test_verification import (
    AGREE,
    DISAGREE,
    REPORTED,
    Agents,
    fresh,
    preempted_with_checkpoint,
    trained,
    usage,
    verifier,
)


def _resume(agent, job: JobModel, *, eval_loss: float = REPORTED):  # type: ignore[no-untyped-def]
    """`agent` claims the job's next training lease and finishes it; (lease id, the checkpoint it resumed from)."""
    a = agent.claim()
    assert a is not None and a.job_id == job.id and a.kind == "train"
    agent.finish(a.lease_id, eval_loss=eval_loss)
    return a.lease_id, (a.resume_from.checkpoint_id if a.resume_from else None)


# --- found by the review (each failed before its fix) ------------------------------------------------------------

def test_a_verifier_of_one_job_never_trains_another_that_holds_back_the_same_sample(
    session: Session, big_job, service_agent: Agents, new_provider, store: BlobStore,  # type: ignore[no-untyped-def]
) -> None:
    """held_out.keep_back seeds the sample with the FILE's sha256, so every job on that file (a customer's rerun
    with other hyperparameters, or another customer's upload of the same public dataset) keeps back the same
    examples. `never_trains` is per job: a verifier of job 1, which downloaded the held-out sample, is placed as the
    trainer of job 2 and can train on exactly the examples job 2's verifiers will measure it on (in redundant mode
    it then wins the comparison and the honest training is the one refuted)."""
    first = big_job(verification="always")
    trained(service_agent, first)
    spy, check = verifier(service_agent, new_provider, "spy")
    seen = leases.lease_input(session=session, worker=spy.worker, lease_id=check, fencing_token=spy.leases[check],
                              which="held_out")
    spy.verify(check, **AGREE)
    assert fresh(session, first).status is JobStatus.succeeded
    second = big_job(verification="redundant")  # the same customer reruns on the same file
    assert second.held_out is not None and second.held_out["sha256"] == seen.sha256  # the very same sample
    a = spy.claim(kinds=["train", "verify"])
    assert a is None, ("a provider that downloaded the held-out sample of job 1 was given the training of job 2, "
                       "which keeps back the very same examples")


def test_a_junk_checkpoint_an_honest_finisher_built_on_is_refuted_with_it_unpaid_and_never_handed_on(
    session: Session, big_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    """Withheld checkpoints (fix 4) are refuted only together with a training "of the same provider". A cheater who
    never finishes anything (it trains junk, uploads a checkpoint, is preempted: the first preemption is free) is
    never that provider: `_refuted` blames and quarantines only the LAST trainer, leaves the cheater's checkpoint
    resumable, so every next honest trainer resumes from the same junk and is refuted in turn (failed check, unpaid,
    excluded). After max_attempts refutations the job fails, and `settle_waiting` pays the cheater's withheld
    checkpoint: paid for the very work two verifiers refuted three times."""
    job = big_job(verification="always")
    cheat = service_agent("cheat-pc", provider=new_provider("cheat"))
    junk = preempted_with_checkpoint(cheat, job)
    [_junk_checkpoint] = session.scalars(select(JobCheckpointModel.id).where(JobCheckpointModel.lease_id == junk)).all()
    resumed = []
    honest = [service_agent("trainer-pc")] + [service_agent(f"honest-{n}-pc", provider=new_provider(f"honest-{n}"))
                                              for n in range(1, settings.max_attempts)]
    for n, finisher in enumerate(honest):
        _, checkpoint = _resume(finisher, job)
        resumed.append(checkpoint)
        checked(service_agent, new_provider, f"v{n}a", f"v{n}b", valid_adapter_loss=DISAGREE["valid_adapter_loss"])
    done = fresh(session, job)
    assert done.status is JobStatus.failed and done.attempts == settings.max_attempts
    # The first finisher resumed the cheater's checkpoint: across providers nobody is blamed. The next ones
    # trained from scratch (that checkpoint quarantined), so a refutation is their own work's.
    assert [finisher.worker.failed_checks for finisher in honest] == [0] + [1] * (len(honest) - 1)
    paid = usage(session, junk)
    assert ledger.audit(session).ok
    assert paid is None or paid.provider_micros == 0, (
        f"the cheater whose checkpoint every refuted adapter was built on is paid {paid.provider_micros} micro-$ "
        f"({paid.rule}); the honest finishers resumed from {resumed}")


def test_after_a_refutation_the_next_training_never_resumes_from_what_the_refuted_adapter_was_built_on(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    """The same flaw seen from placement: the refuted adapter was built on another provider's checkpoint, and that
    checkpoint is neither quarantined nor skipped, so the next training is handed it again."""
    job = big_job(verification="always")
    cheat = service_agent("cheat-pc", provider=new_provider("cheat"))
    junk = preempted_with_checkpoint(cheat, job)
    [junk_checkpoint] = session.scalars(select(JobCheckpointModel.id).where(JobCheckpointModel.lease_id == junk)).all()
    _, first_resume = _resume(service_agent("trainer-pc"), job)
    assert first_resume == junk_checkpoint
    checked(service_agent, new_provider, "vera", "vic", valid_adapter_loss=DISAGREE["valid_adapter_loss"])
    assert fresh(session, job).verification["status"] == "failed"  # type: ignore[index]
    nxt = service_agent("next-pc", provider=new_provider("next")).claim()
    assert nxt is not None and nxt.kind == "train"
    assert nxt.resume_from is None, "the next training resumes from the checkpoint the refuted adapter was built on"


def test_a_redundant_training_that_loses_the_comparison_pays_no_checkpoint_it_was_built_on(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    """Redundant mode: the second training is started by a cheater (junk, checkpoint, preempted) and finished by an
    honest worker from that checkpoint; the adapter's held-out loss is worse beyond the tolerance, so the training
    is refuted. Neither is paid; across providers neither is blamed."""
    job = big_job(verification="redundant")
    first = confirmed(service_agent, new_provider, job)
    cheat = service_agent("cheat-pc", provider=new_provider("cheat"))
    junk = preempted_with_checkpoint(cheat, job)
    bob = service_agent("bob-pc", provider=new_provider("bob"))
    worse, resumed = _resume(bob, job)
    assert resumed is not None
    checked(service_agent, new_provider, "otto", "olga", heldout_adapter_loss=2.5)
    again = fresh(session, job)
    assert outcomes(again) == {first: "confirmed", worse: "refuted"}
    assert bob.worker.failed_checks == 0 and usage(session, worse).provider_micros == 0  # type: ignore[union-attr]
    paid = usage(session, junk)
    assert ledger.audit(session).ok
    assert paid is None or paid.provider_micros == 0, (
        f"the checkpoint the refuted training was built on is paid {paid.provider_micros} micro-$ ({paid.rule})")


def test_a_withheld_checkpoint_the_coordinator_confirms_bad_is_never_paid(
    session: Session, big_job, service_agent: Agents, new_provider, store: BlobStore,  # type: ignore[no-untyped-def]
) -> None:
    """The next worker reports the checkpoint bad and the coordinator's recheck agrees (its stored bytes no longer
    match): the uploader's withheld pay is forfeit, however the job ends. (One merely set aside on a claim the
    coordinator cannot confirm is paid: `test_review2_16`.)"""
    from coordinator.storage import checkpoint_key  # noqa: PLC0415

    job = big_job(verification="always")
    cheat = service_agent("cheat-pc", provider=new_provider("cheat"))
    junk = preempted_with_checkpoint(cheat, job)
    [checkpoint] = session.scalars(select(JobCheckpointModel.id).where(JobCheckpointModel.lease_id == junk)).all()
    path = store.path(checkpoint_key(checkpoint))
    path.write_bytes(path.read_bytes()[:-100])
    b = service_agent("bob-pc", provider=new_provider("bob"))
    a = b.claim()
    assert a is not None and a.resume_from is not None and a.resume_from.checkpoint_id == checkpoint
    b.fail(a.lease_id, kind="bad_checkpoint", message="resume/: archive truncated")
    assert (fresh(session, job).verification or {})["withheld"][0]["forfeit"] is True
    _scratch, resumed = _resume(service_agent("trainer-pc"), job)
    assert resumed is None
    checked(service_agent, new_provider, "vera")
    assert fresh(session, job).status is JobStatus.succeeded
    forfeit = usage(session, junk)
    assert forfeit is not None and (forfeit.rule, forfeit.provider_micros) == ("not_billed", 0)
    assert ledger.audit(session).ok


def test_a_verifier_that_omits_the_validation_rows_the_trainer_reported_on_does_not_agree(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    """`compare` checks the verifier's validation loss against the trainer's reported one only `if
    figures.valid_tokens`. The trainer's claim is the only figure a verifier cannot make up without running the
    model (it never sees it); the held-out improvement it can invent blindly. So a verifier that reports
    valid_tokens=0 and any held-out pair 0.02 apart "agrees" with every adapter, junk included, is paid, and in
    "always" mode its lone agreement releases the trainer's pay."""
    job = big_job(verification="always")
    _, _training = trained(service_agent, job)  # the trainer reported final_eval_loss: it had validation rows
    lazy, check = verifier(service_agent, new_provider, "lazy")
    lazy.verify(check, heldout_base_loss=9.0, heldout_adapter_loss=1.0, heldout_tokens=1)  # made up, no model run
    done = fresh(session, job)
    [verdict] = done.verification["verdicts"]  # type: ignore[index]
    assert not verdict["agrees"], (f"figures without the validation rows the trainer reported a loss for were "
                                   f"accepted: job {done.status.value}, verifier paid "
                                   f"{usage(session, check).provider_micros if usage(session, check) else 0}")


def test_a_worker_a_refutation_suspends_loses_its_live_lease_on_another_job(
    session: Session, big_job, new_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    """A failed check that suspends a worker elsewhere ends its live leases (checkpoints.refuse, admin suspend:
    release_revoked). `work_refuted` (verification._refuted, _decide, _replicated) ignores its return value: the
    trainer suspended by the refutation finishes the job it took meanwhile, unverified, and is paid."""
    cheat = service_agent("cheat-pc", provider=new_provider("cheat"))
    session.execute(update(type(cheat.worker)).where(type(cheat.worker).id == cheat.worker_id).values(
        failed_checks=settings.suspend_after_failed_checks - 1, completed_leases=60))
    session.commit()
    from coordinator.services import worker_states

    worker_states._rescore(cheat.worker)
    session.commit()
    verified = big_job(verification="always")
    a = cheat.claim()
    assert a is not None and a.job_id == verified.id
    cheat.finish(a.lease_id, eval_loss=REPORTED)
    other = new_job()  # a job nobody verifies (share 0, a reliable-looking worker)
    b = cheat.claim()
    assert b is not None and b.job_id == other.id
    cheat.progress(b.lease_id)
    session.execute(update(LeaseModel).where(LeaseModel.id == b.lease_id).values(
        training_started_at=utcnow() - timedelta(seconds=600)))
    session.commit()
    checked(service_agent, new_provider, "vera", "vic", valid_adapter_loss=DISAGREE["valid_adapter_loss"])
    assert cheat.worker.suspended_at is not None  # the refutation suspended it
    try:
        cheat.finish(b.lease_id)
    except Exception:  # noqa: BLE001 - the defended outcome: its lease ended with the suspension
        return
    done = fresh(session, other)
    paid = usage(session, b.lease_id)
    assert done.status is not JobStatus.succeeded, (
        f"a worker suspended for refuted work finished another job and was paid "
        f"{paid.provider_micros if paid else 0} micro-$ for it")


def test_a_job_whose_stage_changes_between_placement_s_look_and_its_lock_is_judged_again(
    session: Session, big_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
    store: BlobStore, backend: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """placement.place_for_worker judges `eligible(requirements(job))` on the job as read WITHOUT a lock, then locks
    it (populate_existing: the row as it is now) and `_assign`s `kind=job.stage` without judging again. vera
    verified training 1 (in never_trains) and may verify training 2 (not_by is per training). If, between vera's
    look and its lock, training 2 loses the comparison (another process: `_next_replica`, stage "train"), vera is
    handed a TRAINING lease: the provider that saw the held-out sample trains the job (and is excluded nowhere)."""
    if backend != "postgresql":
        pytest.skip("two sessions at once: PostgreSQL")
    from coordinator.db.engine import make_engine, make_sessionmaker
    from coordinator.services import placement
    from tests.fakes import ServiceAgent

    job = big_job(verification="redundant")
    confirmed(service_agent, new_provider, job)  # vera and vic verified training 1
    train(service_agent("bob-pc", provider=new_provider("bob")), job)
    vera = service_agent("vera-pc-2", provider=session.scalars(select(AccountModel).where(
        AccountModel.name == "vera")).one())
    judges = [service_agent(f"{n}-pc", provider=new_provider(n)).worker_id for n in ("otto", "olga")]
    engine = make_engine(settings)
    other = make_sessionmaker(engine)()
    real, raced = placement.requirements, []

    def racing(j: JobModel, **known):  # type: ignore[no-untyped-def]
        req = real(j, **known)
        if j.id == job.id and not raced:
            raced.append(True)  # meanwhile, in another process: training 2 is measured worse by two verifiers
            for worker_id in judges:
                judge = ServiceAgent(session=other, settings=settings, store=store, worker_id=worker_id)
                a = judge.claim(kinds=["train", "verify"])
                assert a is not None and a.kind == "verify"
                judge.verify(a.lease_id, **{**AGREE, "heldout_adapter_loss": 2.5})
        return req

    monkeypatch.setattr(placement, "requirements", racing)
    try:
        got = vera.claim(kinds=["train", "verify"])
    finally:
        other.close()
        engine.dispose()
    assert raced and fresh(session, job).verification["status"] == "pending"  # type: ignore[index]
    assert got is None or got.kind != "train", (
        f"a provider in never_trains ({vera.worker.account_id}) was handed a training lease of the job")


# --- already defended ---------------------------------------------------------------------------------------------

def test_a_verifier_of_the_first_training_never_trains_the_third(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    """never_trains survives `begin()` rebuilding job.verification for the second training and the comparison."""
    job = big_job(verification="redundant")
    confirmed(service_agent, new_provider, job)  # verified by vera and vic
    train(service_agent("bob-pc", provider=new_provider("bob")), job)
    checked(service_agent, new_provider, "otto", "olga", heldout_adapter_loss=2.5)  # bob's loses: a third trains
    state = fresh(session, job).verification or {}
    assert state["status"] == "pending" and fresh(session, job).stage == "train"
    assert len(state["never_trains"]) == 4
    for name in ("vera", "vic", "otto", "olga"):
        agent = service_agent(f"{name}-pc-2", provider=session.scalars(select(AccountModel).where(
            AccountModel.name == name)).one())
        assert agent.claim(kinds=["train", "verify"]) is None


def test_a_verifier_that_preempts_its_lease_never_trains_the_job_after_a_refutation(
    session: Session, big_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    trained(service_agent, job)
    peeker = service_agent("peek-pc", provider=new_provider("peek"))
    a = peeker.claim(kinds=["train", "verify"])
    assert a is not None and a.kind == "verify"
    peeker.preempted(a.lease_id)  # walks away (it had the URLs)
    checked(service_agent, new_provider, "vera", "vic", valid_adapter_loss=DISAGREE["valid_adapter_loss"])
    assert fresh(session, job).stage == "train"
    assert peeker.claim(kinds=["train", "verify"]) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_figures_are_refused_by_the_protocol(bad: float) -> None:
    with pytest.raises(ValidationError):
        VerificationResult.model_validate({**AGREE, "heldout_adapter_loss": bad})


def test_a_redundant_job_paused_and_resumed_with_a_waiting_training_and_a_withheld_checkpoint_balances(
    session: Session, big_job, service_agent: Agents, new_provider, customer_account: AccountModel,  # type: ignore[no-untyped-def]
    settings: CoordinatorSettings,
) -> None:
    job = big_job(verification="redundant")
    first = confirmed(service_agent, new_provider, job)
    early = preempted_with_checkpoint(service_agent("p-pc", provider=new_provider("p")), job)
    paused = jobs.pause(session=session, account=customer_account, job_id=job.id)
    pending = replicas.pending_charge(fresh(session, job))
    assert pending > 0 and fresh(session, job).held_micros == pending  # only the waiting work stays held
    jobs.resume(session=session, account=customer_account, job_id=paused.id, settings=settings)
    jobs.cancel(session=session, account=customer_account, job_id=job.id)
    done = fresh(session, job)
    assert outcomes(done) == {first: "settled"} and usage(session, early).rule == "until_checkpoint"  # type: ignore[union-attr]
    assert done.held_micros == 0 and ledger.balance(session, Book.customer_held, customer_account.id) == 0
    assert ledger.audit(session).ok


def test_a_max_cost_below_the_waiting_charge_is_never_exceeded(
    session: Session, big_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    """A withheld checkpoint plus a waiting training plus a running one never bill past max_cost."""
    from coordinator.services import budgets

    job = big_job(verification="redundant")
    confirmed(service_agent, new_provider, job)
    preempted_with_checkpoint(service_agent("p-pc", provider=new_provider("p")), job)
    owed = replicas.pending_charge(fresh(session, job))
    session.execute(update(JobModel).where(JobModel.id == job.id).values(max_cost=owed + 1))
    session.commit()
    bob = service_agent("bob-pc", provider=new_provider("bob"))
    a = bob.claim()
    assert a is not None
    bob.progress(a.lease_id)
    long_ago = utcnow() - timedelta(seconds=900)
    session.execute(update(LeaseModel).where(LeaseModel.id == a.lease_id).values(training_started_at=long_ago))
    session.execute(update(JobModel).where(JobModel.id == job.id).values(accruing_since=long_ago))
    session.commit()
    budgets.enforce_budgets(session=session, settings=settings)
    done = fresh(session, job)
    assert done.status is JobStatus.succeeded and done.billed_micros <= owed + 1 and done.held_micros == 0
    assert session.get(LeaseModel, a.lease_id).status is LeaseStatus.cancelled  # type: ignore[union-attr]
    assert ledger.audit(session).ok


def test_a_provider_training_a_job_never_verifies_another_that_holds_back_the_same_sample_meanwhile(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    """A sweep: two jobs on the same file keep back the same sample. A provider training the second must not be
    handed the first's verification (and with it the sample, to train on) while that training runs."""
    first = big_job(verification="always")
    trained(service_agent, first)
    second = big_job()
    assert second.held_out == {**second.held_out, "sha256": first.held_out["sha256"]}  # type: ignore[index]
    sweeper = new_provider("sweeper")
    a = service_agent("sweep-1", provider=sweeper).claim(kinds=["train"])
    assert a is not None and a.job_id == second.id
    assert service_agent("sweep-2", provider=sweeper).claim(kinds=["train", "verify"]) is None
    fair, check = verifier(service_agent, new_provider, "fair")  # another provider verifies it as usual
    fair.verify(check, **AGREE)
    assert fresh(session, first).status is JobStatus.succeeded


def test_a_placement_pass_never_hands_a_sample_s_viewer_a_job_that_holds_it_back(
    session: Session, big_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    from coordinator.services.placement import place_queued_jobs  # noqa: PLC0415

    first = big_job(verification="always")
    trainer, _ = trained(service_agent, first)
    spy, check = verifier(service_agent, new_provider, "spy")
    spy.verify(check, **AGREE)
    for agent in (trainer, spy):
        assert agent.claim(kinds=["train", "verify"]) is None  # idle: nothing queued
    session.execute(update(type(trainer.worker)).where(type(trainer.worker).id == trainer.worker_id).values(
        state="offline"))  # only the spy is idle when the pass runs
    session.commit()
    second = big_job()  # the same file: the same held-out sample
    assert place_queued_jobs(session=session, settings=settings) == 0
    assert fresh(session, second).status is JobStatus.queued
    fair = service_agent("fair-pc", provider=new_provider("fair"))
    assert fair.claim(kinds=["train"]) is not None  # anyone else trains it
