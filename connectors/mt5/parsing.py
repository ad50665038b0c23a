"""MetaTrader5 package records (namedtuples) into our schemas and snapshot records; pure.

Records are read by attribute with the package's field names (``TradePosition.identifier``,
``TradeOrder.volume_current``, ``TradeDeal.entry`` ...). MT5 stamps records in trade-server
time, so every timestamp is shifted by the server's UTC offset into UTC nanoseconds.
"""

from __future__ import annotations

from typing import Any

import msgspec

from connectors.mt5 import protocol as mt5
from schemas.account import AccountState, SymbolSpec, TradeMode
from schemas.common import OrderType, Side

POSITION_SIDES = {mt5.POSITION_TYPE_BUY: Side.BUY, mt5.POSITION_TYPE_SELL: Side.SELL}
DEAL_SIDES = {mt5.DEAL_TYPE_BUY: Side.BUY, mt5.DEAL_TYPE_SELL: Side.SELL}
PENDING_TYPES = {
    mt5.ORDER_TYPE_BUY_LIMIT: OrderType.BUY_LIMIT,
    mt5.ORDER_TYPE_SELL_LIMIT: OrderType.SELL_LIMIT,
    mt5.ORDER_TYPE_BUY_STOP: OrderType.BUY_STOP,
    mt5.ORDER_TYPE_SELL_STOP: OrderType.SELL_STOP,
}
PENDING_TYPE_CODES = {order_type: code for code, order_type in PENDING_TYPES.items()}
MARKET_TYPE_CODES = {Side.BUY: mt5.ORDER_TYPE_BUY, Side.SELL: mt5.ORDER_TYPE_SELL}
TRADE_MODES = {
    mt5.SYMBOL_TRADE_MODE_DISABLED: TradeMode.DISABLED,
    mt5.SYMBOL_TRADE_MODE_LONGONLY: TradeMode.LONG_ONLY,
    mt5.SYMBOL_TRADE_MODE_SHORTONLY: TradeMode.SHORT_ONLY,
    mt5.SYMBOL_TRADE_MODE_CLOSEONLY: TradeMode.CLOSE_ONLY,
    mt5.SYMBOL_TRADE_MODE_FULL: TradeMode.FULL,
}
#: PositionClosed.reason by DEAL_REASON; manual closes (desktop, mobile, web) are "client".
CLOSE_REASONS = {
    mt5.DEAL_REASON_SL: "sl",
    mt5.DEAL_REASON_TP: "tp",
    mt5.DEAL_REASON_SO: "stop_out",
    mt5.DEAL_REASON_EXPERT: "expert",
}


class PositionSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One open position as the terminal showed it (a ``TradePosition``)."""

    identifier: str
    """POSITION_IDENTIFIER: the opening order's ticket, fixed for the position's life."""
    ticket: str
    """POSITION_TICKET: what requests name (may change on a server-side re-open)."""
    symbol: str
    side: Side
    volume: float
    price_open: float
    price_current: float
    sl: float | None = None
    tp: float | None = None
    magic: int = 0
    comment: str = ""
    time_ns: int = 0
    update_ns: int = 0
    revision: int = 0
    """How many change events the position has had: part of their ids (see ``diff``)."""


class PendingSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One pending limit/stop order as the terminal showed it (a ``TradeOrder``)."""

    ticket: str
    symbol: str
    order_type: OrderType
    volume: float
    price: float
    sl: float | None = None
    tp: float | None = None
    expiration_ns: int = 0
    magic: int = 0
    comment: str = ""
    time_ns: int = 0
    revision: int = 0


class Deal(msgspec.Struct, frozen=True, kw_only=True):
    """One trading deal of the history (a ``TradeDeal`` of type buy or sell)."""

    ticket: int
    order: str
    position_id: str
    symbol: str
    side: Side
    entry: int
    reason: int
    volume: float
    price: float
    magic: int = 0
    comment: str = ""
    time_ns: int = 0


def utc_ns(server_ms: int, server_utc_offset_s: int = 0) -> int:
    """A record's server-time milliseconds as UTC nanoseconds (0 stays 0: no time)."""
    if server_ms <= 0:
        return 0
    return max(0, (server_ms - server_utc_offset_s * 1000) * 1_000_000)


