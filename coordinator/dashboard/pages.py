"""How every dashboard page is rendered and guarded: the templates and their filters, the one thread hop that
reads the caller's dashboard session and does the page's database work, the login redirect and error pages,
CSRF checks and CSV downloads. The pages themselves are `auth.py`, `admin.py` and `own.py`."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from coordinator.api.deps import run_in_session
from coordinator.dashboard import charts
from coordinator.dashboard.sessions import COOKIE, DashboardSession, Sessions, csrf_ok, same_origin
from coordinator.services import billing, replicas, reports
from shared.errors import InvalidRequest, TunegridError
from shared.money import micros_to_usd

T = TypeVar("T")
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
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
    def __init__(self, http_status: int) -> None:
        self.http_status = http_status


def sessions(request: Request) -> Sessions:
    state = request.app.state
    if not hasattr(state, "dashboard_sessions"):
        state.dashboard_sessions = Sessions(state.settings)
    return state.dashboard_sessions


async def in_hop(request: Request, work: Callable[[Session, DashboardSession], T], *, admin: bool) -> T:
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


def server_timing(request: Request) -> str:
    started = request.scope.get("tg_started", time.perf_counter())
    return f"app;dur={(time.perf_counter() - started) * 1000:.1f}"


def html(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, status_code=status)
    response.headers["Server-Timing"] = server_timing(request)
    response.headers["Cache-Control"] = "no-store"
    return response


async def guarded(request: Request, render: Callable[[], Any]) -> Response:
    """Run a page; no session goes to the login page, a wrong role gets the 403 page, a bad input a 400 page."""
    request.scope["tg_started"] = time.perf_counter()
    try:
        return await render()
    except Denied as denied:
        if denied.http_status == 401:
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        return html(request, "error.html", 403, dashboard=None, title="Forbidden",
                     message="This page is for admins. Your own jobs and bills are on your dashboard.")
    except TunegridError as exc:
        return html(request, "error.html", exc.http_status, dashboard=None, title="Cannot do that", message=exc.message)


def period(start: str | None, end: str | None) -> tuple[date, date]:
    today = date.today()
    try:
        last = date.fromisoformat(end) if end else today
        first = date.fromisoformat(start) if start else last - timedelta(days=DEFAULT_DAYS - 1)
    except (ValueError, OverflowError):  # OverflowError: no 30 days before 0001-01-01
        raise InvalidRequest("Days are YYYY-MM-DD, from 0001-01-30 to 9999-12-31.", param="start") from None
    if first > last or (last - first).days >= MAX_DAYS:
        raise InvalidRequest(f"A period runs forward and spans at most {MAX_DAYS} days.", param="start")
    return first, last


def csv_response(request: Request, name: str, header: list[str], rows: list[list[Any]]) -> Response:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return Response(out.getvalue(), media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="tunegrid-{name}.csv"', "Cache-Control": "no-store",
        "Server-Timing": server_timing(request)})


def check_csrf(request: Request, dashboard: DashboardSession, submitted: str) -> None:
    if not same_origin(request) or not csrf_ok(dashboard, submitted):
        raise InvalidRequest("The form expired or came from another site; reload the page and try again.",
                                     code="csrf_failed")


def job_page(request: Request, dashboard: DashboardSession, detail: reports.JobDetail, *, admin: bool) -> Response:
    chart = charts.line_chart(detail.losses, title="Loss by step", x_label="step", y_label="loss")
    cost = billing.job_cost(detail.job, pending=replicas.pending_charge(detail.job))
    return html(request, "job.html", dashboard=dashboard, detail=detail, chart=chart, cost=cost, admin=admin,
                 title=detail.job.id)


