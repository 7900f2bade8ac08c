"""Request-scoped dependencies: who is calling (and the one thread hop that does their database work),
the store, settings, and query-parameter strictness."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import Depends, Request
from starlette.datastructures import State
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from coordinator.db.models import AccountModel, Role
from coordinator.services import keys
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import AuthenticationFailed, InvalidRequest, PermissionDenied

T = TypeVar("T")
bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer tg_...`")


def in_session(state: State, work: Callable[[Session], T]) -> T:
    """Run `work` with a fresh session in the calling (worker) thread, closing it afterwards."""
    with state.sessionmaker() as session:
        return work(session)


async def run_in_session(state: State, work: Callable[[Session], T]) -> T:
    """One hop to a worker thread for all of a request's database work, admitted only while the pool
    has a connection for it.

    One hop, not one per dependency: on this kind of machine each hop costs about as much CPU as a
    query. The admission slot means a thread never waits for a connection that another request holds
    while itself waiting for a thread (a deadlock until the pool times out).
    """
    async with state.session_slots:
        return await anyio.to_thread.run_sync(in_session, state, work)


async def get_settings(request: Request) -> CoordinatorSettings:
    return request.app.state.settings


async def get_store(request: Request) -> BlobStore:
    return request.app.state.store


SettingsDep = Annotated[CoordinatorSettings, Depends(get_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]


@dataclass(frozen=True, slots=True)
class Caller:
    """Whoever sent the request: a bearer key, checked in the same thread hop as the work it asks for."""

    state: State  # the app's
    request_state: State  # this request's: records that the key was checked
    key: str
    roles: frozenset[Role]

    async def run(self, service: Callable[..., T], /, **kwargs: Any) -> T:
        """`service(session=..., account=..., **kwargs)` for the authenticated account."""
        return await run_in_session(self.state, lambda session: service(
            session=session, account=self._authenticate(session), **kwargs))

    async def verify(self) -> None:
        """Check the key alone (401/403), for error replies decided before `run` got to check it."""
        if not getattr(self.request_state, "authenticated", False):
            await run_in_session(self.state, self._authenticate)

    def _authenticate(self, session: Session) -> AccountModel:
        account = keys.authenticate(session=session, key=self.key)
        if account.role not in self.roles:
            allowed = " or ".join(sorted(r.value for r in self.roles))
            raise PermissionDenied(f"This route is for {allowed} keys; this key belongs to a {account.role.value}.")
        self.request_state.authenticated = True
        return account


def _caller(*roles: Role):  # type: ignore[no-untyped-def]
    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Caller:
        if credentials is None or not credentials.credentials:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it in the Authorization header: "
                "'Authorization: Bearer YOUR_KEY'.",
                code="missing_api_key",
            )
        caller = Caller(state=request.app.state, request_state=request.state, key=credentials.credentials,
                        roles=frozenset(roles))
        request.state.caller = caller  # so an early 4xx can still answer 401/403 first (api/errors.py)
        return caller

    return dependency


# Customers own files and jobs; an admin key may act as a customer on its own account.
CustomerCaller = Annotated[Caller, Depends(_caller(Role.customer, Role.admin))]
AnyCaller = Annotated[Caller, Depends(_caller(*Role))]


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
