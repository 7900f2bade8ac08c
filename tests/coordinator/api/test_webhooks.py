"""`/webhooks/stripe` over HTTP: Stripe's real signature scheme (a local fake of Stripe signs): a tampered body,
another secret, a stale timestamp or a malformed header is a 400 and changes nothing; a payload that is not an
event is a 400; without a webhook secret the endpoint says payments are not configured. What each event does is
tests/coordinator/services/test_stripe_sync.py."""

from __future__ import annotations

import json
import time

from fastapi.testclient import TestClient

from tests.conftest import WEBHOOK_SECRET
from tests.coordinator.api.conftest import WEBHOOK, deliver, topup
from tests.stripe_fake import sign


def test_without_a_webhook_secret_the_endpoint_is_not_configured(client: TestClient) -> None:
    unconfigured = client.post(WEBHOOK, content=b"{}", headers={"Stripe-Signature": sign(b"{}", WEBHOOK_SECRET)})
    assert unconfigured.status_code == 400 and unconfigured.json()["error"]["code"] == "payments_not_configured"
    assert client.post(WEBHOOK, content=b"{}").status_code == 400  # no signature at all


def test_webhook_signatures_are_verified(stripe_client: TestClient, stripe_server, paying) -> None:  # type: ignore[no-untyped-def]
    session_id = topup(stripe_client, paying).json()["id"]
    [stripe_session] = stripe_server.sessions.values()
    assert stripe_session["client_reference_id"] == session_id
    payload = stripe_server.event("checkout.session.completed", stripe_server.pay(stripe_session["id"]))

    tampered = payload.replace(b'"amount_total": 2000', b'"amount_total": 2000000')
    assert tampered != payload
    header = sign(payload, WEBHOOK_SECRET)
    for response in (
        deliver(stripe_client, tampered, header=header),  # signed body, changed on the way
        deliver(stripe_client, payload, secret="whsec_someone_else"),
        deliver(stripe_client, payload, timestamp=int(time.time()) - 3600),  # stale: a replay of an old delivery
        deliver(stripe_client, payload, header="t=,v1="),
        deliver(stripe_client, payload, header="t=1,v1=nothex"),
    ):
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_signature", response.text
    assert stripe_client.get("/v1/billing/balance", headers=paying.headers).json()["available"] == "0.000000"
    not_json = b"not json"
    assert deliver(stripe_client, not_json).json()["error"]["code"] == "invalid_payload"
    unknown = json.dumps({"id": "evt_x", "object": "event", "type": "customer.created",
                          "data": {"object": {"id": "cus_1", "object": "customer"}}}).encode()
    assert deliver(stripe_client, unknown).json()["outcome"] == "ignored"
    assert deliver(stripe_client, payload).json()["outcome"] == "credited"


def test_a_signed_payload_that_is_no_event_is_a_400_and_moves_nothing(stripe_client: TestClient, paying) -> None:  # type: ignore[no-untyped-def]
    charge = {"id": "ch_1", "metadata": {"tunegrid_account_id": paying.account_id}}
    for payload in (b"[1, 2]", b'"just text"', json.dumps({"type": "charge.refunded", "data": {"object": charge}}).encode(),
                    json.dumps({"id": "evt_1", "type": "charge.refunded", "data": {"object": {
                        **charge, "refunds": {"data": [{"amount": 500}]}}}}).encode(),
                    json.dumps({"id": "evt_2", "type": "charge.refunded", "data": {"object": {
                        **charge, "refunds": {"data": [{"id": "re_1", "amount": "abc"}]}}}}).encode()):
        response = deliver(stripe_client, payload)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_payload", (payload, response.text)
    assert stripe_client.get("/v1/billing/balance", headers=paying.headers).json()["available"] == "0.000000"
