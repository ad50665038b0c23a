"""What a strategy worker publishes: a candle's signal, or the failure of its run."""

from __future__ import annotations

import msgspec

from engine.signals.candles import Timeframe
from engine.signals.sandbox import FailureKind
from engine.signals.strategy import Signal
from schemas import subjects


class StrategySignal(msgspec.Struct, frozen=True, kw_only=True):
    """A strategy version's signal after one closed candle, on ``tc.v1.signal.<version>.signals``.

    Hold signals are not published: the claim records that the candle ran. The paper-venue
    drive of the strategy's master account consumes these and places its manual orders.
    """

    version_id: str
    symbol: str
    timeframe: Timeframe
    candle_close_ns: int
    """The close time (UTC ns) of the candle the strategy saw last: with the version and the
    symbol and timeframe it names the run, and it is the message's deduplication id."""
    signal: Signal
    price: float
    """The candle's close (bid): what the strategy saw, for the drive's deviation check."""
    worker: str
    emitted_ns: int


class StrategyRunFailed(msgspec.Struct, frozen=True, kw_only=True):
    """A run that gave no signal, on ``tc.v1.signal.<version>.failures``: the record an
    operator or the provider's API reads to see why a candle was not acted on."""

    version_id: str
    symbol: str
    timeframe: Timeframe
    candle_close_ns: int
    kind: FailureKind
    message: str
    worker: str
    failed_ns: int


def run_id(version_id: str, symbol: str, timeframe: Timeframe, candle_close_ns: int) -> str:
    """One strategy run: its claim key and the ``Nats-Msg-Id`` of its signal."""
    return f"{version_id}.{subjects.encode_key_token(symbol)}.{timeframe}.{candle_close_ns}"


encoder = msgspec.msgpack.Encoder()
signal_decoder = msgspec.msgpack.Decoder(StrategySignal)
failure_decoder = msgspec.msgpack.Decoder(StrategyRunFailed)
