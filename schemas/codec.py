"""msgpack encoders and decoders for every wire message (one instance each, reused)."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from schemas.account import AccountState, FxRate, SymbolSpec
from schemas.control import EmergencyStop
from schemas.decisions import CopyDecision
from schemas.links import CopyLink
from schemas.market import Quote
from schemas.master import MasterEvent
from schemas.orders import FollowerOrder, FollowerOrderBatch
from schemas.rejections import MasterEventRejected
from schemas.reports import ExecutionReport

encoder = msgspec.msgpack.Encoder()
encode = encoder.encode

_FLOAT_FOR_INT = re.compile(r"Expected `int`, got `float` - at `(\$[^`]*)`")


class Int64Decoder:
    """A msgpack decoder whose errors say that integers are int64 on the wire.

    msgspec refuses a float where the contract has an int, as it should: a float64 cannot
    hold a UTC-nanosecond time exactly. Its message ("Expected `int`, got `float`") does not
    tell a producer in another language what to send instead, so this one says it (the
    replicator puts it in the ``MasterEventRejected`` it publishes).
    """

    __slots__ = ("_decoder",)

    def __init__(self, tp: Any) -> None:
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(tp)

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            found = _FLOAT_FOR_INT.search(str(exc))
            if found is None:
                raise
            ns = found[1].endswith("_ns")
            why = "; a float64 cannot hold nanosecond times exactly" if ns else ""
            raise msgspec.ValidationError(
                f"{exc} (int64 on the wire: send a msgpack integer, never a float{why})"
            ) from exc


master_event_decoder = Int64Decoder(MasterEvent)
follower_order_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(FollowerOrder)
follower_order_batch_decoder = msgspec.msgpack.Decoder(FollowerOrderBatch)
execution_report_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(ExecutionReport)
decision_decoder = msgspec.msgpack.Decoder(CopyDecision)
rejection_decoder = msgspec.msgpack.Decoder(MasterEventRejected)
account_state_decoder = msgspec.msgpack.Decoder(AccountState)
symbol_spec_decoder = msgspec.msgpack.Decoder(SymbolSpec)
fx_rate_decoder = msgspec.msgpack.Decoder(FxRate)
emergency_stop_decoder = msgspec.msgpack.Decoder(EmergencyStop)
copy_link_decoder = msgspec.msgpack.Decoder(CopyLink)
quote_decoder = msgspec.msgpack.Decoder(Quote)
