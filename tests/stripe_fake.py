"""A local stand-in for Stripe's API (Stripe's servers cannot be reached here), speaking its wire format:
form-encoded requests with bracketed nested keys, `Authorization: Bearer sk_test_...`, `Idempotency-Key`
replays (the same key and parameters answer the stored response; other parameters are a 400
`idempotency_error`), Stripe's error envelope, and objects shaped on Stripe's own fixtures
(`../shared/stripe/fixtures3.json`, MIT; a trimmed copy of the fields we use lives here so tests run without
`../shared`).

It serves what tunegrid calls: Checkout Sessions, Connect accounts, account links and transfers. Tests reach
in to pay a session, finish an account's onboarding, inject failures, or drop a reply after acting on the
request (the "Stripe acted, we never heard" case). `signed_event` signs webhook payloads like Stripe does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "stripe" / "fixtures3.json"
# The fields of Stripe's fixtures we use, for when ../shared is absent.
_FALLBACK = {
    "checkout.session": {"object": "checkout.session", "livemode": False, "payment_status": "unpaid", "status": "open",
                         "mode": "payment", "currency": None, "amount_total": None, "metadata": {},
                         "payment_intent": None},
    "account": {"object": "account", "type": "express", "country": "US", "default_currency": "usd",
                "charges_enabled": False, "payouts_enabled": False, "details_submitted": False, "metadata": {},
                "capabilities": {}},
    "account_link": {"object": "account_link"},
    "transfer": {"object": "transfer", "amount_reversed": 0, "currency": "usd", "livemode": False, "metadata": {},
                 "reversed": False, "source_type": "card", "transfer_group": None},
    "event": {"object": "event", "api_version": "2025-10-29.clover", "livemode": False, "pending_webhooks": 1,
              "request": {"id": None, "idempotency_key": None}},
}


def _templates() -> dict[str, dict[str, Any]]:
    if FIXTURES.exists():
        resources = json.loads(FIXTURES.read_text())["resources"]
        return {name: resources[name] for name in _FALLBACK}
    return _FALLBACK


def parse_form(body: str) -> dict[str, Any]:
    """Stripe's encoding: `a[b][0][c]=v` -> {"a": {"b": [{"c": "v"}]}}."""
    out: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        parts = key.replace("]", "").split("[")
        node: Any = out
        for part, following in zip(parts, parts[1:] + [None]):
            last = following is None
            container: Any = value if last else ([] if following.isdigit() else {})
            if isinstance(node, list):
                index = int(part)
                while len(node) <= index:
                    node.append(None)
                if node[index] is None or last:
                    node[index] = container
                node = node[index]
            else:
                if part not in node or last:
                    node[part] = container
                node = node[part]
    return out


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header for `payload`, as Stripe computes it."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


