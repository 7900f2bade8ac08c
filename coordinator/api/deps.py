"""Request-scoped dependencies: who is calling (and the one thread hop that does their database work),
the store, settings, the Stripe gateway (and the one way a request makes an outbox call), and query-parameter
strictness."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import Depends, Request
from starlette.datastructures import State
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, Role, WorkerModel
from coordinator.effects import Effects, effects, take_effects
from coordinator.services import keys, outbox, stripe_sync, workers
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from coordinator.stripe_gateway import StripeGateway
from coordinator.worker_tokens import STALE_S, WorkerTokenCache
from shared.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from shared.protocol import PROTOCOL_HEADER, SUPPORTED_PROTOCOL_VERSIONS, is_supported

log = logging.getLogger(__name__)
T = TypeVar("T")
bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer tg_...`")


def in_session(state: State, work: Callable[[Session], T]) -> tuple[T, Effects]:
    """Run `work` with a fresh session in the calling (worker) thread, closing it afterwards; with the
    effects its committed changes asked for (coordinator/effects.py)."""
    with state.sessionmaker() as session:
        result = work(session)
        return result, take_effects(session)


async def run_in_session(state: State, work: Callable[[Session], T]) -> T:
    """One hop to a worker thread for all of a request's database work, admitted only while the pool
    has a connection for it.

    One hop, not one per dependency: on this kind of machine each hop costs about as much CPU as a
    query. The admission slot means a thread never waits for a connection that another request holds
    while itself waiting for a thread (a deadlock until the pool times out).
    """
    async with state.session_slots:
        result, effects = await anyio.to_thread.run_sync(in_session, state, work)
    if effects:
        await state.dispatcher.apply(effects)
    return result


async def get_settings(request: Request) -> CoordinatorSettings:
    return request.app.state.settings


async def get_store(request: Request) -> BlobStore:
    return request.app.state.store


async def get_gateway(request: Request) -> StripeGateway | None:
    return request.app.state.stripe


SettingsDep = Annotated[CoordinatorSettings, Depends(get_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]
GatewayDep = Annotated[StripeGateway | None, Depends(get_gateway)]


async def call_stripe(state: State, gateway: StripeGateway, row_id: str) -> None:
    """One outbox call from a request: the database hops hold a connection only around Stripe's call, never
    during it, so a slow Stripe cannot starve the API of connections."""
    call = await run_in_session(state, lambda session: outbox.pending_call(session=session, row_id=row_id))
    if call is None:
        return
    answer = await anyio.to_thread.run_sync(stripe_sync.make_call, gateway, call)
    await run_in_session(state, lambda session: stripe_sync.record_answer(session=session, row_id=row_id,
                                                                          answer=answer))


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
        await request.app.state.limiter.check(credentials.credentials)
        caller = Caller(state=request.app.state, request_state=request.state, key=credentials.credentials,
                        roles=frozenset(roles))
        request.state.caller = caller  # so an early 4xx can still answer 401/403 first (api/errors.py)
        return caller

    return dependency


async def authenticate_customer(state: State, key: str) -> None:
    """A customer (or admin) key, rate limited and checked on its own: for refusing an upload before its body."""
    await state.limiter.check(key)
    caller = Caller(state=state, request_state=State(), key=key, roles=CUSTOMER_ROLES)
    await caller.verify()


# Customers own files and jobs; an admin key may act as a customer on its own account.
CUSTOMER_ROLES = frozenset({Role.customer, Role.admin})
CustomerCaller = Annotated[Caller, Depends(_caller(Role.customer, Role.admin))]
ProviderCaller = Annotated[Caller, Depends(_caller(Role.provider, Role.admin))]
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


# --- workers --------------------------------------------------------------------------------------

_refreshing: set[str] = set()  # tokens (by digest) whose background check is under way
_refresh_tasks: set[asyncio.Task[None]] = set()  # held, so none is collected before it ends


@dataclass(frozen=True, slots=True)
class WorkerCaller:
    """A worker agent: its token, checked in the same thread hop as the work, and its protocol version."""

    state: State
    token: str
    protocol_version: int

    async def run(self, service: Callable[..., T], /, *, told_in_reply: bool = False, **kwargs: Any) -> T:
        """`service(session=..., worker=..., **kwargs)` for the authenticated worker. `told_in_reply`: the worker
        ended its own lease with this call and hears the outcome in the reply, so its next heartbeat need not
        read the database for it (most leases end so: no recheck per job)."""
        def work(session: Session) -> T:
            worker = self._authenticate(session)
            result = service(session=session, worker=worker, **kwargs)
            if told_in_reply:
                effects(session).recheck.discard(worker.id)
            return result

        return await run_in_session(self.state, work)

    async def worker_id(self) -> str:
        """Who is calling, from this process's token cache when possible (`coordinator/worker_tokens.py`): the
        heartbeat's fast path, which never waits for a database connection once the token is known. Heartbeats
        come every 10 s; without the cache nearly every one waited its turn for a pooled connection behind
        placement sweeps and flushes (the soak's 0.9 s p99). A token no process here has seen is taken from
        hot state when another process confirmed it lately, and checked behind the call."""
        cache: WorkerTokenCache = self.state.hot.tokens
        digest = hashlib.sha256(self.token.encode()).hexdigest()
        worker_id, due = cache.lookup(digest, time.monotonic())
        if worker_id is not None:
            if due:
                self._check_later(digest)
            return worker_id
        shared = await self._confirmed_elsewhere()
        if shared is not None and not cache.heard_revoked(shared):
            self._check_later(digest)
            return shared
        return await self._check_now(digest)

    async def _confirmed_elsewhere(self) -> str | None:
        """The worker id another API process confirmed for this token in the database lately (hot state)."""
        parts = workers.split_token(self.token)
        if parts is None:
            return None
        owner = await self.state.hot.token_owner(parts[0])
        if owner is None or not hmac.compare_digest(owner[1], workers.token_sha256(parts[1])):
            return None
        return owner[0]

    async def _check_now(self, digest: str) -> str:
        began = time.monotonic()
        worker_id = await run_in_session(self.state, lambda session: self._authenticate(session).id)
        confirmed = self.state.hot.tokens.confirm(digest, worker_id, began)
        parts = workers.split_token(self.token)
        if confirmed and parts is not None:  # a read older than a revocation heard since is shared with nobody
            await self.state.hot.remember_token(parts[0], workers.token_sha256(parts[1]), worker_id, STALE_S)
        return worker_id

    def _check_later(self, digest: str) -> None:
        if digest in _refreshing:
            return
        _refreshing.add(digest)

        async def check() -> None:
            try:
                await self._check_now(digest)
            except (AuthenticationFailed, PermissionDenied):
                self.state.hot.tokens.forget(digest)  # revoked or gone: the next call is refused
                parts = workers.split_token(self.token)
                if parts is not None:
                    await self.state.hot.forget_token(parts[0])  # and no other process takes it from hot state
            except Exception:  # noqa: BLE001 - the database is away: the next call past the window checks again
                log.warning("a worker token could not be checked again in the background", exc_info=True)
            finally:
                _refreshing.discard(digest)

        task = asyncio.get_running_loop().create_task(check())
        _refresh_tasks.add(task)
        task.add_done_callback(_refresh_tasks.discard)

    async def verify(self) -> None:
        """Check the token alone (401), for error replies decided before `run` got to check it."""
        await self.worker_id()

    def _authenticate(self, session: Session) -> WorkerModel:
        return workers.authenticate(session=session, token=self.token)


async def _worker_caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> WorkerCaller:
    if credentials is None or not credentials.credentials:
        raise AuthenticationFailed("Send the worker token: 'Authorization: Bearer tgw_...'.", code="missing_worker_token")
    await request.app.state.worker_limiter.check(credentials.credentials)  # wrong tokens are limited too
    version = request.headers.get(PROTOCOL_HEADER)
    supported = is_supported(version)
    caller = WorkerCaller(state=request.app.state, token=credentials.credentials,
                          protocol_version=int(version or 0) if supported else 0)
    request.state.caller = caller  # a request refused before its hop (headers, body) checks the token first
    if not supported:
        raise InvalidRequest(
            f"Unsupported or missing {PROTOCOL_HEADER} header ({version!r}); this coordinator speaks "
            f"{sorted(SUPPORTED_PROTOCOL_VERSIONS)}. Upgrade tunegrid-worker.",
            param=PROTOCOL_HEADER, code="unsupported_protocol_version")
    return caller


CurrentWorker = Annotated[WorkerCaller, Depends(_worker_caller)]
