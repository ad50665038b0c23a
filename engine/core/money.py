"""Money in integer minor units: currency exponents, explicit rounding, splits that sum exactly.

Amounts are ``int`` counts of a currency's minor unit (cents for USD, yen for JPY). Anything that
can produce a fraction of a minor unit — a percentage, a rate per lot, a proration — goes through
one function here that names its rounding (half-even unless the caller says otherwise), and a
total divided between parties goes through ``split``, whose parts always add up to the total.
Floats are refused: ``0.1 + 0.2`` is not money.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal, localcontext

#: ISO 4217 minor-unit exponents that differ from 2; every other currency has 2.
_EXPONENTS = {
    "BHD": 3, "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "IQD": 3, "ISK": 0, "JOD": 3, "JPY": 0,
    "KMF": 0, "KRW": 0, "KWD": 3, "LYD": 3, "OMR": 3, "PYG": 0, "RWF": 0, "TND": 3, "UGX": 0,
    "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
}  # fmt: skip

Exact = Decimal | int | str
"""An exact number: a ``Decimal``, an ``int`` or a decimal string such as ``"0.15"``."""


class InexactMoneyError(TypeError):
    """A float (or another inexact number) was given where money must be exact."""


def exponent(currency: str) -> int:
    """Digits after the decimal point of ``currency``'s minor unit (ISO 4217)."""
    if len(currency) != 3 or not currency.isalpha():
        raise ValueError(f"{currency!r} is not an ISO 4217 currency code")
    return _EXPONENTS.get(currency.upper(), 2)


def exact(value: Exact) -> Decimal:
    """``value`` as a Decimal, refusing floats (their binary fractions are not the amount)."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise InexactMoneyError(f"money must be exact (Decimal, int or str), not {value!r}")
    number = Decimal(value)
    if not number.is_finite():
        raise ValueError(f"{value!r} is not a finite amount")
    return number


def round_to_int(value: Exact, rounding: str = ROUND_HALF_EVEN) -> int:
    """``value`` rounded to a whole number with the named ``decimal`` rounding mode."""
    with localcontext() as ctx:
        ctx.prec = 60
        return int(exact(value).quantize(Decimal(1), rounding=rounding))


def to_minor(amount: Exact, currency: str, rounding: str = ROUND_HALF_EVEN) -> int:
    """A major-unit amount (``"12.345"`` USD) in minor units (1234 or 1235 by ``rounding``)."""
    return round_to_int(exact(amount).scaleb(exponent(currency)), rounding)


def to_major(units: int, currency: str) -> Decimal:
    """Minor units back to an exact major-unit Decimal (1234 USD cents → ``Decimal("12.34")``)."""
    return Decimal(units).scaleb(-exponent(currency))


def format_money(units: int, currency: str) -> str:
    """``"12.34 USD"``: as many decimals as the currency has."""
    places = exponent(currency)
    major = to_major(units, currency)
    return f"{major:.{places}f} {currency}"


def multiply(units: int, factor: Exact, rounding: str = ROUND_HALF_EVEN) -> int:
    """``units × factor`` in whole minor units: a fee rate, a rate per lot, a proration share."""
    if not isinstance(units, int) or isinstance(units, bool):
        raise InexactMoneyError(f"an amount in minor units is an int, not {units!r}")
    with localcontext() as ctx:
        ctx.prec = 60
        return round_to_int(Decimal(units) * exact(factor), rounding)


def amount_for(quantity: Exact, unit_price: Exact, rounding: str = ROUND_HALF_EVEN) -> int:
    """``quantity × unit_price`` in whole minor units, rounded once (lots × a rate per lot).

    ``unit_price`` is in minor units per unit of ``quantity`` and may have decimals (1.25 cents
    per lot); the product is exact until this one rounding.
    """
    with localcontext() as ctx:
        ctx.prec = 60
        return round_to_int(exact(quantity) * exact(unit_price), rounding)


def divide(units: int, numerator: int, denominator: int, rounding: str = ROUND_HALF_EVEN) -> int:
    """``units × numerator / denominator`` in whole minor units (e.g. days used / days in plan)."""
    if denominator == 0:
        raise ZeroDivisionError("divide money by zero")
    with localcontext() as ctx:
        ctx.prec = 60
        return round_to_int(Decimal(units) * numerator / denominator, rounding)


def split(total: int, weights: Sequence[Exact]) -> list[int]:
    """``total`` divided in proportion to ``weights`` by the largest-remainder method.

    Every part is its exact share rounded down, and the units left over go one each to the
    largest remainders (ties to the earlier part): the parts always sum to ``total``.
    """
    if not isinstance(total, int) or isinstance(total, bool):
        raise InexactMoneyError(f"an amount in minor units is an int, not {total!r}")
    shares = [exact(w) for w in weights]
    if not shares:
        raise ValueError("split needs at least one weight")
    if any(w < 0 for w in shares):
        raise ValueError("split weights must not be negative")
    whole = sum(shares)
    if whole == 0:
        raise ValueError("split weights must not all be zero")
    sign = -1 if total < 0 else 1
    magnitude = abs(total)
    with localcontext() as ctx:
        ctx.prec = 60
        exact_parts = [magnitude * w / whole for w in shares]
    parts = [int(p) for p in exact_parts]  # int() truncates: every part rounded down
    left = magnitude - sum(parts)
    by_remainder = sorted(range(len(parts)), key=lambda i: (-(exact_parts[i] - parts[i]), i))
    for i in by_remainder[:left]:
        parts[i] += 1
    return [sign * p for p in parts]
