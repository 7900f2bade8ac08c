"""A second hostile review of verification, against the first review's fixes: one placement pass or two machines
claiming at once splitting a held-out sample, a rival's unconfirmable claim, blame across a refuted lineage, a
verdict's suspension (every machine of the provider, unpaid, even when a job is locked); each failed before its
fix. Then what was already defended."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel, JobCheckpointModel, JobStatus, LeaseModel, LeaseStatus, WorkerModel, utcnow,
)
from coordinator.services import jobs, leases, ledger, replicas, verification, worker_states
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.protocol import LeaseComplete
from tests.coordinator.services.test_replicas import checked, confirmed, outcomes, train
from tests.coordinator.services.test_verification import (
    AGREE, DISAGREE, REPORTED, Agents, fresh, preempted_with_checkpoint, trained, usage, verifier,
)


def _live(session: Session, job_id: str) -> list[LeaseModel]:
    session.expire_all()
    return list(session.scalars(select(LeaseModel).where(
        LeaseModel.job_id == job_id, LeaseModel.status.in_((LeaseStatus.assigned, LeaseStatus.running)))))


def _near_suspension(session: Session, settings: CoordinatorSettings, agent) -> None:  # type: ignore[no-untyped-def]
    """One more failed check suspends the worker; it still looks reliable enough to be placed."""
    session.execute(update(WorkerModel).where(WorkerModel.id == agent.worker_id).values(
        failed_checks=settings.suspend_after_failed_checks - 1, completed_leases=60))
    session.commit()
    worker_states._rescore(agent.worker)
    session.commit()


def _ten_minutes(session: Session, lease_id: str) -> None:
    session.execute(update(LeaseModel).where(LeaseModel.id == lease_id).values(
        training_started_at=utcnow() - timedelta(seconds=600)))
    session.commit()


def _cheat_with_another_lease(session: Session, settings: CoordinatorSettings, service_agent: Agents,  # type: ignore[no-untyped-def]
                              new_provider, big_job, new_job, *, second_machine: bool = False):
    """A worker one failed check from suspension hands in an adapter for verification, then it (or its
    provider's `second_machine`) trains another job for ten minutes: (the worker, the other job's trainer, the
    other job, its lease there)."""
    cheater = new_provider("cheat")
    cheat = service_agent("cheat-pc", provider=cheater)
    _near_suspension(session, settings, cheat)
    verified = big_job(verification="always")
    a = cheat.claim()
    assert a is not None and a.job_id == verified.id
    cheat.finish(a.lease_id, eval_loss=REPORTED)
    other = new_job()
    trainer = service_agent("cheat-pc-2", provider=cheater) if second_machine else cheat
    b = trainer.claim()
    assert b is not None and b.job_id == other.id
    trainer.progress(b.lease_id)
    _ten_minutes(session, b.lease_id)
    return cheat, trainer, other, b


# --- found by the review (each failed before its fix) ----------------------------------------------------------

def test_one_placement_pass_never_hands_one_provider_a_sample_s_verification_and_a_training_holding_it_back(
    session: Session, big_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    """placement.place_queued_jobs reads `held_out.viewers` (for the batch's training jobs) and `held_out.training`
    (for its verification jobs) ONCE, before the loop, and never updates them as it assigns. Job A (waiting for
    verification) and job B (on the same file: the same held-out sample) are in one batch; a provider with two idle
    machines gets A's verification lease on one (the held-out sample's URL) and B's training on the other, in the
    same pass: it trains B on the very examples B's verifiers will measure it on. Both rules of held_out.py are
    broken at once (a viewer trains, a trainer verifies)."""
    from coordinator.services.placement import place_queued_jobs  # noqa: PLC0415

    spy = new_provider("spy")
    eyes, hands = (service_agent(f"spy-{n}", provider=spy) for n in (1, 2))
    for agent in (eyes, hands):
        assert agent.claim(kinds=["train", "verify"]) is None  # idle and long-polling, nothing queued yet
    first = big_job(verification="always")
    trainer, _ = trained(service_agent, first)
    session.execute(update(WorkerModel).where(WorkerModel.id == trainer.worker_id).values(state="offline"))
    session.commit()
    second = big_job()  # same file: the same held-out sample
    assert fresh(session, second).held_out["sha256"] == fresh(session, first).held_out["sha256"]  # type: ignore[index]
    placed = place_queued_jobs(session=session, settings=settings)
    kinds = {lease.kind for job in (first, second) for lease in _live(session, job.id)
             if lease.worker_id in (eyes.worker_id, hands.worker_id)}
    assert placed <= 1 or kinds != {"train", "verify"}, (
        "one placement pass gave provider 'spy' the verification of job A (its held-out sample) and the training of "
        "job B, which holds back the same sample")


def test_a_rival_s_unconfirmable_bad_checkpoint_claim_does_not_cost_an_honest_preempted_provider_its_pay(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    """A job whose customer asked for verification withholds a preempted lease's checkpoint pay until a confirmed
    adapter is built on it (`_settle_lineage(confirmed=True)`: entries outside the lineage are `not_billed`). A rival
    that is handed the honest checkpoint reports `bad_checkpoint`: the coordinator's recheck passes, so nobody is
    blamed, the rival is neither billed nor charged an attempt nor excluded (checkpoints.report_bad), and the
    checkpoint is set aside. The rival then trains the whole job from scratch itself: it is paid for all of it, and
    the honest provider, who did nothing wrong (preemption is the owner's right), is paid nothing. One free claim per
    job; in "auto" mode the same checkpoint would have been paid at once."""
    job = big_job(verification="always")
    honest = preempted_with_checkpoint(service_agent("early-pc", provider=new_provider("early")), job)
    rival = service_agent("rival-pc", provider=new_provider("rival"))
    a = rival.claim()
    assert a is not None and a.resume_from is not None
    rival.fail(a.lease_id, kind="bad_checkpoint", message="torch RNG state does not load")  # a lie nobody can check
    b = rival.claim()
    assert b is not None and b.job_id == job.id and b.resume_from is None  # the rival trains all of it itself
    rival.progress(b.lease_id)
    _ten_minutes(session, b.lease_id)
    rival.finish(b.lease_id, eval_loss=REPORTED)
    checked(service_agent, new_provider, "vera")
    assert fresh(session, job).status is JobStatus.succeeded
    assert ledger.audit(session).ok
    paid = usage(session, honest)
    assert paid is not None and paid.provider_micros > 0, (
        f"the honest preempted provider is paid {paid.provider_micros if paid else None} micro-$ ({paid.rule if paid else None}) "
        f"because a rival claimed, unconfirmed, that its checkpoint would not load; the rival was paid "
        f"{usage(session, b.lease_id).provider_micros} micro-$ for training the job itself")  # type: ignore[union-attr]


def test_the_finisher_of_an_adapter_built_on_a_rival_s_junk_checkpoint_is_blamed_no_more_than_the_rival(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    """Before: only the last trainer took the failed check, so a rival's one junk checkpoint (and a free first
    preemption) cost whoever resumed it a failed check, and over jobs, a suspension. Across providers nobody is
    blamed now (the third review: blaming the checkpoint's maker instead lets a junk finish frame it)."""
    job = big_job(verification="always")
    cheat = service_agent("cheat-pc", provider=new_provider("cheat"))
    preempted_with_checkpoint(cheat, job)
    finisher = service_agent("trainer-pc")
    b = finisher.claim()
    assert b is not None and b.resume_from is not None
    finisher.finish(b.lease_id, eval_loss=REPORTED)
    checked(service_agent, new_provider, "vera", "vic", valid_adapter_loss=DISAGREE["valid_adapter_loss"])
    assert fresh(session, job).verification["status"] == "failed"  # type: ignore[index]
    session.expire_all()
    assert cheat.worker.failed_checks >= finisher.worker.failed_checks, (
        f"the finisher took {finisher.worker.failed_checks} failed check(s) for an adapter built on a rival's "
        f"checkpoint; the rival took {cheat.worker.failed_checks}")


def test_a_verdict_s_suspension_ends_the_live_leases_of_the_provider_s_other_machines_too(
    session: Session, big_job, new_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    """Suspension belongs to the provider (placement skips every machine of a provider with a suspended one;
    a new machine registers suspended), but `leases._verified` releases only the live leases of the judged workers
    themselves. The cheater's second machine keeps training another job, finishes it unverified, and is paid."""
    cheater = new_provider("cheat")
    bad = service_agent("cheat-1", provider=cheater)
    other_pc = service_agent("cheat-2", provider=cheater)
    _near_suspension(session, settings, bad)
    verified = big_job(verification="always")
    a = bad.claim()
    assert a is not None and a.job_id == verified.id
    bad.finish(a.lease_id, eval_loss=REPORTED)
    other = new_job()
    b = other_pc.claim()
    assert b is not None and b.job_id == other.id
    other_pc.progress(b.lease_id)
    _ten_minutes(session, b.lease_id)
    checked(service_agent, new_provider, "vera", "vic", valid_adapter_loss=DISAGREE["valid_adapter_loss"])
    session.expire_all()
    assert bad.worker.suspended_at is not None
    assert worker_states.provider_suspended(session, cheater.id) is not None
    try:
        other_pc.finish(b.lease_id)
    except Exception:  # noqa: BLE001 - the defended outcome: the lease ended with the provider's suspension
        return
    done = fresh(session, other)
    paid = usage(session, b.lease_id)
    assert done.status is not JobStatus.succeeded, (
        f"a machine of a provider suspended for refuted work finished another job and was paid "
        f"{paid.provider_micros if paid else 0} micro-$")


def test_a_lease_a_verdict_s_suspension_ends_is_not_paid_and_its_checkpoint_is_not_handed_on(
    session: Session, big_job, new_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    """Before: the suspended cheater's other lease ended `lost`, paid until the checkpoint it uploaded there, and
    that checkpoint was the next worker's starting point. A suspension for failed checks ends its leases
    untrusted: unpaid, their checkpoints quarantined."""
    cheat, _, other, b = _cheat_with_another_lease(session, settings, service_agent, new_provider, big_job, new_job)
    cheat.upload_checkpoint(b.lease_id, 1, cheat.checkpoint_for(b.lease_id, 1))
    checked(service_agent, new_provider, "vera", "vic", valid_adapter_loss=DISAGREE["valid_adapter_loss"])
    session.expire_all()
    assert cheat.worker.suspended_at is not None
    assert session.get(LeaseModel, b.lease_id).status is LeaseStatus.lost  # type: ignore[union-attr]
    paid = usage(session, b.lease_id)
    from coordinator.services import budgets  # noqa: PLC0415

    budgets.enforce_budgets(session=session, settings=settings)  # the ended lease used up the tiny hold: rehold
    nxt = None
    for n in range(3):  # the refuted job is older and queued too: the first taker may take it
        nxt = service_agent(f"next-{n}-pc", provider=new_provider(f"next{n}")).claim()
        if nxt is not None and nxt.job_id == other.id:
            break
    assert nxt is not None and nxt.job_id == other.id
    assert ledger.audit(session).ok
    assert (paid is None or paid.provider_micros == 0) and nxt.resume_from is None, (
        f"the worker suspended for refuted work was paid {paid.provider_micros if paid else 0} micro-$ for its other "
        f"lease, and the next worker resumes from its checkpoint {nxt.resume_from}")


def test_a_suspended_worker_whose_other_job_is_locked_at_the_verdict_still_loses_that_lease(
    session: Session, big_job, new_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
    backend: str,
) -> None:
    """Before: `release_revoked` skipped a lease whose job another transaction held (SKIP LOCKED) and nothing
    retried it, so the suspended worker completed that lease and was paid. An untrusted release waits for the
    lock (here: a sweep holding the job for a second)."""
    if backend != "postgresql":
        pytest.skip("two sessions at once: PostgreSQL")
    from coordinator.db.engine import make_engine, make_sessionmaker  # noqa: PLC0415

    cheat, _, other, b = _cheat_with_another_lease(session, settings, service_agent, new_provider, big_job, new_job)
    engine = make_engine(settings)
    blocker = make_sessionmaker(engine)()
    try:
        blocker.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": other.id})  # a sweep, briefly
        sweep_ends = threading.Timer(1.0, blocker.rollback)
        sweep_ends.start()
        checked(service_agent, new_provider, "vera", "vic", valid_adapter_loss=DISAGREE["valid_adapter_loss"])
        sweep_ends.join()
    finally:
        blocker.rollback()
        blocker.close()
        engine.dispose()
    session.expire_all()
    assert cheat.worker.suspended_at is not None
    try:
        cheat.finish(b.lease_id)
    except Exception:  # noqa: BLE001 - defended: the lease ended (or the suspended worker is refused)
        return
    paid = usage(session, b.lease_id)
    assert fresh(session, other).status is not JobStatus.succeeded, (
        f"the suspended worker's lease was skipped by release_revoked (its job was locked) and it was paid "
        f"{paid.provider_micros if paid else 0} micro-$ for finishing it")


def test_a_provider_s_two_machines_claiming_at_once_never_split_a_sample_s_verification_and_training(
    session: Session, big_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
    store: BlobStore, backend: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """place_for_worker reads `viewed_by` / `trained_by` for the provider once, before its loop, and the re-check
    after locking (`again = needs(locked)`) reuses those stale sets; nothing locks per provider or sample. Machine 1
    of a provider takes job A's verification (committing its `held_out_viewers` row) while machine 2's claim, which
    already read "never viewed", goes on to take job B's training (same sample)."""
    if backend != "postgresql":
        pytest.skip("two sessions at once: PostgreSQL")
    from coordinator.db.engine import make_engine, make_sessionmaker  # noqa: PLC0415
    from coordinator.services import held_out  # noqa: PLC0415
    from tests.fakes import ServiceAgent  # noqa: PLC0415

    spy = new_provider("spy")
    eyes, hands = (service_agent(f"spy-{n}", provider=spy) for n in (1, 2))
    first = big_job(verification="always")
    trainer, _ = trained(service_agent, first)
    session.execute(update(WorkerModel).where(WorkerModel.id == trainer.worker_id).values(state="offline"))
    session.commit()
    second = big_job()
    engine = make_engine(settings)
    other = make_sessionmaker(engine)()
    real, raced = held_out.viewed_by, []

    def racing(s, provider_id):  # type: ignore[no-untyped-def]
        seen = real(s, provider_id)
        if not raced:
            raced.append(True)  # meanwhile, the provider's other machine claims in another API process
            got = ServiceAgent(session=other, settings=settings, store=store, worker_id=eyes.worker_id).claim(
                kinds=["train", "verify"])
            assert got is not None and got.kind == "verify" and got.job_id == first.id
        return seen

    monkeypatch.setattr(held_out, "viewed_by", racing)
    try:
        got = hands.claim(kinds=["train", "verify"])
    finally:
        other.close()
        engine.dispose()
    assert raced
    assert got is None or got.job_id != second.id or got.kind != "train", (
        "the provider holding job A's verification lease (its held-out sample) was handed job B's training, which "
        "holds back the same sample")


# --- defended -----------------------------------------------------------------------------------------------------

def test_a_lineage_with_a_cycle_in_the_database_ends(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    early = preempted_with_checkpoint(service_agent("early-pc", provider=new_provider("early")), job)
    [checkpoint] = session.scalars(select(JobCheckpointModel.id).where(JobCheckpointModel.lease_id == early)).all()
    session.execute(update(LeaseModel).where(LeaseModel.id == early).values(resume_checkpoint_id=checkpoint))
    session.commit()
    assert verification.lineage(session, early) == [early]


def test_a_verification_report_replayed_is_answered_the_same_and_metered_once(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="always")
    trained(service_agent, job)
    agent, check = verifier(service_agent, new_provider, "vera")
    agent.verify(check, **AGREE)
    report = LeaseComplete.model_validate({"verification": AGREE, "usage": {"wall_seconds": 3.0, "gpu_seconds": 3.0}})
    for _ in range(2):
        again = leases.complete(session=session, store=agent.store, settings=agent.settings, worker=agent.worker,
                                lease_id=check, fencing_token=agent.leases[check], report=report)
        assert again.lease.status is LeaseStatus.completed
    assert fresh(session, job).status is JobStatus.succeeded and ledger.audit(session).ok


def test_a_verifier_of_a_redundant_job_s_first_training_cannot_train_a_later_rerun_nor_its_third_training(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="redundant")
    confirmed(service_agent, new_provider, job)  # vera, vic saw the sample
    rerun = big_job()
    for name in ("vera", "vic"):
        agent = service_agent(f"{name}-pc-2", provider=session.scalars(select(AccountModel).where(
            AccountModel.name == name)).one())
        got = agent.claim(kinds=["train", "verify"])
        assert got is None or got.job_id not in (job.id, rerun.id) or got.kind == "verify"


def test_cancelling_a_redundant_job_s_disputed_second_training_with_a_withheld_lineage_balances(
    session: Session, big_job, service_agent: Agents, new_provider, customer_account: AccountModel,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="redundant")
    first = confirmed(service_agent, new_provider, job)
    early = preempted_with_checkpoint(service_agent("p-pc", provider=new_provider("p")), job)
    bob = service_agent("bob-pc", provider=new_provider("bob"))
    b = bob.claim()
    assert b is not None and b.resume_from is not None
    bob.finish(b.lease_id, eval_loss=REPORTED)
    doubter, check = verifier(service_agent, new_provider, "doubter")
    doubter.verify(check, **DISAGREE)
    jobs.cancel(session=session, account=customer_account, job_id=job.id)
    done = fresh(session, job)
    assert outcomes(done) == {first: "settled"}
    for lease_id in (early, b.lease_id):
        record = usage(session, lease_id)
        assert record is not None and record.provider_micros == 0
    assert done.held_micros == 0 and replicas.pending_charge(done) == 0 and ledger.audit(session).ok


def test_two_redundant_verifiers_far_apart_on_the_held_out_loss_ask_a_third(
    session: Session, big_job, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
) -> None:
    job = big_job(verification="redundant")
    train(service_agent("trainer-pc"), job)
    checked(service_agent, new_provider, "vera", heldout_adapter_loss=2.0)
    checked(service_agent, new_provider, "liar", heldout_adapter_loss=1.5)  # agrees, but measures another loss
    assert fresh(session, job).stage == "verify" and not replicas.of(fresh(session, job))
    checked(service_agent, new_provider, "vic", heldout_adapter_loss=2.01)
    again = fresh(session, job)
    assert [r["heldout_adapter_loss"] for r in replicas.of(again)] == [2.01]
    liar = [v for v in again.verification["verdicts"] if v["provider_id"] != again.verification["trainer"]["provider_id"]  # type: ignore[index]
            and v["figures"]["heldout_adapter_loss"] == 1.5]
    assert liar and usage(session, liar[0]["lease_id"]).provider_micros == 0  # type: ignore[union-attr]
    assert ledger.audit(session).ok
