"""The held-out sample: a few examples of each job's training file that no trainer ever receives, so a verifier
can measure what an adapter learned on data its trainer could not have trained on (`verification.py`).

When a job is created from a file of at least `MIN_EXAMPLES` examples, `SHARE_BPS` of them (at least
`MIN_KEPT`, at most `MAX_KEPT`), chosen by a generator seeded with the file's sha256, are written to the job's
held-out blob, and the rest to the job's training blob: that is what a training lease downloads. The lines are
copied byte for byte (validated at upload), so both blobs are valid files of the same format. Smaller files keep
nothing back; their verification measures the validation split alone.

Jobs on the same data keep back the same examples, so whoever may have seen a sample is kept per sample, not per
job (`held_out_viewers`): a provider one of whose workers held a verification lease of a job with the sample
(`viewed`) never trains a job that holds it back (`viewers`, `viewed_by`, read by placement), and a provider
training a job that holds it back never verifies one with it meanwhile (`training`, `trained_by`).
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    LIVE_LEASE, FileModel, HeldOutViewerModel, JobModel, LeaseKind, LeaseModel, WorkerModel,
)
from coordinator.services import files
from coordinator.storage import BlobStore
from shared.datasets import UTF8_BOM
from shared.pricing import BPS

MIN_EXAMPLES = 20
SHARE_BPS = 500  # 5%
MIN_KEPT, MAX_KEPT = 2, 64
SPOOL_BYTES = 8 * 1024 * 1024


def training_key(job_id: str) -> str:
    return f"jobs/{job_id}/training.jsonl"


def held_out_key(job_id: str) -> str:
    return f"jobs/{job_id}/held-out.jsonl"


@dataclass(frozen=True, slots=True)
class Input:
    """A blob a lease downloads: its key in the store and its sha256."""

    key: str
    sha256: str


def kept_back(examples: int) -> int:
    if examples < MIN_EXAMPLES:
        return 0
    return max(MIN_KEPT, min(MAX_KEPT, examples * SHARE_BPS // BPS))


def keep_back(*, store: BlobStore, job: JobModel, training: FileModel) -> dict[str, Any] | None:
    """Split the job's training file into what trainers get and the held-out sample; what `job.held_out` records
    (None when the file is too small to keep any back)."""
    examples = training.examples or 0
    count = kept_back(examples)
    if count == 0:
        return None
    # Seeded by the file, not the job: jobs on the same file keep back the same examples, so their trainers
    # together never hold the whole of it.
    chosen = frozenset(random.Random(f"{training.sha256}:held-out").sample(range(examples), count))
    with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as shipped, tempfile.SpooledTemporaryFile(SPOOL_BYTES) as held:
        index = 0
        for number, line in enumerate(store.iter_lines(files.blob_key(training.id)), start=1):
            if number == 1:
                line = line.removeprefix(UTF8_BOM)
            if not line.strip():
                continue
            (held if index in chosen else shipped).write(line if line.endswith(b"\n") else line + b"\n")
            index += 1
        shipped.seek(0)
        held.seek(0)
        kept = store.put(training_key(job.id), shipped)  # type: ignore[arg-type]
        sample = store.put(held_out_key(job.id), held)  # type: ignore[arg-type]
    return {"examples": count, "sha256": sample.sha256, "bytes": sample.bytes,
            "training_examples": index - count, "training_sha256": kept.sha256, "training_bytes": kept.bytes}


def training_input(job: JobModel, training: FileModel) -> Input:
    """What a training lease downloads: the job's training blob without the held-out sample (or the file itself)."""
    if job.held_out:
        return Input(training_key(job.id), job.held_out["training_sha256"])
    return Input(files.blob_key(training.id), training.sha256)


def sample_input(job: JobModel) -> Input | None:
    """The held-out sample, for a verification lease only."""
    return Input(held_out_key(job.id), job.held_out["sha256"]) if job.held_out else None


def lock_providers(session: Session, provider_ids: list[str]) -> None:
    """Serialise placing held-out work on these providers (a verification that shows a sample, a training that
    must never see it) until the transaction ends, so two of a provider's machines claiming at once cannot split
    a sample between them; the caller reads `viewed_by`/`trained_by` again afterwards. PostgreSQL advisory locks,
    in one order; SQLite (the embedded default, one process) has nothing to lock here."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for provider_id in sorted(set(provider_ids)):
        session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                        {"key": f"held-out:{provider_id}"})


def sample_of(job: JobModel) -> str | None:
    return job.held_out["sha256"] if job.held_out else None


def viewed(session: Session, job: JobModel, provider_id: str) -> None:
    """A worker of the provider holds a verification lease of the job: it may download the held-out sample."""
    sample = sample_of(job)
    if sample is not None and session.get(HeldOutViewerModel, (provider_id, sample)) is None:
        session.add(HeldOutViewerModel(provider_id=provider_id, sample_sha256=sample))


def viewers(session: Session, jobs: list[JobModel]) -> dict[str, set[str]]:
    """For each sample the jobs hold back, the providers that may have seen it."""
    samples = sorted({s for s in map(sample_of, jobs) if s})
    found: dict[str, set[str]] = {}
    for sample, provider in session.execute(select(HeldOutViewerModel.sample_sha256, HeldOutViewerModel.provider_id)
                                            .where(HeldOutViewerModel.sample_sha256.in_(samples))) if samples else ():
        found.setdefault(sample, set()).add(provider)
    return found


def viewed_by(session: Session, provider_id: str) -> frozenset[str]:
    """The samples the provider may have seen."""
    return frozenset(session.scalars(select(HeldOutViewerModel.sample_sha256).where(
        HeldOutViewerModel.provider_id == provider_id)))


def _in_training(session: Session, *where: Any) -> list[tuple[str, str]]:
    rows = session.execute(select(WorkerModel.account_id, JobModel.held_out).join(
        LeaseModel, LeaseModel.worker_id == WorkerModel.id).join(JobModel, JobModel.id == LeaseModel.job_id).where(
        LeaseModel.kind == LeaseKind.train, LeaseModel.status.in_(LIVE_LEASE), JobModel.held_out.is_not(None), *where))
    return [(provider, held["sha256"]) for provider, held in rows if held and held.get("sha256")]


def training(session: Session, jobs: list[JobModel], providers: list[str]) -> dict[str, set[str]]:
    """For each sample the jobs hold back, those of `providers` training a job that holds it back right now (a
    live training lease): they never verify a job with it, since what a verifier downloads could go into that
    training."""
    samples = {s for s in map(sample_of, jobs) if s}
    found: dict[str, set[str]] = {}
    if samples and providers:
        for provider, sample in _in_training(session, WorkerModel.account_id.in_(sorted(set(providers)))):
            if sample in samples:
                found.setdefault(sample, set()).add(provider)
    return found


def trained_by(session: Session, provider_id: str) -> frozenset[str]:
    """The samples held back by the jobs the provider is training right now."""
    return frozenset(sample for _, sample in _in_training(session, WorkerModel.account_id == provider_id))


def delete(store: BlobStore, job_id: str) -> None:
    store.delete(training_key(job_id))
    store.delete(held_out_key(job_id))
