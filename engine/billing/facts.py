"""The ledger facts the fee modules read: copies opened, volume closed, equity, cash flows.

These are filled from the ledger's tables by the billing store; they are kept apart from
``engine.ledger`` (a service never imports another's internals) and carry only what a fee
needs. Money is integer minor units of the account's currency; volume is an exact Decimal.
"""

from __future__ import annotations

import enum
from decimal import Decimal

import msgspec


class CopiedTrade(msgspec.Struct, frozen=True, kw_only=True):
    """A copy that opened on a follower account: the unit pay-per-trade counts."""

    order_id: str
    """The follower order id (deterministic from the master event and link): the dedup key."""
    follower: str
    link: str
    opened_ns: int
    manual: bool = False
    """Opened by hand on the follower account (no master behind it): never counted."""


class ClosedVolume(msgspec.Struct, frozen=True, kw_only=True):
    """Volume closed on a follower position, whole or partial: what the volume fee counts."""

    order_id: str
    """The closing order's id: a partial close has its own, so a redelivery is not counted twice."""
    follower: str
    link: str
    lots: Decimal
    closed_ns: int
    manual: bool = False
    """Closed a position opened by hand (not a copy): never counted."""


class EquitySample(msgspec.Struct, frozen=True, kw_only=True):
    """The follower's equity (balance plus floating P&L) at one instant."""

    follower: str
    equity_minor: int
    ts_ns: int


class CashFlowKind(enum.StrEnum):
    DEPOSIT = "deposit"
    WITHDRAWAL = "withdrawal"


class CashFlow(msgspec.Struct, frozen=True, kw_only=True):
    """Money moved into or out of the follower account: not a trading result."""

    follower: str
    kind: CashFlowKind
    amount_minor: int
    """Always positive; ``kind`` says which way it moved."""
    ts_ns: int

    def __post_init__(self) -> None:
        if not isinstance(self.amount_minor, int) or self.amount_minor <= 0:
            raise ValueError(f"a cash flow is a positive amount of minor units: {self!r}")

    @property
    def signed_minor(self) -> int:
        """+amount for a deposit, −amount for a withdrawal: how it moves the high-water mark."""
        return self.amount_minor if self.kind is CashFlowKind.DEPOSIT else -self.amount_minor


def lots_from_wire(volume: float) -> Decimal:
    """A wire volume (a float on the symbol's step) as the exact lots it stands for.

    The shortest decimal that round-trips (``repr``) is the number the venue sent (0.1, not
    0.1000000000000000055511151231257827).
    """
    if not isinstance(volume, float | int) or isinstance(volume, bool):
        raise TypeError(f"a wire volume is a number, not {volume!r}")
    lots = Decimal(repr(float(volume)))
    if not lots.is_finite() or lots < 0:
        raise ValueError(f"{volume!r} is not a closed volume")
    return lots
