"""Money in another currency: the pairs that convert it and the live rate MT5 would use.

MT5 converts a deal's profit (and swap and commission) from the symbol's profit currency, and
margin from its margin currency, into the deposit currency at the live quote of a currency
pair the server trades: the direct pair (JPY → USD by ``USDJPY``: divide; GBP → USD by
``GBPUSD``: multiply), or a cross through USD when no pair joins the two currencies
(``EURGBP`` → ``EURUSD`` …, CHF → JPY by ``USDCHF`` then ``USDJPY``).

Which side of the conversion quote, as MT5 does it:

* **Profit, swap, commission** — by the sign of the amount, never by the position's side:
  a gain converts at the side that makes it smaller in the deposit currency and a loss (or
  a charge) at the side that makes it larger. Multiplying legs (the money's currency is the
  pair's base: GBP → USD by GBPUSD) use the bid for a gain and the ask for a loss; dividing
  legs (JPY → USD by USDJPY) use the ask for a gain and the bid for a loss. That is why MT5
  gives every symbol two tick values, ``SYMBOL_TRADE_TICK_VALUE_PROFIT`` ("calculated tick
  price for a profitable position") and ``SYMBOL_TRADE_TICK_VALUE_LOSS`` ("... for a losing
  position") in the MQL5 Reference, Symbol Properties
  (https://www.mql5.com/en/docs/constants/environment_state/marketinfoconstants); brokers'
  own descriptions of MT5 say the same (e.g. Exness: "for MT5 ... in case of profit the bid
  price is used, and in case of loss, the ask price", for a multiplying pair).
* **Margin** — by the order's side: a buy's margin converts at the side that makes it larger
  (ask when multiplying, bid when dividing), a sell's at the side that makes it smaller, as
  ``OrderCalcMargin`` does (the MQL5 book's ``MarginProfitMeter.mqh`` reproduces it with
  ``Convert(margin currency, account currency, action == ORDER_TYPE_SELL, ...)``).
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from connectors.paper.model import SymbolConfig
from connectors.paper.prices import Quote
from schemas.common import Side

#: Crosses go through this currency, as MT5's conversion does when no direct pair exists.
_HUB = "USD"


class ConversionLeg(msgspec.Struct, frozen=True):
    pair: str
    multiply: bool
    """True: money in the pair's base currency, times the rate; False: in its profit (quote)
    currency, divided by the rate."""


class Conversion(msgspec.Struct, frozen=True):
    """How money in ``source`` becomes money in ``target``: no legs when they are equal."""

    source: str
    target: str
    legs: tuple[ConversionLeg, ...] = ()

    @property
    def pairs(self) -> str:
        """The pairs used, e.g. ``"USDJPY"`` or ``"EURUSD*USDJPY"``; empty for none."""
        return "*".join(leg.pair for leg in self.legs)


def find_conversion(
    symbols: Mapping[str, SymbolConfig], source: str, target: str
) -> Conversion | None:
    """The pairs among ``symbols`` that turn ``source`` money into ``target`` money: a direct
    pair, else a cross through USD; None when the venue trades no such pair."""
    if source == target:
        return Conversion(source, target)
    direct = _leg(symbols, source, target)
    if direct is not None:
        return Conversion(source, target, (direct,))
    if _HUB not in (source, target):
        first, second = _leg(symbols, source, _HUB), _leg(symbols, _HUB, target)
        if first is not None and second is not None:
            return Conversion(source, target, (first, second))
    return None


def _leg(symbols: Mapping[str, SymbolConfig], source: str, target: str) -> ConversionLeg | None:
    inverse = None
    for cfg in symbols.values():
        if cfg.base_currency == source and cfg.profit_currency == target:
            return ConversionLeg(cfg.symbol, True)
        if inverse is None and cfg.base_currency == target and cfg.profit_currency == source:
            inverse = ConversionLeg(cfg.symbol, False)
    return inverse


def rate(conversion: Conversion, quotes: Mapping[str, Quote], *, larger: bool) -> float | None:
    """Target money per unit of source money at the live quotes, on the side that gives the
    larger (``larger``) or the smaller result; None when a leg's pair has no quote."""
    result = 1.0
    for leg in conversion.legs:
        quote = quotes.get(leg.pair)
        if quote is None:
            return None
        if leg.multiply:
            result *= quote.ask if larger else quote.bid
        else:
            result /= quote.bid if larger else quote.ask
    return result


def money_rate(conversion: Conversion, quotes: Mapping[str, Quote], amount: float) -> float | None:
    """The rate for profit, swap or commission: a gain at the smaller side, a loss at the
    larger one (see the module docstring)."""
    return rate(conversion, quotes, larger=amount < 0)


def margin_rate(conversion: Conversion, quotes: Mapping[str, Quote], side: Side) -> float | None:
    """The rate for margin: a buy's at the larger side, a sell's at the smaller one."""
    return rate(conversion, quotes, larger=side is Side.BUY)


def convert_money(
    conversion: Conversion, quotes: Mapping[str, Quote], amount: float
) -> float | None:
    """``amount`` of source money in target money, or None without the conversion quote."""
    if not conversion.legs:
        return amount
    r = money_rate(conversion, quotes, amount)
    return None if r is None else amount * r


def missing_quote(conversion: Conversion, quotes: Mapping[str, Quote]) -> str | None:
    """The first pair of ``conversion`` without a quote, or None when all are quoted."""
    return next((leg.pair for leg in conversion.legs if leg.pair not in quotes), None)
