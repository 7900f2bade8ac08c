"""Independent verification: a worker of another provider checks a trained adapter before its job succeeds, and
its trainer is paid only when the check agrees.

Chosen (`chosen`) when a training lease completes with an adapter that passed the coordinator's checks: every
job whose customer asked (`verification: "always"`), every job trained by a worker below
`verify_below_reliability`, and `verify_share_bps` of the rest (by the job id's hash, so a job is chosen or not
for good). A job needs something its trainer did not train on: a held-out sample (`held_out.py`) or validation
rows.

The job then waits in the queue for a verification lease (`job.stage == "verify"`), placed on a worker of a
provider that trained no part of the job and did not verify this adapter already. The verifier loads the base and
the adapter and reports the mean token loss of both on the held-out sample (which the trainer never received) and
on the trainer's own validation rows. The figures agree (`compare`) when the adapter improves on the base by
`verify_min_improvement` on data its trainer could not train on, and its validation loss is what the trainer
reported, within `verify_tolerance` + `verify_tolerance_share` of it (same rows, same model, 4-bit numerics); a
verifier that measured no validation rows when the trainer reported a loss on them does not agree (that figure
is the one it cannot make up without running the model).

A quorum of independent workers decides:
- the first verifier agrees: the training lease is metered (until its end) and the job succeeds, `verified`; a
  redundant job's training (`replicas.py`) needs two agreeing verifiers whose held-out losses agree within the
  tolerance (`_concurring`), since that figure decides which training is paid;
- otherwise verifiers of further providers are asked until two concur (`QUORUM`): two agreeing confirm the
  adapter as above; two disagreeing refute it: the training lease is not billed nor paid, its worker's completion
  counts as a failed check, its provider is off the job, its checkpoints are quarantined, and the job trains again
  elsewhere (an attempt used), never on a provider that held a verification lease of the job (it may have seen
  the held-out sample, or the adapter to copy). The refuted adapter's `lineage` (the leases whose checkpoints it
  was built on) goes with it: those checkpoints are quarantined, their withheld pay is not paid (`replicas.py`),
  their providers are off the job; the trainer takes the failed check only when the lineage is all its
  provider's (across providers the verdict cannot tell who spoiled it, and blaming either side would let a
  throwaway account get an honest provider suspended). Verifiers on the quorum's side are paid; one it
  contradicted is not, and that counts as a failed check.
Verifiers are paid from the platform's verification book (`billing.settle_verification`), for at most what
verifying the job can take (`metering.verification_seconds`), at the lower of their ask and the trainer's.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    JobCheckpointModel, JobModel, JobStatus, LeaseKind, LeaseModel, LeaseStatus, WorkerModel,
    utcnow,
)
from coordinator.services import replicas, results, worker_states
from coordinator.services.fencing import FencedLease
from coordinator.services.job_states import change_status, exclude, record_event
from coordinator.services.lease_states import end_and_requeue, end_lease
from coordinator.services.metering import meter_ended, settle_replica, settle_withheld, until_end_charge
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore, checkpoint_key
from shared.errors import InvalidRequest
from shared.pricing import BPS
from shared.protocol import VerificationResult

QUORUM = 2  # concurring verifiers that decide, once any verifier disagreed


def _sampled(job_id: str, share_bps: int) -> bool:
    return int.from_bytes(hashlib.sha256(f"verify:{job_id}".encode()).digest()[:4], "big") % BPS < share_bps


def verifiable(job: JobModel) -> bool:
    """Whether the job holds data its trainer does not train on (a held-out sample, or validation rows)."""
    return bool(job.held_out) or job.validation_file_id is not None


def chosen(job: JobModel, worker: WorkerModel, settings: CoordinatorSettings) -> str | None:
    """Why this job's adapter is verified (the module's rule), or None."""
    if job.verification_mode == "always":
        return "its customer asked for verification"
    if job.verification_mode == "redundant":
        return "its customer asked for redundant training"
    if worker.reliability < settings.verify_below_reliability:
        return f"its trainer's reliability {worker.reliability:.2f} is below {settings.verify_below_reliability:.2f}"
    if _sampled(job.id, settings.verify_share_bps):
        return f"sampled ({settings.verify_share_bps / 100:g}% of jobs are verified)"
    return None


def verifier_exists(session: Session, provider_id: str) -> bool:
    """Whether any worker of another provider could ever take a verification lease (registered, not revoked nor
    suspended, its agent runs `verify`): with none, the platform does not make a job wait for one."""
    for kinds in session.scalars(select(WorkerModel.lease_kinds).where(
            WorkerModel.account_id != provider_id, WorkerModel.revoked_at.is_(None),
            WorkerModel.suspended_at.is_(None), WorkerModel.lease_kinds.is_not(None)).limit(1000)):
        if LeaseKind.verify.value in (kinds or ()):
            return True
    return False


def trainers(session: Session, job: JobModel) -> list[str]:
    """Every provider that held a training lease of the job (whole or part of any training, refuted or not)."""
    return list(session.scalars(select(WorkerModel.account_id).join(
        LeaseModel, LeaseModel.worker_id == WorkerModel.id).where(
        LeaseModel.job_id == job.id, LeaseModel.kind == LeaseKind.train).distinct().order_by(WorkerModel.account_id)))


def begin(*, session: Session, job: JobModel, lease: LeaseModel, worker: WorkerModel, reason: str) -> None:
    """The training lease ended with a checked adapter (kept as its upload, `lease.adapter_key`, until the verdict)
    and its metering waits (the caller ended it with `settle_later`): the job waits for a verifier, of a provider
    that trained no part of the job (a preempted lease's checkpoint may be in this adapter)."""
    reported = lease.result or {}
    earlier = job.verification or {}  # what earlier verifications of the job leave: who held one, replicas
    job.stage = LeaseKind.verify.value
    job.verification = {
        "status": "pending", "reason": reason, "lease_id": lease.id,
        "trainer": {"worker_id": worker.id, "provider_id": worker.account_id},
        "reported": {k: reported.get(k) for k in ("final_eval_loss", "final_train_loss", "steps", "trained_tokens")},
        "not_by": sorted({worker.account_id, *replicas.providers(job), *trainers(session, job)}), "verdicts": [],
        "since": utcnow().isoformat(), "never_trains": earlier.get("never_trains", []), "replicas": replicas.of(job),
        "refuted": earlier.get("refuted", []), "withheld": replicas.withheld(job),
    }
    change_status(session=session, job=job, to=JobStatus.queued, data={"lease_id": lease.id},
                  message=f"Training completed; the adapter is verified on another provider's worker before it is "
                          f"released ({reason})")


def skipped(*, session: Session, job: JobModel, reason: str) -> None:
    """Verification was chosen but cannot be done (the job has nothing its trainer did not see, or no other
    provider verifies): the job goes on unverified, and says so."""
    job.verification = {"status": "skipped", "reason": reason, "withheld": replicas.withheld(job)}
    record_event(session=session, job=job, level="warn", message=f"Not verified: {reason}")


def compare(reported: dict[str, Any], figures: VerificationResult, settings: CoordinatorSettings, *,
            held_out: bool = False) -> str | None:
    """None when the verifier's figures agree with the trainer's work; otherwise why not. With a held-out sample
    (`held_out`), the improvement is measured there and nowhere else: the trainer had the validation rows."""
    if held_out:
        if not figures.heldout_tokens or figures.heldout_base_loss is None or figures.heldout_adapter_loss is None:
            return "the verifier's figures for the held-out sample are missing"
        where, base, tuned = "the held-out sample", figures.heldout_base_loss, figures.heldout_adapter_loss
    elif figures.valid_tokens and figures.valid_base_loss is not None and figures.valid_adapter_loss is not None:
        where, base, tuned = "the validation rows", figures.valid_base_loss, figures.valid_adapter_loss
    else:
        return "the verifier measured no loss"
    if base - tuned < settings.verify_min_improvement:
        return (f"the adapter does not improve on the base on {where} (loss {base:.4f} -> {tuned:.4f}, "
                f"at least {settings.verify_min_improvement} lower expected)")
    claimed = reported.get("final_eval_loss")
    if claimed is not None and not figures.valid_tokens:  # the one figure a verifier cannot make up unseen
        return (f"the trainer reported validation loss {claimed:.4f}, and the verifier measured none on those "
                f"rows")
    if figures.valid_tokens:
        measured = figures.valid_adapter_loss
        if measured is None:
            return "the verifier's figures for the validation rows are missing"
        if claimed is None:
            return "the trainer reported no validation loss for the validation rows it had"
        allowed = settings.verify_tolerance + settings.verify_tolerance_share * claimed
        if abs(measured - claimed) > allowed:
            return (f"the trainer reported validation loss {claimed:.4f}, the verifier measured {measured:.4f} "
                    f"(more than {allowed:.4f} apart)")
    return None


def judged(job: JobModel) -> list[str]:
    """The workers whose work the job's verifications judged: its trainers and its verifiers."""
    state = job.verification or {}
    return sorted({w for w in ((state.get("trainer") or {}).get("worker_id"),
                               *(v.get("worker_id") for v in state.get("verdicts", [])),
                               *(r.get("worker_id") for r in replicas.of(job))) if w})


def _figures(verdict: dict[str, Any]) -> str:
    f = verdict["figures"]
    parts = []
    if f.get("heldout_base_loss") is not None and f.get("heldout_adapter_loss") is not None:
        parts.append(f"held-out loss {f['heldout_base_loss']:.4f} (base) -> {f['heldout_adapter_loss']:.4f} (adapter)")
    if f.get("valid_adapter_loss") is not None:
        parts.append(f"validation loss {f['valid_adapter_loss']:.4f}")
    return ", ".join(parts) or "no figures"


def report(*, session: Session, store: BlobStore, settings: CoordinatorSettings, f: FencedLease,
           figures: VerificationResult | None, usage: dict[str, Any]) -> list[str]:
    """A verification lease's figures (the caller holds its fenced locks): record the verdict and act on the
    quorum (the module's rule). Returns the blob keys the caller deletes once this is committed."""
    if figures is None:
        raise InvalidRequest("A verification lease reports `verification` (its figures), not an adapter.",
                             param="verification", code="verification_missing")
    _lock_judged(session, f)
    lock_books(session, f.job, f.worker.account_id)
    state = dict(f.job.verification or {})
    disagreement = compare(state.get("reported") or {}, figures, settings, held_out=bool(f.job.held_out))
    verdict = {"lease_id": f.lease.id, "worker_id": f.worker.id, "provider_id": f.worker.account_id,
               "agrees": disagreement is None, "why": disagreement, "figures": figures.model_dump()}
    state["verdicts"] = [*state.get("verdicts", []), verdict]
    state["not_by"] = [*state.get("not_by", []), f.worker.account_id]
    f.job.verification = state
    agreeing = [v for v in state["verdicts"] if v["agrees"]]
    disagreeing = [v for v in state["verdicts"] if not v["agrees"]]
    redundant = f.job.verification_mode == "redundant"
    concurring = _concurring(agreeing, settings) if redundant else agreeing
    if concurring and (len(concurring) >= QUORUM or (not redundant and not disagreeing)):
        end_lease(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.completed,
                  reason="verified the adapter", usage=usage, settle_later=True)
        _decide(session, settings, f.job, winners=concurring,
                losers=[v for v in state["verdicts"] if v not in concurring])
        if redundant:
            return _replicated(session, store, settings, f.job, concurring)
        return _confirmed(session, store, f.job, state, verdict)
    if len(disagreeing) >= QUORUM:
        return _refuted(session, settings, f, state, disagreement or "", usage, winners=disagreeing, losers=agreeing)
    split = f" ({len(agreeing)} agree, {len(disagreeing)} disagree)" if agreeing and disagreeing else ""
    again = ("; a worker of another provider checks again" if disagreeing or not redundant else
             "; a redundant training's held-out loss is measured by two, so a worker of another provider checks too")
    end_and_requeue(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.completed,
                    reason=f"disagreed: {disagreement}" if disagreement else "agreed", settings=settings,
                    count_attempt=False, usage=usage, settle_later=True,
                    job_reason=f"Verifier {f.worker.id} " + (f"disagrees with the trainer ({disagreement})"
                                                             if disagreement else "agrees with the trainer")
                               + split + again)
    return []


def _concurring(agreeing: list[dict[str, Any]], settings: CoordinatorSettings) -> list[dict[str, Any]]:
    """A redundant training's agreeing verdicts that also measured the same held-out loss (within the tolerance of
    one of them): the largest such group. Its held-out loss decides which training is better, so one verifier's
    figure alone must never refute the other training."""
    best: list[dict[str, Any]] = []
    for centre in agreeing:
        loss = centre["figures"]["heldout_adapter_loss"]
        allowed = settings.verify_tolerance + settings.verify_tolerance_share * loss
        group = [v for v in agreeing if abs(v["figures"]["heldout_adapter_loss"] - loss) <= allowed]
        if len(group) > len(best):
            best = group
    return best


def _lock_judged(session: Session, f: FencedLease) -> None:
    """Lock the rows of every worker a verdict may count against (the trainers, the verifiers), in id order,
    after the verifier's own and before any balance: the order a lease's own end takes them (worker, then books),
    so a verdict never waits for a worker row while holding balances another lease's end waits for."""
    for worker_id in [w for w in judged(f.job) if w != f.worker.id]:
        session.get(WorkerModel, worker_id, with_for_update=True, populate_existing=True)


def _decide(session: Session, settings: CoordinatorSettings, job: JobModel, *, winners: list[dict[str, Any]],
            losers: list[dict[str, Any]]) -> None:
    """The quorum decided: verifiers on its side are paid; those it contradicted are not, and it counts against
    them."""
    for winner in winners:
        meter_ended(session, job, winner["lease_id"], "until_end")
    for loser in losers:
        meter_ended(session, job, loser["lease_id"], "not_billed")
        worker = session.get(WorkerModel, loser["worker_id"], with_for_update=True, populate_existing=True)
        assert worker is not None
        worker_states.work_refuted(session=session, worker=worker, max_failed_checks=settings.suspend_after_failed_checks)
        record_event(session=session, job=job, level="warn", data={"lease_id": loser["lease_id"]},
                     message=f"Verifier {worker.id} was contradicted by two other workers; it is not paid")


def lock_books(session: Session, job: JobModel, *providers: str) -> None:
    """Lock every kept balance a verdict may move (the customer's, the trainer's, each verifier's), in the ledger's
    one order, before any moves: one transaction settles several providers' leases here."""
    state = job.verification or {}
    owners = {*providers, (state.get("trainer") or {}).get("provider_id"),
              *(v.get("provider_id") for v in state.get("verdicts", [])), *replicas.providers(job)}
    replicas.lock_books(session, job, *(owner for owner in owners if owner))


LINEAGE_MAX = 1000  # leases one lineage walks at most (a job's attempts are far fewer)


def lineage(session: Session, lease_id: str) -> list[str]:
    """The lease and, one after another, the leases whose checkpoints it was built on (`resume_checkpoint_id`):
    every lease whose work is in its adapter."""
    chain: list[str] = []
    current: str | None = lease_id
    while current is not None and current not in chain and len(chain) < LINEAGE_MAX:
        chain.append(current)
        resumed = session.scalar(select(LeaseModel.resume_checkpoint_id).where(LeaseModel.id == current))
        current = session.scalar(select(JobCheckpointModel.lease_id).where(JobCheckpointModel.id == resumed)) \
            if resumed else None
    return chain


def _refute_lineage(session: Session, job: JobModel, trained_id: str) -> list[str]:
    """Training `trained_id` is refuted: the withheld checkpoints of its lineage are not paid (`replicas.py`); the
    rest wait on. Returns the lineage."""
    chain = lineage(session, trained_id)
    settle_withheld(session, job, replicas.take_withheld(job, of_leases=chain), unpaid=chain)
    return chain


def _blame(session: Session, settings: CoordinatorSettings, trainer: WorkerModel, chain: list[str]) -> set[str]:
    """A refuted training's trainer: its completion no longer counts, and when the lineage is all its provider's
    work it takes a failed check. Across providers the verdict cannot tell which of them spoiled it, and blaming
    any one would let a throwaway account get an honest provider suspended (a junk checkpoint for its finisher, a
    junk finish for the checkpoint's maker): none is blamed, none is paid. Returns the lineage's providers."""
    providers = {trainer.account_id, *session.scalars(select(WorkerModel.account_id).join(
        LeaseModel, LeaseModel.worker_id == WorkerModel.id).where(LeaseModel.id.in_(chain)))}
    worker_states.work_refuted(session=session, worker=trainer, blame=len(providers) == 1,
                               max_failed_checks=settings.suspend_after_failed_checks)
    return providers


def _confirmed(session: Session, store: BlobStore, job: JobModel, state: dict[str, Any],
               verdict: dict[str, Any] | None) -> list[str]:
    """The adapter under verification is confirmed by `verdict` (or, with none, released unverified)."""
    if verdict is None:
        return _deliver(session, store, job, state, state["lease_id"], verified=False,
                        how=f", unverified: {state.get('unverified_reason')}", data={"verified": False})
    return _deliver(session, store, job, state, state["lease_id"], verified=True,
                    how=f"; it was verified by worker {verdict['worker_id']} of another provider: {_figures(verdict)}",
                    data={"lease_id": verdict["lease_id"], "verified": True, **verdict["figures"]})


def _deliver(session: Session, store: BlobStore, job: JobModel, state: dict[str, Any], trained_id: str, *,
             verified: bool, how: str, data: dict[str, Any]) -> list[str]:
    """The training lease `trained_id` is billed and paid (a redundant job's, with its withheld checkpoints), and
    the job succeeds with its adapter as a result file. Returns the upload's blob key, for the caller to delete
    after the commit."""
    # A new dict each time: the one assigned before may be what the session flushed, so changing it in place
    # would leave nothing for the next flush to write.
    job.verification = dict(state)
    if any(r["lease_id"] == trained_id for r in replicas.waiting(job)):
        trained = settle_replica(session, job, trained_id, "delivered")
    else:
        trained = meter_ended(session, job, trained_id, "until_end")
        settle_withheld(session, job, replicas.take_withheld(job))  # all confirmed with it, but those forfeit
    assert trained.adapter_key is not None
    job.stage = LeaseKind.train.value
    file = results.deliver(session=session, store=store, job=job, lease=trained, how=how, data=data)
    job.verification = {**job.verification, "status": "passed" if verified else "unverified", "result_file": file.id}
    return [trained.adapter_key]


def _replicated(session: Session, store: BlobStore, settings: CoordinatorSettings, job: JobModel,
                agreeing: list[dict[str, Any]]) -> list[str]:
    """A redundant job's training is confirmed by its verifiers: it waits, unsettled (`replicas.py`), for a
    second one trained from scratch elsewhere; with two, their held-out losses are compared (`_compare_replicas`).
    Returns the blob keys the caller deletes after the commit."""
    trained = session.get(LeaseModel, (job.verification or {})["lease_id"])
    assert trained is not None
    withheld = replicas.take_withheld(job, of_leases=lineage(session, trained.id))  # paid with it
    settle_withheld(session, job, replicas.take_withheld(job))  # the rest (set aside, not built on): paid now
    state = job.verification or {}
    losses = sorted(v["figures"]["heldout_adapter_loss"] for v in agreeing)
    replica = {"lease_id": trained.id, **state["trainer"], "heldout_adapter_loss": losses[len(losses) // 2],
               "heldout_base_loss": agreeing[0]["figures"]["heldout_base_loss"],
               "charge": until_end_charge(trained), "outcome": replicas.WAITING, "withheld": withheld}
    job.verification = {**state, "replicas": [*replicas.of(job), replica]}
    record_event(session=session, job=job, data={"lease_id": trained.id},
                 message=f"Training {len(replicas.of(job))} confirmed by {len(agreeing)} verifier(s): held-out loss "
                         f"{replica['heldout_adapter_loss']:.4f} (base {replica['heldout_base_loss']:.4f})")
    waiting = replicas.waiting(job)
    if len(waiting) < replicas.trainings(job.verification_mode):
        return _next_replica(session, job, why="a second training, from scratch on another provider, is compared "
                                               "with it")
    better, worse = sorted(waiting, key=lambda r: r["heldout_adapter_loss"])
    gap = worse["heldout_adapter_loss"] - better["heldout_adapter_loss"]
    allowed = settings.verify_tolerance + settings.verify_tolerance_share * better["heldout_adapter_loss"]
    if gap <= allowed:  # the better one is settled as the job's adapter; the other as the job ends
        unused = [k for k in (_upload(session, worse["lease_id"]),) if k]
        how = (f"; two trainings on independent providers, each verified, agree on the held-out sample (loss "
               f"{better['heldout_adapter_loss']:.4f} and {worse['heldout_adapter_loss']:.4f}, base "
               f"{better['heldout_base_loss']:.4f}); the better one is delivered")
        return [*_deliver(session, store, job, job.verification or {}, better["lease_id"], verified=True, how=how,
                          data={"verified": True, "heldout_base_loss": better["heldout_base_loss"],
                                "heldout_adapter_loss": better["heldout_adapter_loss"],
                                "other_heldout_adapter_loss": worse["heldout_adapter_loss"]}), *unused]
    why = (f"its held-out loss {worse['heldout_adapter_loss']:.4f} is worse than the other training's "
           f"{better['heldout_adapter_loss']:.4f} by more than {allowed:.4f}")
    replicas.mark(job, worse["lease_id"], "refuted")
    meter_ended(session, job, worse["lease_id"], "not_billed")
    settle_withheld(session, job, worse.get("withheld") or [],
                    unpaid=[w["lease_id"] for w in worse.get("withheld") or []])
    trainer = session.get(WorkerModel, worse["worker_id"], with_for_update=True, populate_existing=True)
    assert trainer is not None
    _blame(session, settings, trainer, lineage(session, worse["lease_id"]))  # it trains again elsewhere anyway
    job.verification = {**(job.verification or {}),
                        "refuted": [*(job.verification or {}).get("refuted", []),
                                    {"lease_id": worse["lease_id"], "why": why}]}
    record_event(session=session, job=job, level="warn", data={"lease_id": worse["lease_id"]},
                 message=f"The training of worker {trainer.id} is not paid nor billed: {why}")
    unused = [k for k in (_upload(session, worse["lease_id"]),) if k]
    return [*unused, *_next_replica(session, job, why="another training, from scratch on another provider, is "
                                                       "compared with the better one")]


def _upload(session: Session, lease_id: str) -> str | None:
    lease = session.get(LeaseModel, lease_id)
    return lease.adapter_key if lease is not None else None


def _next_replica(session: Session, job: JobModel, *, why: str) -> list[str]:
    """The job trains again from scratch: never on a provider that trained it before (nor one that held a
    verification lease of it: placement reads `never_trains`), and never from an earlier training's checkpoints
    (their content is dropped). Returns their blob keys, for the caller to delete after the commit."""
    for provider in trainers(session, job):
        exclude(job, provider=provider)
    retired = session.scalars(select(JobCheckpointModel).where(
        JobCheckpointModel.job_id == job.id, JobCheckpointModel.blob_sha256.is_not(None))).all()
    for checkpoint in retired:
        checkpoint.blob_sha256 = checkpoint.blob_bytes = None
    job.stage = LeaseKind.train.value
    job.verification = {**(job.verification or {}), "status": "pending"}
    change_status(session=session, job=job, to=JobStatus.queued, data={"training": len(replicas.of(job)) + 1},
                  message=f"Training again from scratch: {why}")
    return [checkpoint_key(c.id) for c in retired]


def _refuted(session: Session, settings: CoordinatorSettings, f: FencedLease, state: dict[str, Any], why: str,
             usage: dict[str, Any], *, winners: list[dict[str, Any]], losers: list[dict[str, Any]]) -> list[str]:
    """Two verifiers disagree with the trainer: it is not paid, nor the customer billed; the job trains again,
    never on the trainer's provider, nor on one that held a verification lease of it."""
    trained = session.get(LeaseModel, state["lease_id"])
    assert trained is not None
    trainer = session.get(WorkerModel, trained.worker_id, with_for_update=True, populate_existing=True)
    assert trainer is not None
    f.job.verification = {**state, "status": "failed",
                          "refuted": [*state.get("refuted", []), {"lease_id": trained.id, "why": why}]}
    # The leases it was built on (preempted with a checkpoint) are part of what was refuted: not paid, their
    # checkpoints quarantined, their providers off the job (below).
    chain = _refute_lineage(session, f.job, trained.id)
    f.job.stage = LeaseKind.train.value
    end_and_requeue(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.completed,
                    reason=f"disagreed: {why}", settings=settings, count_attempt=True, usage=usage, settle_later=True,
                    job_reason=f"Two workers of other providers refuted the adapter of worker {trainer.id} ({why}); "
                               "it is not paid nor billed, and the job trains again elsewhere")
    _decide(session, settings, f.job, winners=winners, losers=losers)
    meter_ended(session, f.job, trained.id, "not_billed")
    for provider in _blame(session, settings, trainer, chain):
        exclude(f.job, provider=provider)
    own = select(LeaseModel.id).join(WorkerModel, WorkerModel.id == LeaseModel.worker_id).where(
        LeaseModel.job_id == f.job.id, WorkerModel.account_id == trainer.account_id)
    session.execute(update(JobCheckpointModel).where(
        or_(JobCheckpointModel.lease_id.in_(own), JobCheckpointModel.lease_id.in_(chain)),
        JobCheckpointModel.quarantined_at.is_(None)).values(
        quarantined_at=utcnow(), quarantine_reason=f"its lease's adapter failed independent verification: {why}"))
    return [trained.adapter_key] if trained.adapter_key else []


def abandon(*, session: Session, job: JobModel) -> None:
    """The customer cancels a job under verification (the caller holds its lock): the verifiers whose verdicts
    waited for a quorum are paid, and the training lease is metered until its end, unless a verifier disputed it
    (then it is neither billed nor paid, nor are the withheld checkpoints it was built on: no quorum cleared
    them)."""
    state = job.verification or {}
    if job.stage != LeaseKind.verify.value or state.get("status") != "pending":
        return
    lock_books(session, job)
    disputed = any(not v["agrees"] for v in state.get("verdicts", []))
    meter_ended(session, job, state["lease_id"], "not_billed" if disputed else "until_end")
    if disputed:  # nor the withheld checkpoints it was built on; the rest are paid as the job ends
        _refute_lineage(session, job, state["lease_id"])
    for verdict in state.get("verdicts", []):  # every verdict waits for the quorum, so none is settled yet
        meter_ended(session, job, verdict["lease_id"], "until_end")
    job.verification = {**(job.verification or {}), "status": "cancelled"}  # what the settling above left
    job.stage = LeaseKind.train.value


WAIT_BATCH = 200


def stop_waiting(*, session: Session, store: BlobStore, settings: CoordinatorSettings) -> int:
    """Jobs the platform chose to verify (not those whose customer asked) that found no independent verifier
    within `verify_wait_s`: released unverified, their training paid (no verdict disputed it; a disputed one
    waits for its quorum or a cancel). How many."""
    now = utcnow()
    released = 0
    for job_id in session.scalars(select(JobModel.id).where(
            JobModel.stage == LeaseKind.verify.value, JobModel.status == JobStatus.queued,
            JobModel.verification_mode == "auto").order_by(JobModel.id).limit(WAIT_BATCH)).all():
        job = session.scalars(select(JobModel).where(JobModel.id == job_id, JobModel.status == JobStatus.queued,
                                                     JobModel.stage == LeaseKind.verify.value)
                              .with_for_update(skip_locked=True).execution_options(populate_existing=True)).first()
        state = dict(job.verification or {}) if job is not None else {}
        since = state.get("since")
        if job is None or since is None or (now - datetime.fromisoformat(since)).total_seconds() < settings.verify_wait_s:
            session.rollback()
            continue
        lock_books(session, job)
        if any(not v["agrees"] for v in state.get("verdicts", [])):  # disputed: only a quorum, or a cancel, ends it
            session.rollback()
            continue
        for pending in state.get("verdicts", []):
            meter_ended(session, job, pending["lease_id"], "until_end")
        state["unverified_reason"] = f"no worker of another provider could verify it within {settings.verify_wait_s} s"
        unused = _confirmed(session, store, job, state, None)
        session.commit()
        for key in unused:
            store.delete(key)
        released += 1
    session.commit()
    return released
