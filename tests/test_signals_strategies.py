"""Strategies: the Candles view, SMA crossover and Wilder's RSI by hand and on the shipped bars."""

from __future__ import annotations

import functools
from fractions import Fraction

import msgspec
import pytest

from connectors.paper.prices import bar_to_ticks, load_bars
from engine.signals.candles import Candle, Timeframe, build_candles
from engine.signals.strategies.rsi import RsiParams, rsi_reversal, wilder_rsi
from engine.signals.strategies.sma_cross import SmaCrossParams, sma, sma_cross
from engine.signals.strategy import HOLD, Candles, Signal, SignalAction, signals_over

MINUTE = 60_000_000_000
BUY, SELL, CLOSE = SignalAction.BUY, SignalAction.SELL, SignalAction.CLOSE


def candles_of(closes: list[float]) -> Candles:
    """One-minute candles whose open, high and low sit on the close: only the close matters."""
    return Candles.of(
        [
            Candle(
                symbol="XAUUSD",
                timeframe=Timeframe.M1,
                open_time_ns=i * MINUTE,
                close_time_ns=(i + 1) * MINUTE,
                open=c,
                high=c,
                low=c,
                close=c,
                ticks=1,
            )
            for i, c in enumerate(closes)
        ]
    )


@pytest.fixture(scope="module")
def shipped() -> dict[Timeframe, Candles]:
    bars = load_bars()
    quotes = [q for bar in bars for q in bar_to_ticks(bar, "XAUUSD")]
    last = bars[-1].ts_ns
    return {
        tf: Candles.of(build_candles(quotes, tf, symbol="XAUUSD", until_ns=last + 15 * MINUTE))
        for tf in (Timeframe.M1, Timeframe.M15)
    }


def test_candles_read_like_a_dataframe_of_closed_candles() -> None:
    candles = candles_of([1.0, 2.0, 3.0, 4.0])
    assert len(candles) == 4
    assert candles.close[-1] == 4.0 and candles.close[0] == 1.0
    assert candles.close[-2:] == [3.0, 4.0]
    assert list(candles.close_time_ns) == [MINUTE, 2 * MINUTE, 3 * MINUTE, 4 * MINUTE]
    window = candles[:2]
    assert len(window) == 2 and window.close[-1] == 2.0 and list(window.high) == [1.0, 2.0]
    with pytest.raises(IndexError):
        window.close[2]  # a window never reaches past its last candle
    with pytest.raises(IndexError):
        window.close[-3]
    with pytest.raises(TypeError):
        candles[1:]  # type: ignore[index]
    with pytest.raises(AttributeError):
        candles.close = candles.open  # type: ignore[misc]  # read-only columns
    assert not hasattr(candles.close, "__setitem__")


def test_candles_as_a_pandas_dataframe() -> None:
    pd = pytest.importorskip("pandas")  # the optional extra; the dev install has it
    candles = candles_of([1.0, 2.0, 3.0, 4.0])
    frame = candles[:3].frame()
    assert list(frame.columns) == ["open", "high", "low", "close", "ticks", "open_time"]
    assert list(frame["close"]) == [1.0, 2.0, 3.0]  # the window, not the whole series
    assert frame.index.name == "close_time" and str(frame.index.tz) == "UTC"
    assert frame.index[-1] == pd.Timestamp(3 * MINUTE, unit="ns", tz="UTC")
    assert frame["open_time"].iloc[0] == pd.Timestamp(0, unit="ns", tz="UTC")
    frame.loc[frame.index[0], "close"] = 99.0  # a copy: the candles stay as they were
    assert candles.close[0] == 1.0


def _sma_cross_on_a_frame(candles: Candles) -> Signal:
    """SMA crossover written the pandas way, to compare with the shipped strategy."""
    close = candles.frame()["close"]
    fast, slow = close.rolling(10).mean(), close.rolling(30).mean()
    if len(close) < 31:
        return HOLD
    fast_before, slow_before, fast_now, slow_now = (
        fast.iloc[-2],
        slow.iloc[-2],
        fast.iloc[-1],
        slow.iloc[-1],
    )
    if fast_before <= slow_before and fast_now > slow_now:
        return Signal(action=SignalAction.BUY)
    if fast_before >= slow_before and fast_now < slow_now:
        return Signal(action=SignalAction.SELL)
    return HOLD


