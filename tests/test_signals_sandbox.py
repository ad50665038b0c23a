"""The strategy sandbox: signals out, and every failure typed, bounded and survivable."""

from __future__ import annotations

import time

import pytest

from engine.signals.candles import Candle, Timeframe
from engine.signals.sandbox import (
    FailureKind,
    SandboxLimits,
    SignalResult,
    StrategyFailure,
    run_strategy,
)
from engine.signals.strategies.sma_cross import SmaCrossParams, sma_cross
from engine.signals.strategy import Candles, Signal, SignalAction
from engine.signals.versions import StrategyVersion, new_version

MINUTE_NS = 60_000_000_000
LIMITS = SandboxLimits(wall_s=10.0, cpu_s=10, memory_mb=256)

#: A fall then a jump: the 3-candle SMA crosses above the 8-candle one on the last candle.
CLOSES = [110.0 - i for i in range(12)] + [120.0]


def _candles(closes: list[float] = CLOSES) -> list[Candle]:
    return [
        Candle(
            symbol="XAUUSD",
            timeframe=Timeframe.M1,
            open_time_ns=i * MINUTE_NS,
            close_time_ns=(i + 1) * MINUTE_NS,
            open=close,
            high=close + 1.0,
            low=close - 1.0,
            close=close,
            ticks=4,
        )
        for i, close in enumerate(closes)
    ]


def _uploaded(body: str, **parameters: object) -> StrategyVersion:
    return new_version(source=body, parameters=parameters, author="alice", created_ns=1)


GOOD = """
from engine.signals.strategy import Signal

def strategy(candles, params):
    last = candles.close[-1]
    return Signal(action="buy", sl=last - params["stop"], comment=f"{len(candles)} candles")
"""

FAILING = {
    "busy_loop": (
        "def strategy(candles, params):\n    while True:\n        pass\n",
        FailureKind.TIMEOUT,
        "wall clock",
    ),
    "two_gigabytes": (
        "def strategy(candles, params):\n    hoard = bytearray(2 * 1024**3)\n    return hoard\n",
        FailureKind.MEMORY,
        "memory limit",
    ),
    "network_caught": (
        "import socket\n"
        "def strategy(candles, params):\n"
        "    try:\n"
        "        socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        "    except Exception:\n"
        "        pass\n"
        "    return {'action': 'buy'}\n",
        FailureKind.FORBIDDEN,
        "socket.",
    ),
    "network_at_import": (
        "import socket\nsocket.socket().bind(('127.0.0.1', 0))\n"
        "def strategy(candles, params):\n    return {'action': 'buy'}\n",
        FailureKind.FORBIDDEN,
        "socket.",
    ),
    "subprocess": (
        "import subprocess\ndef strategy(candles, params):\n    subprocess.run(['true'])\n",
        FailureKind.FORBIDDEN,
        "subprocess.Popen",
    ),
    "os_system": (
        "import os\ndef strategy(candles, params):\n    os.system('true')\n",
        FailureKind.FORBIDDEN,
        "os.system",
    ),
    "file_write": (
        "def strategy(candles, params):\n    open('state.txt', 'w').write('x')\n",
        FailureKind.FORBIDDEN,
        "writing the file 'state.txt'",
    ),
    "native_code": (
        "import ctypes\ndef strategy(candles, params):\n    ctypes.CDLL(None)\n",
        FailureKind.FORBIDDEN,
        "ctypes.dlopen",
    ),
    "raises": (
        "def strategy(candles, params):\n"
        "    raise ValueError(f'no edge on {len(candles)} candles')\n",
        FailureKind.CRASH,
        "ValueError: no edge on 13 candles (line 2)",
    ),
    "returns_garbage": (
        "def strategy(candles, params):\n    return 'to the moon'\n",
        FailureKind.BAD_OUTPUT,
        "returned str, not a Signal",
    ),
    "replies_garbage": (
        # Writes past the reply channel's back (the first descriptor after stdio) and leaves.
        "import os\n"
        "def strategy(candles, params):\n    os.write(3, b'\\xc1junk')\n    os._exit(0)\n",
        FailureKind.BAD_OUTPUT,
        "reply is not a signal",
    ),
    "not_a_price": (
        "def strategy(candles, params):\n    return {'action': 'buy', 'sl': float('nan')}\n",
        FailureKind.BAD_OUTPUT,
        "sl nan is not a price",
    ),
    "exits_silently": (
        "import os\ndef strategy(candles, params):\n    os._exit(0)\n",
        FailureKind.BAD_OUTPUT,
        "exited without a reply",
    ),
    "no_entry_point": (
        "def strategy(candles, params):\n    pass\nstrategy = None\n",
        FailureKind.CRASH,
        "defines no function 'strategy'",
    ),
}


async def test_an_uploaded_strategy_returns_its_signal() -> None:
    outcome = await run_strategy(_uploaded(GOOD, stop=5.0), _candles(), LIMITS)
    assert isinstance(outcome, SignalResult), outcome
    assert outcome.signal == Signal(action=SignalAction.BUY, sl=115.0, comment="13 candles")


async def test_a_shipped_strategy_gives_in_the_sandbox_what_it_gives_in_process() -> None:
    version = new_version(
        shipped="sma_cross", parameters={"fast": 3, "slow": 8}, author="ops", created_ns=1
    )
    expected = sma_cross(Candles.of(_candles()), SmaCrossParams(fast=3, slow=8))
    assert expected.action is SignalAction.BUY  # the data really crosses
    outcome = await run_strategy(version, _candles(), LIMITS)
    assert isinstance(outcome, SignalResult) and outcome.signal == expected