def server_seconds(ns: int, server_utc_offset_s: int = 0) -> int:
    """UTC nanoseconds as the trade server's seconds (request expirations, history windows)."""
    return ns // 1_000_000_000 + server_utc_offset_s


#: Trade servers keep a zone's clock: offsets are whole quarter hours.
OFFSET_STEP_S = 900
#: A tick older than this says nothing certain about the server clock.
FRESH_TICK_S = 60
#: How far the server's tick clock may run ahead of our UTC clock (clock skew).
CLOCK_SKEW_S = 5


def measure_server_offset(tick_msc: int, utc_now_ns: int) -> int | None:
    """The trade server's UTC offset from a tick's ``time_msc``, or ``None`` if the tick is
    not fresh enough to tell: a tick is ``age`` seconds old, so the raw difference is
    ``offset - age``; the offset is the quarter hour at most ``FRESH_TICK_S`` above it."""
    if tick_msc <= 0:
        return None
    raw_s = tick_msc / 1000 - utc_now_ns / 1e9
    offset = round(raw_s / OFFSET_STEP_S) * OFFSET_STEP_S
    age = offset - raw_s
    return offset if -CLOCK_SKEW_S <= age <= FRESH_TICK_S else None


def level(value: float | None) -> float | None:
    """An SL/TP/price level; MetaTrader's 0.0 means none."""
    return float(value) if value else None


def _msc(record: Any, msc_field: str, s_field: str) -> int:
    msc = int(getattr(record, msc_field, 0) or 0)
    return msc or int(getattr(record, s_field, 0) or 0) * 1000


def parse_position(record: Any, server_utc_offset_s: int = 0) -> PositionSnapshot | None:
    side = POSITION_SIDES.get(int(record.type))
    if side is None:
        return None
    ticket = str(int(record.ticket))
    return PositionSnapshot(
        identifier=str(int(record.identifier)) if record.identifier else ticket,
        ticket=ticket,
        symbol=record.symbol,
        side=side,
        volume=float(record.volume),
        price_open=float(record.price_open),
        price_current=float(record.price_current),
        sl=level(record.sl),
        tp=level(record.tp),
        magic=int(record.magic),
        comment=record.comment or "",
        time_ns=utc_ns(_msc(record, "time_msc", "time"), server_utc_offset_s),
        update_ns=utc_ns(_msc(record, "time_update_msc", "time_update"), server_utc_offset_s),
    )


def parse_order(record: Any, server_utc_offset_s: int = 0) -> PendingSnapshot | None:
    """A pending limit/stop order; None for market orders in flight and stop-limits."""
    order_type = PENDING_TYPES.get(int(record.type))
    if order_type is None:
        return None
    expiration_s = int(record.time_expiration or 0)
    return PendingSnapshot(
        ticket=str(int(record.ticket)),
        symbol=record.symbol,
        order_type=order_type,
        volume=float(record.volume_current),
        price=float(record.price_open),
        sl=level(record.sl),
        tp=level(record.tp),
        expiration_ns=utc_ns(expiration_s * 1000, server_utc_offset_s),
        magic=int(record.magic),
        comment=record.comment or "",
        time_ns=utc_ns(_msc(record, "time_setup_msc", "time_setup"), server_utc_offset_s),
    )


def parse_deal(record: Any, server_utc_offset_s: int = 0) -> Deal | None:
    """A buy or sell deal; None for balance, credit, commission and other money deals."""
    side = DEAL_SIDES.get(int(record.type))
    if side is None:
        return None
    return Deal(
        ticket=int(record.ticket),
        order=str(int(record.order)),
        position_id=str(int(record.position_id)),
        symbol=record.symbol,
        side=side,
        entry=int(record.entry),
        reason=int(record.reason),
        volume=float(record.volume),
        price=float(record.price),
        magic=int(record.magic),
        comment=record.comment or "",
        time_ns=utc_ns(_msc(record, "time_msc", "time"), server_utc_offset_s),
    )


