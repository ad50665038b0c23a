"""TradingView alerts: the webhook message format, its parsing, dedup ids and master intents."""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from engine.core.errors import AlertError
from schemas.common import Side

#: TradingView caps an alert message far below this; a larger body is not an alert.
MAX_ALERT_BYTES = 16_384

# A float bound rather than ``math.inf``: msgspec lets ``inf`` through ``ge=0``.
_MAX_NUMBER = 1e12
_Size = Annotated[float, msgspec.Meta(ge=0.0, le=_MAX_NUMBER)]
_Positive = Annotated[float, msgspec.Meta(gt=0.0, le=_MAX_NUMBER)]


class AlertAction(enum.StrEnum):
    """``{{strategy.order.action}}`` (buy or sell) or a plain message's buy, sell or close."""

    BUY = "buy"
    SELL = "sell"
    CLOSE = "close"


class MarketPosition(enum.StrEnum):
    """``{{strategy.market_position}}`` and ``{{strategy.prev_market_position}}``."""

    LONG = "long"
    SHORT = "short"
    FLAT = "flat"


class TradingViewAlert(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """One alert message, as the author wrote it in TradingView with the placeholders filled in.

    Unknown keys are refused: a misspelt ``"sl"`` silently dropped would open a position
    without its stop. Numbers may be JSON numbers or strings (``"{{close}}"`` quoted or not).
    The repr masks the secret; log ``alert_id`` rather than the encoded alert.
    """

    secret: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    ticker: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    time: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    """``{{time}}``: the bar's open time, ISO 8601 with a zone (TradingView sends ``...Z``)."""
    action: AlertAction
    contracts: _Positive | None = None
    """``{{strategy.order.contracts}}``; for a plain buy or sell, the volume to trade."""
    price: _Positive | None = None
    """``{{strategy.order.price}}`` or ``{{close}}``: checks SL/TP sides; fills are at market."""
    order_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    """``{{strategy.order.id}}``: the Pine order id ("Long", "Exit"...)."""
    comment: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    market_position: MarketPosition | None = None
    market_position_size: _Size | None = None
    prev_market_position: MarketPosition | None = None
    prev_market_position_size: _Size | None = None
    sl: _Positive | None = None
    tp: _Positive | None = None
    exchange: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    interval: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    timenow: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    """``{{timenow}}``: when the alert fired. Kept for the record, never part of the dedup id."""
    id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    """An author-chosen id, for plain messages that may fire twice on one bar on purpose."""

    def __repr__(self) -> str:
        # Logs render values with repr: the secret must never reach them.
        fields = ", ".join(
            f"{name}={'***' if name == 'secret' else repr(getattr(self, name))}"
            for name in self.__struct_fields__
            if name == "secret" or getattr(self, name) is not None
        )
        return f"TradingViewAlert({fields})"

    @property
    def is_strategy_order(self) -> bool:
        return self.market_position is not None

    @property
    def bar_time_ns(self) -> int:
        return _bar_time_ns(self.time)


def parse_alert(body: bytes | str) -> TradingViewAlert:
    """The alert in ``body``, or :class:`AlertError` naming the field and the reason.

    Any input whatsoever either parses or raises ``AlertError``; nothing else escapes.
    """
    if len(body) > MAX_ALERT_BYTES:
        raise AlertError("$", f"the message is longer than {MAX_ALERT_BYTES} bytes")
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise AlertError("$", f"not JSON ({exc}); set the alert message to a JSON object") from None
    except RecursionError:
        raise AlertError("$", "nested too deeply to be an alert message") from None
    if not isinstance(raw, dict):
        raise AlertError("$", "the message must be a JSON object")
    for key, value in raw.items():
        # TradingView leaves a placeholder it does not know as written: strategy
        # placeholders stay unfilled in an alert() or indicator alert. The secret is neither
        # checked nor echoed: it is whatever the source was given.
        if key != "secret" and isinstance(value, str) and "{{" in value:
            raise AlertError(
                key,
                f"placeholder {value!r} was not filled in; {{{{strategy.*}}}} placeholders "
                "work only in alerts created on a strategy",
            )
    try:
        alert = msgspec.convert(raw, TradingViewAlert, strict=False)
    except msgspec.ValidationError as exc:
        field, reason = _field_of(str(exc))
        raise AlertError(field, reason) from None
    _check(alert)
    return alert


_AT_FIELD = re.compile(r"^(.*) - at `\$\.([^`\[]+)")
_NAMED_FIELD = re.compile(r"field `([^`]+)`")


def _field_of(message: str) -> tuple[str, str]:
    if (match := _AT_FIELD.match(message)) is not None:
        return match.group(2), match.group(1)
    if (match := _NAMED_FIELD.search(message)) is not None:
        if "missing required" in message:
            return match.group(1), "required, missing from the message"
        if "unknown field" in message:
            return match.group(1), "not a field of the alert format (misspelt?)"
        return match.group(1), message
    return "$", message


def _bar_time_ns(text: str) -> int:
    try:
        stamp = datetime.fromisoformat(text)
        utc = stamp.astimezone(UTC) if stamp.tzinfo is not None else None
    except (ValueError, OverflowError):
        raise AlertError("time", f"{text!r} is not an ISO 8601 time; use {{{{time}}}}") from None
    if stamp.tzinfo is None:
        raise AlertError("time", f"{text!r} has no time zone; {{{{time}}}} ends in Z")
    # Integer arithmetic: a float timestamp would round nanoseconds.
    assert utc is not None
    delta = utc - datetime(1970, 1, 1, tzinfo=UTC)
    ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
    if ns < 0:
        raise AlertError("time", f"{text!r} is before 1970")
    return ns


def _check(alert: TradingViewAlert) -> None:
    """The rules a single field's type cannot state."""
    _bar_time_ns(alert.time)
    strategy_fields = {
        "market_position": alert.market_position,
        "market_position_size": alert.market_position_size,
        "prev_market_position": alert.prev_market_position,
        "prev_market_position_size": alert.prev_market_position_size,
    }
    present = [name for name, value in strategy_fields.items() if value is not None]
    if present and len(present) < len(strategy_fields):
        missing = next(name for name, value in strategy_fields.items() if value is None)
        raise AlertError(
            missing, f"a strategy alert carries all four position fields; {missing} is missing"
        )
    if present:
        if alert.action is AlertAction.CLOSE:
            raise AlertError(
                "action", "a strategy alert's action is {{strategy.order.action}}: buy or sell"
            )
        _check_position("market_position", alert.market_position, alert.market_position_size)
        _check_position(
            "prev_market_position", alert.prev_market_position, alert.prev_market_position_size
        )
        before, after = _signed(alert, previous=True), _signed(alert, previous=False)
        if math.isclose(before, after, rel_tol=1e-9, abs_tol=1e-12):
            raise AlertError("market_position_size", "the order does not change the position")
        if (after > before) != (alert.action is AlertAction.BUY):
            raise AlertError(
                "action",
                f"{alert.action} does not move the position from {before:g} to {after:g}",
            )
        if alert.contracts is not None and not math.isclose(
            alert.contracts, abs(after - before), rel_tol=1e-6
        ):
            raise AlertError(
                "contracts",
                f"{alert.contracts:g} contracts do not move the position from {before:g} "
                f"to {after:g}",
            )
    elif alert.action is not AlertAction.CLOSE and alert.contracts is None:
        raise AlertError("contracts", f"a plain {alert.action} message needs the volume to trade")
    side = _opened_side(alert)
    if side is not None and alert.price is not None:
        _check_stops(side, alert.price, alert.sl, alert.tp)


def _check_position(field: str, position: MarketPosition | None, size: float | None) -> None:
    flat = position is MarketPosition.FLAT
    if flat != (size == 0):
        raise AlertError(f"{field}_size", f"a {position} position cannot have size {size:g}")


def _signed(alert: TradingViewAlert, *, previous: bool) -> float:
    position = alert.prev_market_position if previous else alert.market_position
    size = alert.prev_market_position_size if previous else alert.market_position_size
    assert size is not None
    return -size if position is MarketPosition.SHORT else size


def _opened_side(alert: TradingViewAlert) -> Side | None:
    if alert.is_strategy_order:
        return _side_of(alert.market_position)
    return {AlertAction.BUY: Side.BUY, AlertAction.SELL: Side.SELL}.get(alert.action)


def _side_of(position: MarketPosition | None) -> Side | None:
    if position is MarketPosition.LONG:
        return Side.BUY
    if position is MarketPosition.SHORT:
        return Side.SELL
    return None


def _check_stops(side: Side, price: float, sl: float | None, tp: float | None) -> None:
    below, above = ("sl", "tp") if side is Side.BUY else ("tp", "sl")
    low = sl if side is Side.BUY else tp
    high = tp if side is Side.BUY else sl
    if low is not None and low >= price:
        raise AlertError(below, f"{low:g} must be below the price {price:g} for a {side}")
    if high is not None and high <= price:
        raise AlertError(above, f"{high:g} must be above the price {price:g} for a {side}")


def verify_secret(alert: TradingViewAlert, expected: str) -> bool:
    """True when the alert carries the source's secret, compared in constant time.

    An empty expected secret never matches: a source configured without one accepts nothing.
    """
    if not expected:
        return False
    return hmac.compare_digest(alert.secret.encode(), expected.encode())


def alert_id(source: str, alert: TradingViewAlert) -> str:
    """A deterministic id: a retried or re-fired alert maps to the id it had the first time.

    What identifies the trade is the source, the symbol, the bar and the order's effect on
    the position (action, order id, contracts, position before and after), plus the author's
    ``id``. Left out on purpose: ``timenow`` (differs each time TradingView fires the same
    order), price, SL/TP and comment (a re-fire on a later tick of the same bar quotes a new
    price but is the same order), and the secret (never hashed into anything stored).
    Pyramided entries on one bar differ by their position sizes, so each gets its own id.
    """
    key: list[Any] = [
        "tv1",
        source,
        alert.exchange,
        alert.ticker,
        alert.bar_time_ns,
        str(alert.action),
        alert.order_id,
        alert.contracts,
        alert.market_position and str(alert.market_position),
        alert.market_position_size,
        alert.prev_market_position and str(alert.prev_market_position),
        alert.prev_market_position_size,
        alert.id,
    ]
    digest = hashlib.sha256(msgspec.json.encode(key)).hexdigest()
    return f"tv-{digest[:32]}"


class IntentKind(enum.StrEnum):
    """What the alert does to the master's position, as the master account sees it."""

    OPEN = "open"
    ADD = "add"
    REDUCE = "reduce"
    CLOSE = "close"
    REVERSE = "reverse"
    NONE = "none"
    """The master is already where the alert leads (a close when flat, an open already held)."""


class MasterActionKind(enum.StrEnum):
    OPEN = "open"
    ADD = "add"
    REDUCE = "reduce"
    CLOSE = "close"


class MasterAction(msgspec.Struct, frozen=True, kw_only=True):
    """One step on the master account; a reverse is a close followed by an open."""

    kind: MasterActionKind
    side: Side
    """The side of the position acted on (for a close or reduce, the side being closed)."""
    volume: float | None = None
    """In the alert's units (contracts), for open and add."""
    ratio: float | None = None
    """For reduce: the part of the master's position to close, in (0, 1)."""
    sl: float | None = None
    tp: float | None = None


class TradeIntent(msgspec.Struct, frozen=True, kw_only=True):
    kind: IntentKind
    actions: tuple[MasterAction, ...]


def intent_of(alert: TradingViewAlert, current_position: float) -> TradeIntent:
    """The steps that bring the master account where the alert leads.

    ``current_position`` is the master's signed net volume on the symbol (long > 0, short < 0).
    Strategy alerts follow the position transition TradingView reports (prev → now); plain
    messages act on the master's position: buy opens, adds to a long or reverses a short.
    The master's own position wins over the strategy's history where they differ, so a
    missed alert never doubles a position: a close when flat does nothing, an add or open
    when flat opens the strategy's full size, and an open on the side already held does nothing.
    """
    held = _side_of_volume(current_position)
    if alert.is_strategy_order:
        return _strategy_intent(alert, held)
    return _plain_intent(alert, held)


def _side_of_volume(volume: float) -> Side | None:
    if volume > 0:
        return Side.BUY
    if volume < 0:
        return Side.SELL
    return None


def _open(side: Side, volume: float, alert: TradingViewAlert) -> MasterAction:
    return MasterAction(
        kind=MasterActionKind.OPEN, side=side, volume=volume, sl=alert.sl, tp=alert.tp
    )


def _close(side: Side) -> MasterAction:
    return MasterAction(kind=MasterActionKind.CLOSE, side=side)


_NOTHING = TradeIntent(kind=IntentKind.NONE, actions=())


def _strategy_intent(alert: TradingViewAlert, held: Side | None) -> TradeIntent:
    before, after = _signed(alert, previous=True), _signed(alert, previous=False)
    target = _side_of_volume(after)
    if target is None:
        if held is None:
            return _NOTHING
        return TradeIntent(kind=IntentKind.CLOSE, actions=(_close(held),))
    size = abs(after)
    same_side = before * after > 0
    if same_side and abs(after) < abs(before):
        if held is not target:
            # Nothing of the strategy's side to reduce; reducing an opposite position would
            # be a trade the strategy never made.
            return _NOTHING
        ratio = (abs(before) - abs(after)) / abs(before)
        return TradeIntent(
            kind=IntentKind.REDUCE,
            actions=(MasterAction(kind=MasterActionKind.REDUCE, side=target, ratio=ratio),),
        )
    if held is None:
        return TradeIntent(kind=IntentKind.OPEN, actions=(_open(target, size, alert),))
    if held is not target:
        return TradeIntent(
            kind=IntentKind.REVERSE, actions=(_close(held), _open(target, size, alert))
        )
    if same_side:
        add = MasterAction(
            kind=MasterActionKind.ADD,
            side=target,
            volume=abs(after) - abs(before),
            sl=alert.sl,
            tp=alert.tp,
        )
        return TradeIntent(kind=IntentKind.ADD, actions=(add,))
    # An open or reverse into the side the master already holds: the master is ahead of
    # the strategy (an earlier close was missed); adding would double it.
    return _NOTHING


def _plain_intent(alert: TradingViewAlert, held: Side | None) -> TradeIntent:
    if alert.action is AlertAction.CLOSE:
        if held is None:
            return _NOTHING
        return TradeIntent(kind=IntentKind.CLOSE, actions=(_close(held),))
    side = Side.BUY if alert.action is AlertAction.BUY else Side.SELL
    assert alert.contracts is not None  # _check requires it for buy and sell
    if held is None:
        return TradeIntent(kind=IntentKind.OPEN, actions=(_open(side, alert.contracts, alert),))
    if held is side:
        add = MasterAction(
            kind=MasterActionKind.ADD, side=side, volume=alert.contracts, sl=alert.sl, tp=alert.tp
        )
        return TradeIntent(kind=IntentKind.ADD, actions=(add,))
    return TradeIntent(
        kind=IntentKind.REVERSE, actions=(_close(held), _open(side, alert.contracts, alert))
    )