def test_a_pandas_strategy_trades_the_shipped_bars_like_the_shipped_one(
    shipped: dict[Timeframe, Candles],
) -> None:
    pytest.importorskip("pandas")
    candles = shipped[Timeframe.M15]
    ours = signals_over(candles, _sma_cross_on_a_frame)
    reference = signals_over(candles, functools.partial(sma_cross, params=SmaCrossParams()))
    assert len(reference) == 41
    assert [(s.index, s.signal.action) for s in ours] == [
        (s.index, s.signal.action) for s in reference
    ]


def test_sma_of_the_first_shipped_bars(shipped: dict[Timeframe, Candles]) -> None:
    close = shipped[Timeframe.M1].close
    # The file's first three closes: 5014.77, 5014.44, 5015.62.
    assert sma(close, 3, 3) == pytest.approx((5014.77 + 5014.44 + 5015.62) / 3, abs=1e-9)
    assert sma(close, 2, 3) == pytest.approx(5015.03, abs=1e-9)
    assert sma(close, 1, 1) == 5014.77


def test_sma_cross_buys_on_the_candle_the_fast_average_goes_above() -> None:
    params = SmaCrossParams(fast=2, slow=3, sl_distance=1.0, tp_distance=2.0)
    # n=4: fast 1.5 vs slow 5/3 (below, as before); n=5: fast 3 vs slow 7/3 (above).
    candles = candles_of([3.0, 2.0, 1.0, 2.0, 4.0])
    assert sma_cross(candles[:3], params) is HOLD  # fewer than slow + 1 candles
    assert sma_cross(candles[:4], params) is HOLD
    assert sma_cross(candles, params) == Signal(action=BUY, sl=3.0, tp=6.0, comment="sma2>sma3")


def test_sma_cross_sells_on_the_mirror_cross() -> None:
    params = SmaCrossParams(fast=2, slow=3, sl_distance=1.0)
    # n=4: fast 2.5 vs slow 7/3 (above); n=5: fast 1 vs slow 5/3 (below).
    signal = sma_cross(candles_of([1.0, 2.0, 3.0, 2.0, 0.5]), params)
    assert signal == Signal(action=SELL, sl=1.5, tp=None, comment="sma2<sma3")


def test_sma_params_refuse_a_fast_average_not_shorter_than_the_slow() -> None:
    with pytest.raises(ValueError, match="shorter"):
        SmaCrossParams(fast=30, slow=30)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"fast": 5, "slow": 20, "slowest": 50}, SmaCrossParams)


def test_wilder_rsi_matches_a_hand_computed_example() -> None:
    # Period 3 over 10, 11, 12, 11, 13, 12: changes +1 +1 -1 +2 -1.
    # Seed: gain (1+1+0)/3 = 2/3, loss 1/3 -> RS 2 -> RSI 200/3.
    # +2: gain (2/3*2+2)/3 = 10/9, loss (1/3*2)/3 = 2/9 -> RS 5 -> RSI 250/3.
    # -1: gain (10/9*2)/3 = 20/27, loss (2/9*2+1)/3 = 13/27 -> RS 20/13 -> RSI 2000/33.
    rsi = wilder_rsi([10.0, 11.0, 12.0, 11.0, 13.0, 12.0], 3)
    assert rsi[:3] == [None, None, None]
    expected = [Fraction(200, 3), Fraction(250, 3), Fraction(2000, 33)]
    assert rsi[3:] == [pytest.approx(float(v), abs=1e-12) for v in expected]


def test_wilder_rsi_edges() -> None:
    assert wilder_rsi([1.0, 2.0, 3.0, 4.0], 3)[-1] == 100.0  # no loss
    assert wilder_rsi([5.0, 5.0, 5.0, 5.0], 3)[-1] == 50.0  # no movement
    assert wilder_rsi([5.0, 4.0, 3.0, 2.0], 3)[-1] == 0.0  # no gain
    assert wilder_rsi([1.0, 2.0], 3) == [None, None]


def test_rsi_buys_when_it_rises_out_of_oversold() -> None:
    # Period 2 over 10, 9, 8, 7, 9: RSI 0, 0, then gain 1 / loss 0.5 -> 200/3.
    params = RsiParams(period=2, sl_distance=0.5)
    candles = candles_of([10.0, 9.0, 8.0, 7.0, 9.0])
    assert rsi_reversal(candles[:4], params) is HOLD
    assert rsi_reversal(candles, params) == Signal(
        action=BUY, sl=8.5, tp=None, comment="rsi2 66.7 up through 30"
    )


