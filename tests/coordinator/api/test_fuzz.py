"""Schema-driven fuzzing of the whole `/openapi.json` with real credentials (a customer's key, a provider's key,
a worker's token, each where it belongs): no 5xx, every response as documented.

Schemathesis generates requests (valid and invalid) for every operation; each
response must not be a server error and must match the documented status codes,
content types and schemas.
"""

from __future__ import annotations

import pytest
import schemathesis
from coordinator.app import create_app
from hypothesis import HealthCheck, assume, given, settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable

from shared.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION
from tests.conftest import IN_CI, Caller
from tests.fakes import FakeAgent

EXAMPLES_PER_OPERATION = 5  # per run (3 of every operation, below); CI replays the same cases
# A schema-valid upload can still hold a bad dataset (line-level rules live outside the schema), and a
# schema-valid id can name nothing; so "valid data is accepted" is not a rule here. Everything else is.
EXCLUDED = [schemathesis.checks.positive_data_acceptance]


def _reaches_the_server(query: dict | None) -> bool:
    """Whether every generated query parameter reaches the server as generated. An empty name, an empty
    list or an object is dropped or flattened on the way, and a one-item list arrives as a plain value
    (`?purpose=true`), so the server cannot reject what it never receives."""
    return all(
        name and not isinstance(value, dict) and not (isinstance(value, list) and len(value) < 2)
        for name, value in (query or {}).items()
    )


WORKER_PROTOCOL = ("/v1/workers/heartbeat", "/v1/workers/claim", "/v1/workers/leases/")
PROVIDER_ROUTES = ("/v1/workers", "/v1/providers/")


def _credentials(path: str, customer: Caller, provider: Caller, agent: FakeAgent) -> dict[str, str]:
    """Each operation fuzzed with the credentials it is for, so requests get past authentication: a worker's
    token (and protocol header) on the worker protocol, a provider's key on provider routes, else a customer's."""
    if path.startswith(WORKER_PROTOCOL):
        return agent.headers()
    if path.startswith(PROVIDER_ROUTES):
        return {**provider.headers, PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
    return customer.headers


# Valid requests on both databases (they reach the queries); invalid ones on SQLite only: the schema refuses them
# before any query runs, so a second database would replay the same refusals.
@pytest.mark.parametrize(("backend", "mode"), [("sqlite", "positive"), ("postgresql", "positive"), ("sqlite", "negative")],
                         indirect=["backend"])
def test_no_request_crashes_the_server_or_breaks_the_schema(settings, client, customer: Caller, make_caller,  # type: ignore[no-untyped-def]
                                                            training_file: str, mode: str) -> None:
    provider = make_caller("provider", "pat")
    agent = FakeAgent.register(client, provider.key)
    # Claims long-poll (25 s by default): a short ceiling keeps each fuzzed claim within the client's timeout.
    app = create_app(settings.model_copy(update={"claim_timeout_s": 1}))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:
        strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

        @given(case=strategy)
        @hypothesis_settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=IN_CI)  # CI replays the same cases; local runs explore
        def call(case) -> None:  # type: ignore[no-untyped-def]
            assume(_reaches_the_server(case.query))
            case.call_and_validate(headers=_credentials(operation.path, customer, provider, agent),
                                   excluded_checks=EXCLUDED)

        try:
            call()
        except Unsatisfiable:
            # An operation without parameters or body (GET /healthz) has no invalid requests to make.
            assert mode == "negative" and not list(operation.iter_parameters()) and not operation.body, operation.label
