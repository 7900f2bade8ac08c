"""Money: exact decimal USD <-> integer micros, no rounding surprises."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.money import micros_to_usd, usd_to_micros


def test_exact_conversion() -> None:
    assert usd_to_micros("0.35") == 350_000
    assert usd_to_micros(Decimal("1.000001")) == 1_000_001
    assert micros_to_usd(1_500_000) == "1.500000"
    assert micros_to_usd(-5) == "-0.000005"
    assert usd_to_micros("1.500000000") == 1_500_000  # trailing zeros are exact
    assert usd_to_micros("2E+3") == 2_000_000_000


@pytest.mark.parametrize("bad", ["0.0000001", "NaN", "Infinity", "abc", "0.10000000000000000000000000000001",
                                 "1E-99999999999", "1E+999999999"])
def test_rejects_inexact_or_non_numbers(bad: str) -> None:
    with pytest.raises(ValueError):
        usd_to_micros(bad)


@given(st.integers(min_value=-10**15, max_value=10**15))
def test_round_trip(micros: int) -> None:
    assert usd_to_micros(micros_to_usd(micros)) == micros
