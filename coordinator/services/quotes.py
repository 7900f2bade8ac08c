"""Quotes: estimated tokens, memory, GPU-hours and cost per GPU class, and the best offers available now."""

from __future__ import annotations

from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, JobModel, utcnow
from coordinator.services import continuation, jobs, replicas
from coordinator.services.placement import Candidate, placeable_workers, candidate, eligible, requirements
from coordinator.settings import CoordinatorSettings
from shared.catalog import get_base_model
from shared.memory import GIB, estimate_export
from shared.money import micros_to_usd, usd_to_micros
from shared.pricing import (
    CPU, GPU_CLASSES, cost_for_seconds, cpu_can_train, expected_tokens_per_s, export_seconds, get_gpu_class,
    training_seconds,
    training_tokens,
)
from shared.schemas.quotes import ExportQuote, GpuClassQuote, Offer, QuoteCreate, QuoteRead
from shared.weights import check_formats, export_bytes

MAX_QUOTED_WORKERS = 5000


def _draft_job(session: Session, account: AccountModel, request: QuoteCreate) -> JobModel:
    """The job the request describes, never added to the session: placement's requirements read it."""
    start = (continuation.resolve(session=session, account=account, name=request.model)
             if continuation.is_continuation(request.model) else None)
    base = get_base_model(start.parent.model if start else request.model)
    method = jobs.method_of(request)
    hp = jobs.hyperparameters_of(request)
    n_epochs = jobs.DEFAULT_EPOCHS if hp.n_epochs == "auto" else hp.n_epochs
    if request.training_file is not None:
        training = jobs.usable_file(session=session, account=account, file_id=request.training_file, param="training_file")
        jobs.check_files_fit(method=method, base=base, training=training, validation=None)
        per_epoch = training.estimated_tokens or 0
    else:
        per_epoch = request.training_tokens or 0
    tokens = training_tokens(per_epoch, n_epochs=n_epochs, method=method)
    return JobModel(
        id="quote", model=base.id, method=method, hyperparameters={**hp.model_dump(), "n_epochs": n_epochs},
        lora=continuation.lora_for(start, request.lora.model_dump(exclude_unset=True) if request.lora else None)
        if start else jobs.lora_of(request), estimated_tokens=tokens,
        max_price_per_gpu_hour=usd_to_micros(request.max_price_per_gpu_hour) if request.max_price_per_gpu_hour else None,
        min_vram_gb=request.min_vram_gb, gpu_filter=request.gpu_filter, trusted_hosts_only=request.trusted_hosts_only,
    )


def _offer(c: Candidate, *, base, tokens: int, trainings: int) -> Offer:  # type: ignore[no-untyped-def]
    tps = expected_tokens_per_s(base, get_gpu_class(c.worker.gpu_class), speed_factor=c.worker.speed_factor)
    seconds = training_seconds(tokens, tps)
    return Offer(
        worker_id=c.worker.id, gpu_class=c.worker.gpu_class, gpu_name=c.worker.gpu_name,
        price_per_gpu_hour=micros_to_usd(c.price), estimated_tokens_per_s=round(tps, 1), estimated_seconds=seconds,
        estimated_cost=micros_to_usd(cost_for_seconds(c.price, seconds) * trainings),
        has_model_cached=base.id in c.cached,
    )


def quote(*, session: Session, account: AccountModel, request: QuoteCreate, settings: CoordinatorSettings) -> QuoteRead:
    draft = _draft_job(session, account, request)
    jobs.price_cap(session=session, job=draft, settings=settings)
    req = requirements(draft)
    assert req is not None
    base, tokens = req.base, draft.estimated_tokens
    workers = session.scalars(placeable_workers(utcnow(), settings).limit(MAX_QUOTED_WORKERS)).all()
    session.commit()
    able = [c for c in (candidate(w, platform_fee_bps=settings.platform_fee_bps) for w in workers) if eligible(req, c)]
    trainings = replicas.trainings(request.verification)
    offers = [_offer(c, base=base, tokens=tokens, trainings=trainings) for c in able]
    cheapest = min(offers, key=lambda o: (usd_to_micros(o.estimated_cost), o.estimated_seconds), default=None)
    fastest = min(offers, key=lambda o: (o.estimated_seconds, usd_to_micros(o.estimated_cost)), default=None)
    classes = [*GPU_CLASSES, *([CPU] if cpu_can_train(base) else [])]
    rows = []
    for gpu_class in classes:
        tps = expected_tokens_per_s(base, gpu_class)
        seconds = training_seconds(tokens, tps)
        prices = sorted(c.price for c in able if c.worker.gpu_class == gpu_class.id)
        rows.append(GpuClassQuote(
            gpu_class=gpu_class.id, label=gpu_class.label, tier=gpu_class.tier,
            fits=gpu_class.tier == "cpu" or gpu_class.typical_vram_gb * GIB >= req.memory_bytes,
            estimated_tokens_per_s=round(tps, 1), estimated_gpu_hours=round(seconds / 3600, 4),
            workers_available=len(prices),
            price_per_gpu_hour_min=micros_to_usd(prices[0]) if prices else None,
            price_per_gpu_hour_max=micros_to_usd(prices[-1]) if prices else None,
            estimated_cost_min=micros_to_usd(cost_for_seconds(prices[0], seconds) * trainings) if prices else None,
        ))
    return QuoteRead(
        model=base.id, n_epochs=draft.hyperparameters["n_epochs"], estimated_tokens=tokens,
        estimated_memory_gb=round(req.memory_bytes / GIB, 2), platform_fee_percent=settings.platform_fee_bps / 100,
        workers_available=len(able), max_price_per_gpu_hour=micros_to_usd(draft.max_price_per_gpu_hour or 0),
        max_price_source=draft.max_price_source,  # type: ignore[arg-type]
        trainings=trainings, cheapest=cheapest, fastest=fastest, gpu_classes=rows,
        export=_export_quote(base, request, draft, [c.price for c in able]),
    )


def _export_quote(base, request: QuoteCreate, draft: JobModel, prices: list[int]) -> ExportQuote | None:  # type: ignore[no-untyped-def]
    if not request.export:
        return None
    formats = check_formats(base, list(request.export), param="export")
    seconds = export_seconds(base, formats)
    price = min(prices, default=draft.max_price_per_gpu_hour or 0)
    return ExportQuote(formats=formats, estimated_bytes=sum(export_bytes(base, f) for f in formats),
                       estimated_seconds=seconds,
                       estimated_memory_gb=round(estimate_export(base, lora_r=int(draft.lora.get("r", 16))).total / GIB, 2),
                       estimated_cost=micros_to_usd(cost_for_seconds(price, seconds)))

