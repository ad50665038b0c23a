"""Currency conversion between master and follower deposit currencies."""

from __future__ import annotations

from collections.abc import Mapping

#: Currencies tried as the middle leg of a cross rate, most liquid first.
CROSS_VIA = ("USD", "EUR")


def conversion_rate(rates: Mapping[str, float], base: str, quote: str) -> float | None:
    """How many ``quote`` one ``base`` buys, from direct, inverse or cross rates.

    ``rates`` maps ``"EURUSD"`` → 1.08. Returns ``None`` when no path exists: callers skip the
    copy rather than guess.
    """
    if base == quote:
        return 1.0
    direct = _pair(rates, base, quote)
    if direct is not None:
        return direct
    for via in CROSS_VIA:
        if via in (base, quote):
            continue
        first = _pair(rates, base, via)
        second = _pair(rates, via, quote)
        if first is not None and second is not None:
            return first * second
    return None


def _pair(rates: Mapping[str, float], base: str, quote: str) -> float | None:
    rate = rates.get(base + quote)
    if rate is not None and rate > 0:
        return rate
    inverse = rates.get(quote + base)
    if inverse is not None and inverse > 0:
        return 1.0 / inverse
    return None