def test_rsi_sells_when_it_falls_out_of_overbought() -> None:
    # 10, 11, 12, 13, 11: RSI 100, 100, then gain 0.5 / loss 1 -> 100/3.
    signal = rsi_reversal(candles_of([10.0, 11.0, 12.0, 13.0, 11.0]), RsiParams(period=2))
    assert signal == Signal(action=SELL, comment="rsi2 33.3 down through 70")


def test_rsi_closes_when_it_crosses_the_midline() -> None:
    # 10, 11, 10, 9.8, 10.1: RSI 50, 41.7, 61.1 - through 50 but not through 30 or 70.
    params = RsiParams(period=2)
    candles = candles_of([10.0, 11.0, 10.0, 9.8, 10.1])
    assert rsi_reversal(candles, params) == Signal(action=CLOSE, comment="rsi2 crossed 50")
    no_exit = RsiParams(period=2, exit_level=None)
    assert rsi_reversal(candles, no_exit) is HOLD


def test_rsi_params_are_validated() -> None:
    with pytest.raises(ValueError, match="below overbought"):
        RsiParams(oversold=70, overbought=30)
    with pytest.raises(ValueError, match="lookback"):
        RsiParams(period=14, lookback=10)


def test_the_rsi_lookback_agrees_with_a_full_history_run(
    shipped: dict[Timeframe, Candles],
) -> None:
    close = list(shipped[Timeframe.M1].close)
    full = wilder_rsi(close, 14)
    for end in range(300, len(close), 211):
        windowed = wilder_rsi(close[end - 250 : end], 14)[-1]
        assert windowed == pytest.approx(full[end - 1], abs=1e-4)


# (timeframe, strategy, signals, buys, sells, closes, first three (index, close time ns, action))
SHIPPED_RUNS = [
    (
        Timeframe.M1,
        sma_cross,
        587, 294, 293, 0,
        [(40, 1771210080000000000, BUY), (58, 1771211160000000000, SELL),
         (62, 1771211400000000000, BUY)],
    ),
    (
        Timeframe.M1,
        rsi_reversal,
        1986, 173, 188, 1625,
        [(15, 1771208580000000000, CLOSE), (17, 1771208700000000000, CLOSE),
         (18, 1771208760000000000, CLOSE)],
    ),
    (
        Timeframe.M15,
        sma_cross,
        41, 21, 20, 0,
        [(33, 1771237800000000000, BUY), (52, 1771254900000000000, SELL),
         (75, 1771275600000000000, BUY)],
    ),
    (
        Timeframe.M15,
        rsi_reversal,
        140, 9, 22, 109,
        [(20, 1771226100000000000, BUY), (26, 1771231500000000000, CLOSE),
         (27, 1771232400000000000, CLOSE)],
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("timeframe", "strategy", "count", "buys", "sells", "closes", "first"), SHIPPED_RUNS
)
def test_strategies_on_the_shipped_xauusd_bars(
    shipped: dict[Timeframe, Candles],
    timeframe: Timeframe,
    strategy: object,
    count: int,
    buys: int,
    sells: int,
    closes: int,
    first: list[tuple[int, int, SignalAction]],
) -> None:
    candles = shipped[timeframe]
    found = signals_over(candles, strategy)  # type: ignore[arg-type]
    assert len(found) == count
    actions = [s.signal.action for s in found]
    assert (actions.count(BUY), actions.count(SELL), actions.count(CLOSE)) == (buys, sells, closes)
    assert [(s.index, s.close_time_ns, s.signal.action) for s in found[:3]] == first
    assert all(candles.close_time_ns[s.index] == s.close_time_ns for s in found)


def test_a_strategy_never_sees_the_future(shipped: dict[Timeframe, Candles]) -> None:
    candles = shipped[Timeframe.M15]
    whole = signals_over(candles, sma_cross)
    for cut in (100, 400, 700):
        assert signals_over(candles[:cut], sma_cross) == [s for s in whole if s.index < cut]


def test_parameters_bind_with_partial_and_runs_repeat_exactly(
    shipped: dict[Timeframe, Candles],
) -> None:
    strategy = functools.partial(sma_cross, params=SmaCrossParams(fast=5, slow=20))
    first = signals_over(shipped[Timeframe.M15], strategy)
    assert first == signals_over(shipped[Timeframe.M15], strategy)
    assert len(first) != len(signals_over(shipped[Timeframe.M15], sma_cross))
    params = msgspec.json.decode(b'{"period": 7, "exit_level": null}', type=RsiParams)
    assert params == RsiParams(period=7, exit_level=None)
