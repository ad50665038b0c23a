"""Trading statistics of an account or a link, batch and incremental, as PRODUCT.md defines them.

Definitions (money in integer minor units; a trade's P&L is its net: profit + commission + swap):

- gain: time-weighted and deposit/withdrawal neutral, Π(1 + Pᵢ / Bᵢ) − 1 over closed trades in
  close order, Bᵢ the balance when trade i opened; a trade without a known positive Bᵢ is left out
  of the gain (``gain_trades`` counts the ones in it).
- max drawdown: on equity samples in time order, the largest peak-to-trough fall, in minor
  units and as a fraction of the peak. A sample's ``cash_flow`` (a deposit or withdrawal since
  the previous sample) first moves the running peak by its amount, so cash moving in or out is
  no drawdown and no recovery.
- profit factor: Σ wins / |Σ losses| (``None`` without losses).
- win rate: wins / trades; a trade with P&L ≤ 0 is not a win. A loss is P&L < 0; a zero trade is
  neither. MT4 counts a zero trade as a "profit trade"; we do not.
- average win = Σ wins / wins, average loss = Σ losses / losses (negative), expectancy = Σ P&L /
  trades: minor units rounded half-even.
- monthly P&L: Σ P&L by UTC calendar month of the close, the 24 months ending with the month of
  ``now_ns`` (default: the last close), months without trades as 0.
- trades per day: trades / days from the first open to the last close (at least one day).
- Sharpe: of daily returns, annualised with √252, risk-free rate 0: mean / sample standard
  deviation × √252. A day's return is Π(1 + Pᵢ / Bᵢ) − 1 over the trades closed that UTC day
  (deposit neutral, like the gain); every Monday–Friday between the first and the last close
  counts, 0 when nothing closed; Saturday and Sunday count only when something closed.
  ``None`` with fewer than two days or no variation.

``StatsAccumulator`` takes trades (in close order) and equity samples (in time order) one at a
time; its ``snapshot()`` equals ``compute_stats`` over the same inputs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from datetime import date, timedelta

import msgspec

from engine.core.book import AccountBook
from engine.core.calendar import utc_datetime
from engine.core.money import divide

#: Trading days in a year, for annualising the Sharpe ratio.
TRADING_DAYS_PER_YEAR = 252
MONTHS_SHOWN = 24
_DAY_NS = 86_400 * 1_000_000_000


class ClosedTrade(msgspec.Struct, frozen=True, kw_only=True):
    close_ts_ns: int
    pnl: int
    """Net P&L in minor units: profit + commission + swap."""
    balance_at_open: int | None = None
    open_ts_ns: int | None = None
    """Defaults to the close time where unknown."""


class EquitySample(msgspec.Struct, frozen=True, kw_only=True):
    ts_ns: int
    equity: int
    cash_flow: int = 0
    """A deposit (+) or withdrawal (−) that reached the account since the previous sample:
    it moves the running peak, so it is no drawdown and no recovery."""


class AccountStats(msgspec.Struct, frozen=True, kw_only=True):
    trades: int
    wins: int
    losses: int
    gross_profit: int
    gross_loss: int
    """Σ of the losses: zero or negative."""
    net_profit: int
    largest_win: int | None
    largest_loss: int | None
    win_rate: float | None
    profit_factor: float | None
    average_win: int | None
    average_loss: int | None
    expectancy: int | None
    gain: float | None
    gain_trades: int
    max_drawdown: int
    max_drawdown_ratio: float | None
    monthly_pnl: dict[str, int]
    trades_per_day: float | None
    sharpe: float | None


class StatsAccumulator:
    """Statistics kept up to date one trade / sample at a time (see the module docstring)."""

    def __init__(self) -> None:
        self._trades = self._wins = self._losses = 0
        self._gross_profit = self._gross_loss = 0
        self._largest_win: int | None = None
        self._largest_loss: int | None = None
        self._growth = 1.0
        self._gain_trades = 0
        self._first_ns: int | None = None
        self._last_close_ns: int | None = None
        self._months: dict[str, int] = {}
        self._days: dict[date, float] = {}
        self._peak: int | None = None
        self._max_drawdown = 0
        self._max_ratio: float | None = None

    def add_trade(self, trade: ClosedTrade) -> None:
        pnl = trade.pnl
        self._trades += 1
        if pnl > 0:
            self._wins += 1
            self._gross_profit += pnl
            self._largest_win = pnl if self._largest_win is None else max(self._largest_win, pnl)
        elif pnl < 0:
            self._losses += 1
            self._gross_loss += pnl
            self._largest_loss = pnl if self._largest_loss is None else min(self._largest_loss, pnl)
        opened = trade.open_ts_ns if trade.open_ts_ns is not None else trade.close_ts_ns
        self._first_ns = opened if self._first_ns is None else min(self._first_ns, opened)
        closed = trade.close_ts_ns
        self._last_close_ns = (
            closed if self._last_close_ns is None else max(self._last_close_ns, closed)
        )
        month = _month(closed)
        self._months[month] = self._months.get(month, 0) + pnl
        factor = _factor(trade)
        if factor is not None:
            self._growth *= factor
            self._gain_trades += 1
            day = utc_datetime(closed).date()
            self._days[day] = self._days.get(day, 1.0) * factor

    def add_equity(self, sample: EquitySample) -> None:
        equity = sample.equity
        if self._peak is not None:
            self._peak += sample.cash_flow
        if self._peak is None or equity > self._peak:
            self._peak = equity
            return
        fall = self._peak - equity
        if fall > self._max_drawdown:
            self._max_drawdown = fall
        if self._peak > 0:
            ratio = fall / self._peak
            if self._max_ratio is None or ratio > self._max_ratio:
                self._max_ratio = ratio

    def snapshot(self, now_ns: int | None = None) -> AccountStats:
        trades = self._trades
        reference = now_ns if now_ns is not None else self._last_close_ns
        return AccountStats(
            trades=trades,
            wins=self._wins,
            losses=self._losses,
            gross_profit=self._gross_profit,
            gross_loss=self._gross_loss,
            net_profit=self._gross_profit + self._gross_loss,
            largest_win=self._largest_win,
            largest_loss=self._largest_loss,
            win_rate=self._wins / trades if trades else None,
            profit_factor=self._gross_profit / -self._gross_loss if self._gross_loss else None,
            average_win=divide(self._gross_profit, 1, self._wins) if self._wins else None,
            average_loss=divide(self._gross_loss, 1, self._losses) if self._losses else None,
            expectancy=divide(self._gross_profit + self._gross_loss, 1, trades) if trades else None,
            gain=self._growth - 1.0 if self._gain_trades else None,
            gain_trades=self._gain_trades,
            max_drawdown=self._max_drawdown,
            max_drawdown_ratio=self._max_ratio,
            monthly_pnl=_window(self._months, reference),
            trades_per_day=_per_day(trades, self._first_ns, self._last_close_ns),
            sharpe=sharpe(self._days),
        )


def compute_stats(
    trades: Iterable[ClosedTrade],
    equity: Iterable[EquitySample] = (),
    now_ns: int | None = None,
) -> AccountStats:
    """The statistics of ``trades`` (in close order) and the equity curve, in one pass each."""
    trades = list(trades)
    pnls = [t.pnl for t in trades]
    wins = [p for p in pnls if p > 0]
    losses = [p for p in pnls if p < 0]
    gross_profit, gross_loss = sum(wins), sum(losses)
    factors = [(t, f) for t in trades if (f := _factor(t)) is not None]
    days: dict[date, float] = {}
    for trade, factor in factors:
        day = utc_datetime(trade.close_ts_ns).date()
        days[day] = days.get(day, 1.0) * factor
    months: dict[str, int] = {}
    for trade in trades:
        months[_month(trade.close_ts_ns)] = months.get(_month(trade.close_ts_ns), 0) + trade.pnl
    first = min((t.open_ts_ns if t.open_ts_ns is not None else t.close_ts_ns for t in trades),
                default=None)  # fmt: skip
    last = max((t.close_ts_ns for t in trades), default=None)
    drawdown, ratio = max_drawdown(equity)
    return AccountStats(
        trades=len(trades),
        wins=len(wins),
        losses=len(losses),
        gross_profit=gross_profit,
        gross_loss=gross_loss,
        net_profit=sum(pnls),
        largest_win=max(wins, default=None),
        largest_loss=min(losses, default=None),
        win_rate=len(wins) / len(trades) if trades else None,
        profit_factor=gross_profit / -gross_loss if losses and gross_loss else None,
        average_win=divide(gross_profit, 1, len(wins)) if wins else None,
        average_loss=divide(gross_loss, 1, len(losses)) if losses else None,
        expectancy=divide(sum(pnls), 1, len(trades)) if trades else None,
        gain=math.prod(f for _, f in factors) - 1.0 if factors else None,
        gain_trades=len(factors),
        max_drawdown=drawdown,
        max_drawdown_ratio=ratio,
        monthly_pnl=_window(months, now_ns if now_ns is not None else last),
        trades_per_day=_per_day(len(trades), first, last),
        sharpe=sharpe(days),
    )


def max_drawdown(equity: Iterable[EquitySample]) -> tuple[int, float | None]:
    """Largest peak-to-trough fall of equity (minor units) and largest fall / peak, over the
    samples in time order; a sample's cash flow moves the running peak first."""
    peak: int | None = None
    worst, worst_ratio = 0, None
    for sample in equity:
        value = sample.equity
        if peak is not None:
            peak += sample.cash_flow
        if peak is None or value > peak:
            peak = value
            continue
        worst = max(worst, peak - value)
        if peak > 0:
            ratio = (peak - value) / peak
            worst_ratio = ratio if worst_ratio is None else max(worst_ratio, ratio)
    return worst, worst_ratio