async def test_an_uploaded_strategy_gets_its_parameters_as_its_own_struct() -> None:
    source = """
import msgspec
from engine.signals.strategy import Signal

class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    period: int = 3

def strategy(candles, params):
    return Signal(action="hold", comment=f"{type(params).__name__} {params.period}")
"""
    outcome = await run_strategy(_uploaded(source, period=7), _candles(), LIMITS)
    assert isinstance(outcome, SignalResult) and outcome.signal.comment == "Params 7"
    refused = await run_strategy(_uploaded(source, periods=7), _candles(), LIMITS)
    assert isinstance(refused, StrategyFailure) and refused.kind is FailureKind.CRASH
    assert "periods" in refused.message


async def test_prints_go_to_the_log_not_into_the_reply() -> None:
    source = (
        "import os\n"
        "def strategy(candles, params):\n"
        "    print('debugging', len(candles))\n"
        "    os.write(1, b'raw bytes on stdout')\n"
        "    return {'action': 'close'}\n"
    )
    outcome = await run_strategy(_uploaded(source), _candles(), LIMITS)
    assert isinstance(outcome, SignalResult) and outcome.signal.action is SignalAction.CLOSE


@pytest.mark.parametrize("case", sorted(FAILING))
async def test_a_failing_strategy_is_a_typed_failure_and_the_next_run_still_works(
    case: str,
) -> None:
    source, kind, message = FAILING[case]
    limits = SandboxLimits(wall_s=2.0, cpu_s=10, memory_mb=256)
    started = time.monotonic()
    outcome = await run_strategy(_uploaded(source), _candles(), limits)
    elapsed = time.monotonic() - started
    assert isinstance(outcome, StrategyFailure), outcome
    assert outcome.kind is kind
    assert message in outcome.message
    assert elapsed < limits.wall_s + 1.0  # never longer than the limit (and the kill)
    after = await run_strategy(_uploaded(GOOD, stop=1.0), _candles(), LIMITS)
    assert isinstance(after, SignalResult) and after.signal.action is SignalAction.BUY


async def test_a_busy_loop_is_stopped_by_the_cpu_limit_when_the_clock_allows_more() -> None:
    limits = SandboxLimits(wall_s=30.0, cpu_s=1, memory_mb=256)
    started = time.monotonic()
    outcome = await run_strategy(_uploaded(FAILING["busy_loop"][0]), _candles(), limits)
    assert isinstance(outcome, StrategyFailure) and outcome.kind is FailureKind.TIMEOUT
    assert outcome.message == "used more than 1s of CPU; stopped"
    assert time.monotonic() - started < 10.0


async def test_a_strategy_sees_only_the_candles_it_was_given_and_no_environment() -> None:
    source = (
        "import os, sys\n"
        "def strategy(candles, params):\n"
        "    env = ','.join(sorted(os.environ))\n"
        "    return {'action': 'hold', 'comment': f'{len(candles)}|{env}|{os.getcwd()}'}\n"
    )
    outcome = await run_strategy(_uploaded(source), _candles()[:4], LIMITS)
    assert isinstance(outcome, SignalResult)
    count, env, cwd = outcome.signal.comment.split("|")
    assert count == "4"
    # Nothing of the worker's environment (credentials) leaks; numerical libraries on 1 thread.
    assert env == "LC_ALL,MKL_NUM_THREADS,OMP_NUM_THREADS,OPENBLAS_NUM_THREADS,PATH"
    assert "tc-strategy-" in cwd


PANDAS_SMA = """
from engine.signals.strategy import Signal

def strategy(candles, params):
    frame = candles.frame()
    fast = frame["close"].rolling(params["fast"]).mean()
    slow = frame["close"].rolling(params["slow"]).mean()
    crossed = fast.iloc[-2] <= slow.iloc[-2] and fast.iloc[-1] > slow.iloc[-1]
    stamp = frame.index[-1].isoformat()
    return Signal(action="buy" if crossed else "hold", comment=f"{len(frame)} {stamp}")
"""


async def test_an_uploaded_strategy_may_work_on_a_pandas_dataframe() -> None:
    pytest.importorskip("pandas")  # the optional extra; the dev install has it
    outcome = await run_strategy(_uploaded(PANDAS_SMA, fast=3, slow=8), _candles(), LIMITS)
    assert isinstance(outcome, SignalResult), outcome
    assert outcome.signal.action is SignalAction.BUY  # the data crosses on the last candle
    assert outcome.signal.comment == "13 1970-01-01T00:13:00+00:00"


@pytest.mark.parametrize(
    "call",
    [
        "candles.frame().to_csv('candles.csv')",
        "pandas.read_csv('http://127.0.0.1:9/candles.csv')",
        "numpy.save('candles.npy', numpy.zeros(3))",
    ],
)
async def test_pandas_and_numpy_do_not_open_a_way_around_the_hook(call: str) -> None:
    pytest.importorskip("pandas")
    source = (
        "import numpy, pandas\n"
        "def strategy(candles, params):\n"
        f"    {call}\n"
        "    return {'action': 'buy'}\n"
    )
    outcome = await run_strategy(_uploaded(source), _candles(), LIMITS)
    assert isinstance(outcome, StrategyFailure), outcome
    assert outcome.kind is FailureKind.FORBIDDEN, outcome