def close_reason(deal_reason: int) -> str:
    return CLOSE_REASONS.get(deal_reason, "client")


def account_state(account: str, info: Any, *, open_positions: int, now_ns: int) -> AccountState:
    """An ``AccountInfo`` as our account state."""
    return AccountState(
        account=account,
        ts_ns=now_ns,
        currency=info.currency,
        balance=float(info.balance),
        equity=float(info.equity),
        margin=max(0.0, float(info.margin)),
        free_margin=float(info.margin_free),
        leverage=max(1, int(info.leverage)),
        open_positions=max(0, open_positions),
    )


def symbol_spec(account: str, info: Any, now_ns: int = 0) -> SymbolSpec | None:
    """A ``SymbolInfo`` as our symbol spec; None while the terminal has no usable figures.

    The tick value is 0 until the symbol has had a quote (not in the Market Watch, market
    closed since the terminal started): such a spec would size every copy to nothing.
    """
    tick_value = float(info.trade_tick_value or info.trade_tick_value_profit or 0.0)
    tick_size = float(info.trade_tick_size or info.point or 0.0)
    figures = (
        tick_value,
        tick_size,
        float(info.trade_contract_size),
        float(info.volume_min),
        float(info.volume_max),
        float(info.volume_step),
    )
    if not all(value > 0 for value in figures):
        return None
    return SymbolSpec(
        account=account,
        symbol=info.name,
        ts_ns=now_ns,
        contract_size=float(info.trade_contract_size),
        tick_size=tick_size,
        tick_value=tick_value,
        digits=min(10, max(0, int(info.digits))),
        volume_min=float(info.volume_min),
        volume_max=float(info.volume_max),
        volume_step=float(info.volume_step),
        trade_mode=TRADE_MODES.get(int(info.trade_mode), TradeMode.DISABLED),
    )


def filling_types(info: Any, *, pending: bool = False) -> tuple[int, ...]:
    """The request fillings to try, best first; a 10030 answer moves on to the next.

    ``SymbolInfo.filling_mode`` is a set of flags (FOK, IOC). Market execution takes only
    those. Instant and request execution always take FOK (MetaQuotes' filling docs) and
    refuse RETURN on some servers, so RETURN is never first there. Pending orders rest in
    the book: RETURN first, then what the flags allow. The documentation and brokers differ,
    so every mode that may be accepted follows as a fallback.
    """
    flags = int(info.filling_mode)
    allowed = [mode for mode, flag in ((mt5.ORDER_FILLING_FOK, mt5.SYMBOL_FILLING_FOK),
                                       (mt5.ORDER_FILLING_IOC, mt5.SYMBOL_FILLING_IOC))
               if flags & flag]  # fmt: skip
    if pending:
        return (mt5.ORDER_FILLING_RETURN, *allowed)
    execution = int(getattr(info, "trade_exemode", mt5.SYMBOL_TRADE_EXECUTION_MARKET))
    if execution in (mt5.SYMBOL_TRADE_EXECUTION_INSTANT, mt5.SYMBOL_TRADE_EXECUTION_REQUEST):
        fok_first = [mt5.ORDER_FILLING_FOK, *allowed]
        return (*dict.fromkeys(fok_first), mt5.ORDER_FILLING_RETURN)
    if execution == mt5.SYMBOL_TRADE_EXECUTION_EXCHANGE:
        return (*allowed, mt5.ORDER_FILLING_RETURN)
    return tuple(allowed) or (mt5.ORDER_FILLING_RETURN,)


def stops_too_close(
    side: Side, bid: float, ask: float, sl: float | None, tp: float | None, min_distance: float
) -> tuple[bool, bool]:
    """Whether SL and TP of a new position on ``side`` are nearer than the symbol's stops
    level to the price they trigger on (bid for a buy, ask for a sell): the server would
    refuse the whole request with 10016."""
    if min_distance <= 0:
        return False, False
    if side is Side.BUY:
        return (sl is not None and sl > bid - min_distance,
                tp is not None and tp < bid + min_distance)  # fmt: skip
    return (sl is not None and sl < ask + min_distance,
            tp is not None and tp > ask - min_distance)  # fmt: skip
