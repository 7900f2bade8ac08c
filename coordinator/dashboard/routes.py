"""The dashboard: `/admin` for admins (costs, fleet, jobs, actions) and `/dashboard` for customers and
providers (their own jobs, spend and balance; their workers and earnings). Server-rendered with Jinja2; htmx
refreshes the fleet table in place. Every page's database work is one thread hop, like the API's."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from coordinator.api.deps import run_in_session
from coordinator.dashboard import charts
from coordinator.dashboard.sessions import COOKIE, LOGIN_COOKIE, DashboardSession, Sessions, csrf_ok, same_origin
from coordinator.db.tables import ApiKeyModel, Role
from coordinator.services import billing, jobs as job_service, keys, payouts, reports, workers as worker_service
from shared.errors import AuthenticationFailed, InvalidRequest, TunegridError
from shared.money import micros_to_usd, usd_to_micros

T = TypeVar("T")
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)
DEFAULT_DAYS = 30
MAX_DAYS = 366


def usd(micros: int | None, places: int = 2) -> str:
    if micros is None:
        return "-"
    text = micros_to_usd(micros)
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0")
    return f"${whole}.{frac.ljust(places, '0')}"


templates.env.filters["usd"] = usd
templates.env.filters["ts"] = lambda value: value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"
templates.env.filters["hours"] = lambda seconds: f"{(seconds or 0) / 3600:.2f}"


class Denied(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def sessions(request: Request) -> Sessions:
    state = request.app.state
    if not hasattr(state, "dashboard_sessions"):
        state.dashboard_sessions = Sessions(state.settings)
    return state.dashboard_sessions


async def _in_hop(request: Request, work: Callable[[Session, DashboardSession], T], *, admin: bool) -> T:
    """`work` with the caller's dashboard session, in one thread hop; Denied(401/403) otherwise."""
    cookie = request.cookies.get(COOKIE)
    manager = sessions(request)

    def run(session: Session) -> T:
        dashboard = manager.read(session, cookie)
        if dashboard is None:
            session.rollback()
            raise Denied(401)
        if admin and not dashboard.is_admin:
            session.rollback()
            raise Denied(403)
        return work(session, dashboard)

    return await run_in_session(request.app.state, run)


def _server_timing(request: Request) -> str:
    started = request.scope.get("tg_started", time.perf_counter())
    return f"app;dur={(time.perf_counter() - started) * 1000:.1f}"


def _page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, status_code=status)
    response.headers["Server-Timing"] = _server_timing(request)
    response.headers["Cache-Control"] = "no-store"
    return response


async def guarded(request: Request, render: Callable[[], Any]) -> Response:
    """Run a page; no session goes to the login page, a wrong role gets the 403 page, a bad input a 400 page."""
    request.scope["tg_started"] = time.perf_counter()
    try:
        return await render()
    except Denied as denied:
        if denied.status == 401:
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        return _page(request, "error.html", 403, dashboard=None, title="Forbidden",
                     message="This page is for admins. Your own jobs and bills are on your dashboard.")
    except TunegridError as exc:
        return _page(request, "error.html", exc.http_status, dashboard=None, title="Cannot do that", message=exc.message)


def _period(start: str | None, end: str | None) -> tuple[date, date]:
    today = date.today()
    try:
        last = date.fromisoformat(end) if end else today
        first = date.fromisoformat(start) if start else last - timedelta(days=DEFAULT_DAYS - 1)
    except (ValueError, OverflowError):  # OverflowError: no 30 days before 0001-01-01
        raise InvalidRequest("Days are YYYY-MM-DD, from 0001-01-30 to 9999-12-31.", param="start") from None
    if first > last or (last - first).days >= MAX_DAYS:
        raise InvalidRequest(f"A period runs forward and spans at most {MAX_DAYS} days.", param="start")
    return first, last


# --- login ------------------------------------------------------------------------------------------

@router.get("/login")
async def login_form(request: Request, next: str = "/admin") -> Response:  # noqa: A002 - the query's name
    cookie, token = sessions(request).login_token()
    response = _page(request, "login.html", dashboard=None, csrf=token, next=_safe_next(next), error=None)
    response.set_cookie(LOGIN_COOKIE, cookie, max_age=3600, **sessions(request).cookie_options())  # type: ignore[arg-type]
    return response


def _safe_next(target: str) -> str:
    return target if target.startswith(("/admin", "/dashboard")) and "//" not in target else "/admin"