def sharpe(day_growth: dict[date, float]) -> float | None:
    """Annualised (√252) Sharpe of daily returns; ``day_growth`` maps a UTC day with closes to
    its Π(1 + Pᵢ / Bᵢ). Weekdays in between without closes return 0."""
    if not day_growth:
        return None
    first, last = min(day_growth), max(day_growth)
    returns = []
    day = first
    while day <= last:
        growth = day_growth.get(day)
        if growth is not None:
            returns.append(growth - 1.0)
        elif day.weekday() < 5:
            returns.append(0.0)
        day += timedelta(days=1)
    if len(returns) < 2:
        return None
    deviation = statistics.stdev(returns)
    if deviation == 0:
        return None
    return statistics.fmean(returns) / deviation * math.sqrt(TRADING_DAYS_PER_YEAR)


def closed_trades(book: AccountBook, link_id: str | None = None) -> list[ClosedTrade]:
    """The book's closes with a known P&L as trades (of one link's copies when ``link_id``)."""
    trades = []
    for closed in book.closed_positions:
        net = closed.net
        if net is None or (
            link_id is not None and (closed.copy is None or closed.copy.link_id != link_id)
        ):
            continue  # fmt: skip
        trades.append(ClosedTrade(close_ts_ns=closed.close_ts_ns, pnl=net,
                                  balance_at_open=closed.balance_at_open,
                                  open_ts_ns=closed.open_ts_ns))  # fmt: skip
    return trades


