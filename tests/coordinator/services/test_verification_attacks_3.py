"""A third hostile review, of the second review's fixes (lineage blame, `release_suspended`, forfeit checkpoints,
the per-provider advisory lock); each test failed before its fix."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel, Book, JobCheckpointModel, JobStatus, LeaseModel, LeaseStatus,
)
from coordinator.services import jobs, ledger
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from tests.coordinator.services.test_replicas import checked, outcomes, train
from tests.coordinator.services.test_verification import (
    DISAGREE, REPORTED, Agents, fresh, preempted_with_checkpoint, usage, verifier,
)
from tests.coordinator.services.test_verification_attacks_2 import (
    _cheat_with_another_lease, _near_suspension, _ten_minutes,
)


def _live(session: Session, worker_id: str) -> list[LeaseModel]:
    session.expire_all()
    return list(session.scalars(select(LeaseModel).where(
        LeaseModel.worker_id == worker_id, LeaseModel.status.in_((LeaseStatus.assigned, LeaseStatus.running)))))


# --- 1. a provider a refutation suspends loses its other machines' leases ---------------------------------------

def test_a_provider_a_refutation_of_its_own_lineage_suspends_loses_every_machine_s_lease(
    session: Session, big_job, new_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    """The review found that a lineage worker a refutation suspended kept its other machines' leases. Lineages
    across providers now blame nobody (test 2); one that is all one provider's blames its finisher, and the
    release covers every machine of a provider with a suspended machine, not only the judged ones."""
    cheater = new_provider("cheat")
    junk_pc = service_agent("cheat-1", provider=cheater)
    finisher = service_agent("cheat-3", provider=cheater)
    other_pc = service_agent("cheat-2", provider=cheater)
    _near_suspension(session, settings, finisher)
    job = big_job(verification="always")
    preempted_with_checkpoint(junk_pc, job)
    a = finisher.claim()
    assert a is not None and a.job_id == job.id and a.resume_from is not None
    other = new_job()
    b = other_pc.claim()
    assert b is not None and b.job_id == other.id
    other_pc.progress(b.lease_id)
    _ten_minutes(session, b.lease_id)
    finisher.finish(a.lease_id, eval_loss=REPORTED)
    checked(service_agent, new_provider, "vera", "vic", valid_adapter_loss=DISAGREE["valid_adapter_loss"])
    session.expire_all()
    assert fresh(session, job).verification["status"] == "failed"  # type: ignore[index]
    assert finisher.worker.suspended_at is not None  # its own lineage: blamed
    live = _live(session, other_pc.worker_id)
    assert not live, f"machine {other_pc.worker_id} of the suspended provider still holds {[l.id for l in live]}"
    unpaid = usage(session, b.lease_id)
    assert unpaid is None or unpaid.provider_micros == 0


# --- 2. lineage blame: a rival suspends an honest provider cheaply ---------------------------------------------

def test_rivals_finishing_an_honest_checkpoint_with_junk_cannot_suspend_the_honest_provider(
    session: Session, big_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
    customer_account: AccountModel,
) -> None:
    """The reverse of the second review's junk checkpoint: an honest provider is preempted with a good checkpoint
    (the owner's right); a throwaway rival account is placed next, resumes it and hands in a junk adapter (a made-up
    validation loss). Two honest verifiers refute it: the rival takes one failed check (a new account: it does not
    care) and the honest provider takes one too. `suspend_after_failed_checks` (3) attacks from three throwaway
    accounts suspend the honest provider, every machine of it, with nothing wrong ever done by it."""
    honest = service_agent("honest-pc", provider=new_provider("honest"))
    for n in range(settings.suspend_after_failed_checks):
        job = big_job(verification="always")
        preempted_with_checkpoint(honest, job)
        rival = service_agent(f"rival-{n}-pc", provider=new_provider(f"rival{n}"))
        a = rival.claim()
        assert a is not None and a.job_id == job.id and a.resume_from is not None
        rival.finish(a.lease_id, eval_loss=REPORTED)  # junk: the validation loss it reports is made up
        checked(service_agent, new_provider, f"vera{n}", f"vic{n}", valid_adapter_loss=DISAGREE["valid_adapter_loss"])
        assert fresh(session, job).verification["status"] == "failed"  # type: ignore[index]
        jobs.cancel(session=session, account=customer_account, job_id=job.id)
    session.expire_all()
    assert ledger.audit(session).ok
    assert honest.worker.suspended_at is None, (
        f"{settings.suspend_after_failed_checks} throwaway rivals, each resuming the honest provider's checkpoint "
        f"and handing in junk, suspended it: {honest.worker.failed_checks} failed checks, none its own doing "
        f"(each rival took one, on an account it throws away)")


# --- 3. lock order: books before a lineage worker's row, against fenced() (worker before books) ------------------

def test_a_refutation_does_not_deadlock_with_a_lineage_worker_settling_its_other_lease(
    session: Session, big_job, new_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
    backend: str,
) -> None:
    """verification.report locks the books first (`lock_books`: customer, trainer, verifiers, and every provider
    with a withheld checkpoint), then `_refuted` locks each lineage worker's row FOR UPDATE (new). Every lease path
    locks job -> lease -> worker (fenced) and then the books as it meters. A lineage machine settling its lease on
    another job of the same customer at the same moment holds its worker row and asks for its book: a deadlock,
    which PostgreSQL breaks by failing one of the two (a 500 for the verifier or the honest worker)."""
    if backend != "postgresql":
        pytest.skip("two sessions at once: PostgreSQL")
    from coordinator.db.engine import make_engine, make_sessionmaker  # noqa: PLC0415

    provider = new_provider("early")
    early = service_agent("early-pc", provider=provider)
    job = big_job(verification="always")
    preempted_with_checkpoint(early, job)
    finisher = service_agent("trainer-pc")
    a = finisher.claim()
    assert a is not None and a.resume_from is not None
    other = new_job()
    b = early.claim()
    assert b is not None and b.job_id == other.id
    finisher.finish(a.lease_id, eval_loss=REPORTED)
    checked(service_agent, new_provider, "vera", valid_adapter_loss=DISAGREE["valid_adapter_loss"])
    vic, check = verifier(service_agent, new_provider, "vic")
    customer_id, provider_id, early_id = other.account_id, provider.id, early.worker_id  # read before the thread
    engine = make_engine(settings)
    blocker = make_sessionmaker(engine)()
    errors: list[BaseException] = []

    def verdict() -> None:
        try:
            vic.verify(check, **DISAGREE)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            session.rollback()

    try:
        # early-pc completing its lease on the other job: fenced() holds its worker row ...
        blocker.execute(text("SELECT id FROM workers WHERE id = :id FOR UPDATE"), {"id": early_id})
        t = threading.Thread(target=verdict)
        t.start()
        time.sleep(1.5)  # the verdict holds the books and waits for early-pc's row
        try:  # ... and meters it: its provider's book (and the customer's)
            ledger.lock_balances(blocker, [(Book.customer_available, customer_id),
                                           (Book.provider_payable, provider_id)])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        blocker.rollback()
        t.join(30)
    finally:
        blocker.rollback()
        blocker.close()
        engine.dispose()
    assert not errors, f"deadlock between a refutation and a lineage worker's own lease: {errors[0]!r}"[:600]


# --- 4. a forfeit withheld checkpoint in a redundant training's lineage is paid ----------------------------------

def test_a_forfeit_checkpoint_a_confirmed_redundant_training_was_built_on_is_never_paid(
    session: Session, big_job, service_agent: Agents, new_provider, store: BlobStore,  # type: ignore[no-untyped-def]
) -> None:
    """`quarantine` marks the uploader's withheld entry `forfeit`, honoured by `settle_withheld` only. A redundant
    training's confirmed lineage entries move into its replica (`_replicated`), and `settle_replica` pays every one
    of them `until_checkpoint`, forfeit or not. A cheat uploads two checkpoints; the later one proves bad (the
    coordinator confirms it), the earlier one is resumed by an honest worker whose training is confirmed: the cheat
    is paid for the checkpoint the coordinator confirmed bad."""
    from coordinator.storage import checkpoint_key  # noqa: PLC0415

    job = big_job(verification="redundant")
    cheat = service_agent("cheat-pc", provider=new_provider("cheat"))
    a = cheat.claim(kinds=["train"])
    assert a is not None and a.job_id == job.id
    cheat.progress(a.lease_id, step=2)
    _ten_minutes(session, a.lease_id)
    cheat.upload_checkpoint(a.lease_id, 1, cheat.checkpoint_for(a.lease_id, 1))
    cheat.upload_checkpoint(a.lease_id, 2, cheat.checkpoint_for(a.lease_id, 2))
    cheat.preempted(a.lease_id)
    junk = a.lease_id
    latest = session.scalars(select(JobCheckpointModel.id).where(JobCheckpointModel.lease_id == junk)
                             .order_by(JobCheckpointModel.step_number.desc())).first()
    path = store.path(checkpoint_key(latest))
    path.write_bytes(path.read_bytes()[:-100])
    bob = service_agent("bob-pc", provider=new_provider("bob"))
    got = bob.claim()
    assert got is not None and got.resume_from is not None and got.resume_from.checkpoint_id == latest
    bob.fail(got.lease_id, kind="bad_checkpoint", message="resume/: archive truncated")
    assert (fresh(session, job).verification or {})["withheld"][0]["forfeit"] is True
    finisher = service_agent("trainer-pc")
    r = finisher.claim()
    assert r is not None and r.job_id == job.id and r.resume_from is not None  # the cheat's step-1 checkpoint
    finisher.finish(r.lease_id, eval_loss=REPORTED)
    checked(service_agent, new_provider, "vera", "vic")
    assert outcomes(fresh(session, job)) == {r.lease_id: "confirmed"}
    train(service_agent("second-pc", provider=new_provider("second")), job)
    checked(service_agent, new_provider, "val", "vex")
    assert fresh(session, job).status is JobStatus.succeeded
    assert ledger.audit(session).ok
    paid = usage(session, junk)
    assert paid is None or paid.provider_micros == 0, (
        f"the cheat whose checkpoint the coordinator confirmed bad (forfeit) is paid {paid.provider_micros} "
        f"micro-$ ({paid.rule}) through settle_replica, which ignores `forfeit`")


# --- 5. release_suspended runs after the verdict's commit, and nothing runs it again -----------------------------

def test_a_suspension_whose_release_fails_once_still_ends_the_provider_s_leases(
    session: Session, big_job, new_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The verdict (the suspension) commits before `release_suspended` runs, and the release can lose a deadlock
    (a 503 the agent retries); the retried completion finds its lease ended and returns. Before, nothing ended the
    suspended provider's other lease; the reaper now finishes such a release."""
    from coordinator.services import leases  # noqa: PLC0415
    from sqlalchemy.exc import OperationalError  # noqa: PLC0415

    bad, other_pc, other, b = _cheat_with_another_lease(session, settings, service_agent, new_provider, big_job,
                                                        new_job, second_machine=True)
    checked(service_agent, new_provider, "vera", valid_adapter_loss=DISAGREE["valid_adapter_loss"])
    vic, check = verifier(service_agent, new_provider, "vic")
    real, calls = leases.release_suspended, []

    def once(**kw):  # type: ignore[no-untyped-def]
        calls.append(kw)
        if len(calls) == 1:
            raise OperationalError("SELECT ...", {}, Exception("deadlock detected"))
        return real(**kw)

    monkeypatch.setattr(leases, "release_suspended", once)
    with pytest.raises(OperationalError):
        vic.verify(check, **DISAGREE)
    session.rollback()
    from shared.protocol import LeaseComplete  # noqa: PLC0415

    report = LeaseComplete.model_validate({"verification": DISAGREE, "usage": {"wall_seconds": 3.0, "gpu_seconds": 3.0}})
    leases.complete(session=session, store=vic.store, settings=settings, worker=vic.worker, lease_id=check,
                    fencing_token=vic.leases[check], report=report)  # the agent retries its 503
    from coordinator.services.lease_states import reap  # noqa: PLC0415

    assert reap(session=session, settings=settings)["suspended"] == 1  # the periodic sweep finishes the release
    session.expire_all()
    assert bad.worker.suspended_at is not None
    live = _live(session, other_pc.worker_id)
    assert not live, (f"the verdict suspended provider 'cheat', its release failed once, and the retried report "
                      f"({len(calls)} release call(s) in all) left machine cheat-2's lease {[l.id for l in live]} live")


