"""Money as integer micro-dollars (`Micros`); decimal strings only at the API edge. No floats touch money."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import NewType

Micros = NewType("Micros", int)
MICROS_PER_USD = 1_000_000


def usd_to_micros(value: Decimal | str | int) -> Micros:
    """Exact conversion; more than six decimal places is an error, never a silent rounding."""
    try:
        amount = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal amount") from None
    if not amount.is_finite():
        raise ValueError("amount must be finite")
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError("amount has more than 6 decimal places")
    return Micros(int(micros))


def micros_to_usd(micros: int) -> str:
    """'1.250000'-style decimal string for the wire."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{frac:06d}"