def account_stats(book: AccountBook, now_ns: int | None = None) -> AccountStats:
    """Statistics of a folded account: its closes, its equity curve and its cash flows."""
    curve = [EquitySample(ts_ns=s.ts_ns, equity=s.equity, cash_flow=s.cash_flow)
             for s in book.balance_series]  # fmt: skip
    return compute_stats(closed_trades(book), curve, now_ns)


def link_stats(book: AccountBook, link_id: str, now_ns: int | None = None) -> AccountStats:
    """Trade statistics of one link's copies on a follower account (no equity of its own)."""
    return compute_stats(closed_trades(book, link_id), now_ns=now_ns)


def _factor(trade: ClosedTrade) -> float | None:
    balance = trade.balance_at_open
    if balance is None or balance <= 0:
        return None
    return 1.0 + trade.pnl / balance


def _month(ts_ns: int) -> str:
    moment = utc_datetime(ts_ns)
    return f"{moment.year:04d}-{moment.month:02d}"


def _window(months: dict[str, int], reference_ns: int | None) -> dict[str, int]:
    if reference_ns is None:
        return {}
    moment = utc_datetime(reference_ns)
    index = moment.year * 12 + moment.month - 1
    window = {}
    for i in range(index - MONTHS_SHOWN + 1, index + 1):
        key = f"{i // 12:04d}-{i % 12 + 1:02d}"
        window[key] = months.get(key, 0)
    return window


def _per_day(trades: int, first_ns: int | None, last_ns: int | None) -> float | None:
    if not trades or first_ns is None or last_ns is None:
        return None
    return trades / max(1.0, (last_ns - first_ns) / _DAY_NS)
