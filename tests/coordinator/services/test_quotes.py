"""`services/quotes.py` on a real database: a quote from a training file or a token count, offering the cheapest
and the fastest idle worker that could take the job (placement's own rules), and every GPU class that fits it
when none is idle. Nothing is held or stored. The HTTP shape: api/test_quotes.py."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, JobModel
from coordinator.services import quotes
from coordinator.settings import CoordinatorSettings
from shared.errors import InvalidRequest
from shared.schemas.quotes import QuoteCreate
from tests.fakes import gpu


def quote(session: Session, account: AccountModel, settings: CoordinatorSettings, **fields: object):  # type: ignore[no-untyped-def]
    return quotes.quote(session=session, account=account, settings=settings,
                        request=QuoteCreate.model_validate({"model": "tunegrid/tiny-llama", **fields}))


def test_with_no_idle_worker_a_quote_prices_each_gpu_class_and_stores_nothing(
    session: Session, customer_account: AccountModel, settings: CoordinatorSettings, dataset: str,
) -> None:
    q = quote(session, customer_account, settings, training_file=dataset, hyperparameters={"n_epochs": 2})
    assert q.workers_available == 0 and q.cheapest is None and q.fastest is None and q.n_epochs == 2
    assert q.estimated_tokens > 0 and q.gpu_classes
    assert session.scalar(select(func.count()).select_from(JobModel)) == 0


def test_the_cheapest_and_the_fastest_idle_workers_are_offered(session: Session, customer_account: AccountModel,
                                                               settings: CoordinatorSettings, service_agent) -> None:  # type: ignore[no-untyped-def]
    cheap = service_agent("cheap", price="0.10", gpus=[gpu("NVIDIA GeForce RTX 3060", 12, "8.6", uuid="GPU-c")])
    fast = service_agent("fast", price="0.90", gpus=[gpu("NVIDIA GeForce RTX 4090", 24, "8.9", uuid="GPU-f")])
    for agent in (cheap, fast):
        agent.claim()  # idle and placeable
    q = quote(session, customer_account, settings, training_tokens=10**10)  # hours of training: speeds tell apart
    assert q.workers_available == 2
    assert q.cheapest is not None and q.cheapest.worker_id == cheap.worker_id
    assert q.fastest is not None and q.fastest.worker_id == fast.worker_id
    assert q.fastest.estimated_seconds <= q.cheapest.estimated_seconds
    assert q.cheapest.price_per_gpu_hour == "0.120000"  # the ask plus the platform's fee


def test_a_worker_above_the_jobs_max_price_is_not_offered(session: Session, customer_account: AccountModel,
                                                          settings: CoordinatorSettings, service_agent) -> None:  # type: ignore[no-untyped-def]
    service_agent("dear", price="2.00").claim()
    assert quote(session, customer_account, settings, training_tokens=1000, max_price_per_gpu_hour="1").workers_available == 0


def test_someone_elses_file_cannot_be_quoted(session: Session, settings: CoordinatorSettings, make_caller,  # type: ignore[no-untyped-def]
                                             dataset: str) -> None:
    bob = session.get(AccountModel, make_caller("customer", "bob").account_id)
    with pytest.raises(InvalidRequest) as refused:
        quote(session, bob, settings, training_file=dataset)  # type: ignore[arg-type]
    assert refused.value.code == "file_not_found"


def test_a_dpo_quote_counts_the_reference_pass_and_two_sequences_a_pair(
    session: Session, customer_account: AccountModel, settings: CoordinatorSettings,
) -> None:
    """DPO's compute is every epoch's tokens (both answers of each pair, counted by the file) plus a third of
    one epoch for the reference pass; its memory holds two sequences a pair (with "auto", a micro-batch holds the
    same tokens either way: two rows, or one pair)."""
    from coordinator.services.placement import requirements  # noqa: PLC0415

    sft = quote(session, customer_account, settings, training_tokens=30_000, hyperparameters={"n_epochs": 2})
    dpo = quote(session, customer_account, settings, training_tokens=30_000,
                method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2}}})
    assert sft.estimated_tokens == 60_000 and dpo.estimated_tokens == 70_000
    cheapest = {c.gpu_class: c for c in sft.gpu_classes}
    assert all(c.estimated_gpu_hours >= cheapest[c.gpu_class].estimated_gpu_hours for c in dpo.gpu_classes)
    def memory(**fields) -> int:  # type: ignore[no-untyped-def]
        draft = quotes._draft_job(session, customer_account, QuoteCreate.model_validate(  # noqa: SLF001
            {"model": "qwen2.5-7b-instruct", "training_tokens": 1000, **fields}))
        return requirements(draft).memory_bytes  # type: ignore[union-attr]

    one = {"hyperparameters": {"batch_size": 1}}
    assert memory(method={"type": "dpo", "dpo": one}) > memory(method={"type": "supervised", "supervised": one})
    assert memory(method={"type": "dpo"}) == memory()


def test_a_quote_prices_the_exports_asked_for_apart(session, customer_account, settings) -> None:  # type: ignore[no-untyped-def]
    from coordinator.services.quotes import quote  # noqa: PLC0415
    from shared.errors import InvalidRequest  # noqa: PLC0415
    from shared.schemas.quotes import QuoteCreate  # noqa: PLC0415

    request = QuoteCreate.model_validate({"model": "llama-3.1-8b-instruct", "training_tokens": 1_000_000,
                                          "export": ["gguf:q4_k_m", "merged"]})
    found = quote(session=session, account=customer_account, request=request, settings=settings).export
    assert found is not None and found.formats == ["merged", "gguf:q4_k_m"]
    assert 20e9 < found.estimated_bytes < 22e9 and found.estimated_seconds > 1000
    assert 3 < found.estimated_memory_gb < 8 and float(found.estimated_cost) > 0
    with pytest.raises(InvalidRequest):
        quote(session=session, account=customer_account, settings=settings, request=QuoteCreate.model_validate(
            {"model": "mistral-7b-instruct-v0.3", "training_tokens": 1000, "export": ["gguf:q8_0"]}))
