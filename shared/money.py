"""Money as integer micro-dollars (`Micros`); decimal strings only at the API edge. No floats touch money."""

from __future__ import annotations

from decimal import Context, Decimal, Inexact, InvalidOperation
from typing import NewType

Micros = NewType("Micros", int)
MICROS_PER_USD = 1_000_000
MICROS_PER_CENT = 10_000  # Stripe moves whole cents
_ONE_MICRO = Decimal("0.000001")
# Wide enough for any amount we accept; every rounding or overflow raises instead of passing silently.
_EXACT = Context(prec=60, traps=[Inexact, InvalidOperation])


def usd_to_micros(value: Decimal | str | int) -> Micros:
    """Exact conversion; more than six decimal places is an error, never a silent rounding."""
    try:
        amount = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal amount") from None
    if not amount.is_finite():
        raise ValueError("amount must be finite")
    try:
        exact = amount.quantize(_ONE_MICRO, context=_EXACT)
    except Inexact:
        raise ValueError("amount has more than 6 decimal places") from None
    except InvalidOperation:
        raise ValueError("amount is too large") from None
    return Micros(int(exact.scaleb(6, context=_EXACT)))


def micros_to_usd(micros: int) -> str:
    """'1.250000'-style decimal string for the wire."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{frac:06d}"
