"""What each stored message becomes: the key columns of its rows, beside its raw payload.

Pure: bytes in, row tuples out (column order of ``engine.ledger.store``), no I/O. A message
that is not of the contract, or whose keys PostgreSQL could not store (a NUL in a text key, a
timestamp outside ``bigint``), raises ``BadMessage``: it is counted and dropped, never retried.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from engine.core.money import to_minor
from schemas import codec
from schemas.account import AccountState
from schemas.decisions import CopyDecision
from schemas.master import MasterEvent
from schemas.orders import FollowerOrder
from schemas.rejections import MasterEventRejected
from schemas.reports import ExecutionReport

_BIGINT_MAX = 2**63 - 1


class Kind(enum.StrEnum):
    """The kinds of message the ledger stores, one table each."""

    MASTER_EVENT = "master_event"
    FOLLOWER_ORDER = "follower_order"
    EXECUTION_REPORT = "execution_report"
    DECISION = "decision"
    REJECTION = "rejection"
    ACCOUNT_STATE = "account_state"


#: Every ``BadMessage.reason``, and ``refused_by_database`` (a value PostgreSQL refused on
#: insert): the drop counter has a series for each from the start.
DROP_REASONS = ("undecodable", "nul_in_text", "timestamp_out_of_range", "refused_by_database")


class BadMessage(ValueError):
    """A message the ledger cannot store; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


Row = tuple[Any, ...]


def _text(value: str) -> str:
    if "\x00" in value:
        raise BadMessage("nul_in_text", f"{value!r} cannot be stored as text")
    return value


def _opt_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def _ts(value: int) -> int:
    if not 0 <= value <= _BIGINT_MAX:
        raise BadMessage("timestamp_out_of_range", f"ts_ns {value}")
    return value


def _tag(struct: msgspec.Struct) -> str:
    return str(struct.__struct_config__.tag)


def _minor(amount: float, currency: str) -> int | None:
    """A float amount from a terminal in minor units, or None when it is not an amount."""
    try:
        # repr is the shortest decimal that reads back as the same float: 1234.56, not
        # 1234.5599999999999.
        units = to_minor(repr(amount), currency)
    except (ValueError, ArithmeticError):
        return None
    return units if -_BIGINT_MAX <= units <= _BIGINT_MAX else None


def master_event_row(event: MasterEvent, seq: int, payload: bytes) -> Row:
    position_id = getattr(event, "position_id", None)
    return (
        _text(event.event_id), _text(event.master), _tag(event), _text(event.symbol),
        _opt_text(position_id), _ts(event.ts_ns), seq, payload,
    )  # fmt: skip


def follower_order_row(order: FollowerOrder, seq: int, batch_id: str | None, payload: bytes) -> Row:
    return (
        _text(order.order_id), _text(order.follower), _text(order.master), _text(order.link_id),
        _text(order.master_event_id), _tag(order), _text(order.symbol), _ts(order.ts_ns), seq,
        _opt_text(batch_id), payload,
    )  # fmt: skip


def execution_report_row(report: ExecutionReport, seq: int, payload: bytes) -> Row:
    return (
        _text(report.order_id), _tag(report), _text(report.follower), _text(report.link_id),
        _opt_text(getattr(report, "symbol", None)), _opt_text(getattr(report, "position_id", None)),
        _ts(report.ts_ns), seq, payload,
    )  # fmt: skip


def decision_row(decision: CopyDecision, seq: int, payload: bytes) -> Row:
    return (
        _text(decision.decision_id), _text(decision.link_id), _text(decision.master),
        _text(decision.follower), decision.outcome.value, decision.rule.value,
        _text(decision.master_event_id), _ts(decision.ts_ns), seq, payload,
    )  # fmt: skip


def rejection_row(rejection: MasterEventRejected, seq: int, payload: bytes) -> Row:
    return (
        _text(rejection.rejection_id), _text(rejection.master), rejection.reason.value,
        _text(rejection.event_id), _ts(rejection.ts_ns), seq, payload,
    )  # fmt: skip


def account_state_row(state: AccountState, seq: int, payload: bytes) -> Row:
    return (
        _text(state.account), _ts(state.ts_ns), _text(state.currency),
        _minor(state.balance, state.currency), _minor(state.equity, state.currency), seq, payload,
    )  # fmt: skip


_encode = codec.encode
_CONNECTOR_ORDERS = ".connector."


def rows_of(kind: Kind, subject: str, data: bytes, seq: int) -> list[Row]:
    """The rows one message of ``kind`` becomes: one, several (a ``FollowerOrderBatch``), or
    none (an account-state delete marker)."""
    try:
        match kind:
            case Kind.MASTER_EVENT:
                event = codec.master_event_decoder.decode(data)
                return [master_event_row(event, seq, data)]
            case Kind.FOLLOWER_ORDER:
                if _CONNECTOR_ORDERS in subject:
                    batch = codec.follower_order_batch_decoder.decode(data)
                    batch_id = _text(batch.batch_id)
                    # Each order is stored on its own, as it would travel alone.
                    return [
                        follower_order_row(order, seq, batch_id, _encode(order))
                        for order in batch.orders
                    ]
                order = codec.follower_order_decoder.decode(data)
                return [follower_order_row(order, seq, None, data)]
            case Kind.EXECUTION_REPORT:
                report = codec.execution_report_decoder.decode(data)
                return [execution_report_row(report, seq, data)]
            case Kind.DECISION:
                return [decision_row(codec.decision_decoder.decode(data), seq, data)]
            case Kind.REJECTION:
                return [rejection_row(codec.rejection_decoder.decode(data), seq, data)]
            case Kind.ACCOUNT_STATE:
                if not data:
                    return []  # a KV delete or purge marker: nothing happened to the account
                state = codec.account_state_decoder.decode(data)
                return [account_state_row(state, seq, data)]
    except msgspec.DecodeError as exc:
        raise BadMessage("undecodable", str(exc)) from None
    raise AssertionError(f"unknown kind {kind!r}")


#: Where ``ts_ns`` sits in each kind's row (lag is measured from it).
TS_INDEX = {
    Kind.MASTER_EVENT: 5,
    Kind.FOLLOWER_ORDER: 7,
    Kind.EXECUTION_REPORT: 6,
    Kind.DECISION: 7,
    Kind.REJECTION: 4,
    Kind.ACCOUNT_STATE: 1,
}

#: What ``engine.ledger.store.account_facts`` decodes each kind's payload into.
DECODERS: dict[Kind, Any] = {
    Kind.MASTER_EVENT: codec.master_event_decoder,
    Kind.FOLLOWER_ORDER: codec.follower_order_decoder,
    Kind.EXECUTION_REPORT: codec.execution_report_decoder,
    Kind.DECISION: codec.decision_decoder,
    Kind.REJECTION: codec.rejection_decoder,
    Kind.ACCOUNT_STATE: codec.account_state_decoder,
}
