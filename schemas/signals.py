"""Strategy signals on the wire: versions, deployments, and what a strategy run publishes.

A strategy version (immutable code and parameters, named by their hashes) is deployed on one
symbol and timeframe; the signal workers run it once per closed candle and publish its
signal on ``tc.v1.signal.<version>.signals`` or the failed run on
``tc.v1.signal.<version>.failures`` (stream ``TC_SIGNALS``). Deployments made at run time
live in the KV bucket ``tc_signal_deployments`` (key ``subjects.deployment_key``, value a
``StrategyDeployment`` as JSON).
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from schemas.common import Symbol

#: A parameter value: a JSON scalar, so the version id has one canonical spelling.
ParameterValue = str | int | float | bool | None
Parameters = dict[str, ParameterValue]

VERSION_ID_PATTERN = r"^sv-[0-9a-f]{24}$"
VersionId = Annotated[str, msgspec.Meta(pattern=VERSION_ID_PATTERN)]
Author = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
#: The paper master a deployment drives, or empty (signals only). An account id (letters,
#: digits, ``_`` and ``-``), as in ``schemas.common.ACCOUNT_ID_PATTERN``.
MasterOrNone = Annotated[str, msgspec.Meta(pattern=r"^(?:[A-Za-z0-9_-]{1,64})?(?!\n)$")]


class Timeframe(enum.StrEnum):
    """A candle's length: minutes, hours or the broker's server day."""

    M1 = "1m"
    M5 = "5m"
    M15 = "15m"
    H1 = "1h"
    H4 = "4h"
    D1 = "1d"


class SignalAction(enum.StrEnum):
    """What a strategy wants: be long, be short, be flat, or leave things as they are."""

    BUY = "buy"
    SELL = "sell"
    CLOSE = "close"
    HOLD = "hold"


class Signal(msgspec.Struct, frozen=True, kw_only=True):
    """What a strategy wants after the last closed candle; SL and TP are prices."""

    action: SignalAction
    sl: float | None = None
    tp: float | None = None
    comment: str = ""


class FailureKind(enum.StrEnum):
    """Why a strategy run gave no signal."""

    CRASH = "crash"
    """The strategy raised, or the interpreter died."""
    TIMEOUT = "timeout"
    """Over the wall-clock or the CPU-time limit."""
    MEMORY = "memory"
    """Over the memory limit."""
    FORBIDDEN = "forbidden"
    """Tried the network, a process, native code or a file write."""
    BAD_OUTPUT = "bad_output"
    """Returned something that is not a signal, or replied with garbage."""


class StrategyVersion(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One immutable version of a strategy: exactly one of ``shipped`` (the name of a
    strategy that ships with the platform) or ``source`` (an uploaded module's text), its
    parameters, who uploaded it and when. ``version_id`` derives from ``code_sha256`` and the
    parameters, so the same code with the same parameters is the same version whoever
    uploads it again."""

    version_id: VersionId
    code_sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    parameters: Parameters
    author: Author
    created_ns: Annotated[int, msgspec.Meta(ge=0)]
    shipped: str | None = None
    source: str = ""


class StrategyDeployment(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One strategy version run once per closed candle of one symbol and timeframe.

    In the worker's configuration file, or as the value (JSON) of the KV bucket
    ``tc_signal_deployments`` under ``deployment_key(version_id, symbol, timeframe)``.
    """

    version: StrategyVersion
    symbol: Symbol
    timeframe: Timeframe
    history: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 500
    """The most candles the strategy sees (the latest ones)."""
    volume: Annotated[float, msgspec.Meta(gt=0.0, le=1_000.0)] = 0.1
    """The fixed lot the master trades on each signal."""
    master: MasterOrNone = ""
    """The paper master account whose trades the drive makes from this deployment's signals;
    empty: signals only, nothing trades."""


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


encoder = msgspec.msgpack.Encoder()
signal_decoder = msgspec.msgpack.Decoder(StrategySignal)
failure_decoder = msgspec.msgpack.Decoder(StrategyRunFailed)
#: Deployments travel as JSON (the KV bucket's values, the worker's configuration file).
deployment_decoder = msgspec.json.Decoder(StrategyDeployment)
deployment_encoder = msgspec.json.Encoder()