@router.post("/login")
async def login(request: Request, api_key: Annotated[str, Form(max_length=200)],
                csrf_token: Annotated[str, Form(max_length=100)], next: Annotated[str, Form(max_length=200)] = "/admin") -> Response:  # noqa: A002
    manager = sessions(request)
    fresh_cookie, fresh_token = manager.login_token()

    def again(message: str, status: int) -> Response:
        response = _page(request, "login.html", status, dashboard=None, csrf=fresh_token, next=_safe_next(next),
                         error=message)
        response.set_cookie(LOGIN_COOKIE, fresh_cookie, max_age=3600, **manager.cookie_options())  # type: ignore[arg-type]
        return response

    if not same_origin(request) or not manager.check_login_token(request.cookies.get(LOGIN_COOKIE), csrf_token):
        return again("The form expired; log in again.", 400)

    def authenticate(session: Session) -> tuple[ApiKeyModel, Role]:
        account = keys.authenticate(session=session, key=api_key.strip())
        prefix = api_key.strip().split("_")[1]
        key = session.query(ApiKeyModel).filter(ApiKeyModel.prefix == prefix).one()
        session.commit()
        return key, account.role

    try:
        key, role = await run_in_session(request.app.state, authenticate)
    except AuthenticationFailed:
        return again("That key is not valid.", 401)
    cookie, _ = manager.issue(key)
    target = _safe_next(next) if role is Role.admin else "/dashboard"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, cookie, max_age=manager.max_age_s, **manager.cookie_options())  # type: ignore[arg-type]
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


@router.post("/logout")
async def logout(request: Request, csrf_token: Annotated[str, Form(max_length=100)] = "") -> Response:
    async def render() -> Response:
        dashboard = await _in_hop(request, lambda session, d: d, admin=False)
        if not csrf_ok(dashboard, csrf_token):
            return _page(request, "error.html", 400, dashboard=dashboard, title="Cannot do that",
                         message="The form expired; reload the page.")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    return await guarded(request, render)


# --- admin: costs -----------------------------------------------------------------------------------

@router.get("/admin")
async def admin_home() -> Response:
    return RedirectResponse("/admin/costs", status_code=303)


@router.get("/admin/costs")
async def admin_costs(request: Request, start: str | None = None, end: str | None = None) -> Response:
    async def render() -> Response:
        first, last = _period(start, end)
        dashboard, report = await _in_hop(request, lambda s, d: (d, reports.costs(session=s, start=first, end=last)),
                                          admin=True)
        chart = charts.bar_chart([d["day"] for d in report.days], [d["spend"] / 1e6 for d in report.days],
                                 title="Customer spend per day")
        return _page(request, "costs.html", dashboard=dashboard, report=report, chart=chart, title="Costs")

    return await guarded(request, render)


def csv_response(request: Request, name: str, header: list[str], rows: list[list[Any]]) -> Response:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return Response(out.getvalue(), media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="tunegrid-{name}.csv"', "Cache-Control": "no-store",
        "Server-Timing": _server_timing(request)})


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
        first, last = _period(start, end)
        report = await _in_hop(request, lambda s, d: reports.costs(session=s, start=first, end=last), admin=True)
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

    dashboard, result = await _in_hop(request, work, admin=admin)
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
            result = await _in_hop(request, lambda s, d: reports.fleet(
                session=s, state=state, q=q, sort=sort, descending=desc, page=1, size=reports.EXPORT_ROWS), admin=True)
            return csv_response(request, "fleet", [
                "worker_id", "name", "provider_id", "gpu", "gpu_class", "gpus", "vram_gb", "state", "ask_usd_per_hour",
                "reliability", "earned_usd", "last_heartbeat_at"], [
                [w.id, w.name, w.account_id, w.gpu_name, w.gpu_class, len(w.gpus), w.vram_total_bytes >> 30,
                 w.state.value, micros_to_usd(w.ask_price_per_gpu_hour), w.reliability,
                 micros_to_usd(result.extra["earnings"].get(w.id, 0)),
                 w.last_heartbeat_at.isoformat() if w.last_heartbeat_at else ""] for w in result.rows])
        dashboard, result, sparks = await _fleet(request, state=state, q=q, sort=sort, desc=desc, page=page, admin=True)
        return _page(request, "fleet_rows.html" if partial else "fleet.html", dashboard=dashboard, result=result,
                     sparks=sparks, state=state or "", q=q or "", sort=sort, desc=desc, title="Fleet", admin=True)

    return await guarded(request, render)


@router.post("/admin/workers/{worker_id}/suspend")
async def admin_suspend(request: Request, worker_id: str, csrf_token: Annotated[str, Form(max_length=100)] = "",
                        reason: Annotated[str, Form(max_length=500)] = "suspended from the dashboard") -> Response:
    async def render() -> Response:
        settings = request.app.state.settings

        def work(session: Session, d: DashboardSession) -> None:
            _check_csrf(request, d, csrf_token)
            worker_service.suspend(session=session, worker_id=worker_id, reason=reason, settings=settings)

        await _in_hop(request, work, admin=True)
        return RedirectResponse(f"/admin/fleet?q={worker_id}", status_code=303)

    return await guarded(request, render)


