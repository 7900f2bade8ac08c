"""`/webhooks/stripe`: Stripe's events, verified against the endpoint's signing secret before anything is read
from them, then handed to `services/stripe_sync.py` (which acts on each event id once)."""

from __future__ import annotations

from typing import Annotated

import stripe
from fastapi import APIRouter, Header, Request

from coordinator.api.deps import SettingsDep, reject_unknown_query, run_in_session
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.services import stripe_sync
from coordinator.stripe_gateway import payments_not_configured
from shared.errors import InvalidRequest

router = APIRouter(tags=["billing"], responses=ERROR_RESPONSES)
WEBHOOK_BODY_LIMIT = 512 * 1024


@router.post("/webhooks/stripe", dependencies=[reject_unknown_query()], include_in_schema=True)
async def stripe_webhook(
    request: Request, settings: SettingsDep,
    stripe_signature: Annotated[str, Header(alias="Stripe-Signature", max_length=4096)],
) -> dict[str, str]:
    """Stripe's events, verified against the endpoint's signing secret; a replayed event changes nothing."""
    if not settings.stripe_webhook_secret:
        raise payments_not_configured()
    payload = await request.body()
    if len(payload) > WEBHOOK_BODY_LIMIT:
        raise InvalidRequest("Webhook payload too large.", code="payload_too_large")
    try:
        event = stripe.Webhook.construct_event(payload, stripe_signature, settings.stripe_webhook_secret,
                                               tolerance=settings.webhook_tolerance_s)
    except stripe.SignatureVerificationError as exc:
        raise InvalidRequest(f"Invalid Stripe-Signature: {exc.user_message or exc}", param="Stripe-Signature",
                             code="invalid_signature") from None
    except (ValueError, TypeError, AttributeError, KeyError):  # not JSON, or JSON that is not an object
        raise InvalidRequest("The webhook payload is not a Stripe event.", code="invalid_payload") from None
    body = event.to_dict() if hasattr(event, "to_dict") else None
    if (not isinstance(body, dict) or not isinstance(body.get("id"), str) or not isinstance(body.get("type"), str)
            or not isinstance(body.get("data"), dict) or not isinstance(body["data"].get("object"), dict)):
        raise InvalidRequest("The webhook payload is not a Stripe event.", code="invalid_payload")
    outcome = await run_in_session(request.app.state, lambda session: stripe_sync.handle_event(session=session, event=body))
    return {"received": "true", "outcome": outcome}
