"""API keys: shown once, stored hashed, compared in constant time, revocable."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import ApiKeyModel, Role, utcnow
from coordinator.services.keys import authenticate, create_account_with_key
from shared.errors import AuthenticationFailed


def test_key_is_stored_only_as_a_hash(session: Session) -> None:
    created = create_account_with_key(session=session, name="alice", role=Role.customer)
    session.commit()
    row = session.scalars(select(ApiKeyModel)).one()
    secret = created.key.rsplit("_", 1)[1]
    assert secret not in row.secret_sha256 and created.key not in row.secret_sha256
    assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert authenticate(session=session, key=created.key).id == created.account.id
    assert row.last_used_at is not None


@pytest.mark.parametrize("mangle", [
    lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # wrong secret, right prefix
    lambda k: "tg_000000000000_" + k.rsplit("_", 1)[1],  # unknown prefix
    lambda k: k.replace("tg_", "sk_", 1),
    lambda k: "",
    lambda k: "tg_",
])
def test_wrong_keys_are_rejected(session: Session, mangle) -> None:  # type: ignore[no-untyped-def]
    created = create_account_with_key(session=session, name="alice", role=Role.customer)
    session.commit()
    with pytest.raises(AuthenticationFailed):
        authenticate(session=session, key=mangle(created.key))


def test_revoked_key_and_disabled_account_are_rejected(session: Session) -> None:
    first = create_account_with_key(session=session, name="a", role=Role.customer)
    second = create_account_with_key(session=session, name="b", role=Role.provider)
    session.commit()
    first.api_key.revoked_at = utcnow()
    second.account.disabled_at = utcnow()
    session.commit()
    for created in (first, second):
        with pytest.raises(AuthenticationFailed, match="revoked"):
            authenticate(session=session, key=created.key)
