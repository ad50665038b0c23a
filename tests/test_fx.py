"""FX conversion between deposit currencies: direct, inverse and cross rates."""

from __future__ import annotations

import pytest

from engine.replicator.fx import conversion_rate


def test_same_currency_is_one_even_without_rates() -> None:
    assert conversion_rate({}, "EUR", "EUR") == 1.0


def test_direct_rate() -> None:
    assert conversion_rate({"EURUSD": 1.08}, "EUR", "USD") == 1.08


def test_inverse_rate() -> None:
    assert conversion_rate({"EURUSD": 1.25}, "USD", "EUR") == pytest.approx(0.8)


def test_direct_rate_preferred_over_inverse() -> None:
    assert conversion_rate({"EURUSD": 1.1, "USDEUR": 0.5}, "EUR", "USD") == 1.1


def test_cross_via_usd() -> None:
    rates = {"EURUSD": 1.1, "USDJPY": 150.0}
    assert conversion_rate(rates, "EUR", "JPY") == pytest.approx(165.0)
    assert conversion_rate(rates, "JPY", "EUR") == pytest.approx(1 / 165.0)


def test_cross_via_usd_with_inverted_legs() -> None:
    # GBP→USD from GBPUSD, USD→CHF from CHFUSD (inverse).
    rates = {"GBPUSD": 1.25, "CHFUSD": 1.1}
    assert conversion_rate(rates, "GBP", "CHF") == pytest.approx(1.25 / 1.1)


def test_cross_via_eur_when_no_usd_path() -> None:
    rates = {"EURGBP": 0.85, "EURCHF": 0.95}
    assert conversion_rate(rates, "GBP", "CHF") == pytest.approx(0.95 / 0.85)


def test_no_path_is_none() -> None:
    assert conversion_rate({"EURUSD": 1.1}, "GBP", "JPY") is None
    assert conversion_rate({}, "EUR", "USD") is None


@pytest.mark.parametrize("bad", [0.0, -1.1])
def test_zero_or_negative_direct_rate_is_ignored(bad: float) -> None:
    assert conversion_rate({"EURUSD": bad}, "EUR", "USD") is None
    # ...and the inverse is used instead when it is valid.
    assert conversion_rate({"EURUSD": bad, "USDEUR": 0.5}, "EUR", "USD") == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [0.0, -150.0])
def test_zero_or_negative_rate_breaks_the_cross_path(bad: float) -> None:
    assert conversion_rate({"EURUSD": 1.1, "USDJPY": bad}, "EUR", "JPY") is None


def test_nan_rate_is_ignored() -> None:
    assert conversion_rate({"EURUSD": float("nan")}, "EUR", "USD") is None
