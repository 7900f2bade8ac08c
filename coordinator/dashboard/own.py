"""`/dashboard`: a customer's own jobs, spend and balance, or a provider's own workers and earnings."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from coordinator.dashboard import charts
from coordinator.dashboard.pages import DEFAULT_DAYS, guarded, html, in_hop, job_page
from coordinator.dashboard.sessions import DashboardSession
from coordinator.db.tables import Role
from coordinator.services import billing, payouts, reports

router = APIRouter(include_in_schema=False)


@router.get("/dashboard")
async def own_dashboard(request: Request, page: Annotated[int, Query(ge=1, le=100_000)] = 1,
                        status: str | None = None) -> Response:
    async def render() -> Response:
        today = date.today()
        first = today - timedelta(days=DEFAULT_DAYS - 1)

        def work(session: Session, d: DashboardSession) -> dict[str, Any]:
            if d.account.role is Role.provider:
                return {"dashboard": d, "earnings": payouts.earnings(session=session, account=d.account),
                        "fleet": reports.fleet(session=session, state=None, q=None, sort="name", descending=False,
                                               page=page, provider_id=d.account.id)}
            return {"dashboard": d, "balance": billing.balance_of(session=session, account=d.account),
                    "costs": reports.costs(session=session, start=first, end=today, account_id=d.account.id),
                    "jobs": reports.jobs(session=session, status=status or None, customer=None, model=None, worker=None,
                                         page=page, account_id=d.account.id)}

        context = await in_hop(request, work, admin=False)
        if "costs" in context:
            days = context["costs"].days
            context["chart"] = charts.bar_chart([d["day"] for d in days], [d["spend"] / 1e6 for d in days],
                                                title="Your spend per day")
            return html(request, "customer.html", title="Your dashboard", status_filter=status or "", **context)
        return html(request, "provider.html", title="Your workers", **context)

    return await guarded(request, render)


@router.get("/dashboard/jobs/{job_id}")
async def own_job(request: Request, job_id: str) -> Response:
    async def render() -> Response:
        dashboard, detail = await in_hop(request, lambda s, d: (d, reports.job_detail(
            session=s, job_id=job_id, account_id=d.account.id)), admin=False)
        return job_page(request, dashboard, detail, admin=False)

    return await guarded(request, render)
