"""Dashboard logins: an API key exchanged for a signed, HttpOnly, SameSite=Strict session cookie.

The cookie holds the key's id, its account and a CSRF token, signed (itsdangerous) and dated; every request
checks the signature and age and that the key is still live, so revoking a key ends its sessions. Every
form that changes something carries the CSRF token, and a POST from another origin is refused.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, ApiKeyModel, Role
from coordinator.settings import CoordinatorSettings

COOKIE = "tg_session"
LOGIN_COOKIE = "tg_login"  # carries the login form's CSRF token before there is a session
LOGIN_MAX_AGE_S = 3600


def secret_for(settings: CoordinatorSettings) -> str:
    """The configured secret, or one made once and kept owner-only in the data dir (shared by every process
    that shares the data dir)."""
    if settings.session_secret:
        return settings.session_secret
    path = Path(settings.data_dir) / "session-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".session-secret-{secrets.token_hex(6)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
        try:
            os.link(draft, path)  # atomic; another process's secret wins if it got there first
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()


@dataclass(frozen=True, slots=True)
class DashboardSession:
    account: AccountModel
    key_id: str
    csrf: str

    @property
    def is_admin(self) -> bool:
        return self.account.role is Role.admin


class Sessions:
    def __init__(self, settings: CoordinatorSettings) -> None:
        self.serializer = URLSafeTimedSerializer(secret_for(settings), salt="tunegrid-dashboard")
        self.max_age_s = settings.session_max_age_s
        self.secure = settings.public_url.startswith("https://")

    def issue(self, key: ApiKeyModel) -> tuple[str, str]:
        """(cookie value, csrf token) for a fresh login."""
        csrf = secrets.token_urlsafe(24)
        return self.serializer.dumps({"k": key.id, "a": key.account_id, "c": csrf}), csrf

    def read(self, session: Session, cookie: str | None) -> DashboardSession | None:
        if not cookie:
            return None
        try:
            data = self.serializer.loads(cookie, max_age=self.max_age_s)
        except BadSignature:
            return None
        key = session.get(ApiKeyModel, data.get("k"))
        if key is None or key.revoked_at is not None or key.account_id != data.get("a") or key.account.disabled_at:
            return None
        return DashboardSession(account=key.account, key_id=key.id, csrf=data["c"])

    def login_token(self) -> tuple[str, str]:
        token = secrets.token_urlsafe(24)
        return self.serializer.dumps({"login": token}), token

    def check_login_token(self, cookie: str | None, submitted: str) -> bool:
        if not cookie:
            return False
        try:
            data = self.serializer.loads(cookie, max_age=LOGIN_MAX_AGE_S)
        except BadSignature:
            return False
        return _same(str(data.get("login", "")), submitted)

    def cookie_options(self) -> dict[str, object]:
        return {"httponly": True, "samesite": "strict", "secure": self.secure, "path": "/"}


def same_origin(request: Request) -> bool:
    """A POST's Origin (or Referer) names this host, when the browser sent one."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True  # old browsers and non-browser clients: the CSRF token still has to match
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1].split("/", 1)[0] == host


def _same(expected: str, submitted: str) -> bool:
    """Constant-time, and for any text a form can carry (compare_digest refuses non-ASCII `str`)."""
    return hmac.compare_digest(expected.encode(), submitted.encode("utf-8", "surrogatepass"))


def csrf_ok(dashboard: DashboardSession, submitted: str | None) -> bool:
    return bool(submitted) and _same(dashboard.csrf, submitted or "")
