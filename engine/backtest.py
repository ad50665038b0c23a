"""``tradecopy backtest``: a strategy over bar files through the live candle path and paper venue.

The backtest is the live path with the network taken out. The bars become quotes exactly as
the paper venue's price replay makes them (``bar_to_ticks``: open, the nearer extreme, the
other extreme, close, 15 s apart); each quote goes to the master's ``PaperVenue`` (SL/TP,
stop-out) and to the same ``CandleBuilder`` the strategy worker uses. On each closed candle
the same strategy runs on the same window the worker passes (the latest ``history``
candles), in-process or in the worker's sandbox, and ``drive.orders_for`` turns its signal
into the master's orders.

**Fill convention.** A candle closes when the first quote of a later bucket arrives; the
signal's orders fill at that quote, after the venue has taken it. That is the first price
after the candle's close, the one at which the live worker's signal reaches the master when
the strategy answers before the next quote (``LiveDriver`` waits for that quote and fills at
the venue's price when the signal arrives). A live run whose strategy takes longer than the
gap between quotes fills later, at a later quote.

The statistics are the ledger's own: the master events and account-state samples fold with
``engine.core.book.fold_account`` and ``engine.core.performance.account_stats``.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import structlog

from connectors.paper.model import XAUUSD, Result
from connectors.paper.prices import Bar, bar_to_ticks, load_bars
from connectors.paper.venue import PaperVenue
from engine.core.book import ClosedPosition, OpenPosition, fold_account
from engine.core.calendar import utc_datetime
from engine.core.money import format_money
from engine.core.performance import TRADING_DAYS_PER_YEAR, AccountStats, account_stats
from engine.runtime.eventloop import run_async
from engine.signals.candles import Candle, CandleBuilder, ServerDay, Timeframe, bucket_of
from engine.signals.drive import MasterOrder, OrderKind, net_position, orders_for
from engine.signals.errors import StrategyVersionError
from engine.signals.messages import StrategySignal, signal_decoder
from engine.signals.sandbox import SandboxLimits, StrategyFailure, run_strategy
from engine.signals.strategy import Candles, Signal, SignalAction
from engine.signals.versions import SHIPPED, StrategyVersion, bind_shipped, new_version, verify
from schemas import codec, subjects
from schemas.market import Quote

log = structlog.get_logger("tradecopy.backtest")

#: Bar files carry broker server time read as UTC (``load_bars``), so the server day of a
#: backtest over them starts at 00:00 UTC; only 4h and 1d candles depend on it.
BARS_SERVER_DAY = ServerDay(timezone="UTC", starts_at="00:00")
DEFAULT_ACCOUNT = "backtest"
DEFAULT_VOLUME = 0.1


class BacktestError(ValueError):
    """A backtest that cannot start: unknown strategy, bad parameters or bars."""


class BacktestTrade(msgspec.Struct, frozen=True, kw_only=True):
    """One position of the master, closed (``close_ns`` set) or still open at the end."""

    side: str
    volume: float
    open_ns: int
    open_price: float
    close_ns: int | None = None
    close_price: float | None = None
    reason: str = ""
    """manual (the strategy closed it), sl, tp or stop_out; empty while open."""
    net: int | None = None
    """Profit + commission + swap in minor units of the account currency."""


class BacktestResult(msgspec.Struct, frozen=True, kw_only=True):
    version_id: str
    strategy: str
    symbol: str
    timeframe: Timeframe
    volume: float
    bars: int
    quotes: int
    candles: int
    signals: int
    """Signals other than hold."""
    failures: int
    """Runs that gave no signal (sandbox only: crash, timeout, memory, forbidden...)."""
    rejected: list[str]
    """Orders the venue refused, with its reason."""
    first_quote_ns: int
    last_quote_ns: int
    wall_s: float
    trades: list[BacktestTrade]
    open_trades: list[BacktestTrade]
    stats: AccountStats
    currency: str
    balance: float
    equity: float

    @property
    def simulated_s(self) -> float:
        return (self.last_quote_ns - self.first_quote_ns) / 1e9


class MasterDrive:
    """The strategy's master account on a paper venue: quotes and signals in, master events
    and account-state samples out (the facts the ledger folds).

    Shared by the backtest and :class:`LiveDriver`, so both trade and sample the same way. The
    account is sampled at its first quote, at the first quote of every candle bucket (before
    that candle's signal trades), after every quote that changed it (SL/TP, stop-out) and
    after every order.
    """

    def __init__(
        self,
        venue: PaperVenue,
        account: str,
        symbol: str,
        timeframe: Timeframe,
        volume: float,
        server_day: ServerDay = BARS_SERVER_DAY,
    ) -> None:
        self.venue = venue
        self.account = account
        self.symbol = symbol
        self.timeframe = Timeframe(timeframe)
        self.volume = volume
        self.server_day = server_day
        self.facts: list[object] = []
        self.rejected: list[str] = []
        self.quotes = 0
        self.first_quote_ns: int | None = None
        self._bucket: int | None = None

    def on_quote(self, quote: Quote) -> None:
        events = self.venue.on_quote(quote)
        self.facts.extend(events)
        self.quotes += 1
        if self.first_quote_ns is None:
            self.first_quote_ns = quote.ts_ns
        bucket = bucket_of(self.timeframe, quote.ts_ns, self.server_day)[0]
        if bucket != self._bucket or events:
            self._bucket = bucket
            self.sample()

    def sample(self) -> None:
        self.facts.append(self.venue.account_state(self.account))

    def on_signal(self, signal: Signal | StrategySignal) -> list[MasterOrder]:
        """Trade the signal at the venue's current price; returns the orders it placed."""
        position = net_position(self.venue.positions(self.account), self.symbol)
        orders = orders_for(signal, position, self.volume)
        for order in orders:
            self._execute(order)
        if orders:
            self.sample()
        return orders

    def _execute(self, order: MasterOrder) -> None:
        results: list[Result] = []
        if order.kind is OrderKind.OPEN:
            results.append(
                self.venue.market_order(
                    self.account,
                    self.symbol,
                    order.side,
                    order.volume,
                    sl=order.sl,
                    tp=order.tp,
                    comment=order.comment,
                )
            )
        else:
            for position in self.venue.positions(self.account):
                if position.symbol == self.symbol and position.side is order.side:
                    results.append(self.venue.close_position(self.account, position.position_id))
        for result in results:
            self.facts.extend(result.transactions)
            if not result.ok:
                # The venue's refusal is the outcome (an SL on the wrong side of the fill, no
                # margin): recorded and reported, never retried at another price.
                self.rejected.append(f"{order.kind} {order.side}: {result.retcode} {result.reason}")
                log.warning("backtest_order_rejected", kind=order.kind.value,
                            side=order.side.value, retcode=result.retcode,
                            reason=result.reason)  # fmt: skip

    def trades(self) -> tuple[list[BacktestTrade], list[BacktestTrade], AccountStats]:
        """Closed trades, open ones, and the statistics, folded as the ledger folds them."""
        book = fold_account(self.account, self.facts)
        closed = [_closed_trade(c) for c in book.closed_positions]
        still_open = [_open_trade(p) for p in book.open_positions]
        return closed, still_open, account_stats(book)


def _closed_trade(closed: ClosedPosition) -> BacktestTrade:
    return BacktestTrade(
        side=closed.side.value, volume=closed.volume, open_ns=closed.open_ts_ns,
        open_price=closed.open_price, close_ns=closed.close_ts_ns, close_price=closed.close_price,
        reason=closed.reason.value, net=closed.net,
    )  # fmt: skip


def _open_trade(position: OpenPosition) -> BacktestTrade:
    return BacktestTrade(side=position.side.value, volume=position.volume,
                         open_ns=position.open_ts_ns, open_price=position.open_price)  # fmt: skip


def resolve_version(
    strategy: str | StrategyVersion, params: Mapping[str, Any] | None = None
) -> StrategyVersion:
    """A shipped strategy's name (with ``params``), a version JSON file's path, or a version."""
    try:
        if isinstance(strategy, StrategyVersion):
            version = strategy
        elif strategy in SHIPPED:
            return new_version(shipped=strategy, parameters=dict(params or {}),
                               author="backtest", created_ns=0)  # fmt: skip
        else:
            path = Path(strategy)
            if not path.is_file():
                known = ", ".join(sorted(SHIPPED))
                raise BacktestError(
                    f"{strategy!r} is neither a shipped strategy ({known}) nor a version file"
                )
            version = msgspec.json.decode(path.read_bytes(), type=StrategyVersion)
        if params:
            raise BacktestError("parameters belong to the version; --params is for shipped ones")
        return verify(version)
    except (StrategyVersionError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BacktestError(str(exc)) from None


async def run_backtest(
    strategy: str | StrategyVersion,
    bars: Sequence[Bar] | Path | str | None = None,
    *,
    timeframe: Timeframe | str = Timeframe.M15,
    params: Mapping[str, Any] | None = None,
    volume: float = DEFAULT_VOLUME,
    symbol: str = XAUUSD.symbol,
    history: int = 500,
    server_day: ServerDay = BARS_SERVER_DAY,
    sandbox: bool = False,
    limits: SandboxLimits | None = None,
    balance: float = 10_000.0,
) -> BacktestResult:
    """Run the strategy over the bars (a file, or the shipped bars when ``None``).

    Shipped strategies run in-process unless ``sandbox``; an uploaded source always runs in
    the worker's sandbox: its code never executes in this process.
    """
    started = time.perf_counter()
    version = resolve_version(strategy, params)
    try:
        timeframe = Timeframe(timeframe)
    except ValueError:
        raise BacktestError(f"unknown timeframe {timeframe!r}") from None
    if not (math.isfinite(volume) and volume > 0):
        raise BacktestError(f"volume must be a positive number of lots, not {volume!r}")
    if bars is None or isinstance(bars, str | Path):
        bars = load_bars(None if bars is None else Path(bars))
    if not bars:
        raise BacktestError("no bars to run over")
    venue = PaperVenue()
    resolved = venue.resolve(symbol)
    if resolved is None:
        raise BacktestError(f"the paper venue does not trade {symbol!r}")
    cfg = venue.symbols[resolved]
    venue.open_account(DEFAULT_ACCOUNT, balance=balance)
    drive = MasterDrive(venue, DEFAULT_ACCOUNT, cfg.symbol, timeframe, volume, server_day)
    builder = CandleBuilder(cfg.symbol, timeframe, server_day)
    window: deque[Candle] = deque(maxlen=history)
    run = _in_process(version) if version.shipped is not None and not sandbox else None
    limits = limits or SandboxLimits()
    candles = signals = failures = 0
    last_ns = 0
    for bar in bars:
        for quote in bar_to_ticks(bar, cfg.symbol, cfg.tick_size, cfg.digits):
            drive.on_quote(quote)
            last_ns = quote.ts_ns
            closed = builder.on_quote(quote)
            if closed is None:
                continue
            candles += 1
            window.append(closed)
            if run is not None:
                signal: Signal | None = run(Candles.of(window))
            else:
                outcome = await run_strategy(version, tuple(window), limits)
                if isinstance(outcome, StrategyFailure):
                    failures += 1
                    log.warning("backtest_run_failed", candle_close_ns=closed.close_time_ns,
                                kind=outcome.kind.value, message=outcome.message)  # fmt: skip
                    signal = None
                else:
                    signal = outcome.signal
            if signal is not None and signal.action is not SignalAction.HOLD:
                signals += 1
                drive.on_signal(signal)
    trades, still_open, stats = drive.trades()
    state = venue.account_state(DEFAULT_ACCOUNT)
    return BacktestResult(
        version_id=version.version_id, strategy=version.shipped or "uploaded source",
        symbol=cfg.symbol, timeframe=timeframe, volume=volume, bars=len(bars),
        quotes=drive.quotes, candles=candles, signals=signals, failures=failures,
        rejected=drive.rejected, first_quote_ns=drive.first_quote_ns or 0, last_quote_ns=last_ns,
        wall_s=time.perf_counter() - started, trades=trades, open_trades=still_open, stats=stats,
        currency=state.currency, balance=state.balance, equity=state.equity,
    )  # fmt: skip


def _in_process(version: StrategyVersion) -> Callable[[Candles], Signal]:
    assert version.shipped is not None
    return bind_shipped(version.shipped, version.parameters)


class LiveDriver:
    """The live counterpart of the backtest's loop: a :class:`MasterDrive` fed by the quotes
    on ``tc.v1.quotes.<symbol>`` and by a strategy version's signals from ``TC_SIGNALS``, in
    stream order.

    A signal on the candle that closed at T trades once the venue has a quote at or after T
    (the quote that closed the candle: a signal can outrun it, the two travel on different
    connections). A signal for a candle at or before one already traded is a redelivery and
    is skipped, so the master never trades a candle twice.
    """

    def __init__(self, nc: Any, js: Any, version_id: str, drive: MasterDrive) -> None:
        self.nc = nc
        self.js = js
        self.version_id = version_id
        self.drive = drive
        self.handled = 0
        self.last_sequence = 0
        self._last_candle_ns = -1
        self._subs: list[Any] = []
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []

    async def start(self) -> None:
        self._subs.append(
            await self.nc.subscribe(subjects.quotes(self.drive.symbol), cb=self._on_quote)
        )
        await self.nc.flush()
        self._subs.append(
            await self.js.subscribe(
                subjects.strategy_signals(self.version_id),
                cb=self._on_signal,
                ordered_consumer=True,
            )
        )

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # a closed connection has nothing left to unsubscribe
                log.debug("live_driver_unsubscribe_failed", error=repr(exc))
        self._subs.clear()

    async def _on_quote(self, msg: Any) -> None:
        try:
            quote = codec.quote_decoder.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("quote_invalid", subject=msg.subject, error=str(exc))
            return
        self.drive.on_quote(quote)
        still = []
        for due_ns, future in self._waiting:
            if quote.ts_ns >= due_ns:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((due_ns, future))
        self._waiting = still

    async def _on_signal(self, msg: Any) -> None:
        emitted = signal_decoder.decode(msg.data)
        if emitted.candle_close_ns > self._last_candle_ns:
            if self.drive.venue.clock_ns < emitted.candle_close_ns:
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiting.append((emitted.candle_close_ns, future))
                await future
            self._last_candle_ns = emitted.candle_close_ns
            self.drive.on_signal(emitted)
        else:
            log.info("live_signal_repeated", candle_close_ns=emitted.candle_close_ns)
        self.handled += 1
        self.last_sequence = msg.metadata.sequence.stream


# ---------------------------------------------------------------------------- presentation


def _time(ts_ns: int) -> str:
    return utc_datetime(ts_ns).strftime("%Y-%m-%d %H:%M")


def _ratio(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.2f}%" if percent else f"{value:.2f}"


def report_lines(result: BacktestResult) -> list[str]:
    """The human report: the run, the ledger's statistics and the trades."""
    stats = result.stats
    rows = [
        ("trades", f"{stats.trades} ({stats.wins} won, {stats.losses} lost)"
                   f"{f', {len(result.open_trades)} still open' if result.open_trades else ''}"),
        ("net profit", format_money(stats.net_profit, result.currency)),
        ("gain", _ratio(stats.gain, percent=True)),
        ("max drawdown", f"{format_money(stats.max_drawdown, result.currency)} "
                         f"({_ratio(stats.max_drawdown_ratio, percent=True)})"),
        ("profit factor", _ratio(stats.profit_factor)),
        ("win rate", _ratio(stats.win_rate, percent=True)),
        ("Sharpe", f"{_ratio(stats.sharpe)} (daily returns x sqrt({TRADING_DAYS_PER_YEAR}))"),
        ("balance", f"{result.balance:.2f} {result.currency}"),
    ]  # fmt: skip
    speed = result.simulated_s / result.wall_s if result.wall_s > 0 else math.inf
    lines = [
        f"backtest {result.strategy} {result.version_id} on {result.symbol} "
        f"{result.timeframe}, {result.volume:g} lots a trade",
        f"{result.bars} bars, {result.quotes} quotes, {result.candles} candles, "
        f"{result.signals} signals, {result.failures} failed runs",
        f"simulated {_time(result.first_quote_ns)} .. {_time(result.last_quote_ns)} UTC "
        f"({result.simulated_s / 3600:.1f} h) in {result.wall_s:.2f} s wall "
        f"({speed:,.0f}x real time)",
        "",
    ]
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    if result.rejected:
        lines += ["", f"{len(result.rejected)} orders refused by the venue:"]
        lines += [f"  {reason}" for reason in result.rejected]
    if result.trades:
        lines += ["", "  side  lots   open              price      close             price"
                      "      reason  net"]  # fmt: skip
        for t in result.trades:
            net = "-" if t.net is None else format_money(t.net, result.currency)
            lines.append(
                f"  {t.side:<4}  {t.volume:<5g}  {_time(t.open_ns)}  {t.open_price:<9.2f}  "
                f"{_time(t.close_ns or 0)}  {t.close_price or 0:<9.2f}  {t.reason:<6}  {net}"
            )
    return lines


def main(
    strategy: str,
    bars: str | None,
    *,
    timeframe: str = "15m",
    params: str | None = None,
    volume: float = DEFAULT_VOLUME,
    sandbox: bool = False,
    json: bool = False,
) -> int:
    """The command: prints the report (or, with ``json``, one JSON line); 2 on bad input."""
    try:
        parameters = msgspec.json.decode(params) if params else None
        if parameters is not None and not isinstance(parameters, dict):
            raise BacktestError("--params must be a JSON object")
        result = run_async(
            run_backtest(
                strategy,
                None if bars is None else Path(bars),
                timeframe=timeframe,
                params=parameters,
                volume=volume,
                sandbox=sandbox,
            )
        )
    except (BacktestError, msgspec.DecodeError, OSError) as exc:
        print(f"backtest: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a malformed bar file names its line
        print(f"backtest: {exc}", file=sys.stderr)
        return 2
    if json:
        summary = msgspec.to_builtins(result)
        summary["simulated_s"] = result.simulated_s
        print(msgspec.json.encode(summary).decode())
    else:
        print("\n".join(report_lines(result)))
    return 0