def _check_csrf(request: Request, dashboard: DashboardSession, submitted: str) -> None:
    if not same_origin(request) or not csrf_ok(dashboard, submitted):
        raise InvalidRequest("The form expired or came from another site; reload the page and try again.",
                                     code="csrf_failed")


# --- admin: jobs ------------------------------------------------------------------------------------

@router.get("/admin/jobs")
async def admin_jobs(request: Request, status: str | None = None, customer: Annotated[str | None, Query(max_length=64)] = None,
                     model: Annotated[str | None, Query(max_length=100)] = None,
                     worker: Annotated[str | None, Query(max_length=64)] = None,
                     page: Annotated[int, Query(ge=1, le=100_000)] = 1, format: str = "html") -> Response:  # noqa: A002
    async def render() -> Response:
        size = reports.EXPORT_ROWS if format == "csv" else reports.PAGE_SIZE
        dashboard, result = await _in_hop(request, lambda s, d: (d, reports.jobs(
            session=s, status=status or None, customer=customer or None, model=model or None, worker=worker or None,
            page=1 if format == "csv" else page, size=size)), admin=True)
        if format == "csv":
            return csv_response(request, "jobs", [
                "job_id", "customer_id", "customer", "model", "status", "cost_usd", "held_usd", "created_at"], [
                [j.id, j.account_id, result.extra["customers"].get(j.account_id, ""), j.model, j.status.value,
                 micros_to_usd(j.billed_micros), micros_to_usd(j.held_micros), j.created_at.isoformat()]
                for j in result.rows])
        return _page(request, "jobs.html", dashboard=dashboard, result=result, title="Jobs", admin=True,
                     filters={"status": status or "", "customer": customer or "", "model": model or "",
                              "worker": worker or ""})

    return await guarded(request, render)


def _job_page(request: Request, dashboard: DashboardSession, detail: reports.JobDetail, *, admin: bool) -> Response:
    chart = charts.line_chart(detail.losses, title="Loss by step", x_label="step", y_label="loss")
    cost = billing.job_cost(detail.job)
    return _page(request, "job.html", dashboard=dashboard, detail=detail, chart=chart, cost=cost, admin=admin,
                 title=detail.job.id)


@router.get("/admin/jobs/{job_id}")
async def admin_job(request: Request, job_id: str) -> Response:
    async def render() -> Response:
        dashboard, detail = await _in_hop(request, lambda s, d: (d, reports.job_detail(session=s, job_id=job_id)),
                                          admin=True)
        return _job_page(request, dashboard, detail, admin=True)

    return await guarded(request, render)


@router.post("/admin/jobs/{job_id}/cancel")
async def admin_cancel(request: Request, job_id: str, csrf_token: Annotated[str, Form(max_length=100)] = "") -> Response:
    async def render() -> Response:
        def work(session: Session, d: DashboardSession) -> None:
            _check_csrf(request, d, csrf_token)
            detail = reports.job_detail(session=session, job_id=job_id)
            job_service.cancel(session=session, account=detail.customer, job_id=job_id)

        await _in_hop(request, work, admin=True)
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
            _check_csrf(request, d, csrf_token)
            reports.refund_job(session=session, job_id=job_id, amount=micros, nonce=nonce, admin=d.account, reason=reason)

        await _in_hop(request, work, admin=True)
        return RedirectResponse(f"/admin/jobs/{job_id}", status_code=303)

    return await guarded(request, render)


# --- customers and providers ------------------------------------------------------------------------

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

        context = await _in_hop(request, work, admin=False)
        if "costs" in context:
            days = context["costs"].days
            context["chart"] = charts.bar_chart([d["day"] for d in days], [d["spend"] / 1e6 for d in days],
                                                title="Your spend per day")
            return _page(request, "customer.html", title="Your dashboard", status_filter=status or "", **context)
        return _page(request, "provider.html", title="Your workers", **context)

    return await guarded(request, render)


@router.get("/dashboard/jobs/{job_id}")
async def own_job(request: Request, job_id: str) -> Response:
    async def render() -> Response:
        dashboard, detail = await _in_hop(request, lambda s, d: (d, reports.job_detail(
            session=s, job_id=job_id, account_id=d.account.id)), admin=False)
        return _job_page(request, dashboard, detail, admin=False)

    return await guarded(request, render)
