"""Logging in to the dashboard with an API key (a CSRF-checked form; the key becomes a signed session cookie)
and logging out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from coordinator.api.deps import run_in_session
from coordinator.dashboard.pages import guarded, html, in_hop, sessions
from coordinator.dashboard.sessions import COOKIE, LOGIN_COOKIE, csrf_ok, same_origin
from coordinator.db.tables import ApiKeyModel, Role
from coordinator.services import keys
from shared.errors import AuthenticationFailed

router = APIRouter(include_in_schema=False)


@router.get("/login")
async def login_form(request: Request, next: str = "/admin") -> Response:  # noqa: A002 - the query's name
    cookie, token = sessions(request).login_token()
    response = html(request, "login.html", dashboard=None, csrf=token, next=_safe_next(next), error=None)
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
        response = html(request, "login.html", status, dashboard=None, csrf=fresh_token, next=_safe_next(next),
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
        dashboard = await in_hop(request, lambda session, d: d, admin=False)
        if not csrf_ok(dashboard, csrf_token):
            return html(request, "error.html", 400, dashboard=dashboard, title="Cannot do that",
                         message="The form expired; reload the page.")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    return await guarded(request, render)