# --- 6. the rejected-adapter suspension releases nothing ----------------------------------------------------------

def test_a_suspension_by_a_rejected_adapter_ends_the_provider_s_other_leases(
    session: Session, big_job, new_job, service_agent: Agents, new_provider, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    """`leases.complete`'s rejected-adapter branch suspends with `suspend_if_untrustworthy` and calls no
    `release_suspended`: the provider's other machine keeps training (and checkpointing, paid) under a suspension
    that the second review says ends every live lease of the provider."""
    from tests.fakes import adapter_archive  # noqa: PLC0415

    cheater = new_provider("cheat")
    bad = service_agent("cheat-1", provider=cheater)
    other_pc = service_agent("cheat-2", provider=cheater)
    _near_suspension(session, settings, bad)
    job = new_job()
    a = bad.claim()
    assert a is not None and a.job_id == job.id
    other = new_job()
    b = other_pc.claim()
    assert b is not None and b.job_id == other.id
    wrong = adapter_archive(r=8)  # rejected: r/alpha
    bad.progress(a.lease_id)
    bad.upload_adapter(a.lease_id, wrong)
    bad.complete(a.lease_id, wrong)
    session.expire_all()
    assert bad.worker.suspended_at is not None
    live = _live(session, other_pc.worker_id)
    assert not live, f"provider 'cheat' suspended by a rejected adapter; machine cheat-2 keeps lease {[l.id for l in live]}"
