"""The market's default price cap: a job that names no `max_price_per_gpu_hour` gets one, so no worker can
charge it what it likes.

The rule: at most `market_price_cap_bps` (3x by default) of the market price of GPUs that fit the job — the
median over providers of each provider's median customer price (ask plus our fee) among its machines that
could run the job — and never above `max_price_cap_usd`, which is also the cap when no fitting machine is
registered. Counting each provider once keeps one provider's many machines from moving the median. The cap is
fixed when the job is created and shown in its quote and on the job (`max_price_source: "market"`).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import WorkerModel
from coordinator.services.placement import Requirements, candidate, eligible
from coordinator.settings import CoordinatorSettings
from shared.money import Micros
from shared.pricing import BPS

MARKET_WORKERS = 5000  # registered machines looked at (newest first)


def market_price(session: Session, req: Requirements, settings: CoordinatorSettings) -> Micros | None:
    """The median over providers of their median customer price for machines that fit the job; None when none do."""
    by_provider: dict[str, list[int]] = defaultdict(list)
    for worker in session.scalars(
        select(WorkerModel).where(WorkerModel.revoked_at.is_(None), WorkerModel.suspended_at.is_(None))
        .order_by(WorkerModel.id.desc()).limit(MARKET_WORKERS)
    ):
        c = candidate(worker, platform_fee_bps=settings.platform_fee_bps)
        if eligible(req, c):
            by_provider[worker.account_id].append(c.price)
    if not by_provider:
        return None
    return Micros(math.ceil(statistics.median(statistics.median(p) for p in by_provider.values())))


def default_price_cap(session: Session, req: Requirements, settings: CoordinatorSettings) -> Micros:
    """The cap a job without its own gets (the module's rule)."""
    ceiling = settings.max_price_cap
    market = market_price(session, req, settings)
    if market is None:
        return ceiling
    return Micros(min(-(-market * settings.market_price_cap_bps // BPS), ceiling))
