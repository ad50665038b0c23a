"""msgpack encoders and decoders for every wire message (one instance each, reused)."""

from __future__ import annotations

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

master_event_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(MasterEvent)
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
