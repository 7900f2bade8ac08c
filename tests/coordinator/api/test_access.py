"""Who may do what, route by route: every `/v1` route is called as each kind of caller (anonymous, customer A
who owns the resources, customer B, provider P who owns the worker, provider Q, the worker holding the lease,
another worker, admin) and answers as the table says. Nobody reads or changes what is not theirs; a missing
or foreign id is the same 404. A route added without a row here fails the coverage check."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from shared.protocol import FENCING_TOKEN_HEADER, PROTOCOL_HEADER, PROTOCOL_VERSION
from tests.fakes import FakeAgent, adapter_archive, sha256

ROLES = ("anon", "a", "b", "p", "q", "w1", "w2", "admin")
OK = 200


@pytest.fixture
def world(client: TestClient, make_caller, upload) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    a, b = make_caller("customer", "alice"), make_caller("customer", "bob")
    p, q = make_caller("provider", "pat"), make_caller("provider", "quinn")
    admin = make_caller("admin", "root")
    file_id = upload(a).json()["id"]
    w1 = FakeAgent.register(client, p.key, machine_id="pc-p")
    job = client.post("/v1/fine_tuning/jobs", headers=a.headers,
                      json={"model": "tunegrid/tiny-llama", "training_file": file_id}).json()
    lease = w1.claim(wait_s=2)
    assert lease is not None and lease["job_id"] == job["id"]
    w1.progress(lease["lease_id"], step=1)
    checkpoint = w1.save_checkpoint(lease["lease_id"], 1).json()
    w2 = FakeAgent.register(client, q.key, machine_id="pc-q")
    return {"a": a, "b": b, "p": p, "q": q, "admin": admin, "w1": w1, "w2": w2, "file": file_id, "job": job["id"],
            "lease": lease["lease_id"], "token": lease["fencing_token"], "worker": w1.worker_id,
            "checkpoint": checkpoint.get("checkpoint_id") or checkpoint.get("id")}


def headers(world: dict[str, Any], role: str, *, lease: bool = False, protocol: bool = False) -> dict[str, str]:
    """The caller's credentials; on the worker protocol's routes, with its protocol header (and for a lease,
    the lease's fencing token) as an agent would send them, so only the credential decides."""
    if role in ("w1", "w2"):
        agent: FakeAgent = world[role]
        return agent.headers(world["lease"], world["token"]) if lease else agent.headers()
    sent = {} if role == "anon" else dict(world[role].headers)
    if protocol:
        sent |= {PROTOCOL_HEADER: str(PROTOCOL_VERSION), FENCING_TOKEN_HEADER: str(world["token"])}
    return sent


# (method, path template, body kind, {role: expected status}); roles not listed are not called
# (a call that would change the owner's state, e.g. customer A cancelling its own job, is tested elsewhere).
CUSTOMER_READ = {"anon": 401, "a": OK, "b": 404, "p": 403, "q": 403, "w1": 401, "admin": 404}
CUSTOMER_WRITE = {"anon": 401, "b": 404, "p": 403, "w1": 401, "admin": 404}
LEASE = {"anon": 401, "a": 401, "p": 401, "w2": 404}
TABLE: list[tuple[str, str, str, dict[str, int]]] = [
    ("GET", "/v1/files", "", {"anon": 401, "a": OK, "b": OK, "p": 403, "w1": 401, "admin": OK}),
    ("POST", "/v1/files", "file", {"anon": 401, "p": 403, "w1": 401}),
    ("GET", "/v1/files/{file}", "", CUSTOMER_READ),
    ("GET", "/v1/files/{file}/content", "", CUSTOMER_READ),
    ("DELETE", "/v1/files/{file}", "", CUSTOMER_WRITE),
    ("POST", "/v1/fine_tuning/jobs", "job", {"anon": 401, "b": 400, "p": 403, "w1": 401}),  # B: A's file is not B's
    ("GET", "/v1/fine_tuning/jobs", "", {"anon": 401, "a": OK, "b": OK, "p": 403, "w1": 401, "admin": OK}),
    ("GET", "/v1/fine_tuning/jobs/{job}", "", CUSTOMER_READ),
    ("POST", "/v1/fine_tuning/jobs/{job}/cancel", "", CUSTOMER_WRITE),
    ("POST", "/v1/fine_tuning/jobs/{job}/pause", "", CUSTOMER_WRITE),
    ("POST", "/v1/fine_tuning/jobs/{job}/resume", "", CUSTOMER_WRITE),
    ("GET", "/v1/fine_tuning/jobs/{job}/events", "", CUSTOMER_READ),
    ("GET", "/v1/fine_tuning/jobs/{job}/checkpoints", "", CUSTOMER_READ),
    ("POST", "/v1/fine_tuning/quotes", "quote", {"anon": 401, "a": OK, "b": 400, "p": 403, "w1": 401}),
    ("GET", "/v1/models", "", {"anon": 401, "a": OK, "p": OK, "w1": 401, "admin": OK}),
    ("GET", "/v1/models/{model}", "", {"anon": 401, "a": OK, "p": OK, "w1": 401}),
    ("GET", "/v1/billing/balance", "", {"anon": 401, "a": OK, "p": 403, "w1": 401, "admin": OK}),
    ("GET", "/v1/billing/usage", "", {"anon": 401, "a": OK, "p": 403, "w1": 401}),
    ("GET", "/v1/billing/transactions", "", {"anon": 401, "a": OK, "b": OK, "p": OK, "w1": 401}),
    ("POST", "/v1/billing/topups", "topup", {"anon": 401, "p": 403, "w1": 401}),
    ("GET", "/v1/billing/topups", "", {"anon": 401, "a": OK, "p": 403, "w1": 401}),
    ("GET", "/v1/providers/me/earnings", "", {"anon": 401, "a": 403, "p": OK, "q": OK, "w1": 401}),
    ("POST", "/v1/providers/me/payout-account", "", {"anon": 401, "a": 403, "w1": 401}),
    ("POST", "/v1/workers/register", "register", {"anon": 401, "a": 403, "w1": 401}),
    ("GET", "/v1/workers", "", {"anon": 401, "a": 403, "p": OK, "q": OK, "w1": 401, "admin": OK}),
    ("GET", "/v1/workers/{worker}", "", {"anon": 401, "a": 403, "p": OK, "q": 404, "w1": 401, "admin": OK}),
    ("POST", "/v1/workers/{worker}/revoke", "", {"anon": 401, "a": 403, "q": 404, "w1": 401}),
    ("POST", "/v1/workers/heartbeat", "heartbeat", {"anon": 401, "a": 401, "p": 401, "w1": OK, "w2": OK}),
    ("POST", "/v1/workers/claim", "claim", {"anon": 401, "a": 401, "p": 401}),
    ("POST", "/v1/workers/leases/{lease}/events", "events", {**LEASE, "w1": OK}),
    ("GET", "/v1/workers/leases/{lease}/files/training", "", {**LEASE, "w1": OK}),
    ("GET", "/v1/workers/leases/{lease}/checkpoints/{checkpoint}/content", "", {**LEASE, "w1": 404}),
    ("PUT", "/v1/workers/leases/{lease}/checkpoints?step=2", "bytes", LEASE),
    ("PUT", "/v1/workers/leases/{lease}/adapter", "bytes", LEASE),
    ("POST", "/v1/workers/leases/{lease}/complete", "complete", LEASE),
    ("POST", "/v1/workers/leases/{lease}/fail", "fail", LEASE),
    ("POST", "/v1/workers/leases/{lease}/preempted", "preempted", LEASE),
]
# The resume checkpoint is only the resuming lease's (none here): even the holder gets 404 for it.


def body(kind: str, world: dict[str, Any]) -> dict[str, Any]:
    data = b"bytes of a checkpoint"
    return {
        "": {},
        "file": {"data": {"purpose": "fine-tune"}, "files": {"file": ("t.jsonl", b'{"messages": []}\n', "application/jsonl")}},
        "job": {"json": {"model": "tunegrid/tiny-llama", "training_file": world["file"]}},
        "quote": {"json": {"model": "tunegrid/tiny-llama", "training_file": world["file"]}},
        "topup": {"json": {"amount": "10"}},
        "register": {"json": {"machine_id": "x", "agent_version": "t", "ask_price_per_gpu_hour": "0.1", "gpus": []}},
        "heartbeat": {"json": {"activity": "idle"}},
        "claim": {"json": {"wait_s": 0}},
        "events": {"json": {"events": [{"type": "progress", "step": 2, "train_loss": 1.5}]}},
        "bytes": {"content": data, "headers": {"Tunegrid-Sha256": sha256(data)}},
        "complete": {"json": {"adapter_sha256": sha256(adapter_archive()), "usage": {"wall_seconds": 1, "gpu_seconds": 1},
                              "result": {"steps": 1, "trained_tokens": 10, "final_train_loss": 1.0}}},
        "fail": {"json": {"kind": "worker_error", "message": "x", "usage": {"wall_seconds": 1, "gpu_seconds": 1}}},
        "preempted": {"json": {"reason": "game", "usage": {"wall_seconds": 1, "gpu_seconds": 1}}},
    }[kind]


def test_every_route_answers_each_caller_as_the_table_says(client: TestClient, world: dict[str, Any]) -> None:
    failures = []
    values = {**world, "model": "tunegrid/tiny-llama"}
    for method, template, kind, expected in TABLE:
        path = template.format(**values)
        for role in ROLES:
            if role not in expected:
                continue
            kwargs = dict(body(kind, world))
            extra = kwargs.pop("headers", {})
            sent = headers(world, role, lease="/leases/" in path, protocol=path.startswith("/v1/workers/")
                           and not path.startswith("/v1/workers/wrk-"))
            response = client.request(method, path, headers={**sent, **extra}, **kwargs)
            status = response.status_code if response.status_code != 201 else OK
            want = expected[role]
            if (want == OK and not 200 <= status < 300) or (want != OK and status != want):
                failures.append(f"{method} {template} as {role}: {status}, expected {want} ({response.text[:120]})")
    assert not failures, "\n".join(failures)
    # Nothing changed hands: A's job is still A's and still running on W1.
    job = client.get(f"/v1/fine_tuning/jobs/{world['job']}", headers=world["a"].headers).json()
    assert job["status"] == "running"
    assert world["job"] not in client.get("/v1/fine_tuning/jobs", headers=world["b"].headers).text
    assert world["file"] not in client.get("/v1/files", headers=world["b"].headers).text
    assert world["file"] not in client.get("/v1/files", headers=world["admin"].headers).text


def test_every_v1_route_is_in_the_table(app) -> None:  # type: ignore[no-untyped-def]
    listed = {(m, t.split("?")[0].replace("{file}", "{file_id}").replace("{job}", "{fine_tuning_job_id}")
               .replace("{worker}", "{worker_id}").replace("{lease}", "{lease_id}").replace("{checkpoint}", "{checkpoint_id}")
               .replace("{model}", "{model:path}").replace("/files/training", "/files/{which}"))
              for m, t, _, _ in TABLE}
    routes = {(method, route.path) for route in app.routes if isinstance(route, APIRoute) and route.path.startswith("/v1")
              for method in route.methods}
    missing = sorted(routes - listed)
    assert not missing, f"routes without access rows: {missing}"
