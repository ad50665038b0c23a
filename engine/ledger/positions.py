"""The ledger's positions read model: the account book fold of ``engine.core.book``."""

from __future__ import annotations

from engine.core.book import (
    VOLUME_EPSILON,
    AccountBook,
    AccountFold,
    BalanceSample,
    CashFlow,
    ClosedPosition,
    CloseReason,
    CopyMapEntry,
    CopyRef,
    LinkOutcome,
    OpenPosition,
    OrderOutcome,
    PendingOrder,
    fold_account,
)

__all__ = [
    "VOLUME_EPSILON",
    "AccountBook",
    "AccountFold",
    "BalanceSample",
    "CashFlow",
    "CloseReason",
    "ClosedPosition",
    "CopyMapEntry",
    "CopyRef",
    "LinkOutcome",
    "OpenPosition",
    "OrderOutcome",
    "PendingOrder",
    "fold_account",
]  # fmt: skip
