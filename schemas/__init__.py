"""tradecopy wire contract: versioned msgspec messages, subject map and stream definitions."""

from __future__ import annotations

from schemas.account import AccountState, FxRate, SymbolSpec, TradeMode
from schemas.common import OrderType, Side, Trace
from schemas.control import EmergencyStop
from schemas.decisions import CopyDecision, DecisionOutcome, DecisionRule
from schemas.links import CopyLink
from schemas.master import (
    MasterEvent,
    PendingOrderCancelled,
    PendingOrderModified,
    PendingOrderPlaced,
    PendingOrderTriggered,
    PositionClosed,
    PositionClosedBy,
    PositionModified,
    PositionOpened,
    PositionReduced,
)
from schemas.orders import (
    FollowerClose,
    FollowerCloseAll,
    FollowerCloseBy,
    FollowerModify,
    FollowerOpen,
    FollowerOrder,
    FollowerOrderBatch,
    FollowerPendingCancel,
    FollowerPendingModify,
    FollowerPendingPlace,
)
from schemas.rejections import MasterEventRejected, RejectionReason
from schemas.reports import (
    ExecutionReport,
    OrderDone,
    OrderFilled,
    OrderPartiallyFilled,
    OrderRejected,
    OrderUnknown,
)

WIRE_VERSION = 1

__all__ = [
    "WIRE_VERSION",
    "AccountState",
    "CopyDecision",
    "CopyLink",
    "DecisionOutcome",
    "DecisionRule",
    "EmergencyStop",
    "ExecutionReport",
    "FollowerClose",
    "FollowerCloseAll",
    "FollowerCloseBy",
    "FollowerModify",
    "FollowerOpen",
    "FollowerOrder",
    "FollowerOrderBatch",
    "FollowerPendingCancel",
    "FollowerPendingModify",
    "FollowerPendingPlace",
    "FxRate",
    "MasterEvent",
    "MasterEventRejected",
    "OrderDone",
    "OrderFilled",
    "OrderPartiallyFilled",
    "OrderRejected",
    "OrderType",
    "OrderUnknown",
    "PendingOrderCancelled",
    "PendingOrderModified",
    "PendingOrderPlaced",
    "PendingOrderTriggered",
    "PositionClosed",
    "PositionClosedBy",
    "PositionModified",
    "PositionOpened",
    "PositionReduced",
    "RejectionReason",
    "Side",
    "SymbolSpec",
    "Trace",
    "TradeMode",
]
