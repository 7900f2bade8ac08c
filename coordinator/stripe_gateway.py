"""The one place that talks to Stripe: the official SDK's `StripeClient`, with explicit timeouts, a bounded
number of network retries (each with the same idempotency key), and Stripe's errors sorted into "try again
later" and "refused for good". The API base is configurable, so tests point it at a local fake that speaks
Stripe's wire format.

Calls are never made straight from a request handler's logic: they are rows in the outbox
(`services/outbox.py`); `services/stripe_sync.py` calls `StripeGateway.call` and applies the answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import stripe

from coordinator.settings import CoordinatorSettings
from shared.errors import InvalidRequest


class StripeUnavailable(Exception):
    """No answer, a timeout, a rate limit or a 5xx: the same call (same idempotency key) may be retried."""


class StripeRefused(Exception):
    """Stripe answered that this call cannot succeed as made (a 4xx): retrying it would fail the same way."""

    def __init__(self, message: str, *, code: str | None) -> None:
        super().__init__(message)
        self.code = code


class StripeGateway:
    OPERATIONS = ("checkout.session.create", "account.create", "account_link.create", "transfer.create")

    def __init__(self, settings: CoordinatorSettings) -> None:
        if not settings.stripe_api_key:
            raise ValueError("StripeGateway needs TUNEGRID_STRIPE_API_KEY")
        base = settings.stripe_api_base
        self.client = stripe.StripeClient(
            settings.stripe_api_key,
            base_addresses={"api": base, "connect": base} if base else None,  # type: ignore[typeddict-item]
            max_network_retries=settings.stripe_max_retries,
            http_client=stripe.HTTPXClient(timeout=settings.stripe_timeout_s, allow_sync_methods=True),
        )
        v1 = self.client.v1
        self._calls: dict[str, Callable[..., Any]] = {
            "checkout.session.create": v1.checkout.sessions.create,
            "account.create": v1.accounts.create,
            "account_link.create": v1.account_links.create,
            "transfer.create": v1.transfers.create,
        }

    def call(self, operation: str, params: dict[str, Any], *, idempotency_key: str) -> dict[str, Any]:
        """Make one call; the object Stripe returned, as a dict."""
        method = self._calls[operation]
        try:
            result = method(params=params, options={"idempotency_key": idempotency_key})
        except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
            raise StripeUnavailable(f"{exc.__class__.__name__}: {exc.user_message or exc}") from exc
        except stripe.StripeError as exc:
            if (exc.http_status or 0) >= 500 or exc.http_status in (409, 429):
                raise StripeUnavailable(f"{exc.__class__.__name__}: {exc.user_message or exc}") from exc
            raise StripeRefused(str(exc.user_message or exc), code=exc.code) from exc
        # The SDK turns decimal fields into Decimal; stored as JSON they go back to Stripe's own strings.
        return json.loads(json.dumps(result.to_dict(), default=str))


def make_gateway(settings: CoordinatorSettings) -> StripeGateway | None:
    """The gateway when a Stripe key is configured; None in the embedded default (no payments)."""
    return StripeGateway(settings) if settings.stripe_enabled else None


def payments_not_configured() -> InvalidRequest:
    """What a customer or provider hears when this coordinator has no Stripe key (or webhook secret)."""
    return InvalidRequest("Payments through Stripe are not configured on this coordinator; an admin can grant "
                          "credit with `tunegrid-coordinator credits grant`.", code="payments_not_configured")
