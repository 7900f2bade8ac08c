"""`services/workers.py` on a real database: registration (the token shown once, stored hashed; a machine
re-registers as itself; revoked machines and providers over their cap are refused), token authentication, a
provider's view, revocation and suspension ending leases, heartbeats written in batches with the commands
an agent must hear, and the provider's record a new machine starts from (its suspension included)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, JobModel, JobStatus, LeaseModel, LeaseStatus, Role, WorkerModel, WorkerState, utcnow
from coordinator.services import worker_states, workers
from coordinator.services.keys import create_account
from coordinator.settings import CoordinatorSettings
from shared.errors import AuthenticationFailed, Conflict, NotFound, PermissionDenied
from shared.protocol import PROTOCOL_VERSION, WorkerHeartbeat, WorkerRegister
from tests.fakes import ServiceAgent, registration

Agents = Callable[..., ServiceAgent]


def register(session: Session, provider: AccountModel, machine_id: str = "pc-1", *, max_workers: int = 10,
             **fields: object) -> tuple[WorkerModel, str]:
    return workers.register(session=session, account=provider, protocol_version=PROTOCOL_VERSION,
                            request=WorkerRegister.model_validate(registration(machine_id, **fields)),
                            max_workers=max_workers)


def test_a_token_is_shown_once_and_kept_only_as_a_hash(session: Session, provider_account: AccountModel) -> None:
    worker, token = register(session, provider_account)
    prefix, secret = workers.split_token(token)  # type: ignore[misc]
    assert worker.token_prefix == prefix and worker.token_sha256 == workers.token_sha256(secret)
    assert secret not in (worker.token_sha256 or "")
    assert workers.authenticate(session=session, token=token).id == worker.id


@pytest.mark.parametrize("token", ["tgw_000000000000_nope", "garbage", "tg_abcdefabcdef_x", ""])
def test_unknown_or_malformed_tokens_fail_authentication(session: Session, provider_account: AccountModel, token: str) -> None:
    register(session, provider_account)
    with pytest.raises(AuthenticationFailed):
        workers.authenticate(session=session, token=token)


def test_a_machine_re_registers_as_itself_with_a_new_token_and_its_reputation(session: Session,
                                                                               provider_account: AccountModel) -> None:
    first, old_token = register(session, provider_account, price="0.30")
    first.completed_leases, first.reliability = 7, 0.95
    session.commit()
    again, new_token = register(session, provider_account, price="0.40")
    assert again.id == first.id and new_token != old_token and again.completed_leases == 7
    assert again.ask_price_per_gpu_hour == 400_000 and again.state is WorkerState.offline
    with pytest.raises(AuthenticationFailed):
        workers.authenticate(session=session, token=old_token)


def test_a_revoked_machine_cannot_register_again(session: Session, provider_account: AccountModel,
                                                 settings: CoordinatorSettings) -> None:
    worker, token = register(session, provider_account)
    workers.revoke(session=session, account=provider_account, worker_id=worker.id, settings=settings)
    with pytest.raises(AuthenticationFailed) as revoked:
        workers.authenticate(session=session, token=token)
    assert revoked.value.code == "worker_revoked"
    with pytest.raises(PermissionDenied):
        register(session, provider_account)


def test_a_provider_has_at_most_its_cap_of_machines(session: Session, provider_account: AccountModel,
                                                    settings: CoordinatorSettings) -> None:
    first, _ = register(session, provider_account, "pc-1", max_workers=2)
    register(session, provider_account, "pc-2", max_workers=2)
    with pytest.raises(Conflict) as full:
        register(session, provider_account, "pc-3", max_workers=2)
    assert full.value.code == "worker_limit_reached"
    register(session, provider_account, "pc-1", max_workers=2)  # re-registering one is not another
    workers.revoke(session=session, account=provider_account, worker_id=first.id, settings=settings)
    register(session, provider_account, "pc-3", max_workers=2)  # a revoked machine frees its place


def test_providers_see_their_own_workers_and_admins_every_worker(session: Session, provider_account: AccountModel) -> None:
    mine, _ = register(session, provider_account)
    other = create_account(session=session, name="olga", role=Role.provider)
    admin = create_account(session=session, name="root", role=Role.admin)
    assert workers.list_workers(session=session, account=other, after=None, limit=10) == ([], False)
    with pytest.raises(NotFound):
        workers.get_owned(session=session, account=other, worker_id=mine.id)
    assert [w.id for w in workers.list_workers(session=session, account=admin, after=None, limit=10)[0]] == [mine.id]
    assert workers.get_owned(session=session, account=admin, worker_id=mine.id).id == mine.id


@pytest.mark.parametrize("ending", ["revoke", "suspend"])
def test_revoking_or_suspending_a_busy_worker_requeues_its_job_at_once(
    session: Session, settings: CoordinatorSettings, service_agent: Agents, new_job, provider_account: AccountModel,  # type: ignore[no-untyped-def]
    ending: str,
) -> None:
    agent = service_agent()
    job = new_job()
    a = agent.claim()
    assert a is not None
    if ending == "revoke":
        worker = workers.revoke(session=session, account=provider_account, worker_id=agent.worker_id, settings=settings)
        assert worker.revoked_at is not None and worker.state is WorkerState.offline
    else:
        worker = workers.suspend(session=session, worker_id=agent.worker_id, reason="stolen GPU", settings=settings)
        assert worker.suspended_at is not None and worker.state is WorkerState.suspended
    session.expire_all()
    lease = session.get(LeaseModel, a.lease_id)
    assert lease is not None and lease.status is LeaseStatus.lost
    queued = session.get(JobModel, job.id)
    assert queued is not None and queued.status is JobStatus.queued and queued.attempts == 0  # not the job's fault


def test_a_batch_of_heartbeats_renews_leases_and_names_the_workers_whose_lease_ended(
    session: Session, service_agent: Agents, new_job,  # type: ignore[no-untyped-def]
) -> None:
    busy, idle, stale = service_agent("pc-1"), service_agent("pc-2"), service_agent("pc-3")
    new_job()
    a = busy.claim()
    assert a is not None
    now = utcnow()
    stale_changes = workers.flush_heartbeats(session=session, batch={
        busy.worker_id: (WorkerHeartbeat(activity="working", lease_id=a.lease_id, step=7), now),
        idle.worker_id: (WorkerHeartbeat(activity="paused_by_owner", pause_reason="a game"), now),
        stale.worker_id: (WorkerHeartbeat(activity="working", lease_id="lease-gone", step=1), now),
    })
    assert stale_changes == {stale.worker_id}
    session.expire_all()
    lease = session.get(LeaseModel, a.lease_id)
    assert lease is not None and lease.last_step == 7 and lease.last_renewed_at is not None
    assert idle.worker.state is WorkerState.paused and idle.worker.pause_reason == "a game"
    assert busy.worker.last_heartbeat_at is not None


def test_a_heartbeat_on_an_ended_lease_hears_what_happened(session: Session, service_agent: Agents, new_job,  # type: ignore[no-untyped-def]
                                                          customer_account: AccountModel) -> None:
    from coordinator.services import jobs  # noqa: PLC0415

    agent = service_agent()
    job = new_job()
    a = agent.claim()
    assert a is not None
    jobs.pause(session=session, account=customer_account, job_id=job.id)
    [command] = workers.record_heartbeat(session=session, worker=agent.worker, received_at=utcnow(),
                                         heartbeat=WorkerHeartbeat(activity="working", lease_id=a.lease_id))
    assert (command.type, command.lease_id) == ("pause", a.lease_id)
    [unknown] = workers.record_heartbeat(session=session, worker=agent.worker, received_at=utcnow(),
                                         heartbeat=WorkerHeartbeat(activity="working", lease_id="lease-nobody"))
    assert unknown.type == "lease_lost" and unknown.reason == "unknown lease"


# --- the provider's record ------------------------------------------------------------------------

def test_a_new_machine_starts_from_its_providers_record(session: Session, provider_account: AccountModel,
                                                         service_agent: Agents, new_job) -> None:  # type: ignore[no-untyped-def]
    first = service_agent("pc-1")
    for _ in range(2):  # two losses on the provider's first machine
        new_job()
        a = first.claim()
        assert a is not None
        first.fail(a.lease_id)
    worn = first.worker.reliability
    fresh_start = worker_states.reliability(completed=0, lost=0, failed_checks=0)
    assert worn < fresh_start
    second, _ = register(session, provider_account, "pc-2")
    assert (second.inherited_lost, second.lost_leases) == (2, 0)
    assert second.reliability == pytest.approx(worn)
    stranger, _ = register(session, create_account(session=session, name="quinn", role=Role.provider), "pc-9")
    assert stranger.reliability == pytest.approx(fresh_start)


def test_a_new_machine_of_a_suspended_provider_is_suspended_and_its_others_are_not_placed(
    session: Session, provider_account: AccountModel, settings: CoordinatorSettings, service_agent: Agents,
    new_job,  # type: ignore[no-untyped-def]
) -> None:
    bad, other = service_agent("pc-1"), service_agent("pc-2")
    workers.suspend(session=session, worker_id=bad.worker_id, reason="tampered adapters", settings=settings)
    escape, _ = register(session, provider_account, "pc-brand-new")
    assert escape.state is WorkerState.suspended and escape.suspended_at is not None
    assert bad.worker_id in (escape.pause_reason or "")
    job = new_job()
    assert other.claim() is None  # the provider's unsuspended machine is not placed either
    assert ServiceAgent.register(session, settings, other.store, create_account(
        session=session, name="quinn", role=Role.provider), "pc-9").claim().job_id == job.id  # type: ignore[union-attr]
