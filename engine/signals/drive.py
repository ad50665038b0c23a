"""What a strategy's master account does for a signal, given the position it holds now."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Protocol

import msgspec

from engine.signals.messages import StrategySignal
from engine.signals.strategy import Signal, SignalAction
from schemas.common import Side

#: Volumes below this are float noise, not a position (lots have at most 8 decimals).
_VOLUME_EPSILON = 1e-9


class OrderKind(enum.StrEnum):
    OPEN = "open"
    CLOSE = "close"


class MasterOrder(msgspec.Struct, frozen=True, kw_only=True):
    """One manual order on the strategy's master account.

    ``open``: a market order of ``volume`` lots on ``side`` with the signal's SL/TP.
    ``close``: close every position of ``side`` on the symbol (``volume`` is what is held).
    """

    kind: OrderKind
    side: Side
    volume: float
    sl: float | None = None
    tp: float | None = None
    comment: str = ""


class HeldPosition(Protocol):
    """What the drive needs of a venue's open position (the paper venue's ``Position``)."""

    @property
    def symbol(self) -> str: ...
    @property
    def side(self) -> Side: ...
    @property
    def volume(self) -> float: ...


def net_position(positions: Iterable[HeldPosition], symbol: str) -> float:
    """The master's signed net volume on ``symbol``: positive long, negative short."""
    net = 0.0
    for position in positions:
        if position.symbol == symbol:
            net += position.volume if position.side is Side.BUY else -position.volume
    return 0.0 if abs(net) < _VOLUME_EPSILON else round(net, 8)


def orders_for(
    signal: Signal | StrategySignal, position: float, volume: float
) -> list[MasterOrder]:
    """The orders that take the master from ``position`` (signed net lots) to the signal's side.

    | signal | flat | long | short |
    |---|---|---|---|
    | buy | open buy | nothing | close the short, open buy (reverse) |
    | sell | open sell | close the long, open sell (reverse) | nothing |
    | close | nothing | close the long | close the short |
    | hold | nothing | nothing | nothing |

    A signal on the side already held does nothing: a strategy signals a cross once, and a
    repeated or replayed signal must never double the position. ``volume`` is the fixed lot
    the deployment trades; the held position is closed whole, whatever its size.
    """
    if isinstance(signal, StrategySignal):
        signal = signal.signal
    if not volume > 0:
        raise ValueError(f"volume must be positive, not {volume!r}")
    action = signal.action
    held = None if abs(position) < _VOLUME_EPSILON else (Side.BUY if position > 0 else Side.SELL)
    if action is SignalAction.HOLD:
        return []
    closing = (
        []
        if held is None
        else [MasterOrder(kind=OrderKind.CLOSE, side=held, volume=round(abs(position), 8))]
    )
    if action is SignalAction.CLOSE:
        return closing
    wanted = Side.BUY if action is SignalAction.BUY else Side.SELL
    if held is wanted:
        return []
    opening = MasterOrder(
        kind=OrderKind.OPEN,
        side=wanted,
        volume=volume,
        sl=signal.sl,
        tp=signal.tp,
        comment=signal.comment,
    )
    return [*closing, opening]
