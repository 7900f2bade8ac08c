"""`/admin`: what admins watch and do: costs and revenue (with CSV), the fleet (suspend a worker), and jobs
(cancel, refund)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from coordinator.dashboard import charts
from coordinator.dashboard.pages import check_csrf, csv_response, guarded, html, in_hop, job_page, period
from coordinator.dashboard.sessions import DashboardSession
from coordinator.services import billing, jobs as job_service, reports, workers as worker_service
from shared.errors import InvalidRequest
from shared.money import micros_to_usd, usd_to_micros

router = APIRouter(include_in_schema=False)


# --- admin: costs -----------------------------------------------------------------------------------

@router.get("/admin")
async def admin_home() -> Response:
    return RedirectResponse("/admin/costs", status_code=303)


@router.get("/admin/costs")
async def admin_costs(request: Request, start: str | None = None, end: str | None = None) -> Response:
    async def render() -> Response:
        first, last = period(start, end)
        dashboard, report = await in_hop(request, lambda s, d: (d, reports.costs(session=s, start=first, end=last)),
                                          admin=True)
        chart = charts.bar_chart([d["day"] for d in report.days], [d["spend"] / 1e6 for d in report.days],
                                 title="Customer spend per day")
        return html(request, "costs.html", dashboard=dashboard, report=report, chart=chart, title="Costs")

    return await guarded(request, render)


CSV_TABLES = {
    "days": ("day", "spend", "fee", "earned", "seconds"),
    "customers": ("account_id", "name", "spend", "leases", "seconds"),
    "jobs": ("job_id", "customer_id", "model", "spend", "seconds"),
    "gpu_classes": ("gpu_class", "spend", "seconds", "leases"),
}


@router.get("/admin/costs.csv")
async def admin_costs_csv(request: Request, table: str = "days", start: str | None = None,
                          end: str | None = None) -> Response:
    async def render() -> Response:
        if table not in CSV_TABLES:
            raise InvalidRequest(f"Unknown table {table!r}; one of {', '.join(CSV_TABLES)}.", param="table")
        first, last = period(start, end)
        report = await in_hop(request, lambda s, d: reports.costs(session=s, start=first, end=last), admin=True)
        columns = CSV_TABLES[table]
        money = ("spend", "fee", "earned")
        return csv_response(request, f"{table}-{first}-{last}", [f"{c}_usd" if c in money else c for c in columns],
                            [[micros_to_usd(row[c]) if c in money else row[c] for c in columns]
                             for row in getattr(report, table)])

    return await guarded(request, render)


# --- admin: fleet -----------------------------------------------------------------------------------

def _telemetry_series(history: list[bytes]) -> dict[str, list[float | None]]:
    temps: list[float | None] = []
    utils: list[float | None] = []
    for raw in reversed(history):  # oldest first
        try:
            gpus = json.loads(raw).get("heartbeat", {}).get("gpus") or []
        except ValueError:
            continue
        temps.append(max((g["temperature_c"] for g in gpus if g.get("temperature_c") is not None), default=None))
        utils.append(max((g["utilization_pct"] for g in gpus if g.get("utilization_pct") is not None), default=None))
    return {"temperature": temps, "utilization": utils}


async def _fleet(request: Request, *, state: str | None, q: str | None, sort: str, desc: bool, page: int,
                 admin: bool) -> tuple[DashboardSession, reports.Page, dict[str, Any]]:
    def work(session: Session, d: DashboardSession) -> tuple[DashboardSession, reports.Page]:
        provider = None if d.is_admin and admin else d.account.id
        return d, reports.fleet(session=session, state=state, q=q, sort=sort, descending=desc, page=page,
                                provider_id=provider)

    dashboard, result = await in_hop(request, work, admin=admin)
    history = await request.app.state.hot.history([w.id for w in result.rows])
    sparks = {}
    for worker in result.rows:
        series = _telemetry_series(history.get(worker.id, []))
        sparks[worker.id] = (charts.sparkline(series["temperature"], label="GPU temperature °C"),
                             charts.sparkline(series["utilization"], label="GPU utilisation %"))
    return dashboard, result, sparks


@router.get("/admin/fleet")
async def admin_fleet(request: Request, state: str | None = None, q: Annotated[str | None, Query(max_length=100)] = None,
                      sort: str = "name", desc: bool = False, page: Annotated[int, Query(ge=1, le=100_000)] = 1,
                      partial: bool = False, format: str = "html") -> Response:  # noqa: A002 - the query's name
    async def render() -> Response:
        if format == "csv":
            result = await in_hop(request, lambda s, d: reports.fleet(
                session=s, state=state, q=q, sort=sort, descending=desc, page=1, size=reports.EXPORT_ROWS), admin=True)
            return csv_response(request, "fleet", [
                "worker_id", "name", "provider_id", "gpu", "gpu_class", "gpus", "vram_gb", "state", "ask_usd_per_hour",
                "reliability", "earned_usd", "last_heartbeat_at"], [
                [w.id, w.name, w.account_id, w.gpu_name, w.gpu_class, len(w.gpus), w.vram_total_bytes >> 30,
                 w.state.value, micros_to_usd(w.ask_price_per_gpu_hour), w.reliability,
                 micros_to_usd(result.extra["earnings"].get(w.id, 0)),
                 w.last_heartbeat_at.isoformat() if w.last_heartbeat_at else ""] for w in result.rows])
        dashboard, result, sparks = await _fleet(request, state=state, q=q, sort=sort, desc=desc, page=page, admin=True)
        return html(request, "fleet_rows.html" if partial else "fleet.html", dashboard=dashboard, result=result,
                     sparks=sparks, state=state or "", q=q or "", sort=sort, desc=desc, title="Fleet", admin=True)

    return await guarded(request, render)


@router.post("/admin/workers/{worker_id}/suspend")
async def admin_suspend(request: Request, worker_id: str, csrf_token: Annotated[str, Form(max_length=100)] = "",
                        reason: Annotated[str, Form(max_length=500)] = "suspended from the dashboard") -> Response:
    async def render() -> Response:
        settings = request.app.state.settings

        def work(session: Session, d: DashboardSession) -> None:
            check_csrf(request, d, csrf_token)
            worker_service.suspend(session=session, worker_id=worker_id, reason=reason, settings=settings)

        await in_hop(request, work, admin=True)
        return RedirectResponse(f"/admin/fleet?q={worker_id}", status_code=303)

    return await guarded(request, render)


# --- admin: jobs ------------------------------------------------------------------------------------

@router.get("/admin/jobs")
async def admin_jobs(request: Request, status: str | None = None, customer: Annotated[str | None, Query(max_length=64)] = None,
                     model: Annotated[str | None, Query(max_length=100)] = None,
                     worker: Annotated[str | None, Query(max_length=64)] = None,
                     page: Annotated[int, Query(ge=1, le=100_000)] = 1, format: str = "html") -> Response:  # noqa: A002
    async def render() -> Response:
        size = reports.EXPORT_ROWS if format == "csv" else reports.PAGE_SIZE
        dashboard, result = await in_hop(request, lambda s, d: (d, reports.jobs(
            session=s, status=status or None, customer=customer or None, model=model or None, worker=worker or None,
            page=1 if format == "csv" else page, size=size)), admin=True)
        if format == "csv":
            return csv_response(request, "jobs", [
                "job_id", "customer_id", "customer", "model", "status", "cost_usd", "held_usd", "created_at"], [
                [j.id, j.account_id, result.extra["customers"].get(j.account_id, ""), j.model, j.status.value,
                 micros_to_usd(j.billed_micros), micros_to_usd(j.held_micros), j.created_at.isoformat()]
                for j in result.rows])
        return html(request, "jobs.html", dashboard=dashboard, result=result, title="Jobs", admin=True,
                     filters={"status": status or "", "customer": customer or "", "model": model or "",
                              "worker": worker or ""})

    return await guarded(request, render)


@router.get("/admin/jobs/{job_id}")
async def admin_job(request: Request, job_id: str) -> Response:
    async def render() -> Response:
        dashboard, detail = await in_hop(request, lambda s, d: (d, reports.job_detail(session=s, job_id=job_id)),
                                          admin=True)
        return job_page(request, dashboard, detail, admin=True)

    return await guarded(request, render)


@router.post("/admin/jobs/{job_id}/cancel")
async def admin_cancel(request: Request, job_id: str, csrf_token: Annotated[str, Form(max_length=100)] = "") -> Response:
    async def render() -> Response:
        def work(session: Session, d: DashboardSession) -> None:
            check_csrf(request, d, csrf_token)
            detail = reports.job_detail(session=session, job_id=job_id)
            job_service.cancel(session=session, account=detail.customer, job_id=job_id)

        await in_hop(request, work, admin=True)
        return RedirectResponse(f"/admin/jobs/{job_id}", status_code=303)

    return await guarded(request, render)


@router.post("/admin/jobs/{job_id}/refund")
async def admin_refund(request: Request, job_id: str, amount: Annotated[str, Form(max_length=32)],
                       nonce: Annotated[str, Form(min_length=8, max_length=64)],
                       csrf_token: Annotated[str, Form(max_length=100)] = "",
                       reason: Annotated[str, Form(max_length=500)] = "refunded from the dashboard") -> Response:
    async def render() -> Response:
        try:
            micros = usd_to_micros(amount)
        except ValueError as exc:
            raise InvalidRequest(f"Amount: {exc}.", param="amount") from None

        def work(session: Session, d: DashboardSession) -> None:
            check_csrf(request, d, csrf_token)
            billing.refund_job(session=session, job_id=job_id, amount=micros, nonce=nonce, admin=d.account, reason=reason)

        await in_hop(request, work, admin=True)
        return RedirectResponse(f"/admin/jobs/{job_id}", status_code=303)

    return await guarded(request, render)


