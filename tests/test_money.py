"""Money in minor units: exact conversions, named rounding, splits that always sum to the total."""

from __future__ import annotations

from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.money import (
    InexactMoneyError,
    amount_for,
    divide,
    exponent,
    format_money,
    multiply,
    split,
    to_major,
    to_minor,
)


def test_currencies_have_their_iso_minor_units() -> None:
    assert (exponent("USD"), exponent("JPY"), exponent("KWD"), exponent("eur")) == (2, 0, 3, 2)
    with pytest.raises(ValueError, match="ISO 4217"):
        exponent("US")


def test_major_amounts_become_minor_units_with_the_named_rounding() -> None:
    assert to_minor("12.34", "USD") == 1234
    assert to_minor("12.345", "USD") == 1234  # half-even: the 4 is even
    assert to_minor("12.355", "USD") == 1236
    assert to_minor("12.345", "USD", ROUND_HALF_UP) == 1235
    assert to_minor("1500", "JPY") == 1500
    assert to_minor("1.2345", "KWD") == 1234
    assert to_major(1234, "USD") == Decimal("12.34")


def test_floats_are_refused_because_they_are_not_exact() -> None:
    with pytest.raises(InexactMoneyError):
        to_minor(0.1, "USD")  # type: ignore[arg-type]
    with pytest.raises(InexactMoneyError):
        multiply(1000, 0.2)  # type: ignore[arg-type]
    with pytest.raises(InexactMoneyError):
        split(10.0, [1, 1])  # type: ignore[arg-type]


def test_a_fee_rate_rounds_half_even_unless_told_otherwise() -> None:
    # 20 % of 12.345 … : 1234.5 → 1234 half-even, 1235 half-up, 1234 down.
    assert multiply(6_172_5, "0.02") == 1234
    assert multiply(6_172_5, "0.02", ROUND_HALF_UP) == 1235
    assert multiply(6_172_5, "0.02", ROUND_DOWN) == 1234
    assert multiply(1000, Decimal("0.15")) == 150


def test_proration_divides_with_explicit_rounding() -> None:
    assert divide(3000, 10, 30) == 1000
    assert divide(1000, 1, 3) == 333
    assert divide(1000, 2, 3) == 667
    with pytest.raises(ZeroDivisionError):
        divide(1000, 1, 0)


def test_a_quantity_times_a_unit_price_rounds_once_with_the_named_rounding() -> None:
    # 0.05 lot at 125 cents a lot is 6.25 cents: one rounding of the exact product.
    assert amount_for("0.05", 125) == 6
    assert amount_for(Decimal("0.05"), "125", ROUND_HALF_UP) == 6
    assert amount_for("0.3", "2.5") == 1  # 0.75 → 1
    assert amount_for("0.5", "5") == 2  # 2.5 → 2, half-even
    assert amount_for("0.5", "5", ROUND_HALF_UP) == 3
    with pytest.raises(InexactMoneyError):
        amount_for(0.05, 125)  # type: ignore[arg-type]


@given(
    lots=st.lists(st.decimals(min_value=0, max_value=1000, places=2), min_size=1, max_size=10),
    price=st.decimals(min_value=0, max_value=10**6, places=3),
)
def test_a_product_of_a_sum_is_within_half_a_unit_of_the_exact_amount(
    lots: list[Decimal], price: Decimal
) -> None:
    quantity = sum(lots, Decimal(0))
    assert abs(amount_for(quantity, price) - quantity * price) <= Decimal("0.5")


def test_amounts_print_with_the_currency_decimals() -> None:
    assert format_money(1234, "USD") == "12.34 USD"
    assert format_money(-5, "USD") == "-0.05 USD"
    assert format_money(1500, "JPY") == "1500 JPY"


def test_a_split_gives_the_leftover_units_to_the_largest_remainders() -> None:
    assert split(100, [1, 1, 1]) == [34, 33, 33]
    assert split(1000, ["0.7", "0.3"]) == [700, 300]
    assert split(5, [1, 2]) == [2, 3]
    assert split(-100, [1, 1, 1]) == [-34, -33, -33]


@given(
    total=st.integers(-(10**15), 10**15),
    weights=st.lists(st.integers(0, 10**9), min_size=1, max_size=20).filter(any),
)
def test_a_split_always_sums_to_the_total_and_each_part_is_within_one_unit(
    total: int, weights: list[int]
) -> None:
    parts = split(total, weights)
    assert sum(parts) == total
    whole = sum(weights)
    for part, weight in zip(parts, weights, strict=True):
        share = Decimal(total) * weight / whole
        assert abs(Decimal(part) - share) < 1


def test_a_split_refuses_weights_that_cannot_divide_anything() -> None:
    with pytest.raises(ValueError):
        split(100, [])
    with pytest.raises(ValueError):
        split(100, [0, 0])
    with pytest.raises(ValueError):
        split(100, [1, -1])