@dataclass
class FakeStripe:
    api_key: str = "sk_test_tunegrid"
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, idempotency key
    fail_next: list[int] = field(default_factory=list)  # statuses to answer the next requests with, in order
    drop_next: int = 0  # act on this many requests, then close the connection without answering
    url: str = ""

    def __post_init__(self) -> None:
        self._templates = _templates()
        self._idempotent: dict[str, tuple[str, int, bytes]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle

    def start(self) -> FakeStripe:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                fake._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                fake._handle(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()  # stop() waits one poll
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # --- what tests do to it

    def pay(self, session_id: str) -> dict[str, Any]:
        """The customer paid on the Checkout page: the session, now complete."""
        with self._lock:
            session = self.sessions[session_id]
            session.update(status="complete", payment_status="paid",
                           payment_intent=f"pi_{secrets.token_hex(12)}")
            return json.loads(json.dumps(session))

    def finish_onboarding(self, account_id: str) -> dict[str, Any]:
        with self._lock:
            account = self.accounts[account_id]
            account.update(details_submitted=True, payouts_enabled=True, charges_enabled=True,
                           capabilities={"transfers": "active"})
            return json.loads(json.dumps(account))

    def event(self, type_: str, obj: dict[str, Any], *, event_id: str | None = None) -> bytes:
        body = {**self._templates["event"], "id": event_id or f"evt_{secrets.token_hex(12)}", "type": type_,
                "created": int(time.time()), "data": {"object": obj}}
        return json.dumps(body).encode()

    # --- the API

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length).decode() if length else ""
        path = handler.path.split("?")[0]
        key = handler.headers.get("Idempotency-Key")
        with self._lock:
            self.requests.append((method, path, key))
            if handler.headers.get("Authorization") != f"Bearer {self.api_key}":
                return self._send(handler, 401, _error("invalid_request_error", "Invalid API Key provided."))
            if self.fail_next:
                status = self.fail_next.pop(0)
                return self._send(handler, status, _error("api_error", "Something went wrong on Stripe's end."))
            fingerprint = f"{method} {path} {raw}"
            if method == "POST" and key and key in self._idempotent:
                seen, status, body = self._idempotent[key]
                if seen != fingerprint:
                    return self._send(handler, 400, _error(
                        "idempotency_error", "Keys for idempotent requests can only be used with the same parameters "
                        "they were first used with."))
                return self._send(handler, status, body, replayed=True)
            status, body = self._route(method, path, parse_form(raw))
            encoded = json.dumps(body).encode()
            if method == "POST" and key and status < 500:
                self._idempotent[key] = (fingerprint, status, encoded)
            if self.drop_next:
                self.drop_next -= 1
                handler.close_connection = True
                handler.connection.close()
                return None
        return self._send(handler, status, encoded)

    def _send(self, handler: BaseHTTPRequestHandler, status: int, body: bytes | dict[str, Any],
              replayed: bool = False) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Request-Id", f"req_{secrets.token_hex(7)}")
        if replayed:
            handler.send_header("Idempotent-Replayed", "true")
        handler.end_headers()
        handler.wfile.write(data)

    def _route(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if method == "POST" and path == "/v1/checkout/sessions":
            return self._create_session(params)
        if method == "POST" and path == "/v1/accounts":
            account_id = f"acct_{secrets.token_hex(8)}"
            account = {**self._templates["account"], "id": account_id, "created": int(time.time()),
                       "type": params.get("type", "express"), "metadata": params.get("metadata", {}),
                       "payouts_enabled": False, "details_submitted": False, "charges_enabled": False,
                       "capabilities": {"transfers": "inactive"}}
            self.accounts[account_id] = account
            return 200, account
        if method == "POST" and path == "/v1/account_links":
            if params.get("account") not in self.accounts:
                return 400, _error("invalid_request_error", f"No such account: '{params.get('account')}'",
                                   code="resource_missing", param="account")
            return 200, {**self._templates["account_link"], "created": int(time.time()),
                         "expires_at": int(time.time()) + 300,
                         "url": f"https://connect.stripe.test/setup/e/{params['account']}/{secrets.token_hex(6)}"}
        if method == "POST" and path == "/v1/transfers":
            return self._create_transfer(params)
        if method == "GET" and path.startswith("/v1/transfers/"):
            transfer = self.transfers.get(path.rsplit("/", 1)[1])
            return (200, transfer) if transfer else (404, _error("invalid_request_error", "No such transfer",
                                                                 code="resource_missing"))
        return 404, _error("invalid_request_error", f"Unrecognized request URL ({method}: {path}).")

    def _create_session(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            item = params["line_items"][0]
            amount = int(item["price_data"]["unit_amount"]) * int(item.get("quantity", 1))
            currency = item["price_data"]["currency"]
        except (KeyError, IndexError, TypeError, ValueError):
            return 400, _error("invalid_request_error", "Missing required param: line_items.", param="line_items")
        if amount < 50:
            return 400, _error("invalid_request_error", "The Checkout Session's total amount due must add up to at "
                               "least $0.50 usd", param="line_items")
        session_id = f"cs_test_{secrets.token_hex(16)}"
        session = {**self._templates["checkout.session"], "id": session_id, "created": int(time.time()),
                   "expires_at": int(time.time()) + 86400, "amount_subtotal": amount, "amount_total": amount,
                   "currency": currency, "mode": params.get("mode"), "metadata": params.get("metadata", {}),
                   "client_reference_id": params.get("client_reference_id"), "status": "open",
                   "payment_status": "unpaid", "success_url": params.get("success_url"),
                   "cancel_url": params.get("cancel_url"),
                   "url": f"https://checkout.stripe.test/c/pay/{session_id}"}
        self.sessions[session_id] = session
        return 200, session

    def _create_transfer(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        account = self.accounts.get(params.get("destination", ""))
        if account is None:
            return 400, _error("invalid_request_error", f"No such destination: '{params.get('destination')}'",
                               code="resource_missing", param="destination")
        if (account.get("capabilities") or {}).get("transfers") != "active":
            return 400, _error("invalid_request_error", "Your destination account needs to have at least one of the "
                               "following capabilities enabled: transfers, crypto_transfers, legacy_payments",
                               code="insufficient_capabilities_for_transfer", param="destination")
        try:
            amount = int(params["amount"])
        except (KeyError, ValueError):
            return 400, _error("invalid_request_error", "Invalid integer: amount", param="amount")
        if amount < 1:
            return 400, _error("invalid_request_error", "This value must be greater than or equal to 1.", param="amount")
        transfer_id = f"tr_{secrets.token_hex(12)}"
        transfer = {**self._templates["transfer"], "id": transfer_id, "created": int(time.time()), "amount": amount,
                    "currency": params.get("currency", "usd"), "destination": account["id"],
                    "destination_payment": f"py_{secrets.token_hex(8)}", "metadata": params.get("metadata", {}),
                    "transfer_group": params.get("transfer_group"), "balance_transaction": f"txn_{secrets.token_hex(8)}",
                    "reversals": {"object": "list", "data": [], "has_more": False,
                                  "url": f"/v1/transfers/{transfer_id}/reversals"}}
        self.transfers[transfer_id] = transfer
        return 200, transfer


def _error(type_: str, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    return {"error": error}
