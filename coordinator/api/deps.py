"""Request-scoped dependencies: the database session, the store, settings, and who is calling."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from coordinator.db.models import AccountModel, Role
from coordinator.services import keys
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import AuthenticationFailed, InvalidRequest, PermissionDenied

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer tg_...`")


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session per request, admitted only while the pool has a connection for it.

    A request holds its connection across several worker-thread hops (auth, endpoint, close). Without the
    admission slot, requests waiting between hops could hold every connection while every thread waits
    for one: a deadlock until the pool times out. Opening a Session does no I/O; closing may (the pool
    resets the connection), so it runs in a thread too.
    """
    async with request.app.state.session_slots:
        session = request.app.state.sessionmaker()
        try:
            yield session
        finally:
            await anyio.to_thread.run_sync(session.close)


# Dependencies that do no I/O are `async def` so FastAPI does not hop to a worker thread for each one.
async def get_settings(request: Request) -> CoordinatorSettings:
    return request.app.state.settings


async def get_store(request: Request) -> BlobStore:
    return request.app.state.store


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[CoordinatorSettings, Depends(get_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]


def current_account(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> AccountModel:
    if credentials is None or not credentials.credentials:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it in the Authorization header: 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    return keys.authenticate(session=session, key=credentials.credentials)


CurrentAccount = Annotated[AccountModel, Depends(current_account)]


async def current_customer(account: CurrentAccount) -> AccountModel:
    """Customers own files and jobs; an admin key may act as a customer on its own account."""
    if account.role not in (Role.customer, Role.admin):
        raise PermissionDenied(f"This route is for customer keys; this key belongs to a {account.role.value}.")
    return account


CurrentCustomer = Annotated[AccountModel, Depends(current_customer)]


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def reject_unknown_query(*allowed_prefixes: str):  # type: ignore[no-untyped-def]
    """A route dependency: a misspelled (`?limt=5`) or repeated query parameter is a 400, not a silent guess."""

    async def check(request: Request) -> None:
        route = request.scope.get("route")
        if route is None:
            return
        known = _query_names(route.dependant)
        for name in request.query_params:
            if name not in known and not name.startswith(allowed_prefixes):
                raise InvalidRequest(f"Unrecognized query parameter: {name!r}.", param=name, code="unknown_parameter")
            if len(request.query_params.getlist(name)) > 1:
                raise InvalidRequest(f"Query parameter {name!r} is given more than once.", param=name,
                                     code="duplicate_parameter")

    return Depends(check)
