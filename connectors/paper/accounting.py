"""Paper venue arithmetic: deal profit, margin, equity and the MT5 validity checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from connectors.paper.model import AccountBook, MarginMode, Position, SymbolConfig
from connectors.paper.prices import Quote
from engine.core.volume import decimals
from schemas.common import OrderType, Side

#: Volumes are on the step when within this many steps of a whole number (0.07 / 0.01 noise).
_STEP_TOLERANCE = 1e-6


def normalize_volume(volume: float, cfg: SymbolConfig) -> float:
    """``volume`` snapped to the nearest step, without float noise (call after validating)."""
    step = cfg.volume_step
    return round(round(volume / step) * step, decimals(step))


def volume_error(volume: float, cfg: SymbolConfig) -> str | None:
    """Why ``volume`` cannot be traded on ``cfg``, or None when it can."""
    if not math.isfinite(volume) or volume <= 0:
        return f"volume {volume} must be a positive number"
    # Range first: a huge volume divided by the step may not even round to an integer.
    if volume < cfg.volume_min - cfg.volume_step * _STEP_TOLERANCE:
        return f"volume {volume} is below the minimum {cfg.volume_min}"
    if volume > cfg.volume_max + cfg.volume_step * _STEP_TOLERANCE:
        return f"volume {volume} is above the maximum {cfg.volume_max}"
    steps = volume / cfg.volume_step
    if abs(steps - round(steps)) > _STEP_TOLERANCE:
        return f"volume {volume} is not a multiple of the step {cfg.volume_step}"
    return None


def direction(side: Side) -> int:
    return 1 if side is Side.BUY else -1


def entry_price(side: Side, quote: Quote) -> float:
    """Buys open at the ask, sells at the bid."""
    return quote.ask if side is Side.BUY else quote.bid


def exit_price(side: Side, quote: Quote) -> float:
    """Buys close (and are valued, and hit SL/TP) at the bid, sells at the ask."""
    return quote.bid if side is Side.BUY else quote.ask


def deal_profit(
    cfg: SymbolConfig, side: Side, volume: float, open_price: float, close_price: float
) -> float:
    """Profit in the symbol's profit currency of closing ``volume`` lots: ticks moved x tick
    value x lots (``connectors.paper.fx`` converts it to the account currency)."""
    ticks = (close_price - open_price) / cfg.tick_size
    return direction(side) * ticks * cfg.tick_value * volume


def to_minor(amount: float, money_digits: int) -> int:
    """Money rounds to the account currency's minor unit once per deal, as a server books it."""
    return round(amount * 10**money_digits)


def position_margin(cfg: SymbolConfig, volume: float, price: float, leverage: int) -> float:
    """Margin for a position in the symbol's margin currency, at its open price: notional /
    leverage x margin rate, the notional being lots x contract size (forex mode: in the base
    currency, whatever the price) or lots x contract size x price (CFD leverage mode).
    Hedged legs are summed, not netted.
    """
    notional = volume * cfg.contract_size
    if cfg.margin_mode is not MarginMode.FOREX:
        notional *= price
    return notional / leverage * cfg.margin_rate


def floating_profit(cfg: SymbolConfig, position: Position, quote: Quote | None) -> float:
    """Profit of closing the whole position now, in the symbol's profit currency."""
    if quote is None:
        return 0.0
    return deal_profit(
        cfg, position.side, position.volume, position.open_price, exit_price(position.side, quote)
    )


def account_figures(
    book: AccountBook,
    symbols: Mapping[str, SymbolConfig],
    quotes: Mapping[str, Quote],
    to_account: Callable[[str, float], float | None] | None = None,
) -> tuple[float, float, float]:
    """``(balance, equity, margin)`` of one account at the latest quotes.

    ``to_account(currency, amount)`` converts a position's floating profit from its profit
    currency (None: no conversion quote, counted as no floating profit); without it profits
    are taken as already in the account currency. Accrued swaps count in equity; margin is
    what each position holds since its open.
    """
    balance = book.balance_minor / 10**book.money_digits
    floating = 0.0
    margin = 0.0
    for position in book.positions.values():
        cfg = symbols[position.symbol]
        profit = floating_profit(cfg, position, quotes.get(position.symbol))
        if to_account is not None and profit:
            profit = to_account(cfg.profit_currency, profit) or 0.0
        floating += profit + position.swap
        margin += position.margin or position_margin(
            cfg, position.volume, position.open_price, book.leverage
        )
    return balance, balance + floating, margin


def _points(distance: float, cfg: SymbolConfig) -> float:
    points = distance / cfg.point
    # An absurd level (1e308) overflows to infinity, which still compares the right way.
    return round(points) if math.isfinite(points) else points


def stops_error(
    cfg: SymbolConfig, side: Side, reference: float, sl: float | None, tp: float | None
) -> str | None:
    """Why SL/TP cannot sit where asked, measured from ``reference``.

    For a position the reference is the price it would close at (bid for buys, ask for
    sells), as MT5 measures it, so a new stop can never be hit by the very quote it was set on.
    For a pending order it is the order's own price.
    """
    level = cfg.stops_level_points
    sign = direction(side)
    for name, value in (("stop loss", sl), ("take profit", tp)):
        if value is not None and not math.isfinite(value):
            return f"{name} {value} must be a finite price"
    if sl is not None:
        distance = _points((reference - sl) * sign, cfg)
        if sl <= 0 or distance <= 0 or distance < level:
            return (
                f"stop loss {sl} must be {'below' if sign > 0 else 'above'} {reference}"
                f" by at least {max(level, 1)} points"
            )
    if tp is not None:
        distance = _points((tp - reference) * sign, cfg)
        if tp <= 0 or distance <= 0 or distance < level:
            return (
                f"take profit {tp} must be {'above' if sign > 0 else 'below'} {reference}"
                f" by at least {max(level, 1)} points"
            )
    return None


def pending_price_error(
    cfg: SymbolConfig, order_type: OrderType, price: float, quote: Quote
) -> str | None:
    """Limits wait for a better price, stops for a worse one, at least the stops level away."""
    level = cfg.stops_level_points
    if order_type is OrderType.BUY_LIMIT:
        distance, where, market = quote.ask - price, "below the ask", quote.ask
    elif order_type is OrderType.SELL_LIMIT:
        distance, where, market = price - quote.bid, "above the bid", quote.bid
    elif order_type is OrderType.BUY_STOP:
        distance, where, market = price - quote.ask, "above the ask", quote.ask
    else:
        distance, where, market = quote.bid - price, "below the bid", quote.bid
    points = _points(distance, cfg)
    if points <= 0 or points < level:
        return (
            f"{order_type.value} price {price} must be {where} {market}"
            f" by at least {max(level, 1)} points"
        )
    return None


def pending_triggered(order_type: OrderType, price: float, quote: Quote) -> bool:
    if order_type is OrderType.BUY_LIMIT:
        return quote.ask <= price
    if order_type is OrderType.SELL_LIMIT:
        return quote.bid >= price
    if order_type is OrderType.BUY_STOP:
        return quote.ask >= price
    return quote.bid <= price
