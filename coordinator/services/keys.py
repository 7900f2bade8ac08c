"""Accounts and API keys: creation (the secret is shown once) and bearer-key authentication.

A key reads `tg_<prefix>_<secret>`. The prefix finds the row; only the sha256 of
the secret is stored, and it is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import AccountModel, ApiKeyModel, Role, utcnow
from shared.errors import AuthenticationFailed

KEY_SCHEME = "tg"
_PREFIX_CHARS = 12
_LAST_USED_RESOLUTION = timedelta(minutes=1)  # do not turn every request into a write


@dataclass(frozen=True, slots=True)
class CreatedKey:
    account: AccountModel
    api_key: ApiKeyModel
    key: str  # the bare key, shown once


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_account(*, session: Session, name: str, role: Role) -> AccountModel:
    account = AccountModel(id=new_id("acct-"), name=name, role=role)
    session.add(account)
    session.flush()
    return account


def create_key(*, session: Session, account: AccountModel, name: str) -> CreatedKey:
    prefix = secrets.token_hex(_PREFIX_CHARS // 2)
    secret = secrets.token_urlsafe(32).replace("_", "x").replace("-", "y")
    api_key = ApiKeyModel(
        id=new_id("key-"), account_id=account.id, name=name, prefix=prefix, secret_sha256=_sha256(secret)
    )
    session.add(api_key)
    session.flush()
    return CreatedKey(account=account, api_key=api_key, key=f"{KEY_SCHEME}_{prefix}_{secret}")


def create_account_with_key(*, session: Session, name: str, role: Role) -> CreatedKey:
    account = create_account(session=session, name=name, role=role)
    return create_key(session=session, account=account, name=name)


def authenticate(*, session: Session, key: str) -> AccountModel:
    """The account a bearer key belongs to; any mismatch is the same 401."""
    invalid = AuthenticationFailed("Incorrect API key provided.")
    scheme, _, rest = key.partition("_")
    prefix, _, secret = rest.partition("_")
    if scheme != KEY_SCHEME or len(prefix) != _PREFIX_CHARS or not secret:
        raise invalid
    api_key = session.scalars(select(ApiKeyModel).where(ApiKeyModel.prefix == prefix)).one_or_none()
    # Hash even when no row matched so timing does not reveal which prefixes exist.
    presented = _sha256(secret)
    expected = api_key.secret_sha256 if api_key else "0" * 64
    if not hmac.compare_digest(presented, expected) or api_key is None:
        raise invalid
    if api_key.revoked_at is not None or api_key.account.disabled_at is not None:
        raise AuthenticationFailed("This API key has been revoked.", code="revoked_api_key")
    now = utcnow()
    if api_key.last_used_at is None or now - api_key.last_used_at > _LAST_USED_RESOLUTION:
        api_key.last_used_at = now
        session.commit()
    return api_key.account
