"""Statistics as PRODUCT.md defines them: hand-worked examples and incremental == batch."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.book import fold_account
from engine.core.performance import (
    AccountStats,
    ClosedTrade,
    EquitySample,
    StatsAccumulator,
    account_stats,
    compute_stats,
    link_stats,
    max_drawdown,
)
from schemas.account import AccountState
from schemas.common import Side
from schemas.master import PositionClosed, PositionOpened


def ns(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp()) * 1_000_000_000


# Four trades on a 10,000.00 USD account (amounts in cents), no deposits:
#   T1 Mon 2 Mar 10:00 → 12:00  +100.00 on 10,000.00
#   T2 Tue 3 Mar               −50.00 on 10,100.00
#   T3 Thu 5 Mar                 0.00 on 10,050.00
#   T4 Wed 1 Apr → 10:00       +200.00 on 10,050.00
TRADES = [
    ClosedTrade(
        open_ts_ns=ns(2026, 3, 2, 10),
        close_ts_ns=ns(2026, 3, 2, 12),
        pnl=10000,
        balance_at_open=1_000_000,
    ),
    ClosedTrade(
        open_ts_ns=ns(2026, 3, 3, 9),
        close_ts_ns=ns(2026, 3, 3, 15),
        pnl=-5000,
        balance_at_open=1_010_000,
    ),
    ClosedTrade(
        open_ts_ns=ns(2026, 3, 5, 9),
        close_ts_ns=ns(2026, 3, 5, 11),
        pnl=0,
        balance_at_open=1_005_000,
    ),
    ClosedTrade(
        open_ts_ns=ns(2026, 3, 31, 9),
        close_ts_ns=ns(2026, 4, 1, 10),
        pnl=20000,
        balance_at_open=1_005_000,
    ),
]


@pytest.fixture
def stats() -> AccountStats:
    return compute_stats(TRADES)


def test_gain_is_the_product_of_trade_returns_on_the_balance_at_open(stats: AccountStats) -> None:
    # (1 + 10000/1000000)(1 − 5000/1010000)(1 + 0/1005000)(1 + 20000/1005000) − 1
    # = 1.01 × 1005000/1010000 × 1025000/1005000 − 1 = 1025000/1000000 − 1 = 0.025
    assert stats.gain == pytest.approx(0.025, abs=1e-15)
    assert stats.gain_trades == 4


def test_gain_leaves_out_trades_without_a_positive_balance() -> None:
    trades = [
        *TRADES,
        ClosedTrade(close_ts_ns=ns(2026, 4, 2), pnl=500, balance_at_open=None),
        ClosedTrade(close_ts_ns=ns(2026, 4, 2), pnl=500, balance_at_open=0),
    ]
    result = compute_stats(trades)
    assert result.gain == pytest.approx(0.025, abs=1e-15) and result.gain_trades == 4
    assert result.trades == 6  # they still count as trades


def test_gain_is_neutral_to_a_deposit() -> None:
    # A 10,000.00 deposit after T2 doubles the balance the later trades open on; the same
    # trades in percent (T3, T4 doubled in money) give the same gain: 1.01 × 1.015 − 1 ... = 0.025
    doubled = [*TRADES[:2]] + [
        ClosedTrade(
            open_ts_ns=t.open_ts_ns,
            close_ts_ns=t.close_ts_ns,
            pnl=t.pnl * 2,
            balance_at_open=(t.balance_at_open or 0) * 2,
        )
        for t in TRADES[2:]
    ]
    assert compute_stats(doubled).gain == pytest.approx(0.025, abs=1e-15)
    assert compute_stats(doubled).net_profit == 45000  # money is not neutral, the gain is


def test_win_rate_counts_only_positive_trades(stats: AccountStats) -> None:
    # wins: T1, T4; loss: T2; T3 (0.00) is neither: 2 / 4 trades
    assert (stats.wins, stats.losses, stats.trades) == (2, 1, 4)
    assert stats.win_rate == 0.5


def test_profit_factor_is_wins_over_losses(stats: AccountStats) -> None:
    # Σ wins = 10000 + 20000 = 30000; |Σ losses| = 5000; 30000 / 5000 = 6
    assert (stats.gross_profit, stats.gross_loss, stats.net_profit) == (30000, -5000, 25000)
    assert stats.profit_factor == 6.0
    assert compute_stats(TRADES[:1]).profit_factor is None  # no losses: undefined


def test_average_win_loss_and_expectancy_round_half_even(stats: AccountStats) -> None:
    # average win 30000 / 2 = 15000; average loss −5000 / 1; expectancy 25000 / 4 = 6250
    assert (stats.average_win, stats.average_loss, stats.expectancy) == (15000, -5000, 6250)
    assert (stats.largest_win, stats.largest_loss) == (20000, -5000)
    odd = compute_stats(
        [ClosedTrade(close_ts_ns=1, pnl=p, balance_at_open=1000) for p in (1, 2, -3, -4)]
    )
    # wins (1 + 2) / 2 = 1.5 → 2 (half-even); losses −7 / 2 = −3.5 → −4; net −4 / 4 = −1
    assert (odd.average_win, odd.average_loss, odd.expectancy) == (2, -4, -1)


def test_monthly_pnl_covers_the_last_24_months(stats: AccountStats) -> None:
    # March: 10000 − 5000 + 0 = 5000; April: 20000; the window ends with April 2026
    months = stats.monthly_pnl
    assert len(months) == 24 and next(iter(months)) == "2024-05" and list(months)[-1] == "2026-04"
    assert (months["2026-03"], months["2026-04"], months["2025-12"]) == (5000, 20000, 0)
    later = compute_stats(TRADES, now_ns=ns(2028, 3, 15))  # March 2026 is 25 months back
    assert "2026-03" not in later.monthly_pnl and later.monthly_pnl["2026-04"] == 20000


def test_trades_per_day_spans_first_open_to_last_close(stats: AccountStats) -> None:
    # 2 Mar 10:00 → 1 Apr 10:00 is 30 days; 4 trades / 30 days
    assert stats.trades_per_day == pytest.approx(4 / 30)
    one = compute_stats([ClosedTrade(open_ts_ns=0, close_ts_ns=3600 * 10**9, pnl=1)])
    assert one.trades_per_day == 1.0  # at least one day


def test_sharpe_annualises_daily_returns_with_sqrt_252(stats: AccountStats) -> None:
    # Weekdays 2 Mar – 1 Apr: 23 days. Returns: 2 Mar +0.01, 3 Mar −5000/1010000,
    # 5 Mar 0, 1 Apr +20000/1005000, the other 19 weekdays 0.
    returns = [0.01, -5000 / 1010000, 0.0, 20000 / 1005000] + [0.0] * 19
    mean = sum(returns) / 23  # 0.02495000246 / 23 = 0.00108478272
    variance = sum((r - mean) ** 2 for r in returns) / 22  # sample variance: 2.24305e-05
    expected = mean / math.sqrt(variance) * math.sqrt(252)  # ≈ 3.636
    assert stats.sharpe == pytest.approx(expected, rel=1e-12)
    assert stats.sharpe == pytest.approx(3.63599, rel=1e-5)
    assert compute_stats(TRADES[:1]).sharpe is None  # one day: no deviation


def test_max_drawdown_is_peak_to_trough_on_equity() -> None:
    curve = [EquitySample(ts_ns=i, equity=e) for i, e in enumerate((1000, 1200, 900, 1100, 800))]
    # peak 1200 → trough 800: 400, and 400 / 1200 of the peak
    assert max_drawdown(curve) == (400, pytest.approx(1 / 3))
    assert compute_stats([], curve).max_drawdown == 400


def test_cash_moving_in_or_out_is_no_drawdown_and_no_recovery() -> None:
    deposit = [
        EquitySample(ts_ns=0, equity=1000),
        EquitySample(ts_ns=1, equity=1500, cash_flow=500),
        EquitySample(ts_ns=2, equity=1400),
    ]
    # peak 1000 + 500 deposited = 1500; 1500 → 1400: 100, 100 / 1500
    assert max_drawdown(deposit) == (100, pytest.approx(100 / 1500))
    withdrawal = [
        EquitySample(ts_ns=0, equity=1000),
        EquitySample(ts_ns=1, equity=600, cash_flow=-400),
        EquitySample(ts_ns=2, equity=550),
    ]
    # peak 1000 − 400 withdrawn = 600; 600 → 550: 50
    assert max_drawdown(withdrawal)[0] == 50


def test_an_account_book_gives_account_and_link_statistics() -> None:
    s = 1_000_000_000

    def balance_sheet(ts: int, balance: float, equity: float) -> AccountState:
        return AccountState(
            account="m1", ts_ns=ts * s, currency="USD", balance=balance, equity=equity
        )

    def trade(i: int, opened_at: int, profit: float) -> list[object]:
        return [
            PositionOpened(
                event_id=f"o{i}",
                master="m1",
                symbol="EURUSD",
                ts_ns=opened_at * s,
                position_id=f"P{i}",
                side=Side.BUY,
                volume=0.1,
                price=1.1,
            ),
            PositionClosed(
                event_id=f"c{i}",
                master="m1",
                symbol="EURUSD",
                ts_ns=(opened_at + 2) * s,
                position_id=f"P{i}",
                side=Side.BUY,
                volume=0.1,
                price=1.1,
                profit=profit,
            ),
        ]

    book = fold_account(
        "m1",
        [
            balance_sheet(0, 1000.0, 1000.0),
            *trade(0, 1, 30.0),
            balance_sheet(3, 1030.0, 1030.0),
            trade(1, 4, -10.0)[0],
            balance_sheet(5, 1030.0, 1012.0),
            trade(1, 4, -10.0)[1],
            balance_sheet(6, 1020.0, 1020.0),
        ],
    )
    result = account_stats(book)
    # 1.03 × (1 − 1000/103000) − 1 = 1.03 × 102000/103000 − 1 = 1020/1000 − 1 = 0.02
    assert (result.trades, result.net_profit) == (2, 2000)
    assert result.gain == pytest.approx(0.02, abs=1e-15)
    # equity 1000 → 1030 → 1012 (P1 floating −18) → 1020: peak 1030 to trough 1012
    assert result.max_drawdown == 1800
    assert link_stats(book, "no-such-link").trades == 0  # none of these trades is a copy


# -- properties ---------------------------------------------------------------------------------

trade_lists = st.lists(
    st.builds(
        lambda close, length, pnl, balance: ClosedTrade(
            open_ts_ns=max(0, close - length), close_ts_ns=close, pnl=pnl, balance_at_open=balance
        ),
        st.integers(min_value=ns(2024, 1, 1), max_value=ns(2026, 12, 31)),
        st.integers(min_value=0, max_value=10 * 86_400 * 10**9),
        st.integers(min_value=-(10**7), max_value=10**7),
        st.one_of(st.none(), st.integers(min_value=-(10**6), max_value=10**9)),
    ),
    max_size=40,
).map(lambda trades: sorted(trades, key=lambda t: t.close_ts_ns))
curves = st.lists(
    st.tuples(
        st.integers(min_value=-(10**6), max_value=10**9),
        st.integers(min_value=-(10**6), max_value=10**6),
    ),
    max_size=40,
).map(
    lambda pairs: [EquitySample(ts_ns=i, equity=e, cash_flow=f) for i, (e, f) in enumerate(pairs)]
)


@settings(max_examples=200, deadline=None)
@given(trade_lists, curves)
def test_incremental_statistics_equal_the_batch(
    trades: list[ClosedTrade], curve: list[EquitySample]
) -> None:
    accumulator = StatsAccumulator()
    for trade in trades:
        accumulator.add_trade(trade)
    for sample in curve:
        accumulator.add_equity(sample)
    assert accumulator.snapshot() == compute_stats(trades, curve)


@settings(max_examples=200, deadline=None)
@given(trade_lists)
def test_win_rate_stays_between_zero_and_one(trades: list[ClosedTrade]) -> None:
    rate = compute_stats(trades).win_rate
    assert rate is None if not trades else 0.0 <= rate <= 1.0


@settings(max_examples=200, deadline=None)
@given(trade_lists, st.integers(min_value=0, max_value=40), st.integers(min_value=2, max_value=50))
def test_gain_does_not_move_when_money_comes_in_or_goes_out(
    trades: list[ClosedTrade],
    cut: int,
    scale: int,
) -> None:
    # After a deposit (scale > 1) the same trades are the same returns on a larger balance.
    moved = trades[:cut] + [
        ClosedTrade(
            open_ts_ns=t.open_ts_ns,
            close_ts_ns=t.close_ts_ns,
            pnl=t.pnl * scale,
            balance_at_open=None if t.balance_at_open is None else t.balance_at_open * scale,
        )
        for t in trades[cut:]
    ]
    assert compute_stats(moved).gain == compute_stats(trades).gain


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-(10**6), max_value=10**9), max_size=40))
def test_max_drawdown_is_the_largest_fall_from_any_earlier_sample(equities: list[int]) -> None:
    curve = [EquitySample(ts_ns=i, equity=e) for i, e in enumerate(equities)]
    brute = max(
        (equities[i] - equities[j] for i in range(len(equities)) for j in range(i, len(equities))),
        default=0,
    )
    assert max_drawdown(curve)[0] == brute


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=40),
    st.integers(min_value=0, max_value=39),
    st.integers(min_value=-(10**8), max_value=10**8),
)
def test_a_deposit_changes_no_drawdown(equities: list[int], at: int, amount: int) -> None:
    at = min(at, len(equities) - 1)
    plain = [EquitySample(ts_ns=i, equity=e) for i, e in enumerate(equities)]
    funded = [
        EquitySample(
            ts_ns=i,
            equity=e + (amount if i >= at else 0),
            cash_flow=amount if i == at and i > 0 else 0,
        )
        for i, e in enumerate(equities)
    ]
    if at == 0:  # money before the first sample is just the starting equity
        funded = [EquitySample(ts_ns=s.ts_ns, equity=s.equity) for s in funded]
    assert max_drawdown(funded)[0] == max_drawdown(plain)[0]
