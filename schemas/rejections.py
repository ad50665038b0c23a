"""Master-event rejections: the replicator refused an event, and says so to its producer.

JetStream acknowledges a master event as soon as it is stored; whether the replicator could
copy it is only known later. Every event it refuses (not a master event at all, a failed
sanity check, a fan-out that cannot be done) is answered on
``tc.v1.master.<account>.rejections`` with the reason, so the producer learns that its event
was not copied. The event itself stays in the master-event stream for inspection.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from schemas.common import TimestampNs

#: The subject token the event came on: not necessarily a valid account id (that may be why
#: it was rejected), but always a NATS subject token.
SubjectToken = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class RejectionReason(enum.StrEnum):
    INVALID_PAYLOAD = "invalid_payload"
    """Not a master event of this contract version (bad msgpack, unknown type, a field out of
    its range); ``event_id`` is empty and ``stream_seq`` says which message it was."""
    SUBJECT_MISMATCH = "subject_mismatch"
    """The event names another master than the subject it was published on."""
    INVALID_PRICE = "invalid_price"
    """A price, SL or TP that is not finite, or an entry price that is not above zero."""
    INVALID_VOLUME = "invalid_volume"
    """A volume that is not finite or not above zero."""
    VOLUME_ABOVE_SYMBOL_MAX = "volume_above_symbol_max"
    """More lots than the master's own symbol allows in one order (its published spec)."""
    PLANNING_FAILED = "planning_failed"
    """The copy rules raised on this event: a defect, reported rather than retried."""
    FAN_OUT_IMPOSSIBLE = "fan_out_impossible"
    """The orders can never be stored (e.g. larger than the server's maximum payload)."""
    PUBLISH_FAILED = "publish_failed"
    """NATS did not store the orders through every delivery the replicator allows."""


class MasterEventRejected(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A master event the replicator did not copy to any follower, and why."""

    rejection_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    """``rejected:<stream seq>``: one per stored event, the same for each of its deliveries,
    so a redelivered event's rejection is stored once (``Nats-Msg-Id``)."""
    master: SubjectToken
    """The master account the subject names (the ``<account>`` of the rejections subject)."""
    subject: Annotated[str, msgspec.Meta(max_length=512)]
    """The subject the event was published on, ``tc.v1.master.<account>.events``."""
    reason: RejectionReason
    message: str
    """The reason in words, for people."""
    ts_ns: TimestampNs
    """When the replicator rejected the event (UTC ns)."""
    event_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    """The event's id, when it decoded far enough to have one."""
    event_type: Annotated[str, msgspec.Meta(max_length=64)] = ""
    """The event's ``type`` tag, when it decoded."""
    stream_seq: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Where the event sits in ``TC_MASTER_EVENTS`` (it is kept there for inspection)."""
    numbers: dict[str, float | str | None] = {}
    """The values the check saw, e.g. ``{"volume": 1e300, "volume_max": 100.0}``."""
