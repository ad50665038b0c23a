"""``tradecopy demo``: a master on real XAUUSD prices, copied to paper followers.

The master is scripted (``--source script``: every kind of action once) or traded by the
shipped SMA crossover through the live signal path (``--source strategy``, see
``engine.demo_strategy``).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from connectors.paper.connector import PaperConnector, PaperTerminal, master_ref
from connectors.paper.model import XAUUSD, Result
from connectors.paper.prices import PriceReplay, load_bars
from connectors.paper.quotes import NatsQuotes
from connectors.paper.venue import PaperVenue
from engine import demo_strategy
from engine.api.service import LocalApi, start_local_api
from engine.billing import demo as billing_demo
from engine.billing.windows import BillingWindow
from engine.core.money import format_money
from engine.core.volume import partial_close_volume
from engine.ledger import store as ledger_store
from engine.ledger.service import spawn_ledger, wait_for_ledger, wait_for_ledger_drained
from engine.ledger.store import migrate
from engine.runtime.eventloop import run_async
from engine.runtime.natsauth import Role
from engine.runtime.natsserver import free_port
from engine.runtime.postgres import start_database
from engine.runtime.processes import stop_process
from engine.runtime.stack import LocalStack
from schemas import codec, subjects
from schemas.common import OrderType, Side
from schemas.decisions import CopyDecision
from schemas.links import BalanceRatio, CopyLink, Multiplier, RiskPercent, SymbolMapping
from schemas.master import PositionClosed, PositionClosedBy
from schemas.orders import FollowerClose, FollowerCloseBy, FollowerOpen, FollowerOrder
from schemas.reports import ExecutionReport, OrderDone, OrderFilled, OrderRejected
from schemas.streams import DECISIONS_STREAM, EXECUTION_REPORTS_STREAM, FOLLOWER_ORDERS_STREAM

MASTER = "demo-master"
SOURCES = ("script", "strategy")
DEFAULT_SECONDS = 20.0
DEFAULT_SPEED = 60.0
CONNECTOR = "demo-paper"
SUFFIXED = "XAUUSD.m"
#: Where the replay starts: a busy London morning in the shipped data.
START_BAR = 420


@dataclass(frozen=True, slots=True)
class FollowerKind:
    name: str
    rule: str
    balance: float
    link: dict[str, Any]


KINDS = (
    FollowerKind("x2", "multiplier ×2", 10_000.0, {"sizing": Multiplier(factor=2.0)}),
    FollowerKind("half", "balance ratio (5k vs 10k)", 5_000.0, {"sizing": BalanceRatio()}),
    FollowerKind("risk1", "risk 1 % of equity per SL", 10_000.0,
                 {"sizing": RiskPercent(percent=1.0)}),
    FollowerKind("suffix", "symbol → XAUUSD.m", 10_000.0,
                 {"symbol_mapping": SymbolMapping(add_suffix=".m")}),
    FollowerKind("reverse", "reverse copy", 10_000.0, {"reverse": True}),
    FollowerKind("limit3", "daily trade limit 3", 10_000.0, {"daily_trade_limit": 3}),
    FollowerKind("cap", "×3, max lot 0.15", 10_000.0,
                 {"sizing": Multiplier(factor=3.0), "max_lot": 0.15}),
)  # fmt: skip


def follower_id(index: int) -> str:
    kind = KINDS[index % len(KINDS)]
    return f"demo-{kind.name}" if index < len(KINDS) else f"demo-{kind.name}-{index}"


@dataclass
class Observed:
    """Everything the demo saw on NATS."""

    orders: list[FollowerOrder] = field(default_factory=list)
    reports: dict[str, ExecutionReport] = field(default_factory=dict)
    decisions: list[CopyDecision] = field(default_factory=list)
    master_events: int = 0

    async def on_order(self, msg: Any) -> None:
        self.orders.append(codec.follower_order_decoder.decode(msg.data))

    async def on_report(self, msg: Any) -> None:
        report = codec.execution_report_decoder.decode(msg.data)
        self.reports[report.order_id] = report

    async def on_decision(self, msg: Any) -> None:
        self.decisions.append(codec.decision_decoder.decode(msg.data))


# --------------------------------------------------------------------- the trader


class ScriptedTrader:
    """Trades the master like a person would: every kind of action once, on live prices."""

    def __init__(self, connector: PaperConnector, log: Callable[[str], None]) -> None:
        self.connector = connector
        self.log = log
        self.ids: dict[str, str] = {}

    @property
    def venue(self) -> PaperVenue:
        return self.connector.terminal.venue

    def _prices(self) -> tuple[float, float]:
        quote = self.venue.quote("XAUUSD")
        assert quote is not None
        return quote.bid, quote.ask

    async def _do(self, label: str, action: Callable[[PaperVenue], Result], key: str = "") -> None:
        result = await self.connector.trade(action)
        if result.ok:
            if key:
                self.ids[key] = result.position_id or result.order_id or ""
            self.log(f"master: {label}")
        else:
            self.log(f"master: {label} — rejected by the venue: {result.reason}")

    def steps(self) -> list[Callable[[], Any]]:
        v, m = self.venue, MASTER

        async def open_a() -> None:
            bid, ask = self._prices()
            await self._do(
                "buy 0.10 XAUUSD, SL −15, TP +30",
                lambda _: v.market_order(
                    m, "XAUUSD", Side.BUY, 0.10, sl=round(bid - 15, 2), tp=round(ask + 30, 2)
                ),
                "A",
            )

        async def modify_a() -> None:
            bid, ask = self._prices()
            await self._do(
                "move SL/TP of the buy",
                lambda _: v.modify_position(
                    m, self.ids["A"], round(bid - 10, 2), round(ask + 25, 2)
                ),
            )

        async def open_b() -> None:
            await self._do(
                "sell 0.05 XAUUSD, no SL",
                lambda _: v.market_order(m, "XAUUSD", Side.SELL, 0.05),
                "B",
            )

        async def partial_a() -> None:
            await self._do(
                "close 40 % of the buy", lambda _: v.close_position(m, self.ids["A"], 0.04)
            )

        async def place_limit() -> None:
            _bid, ask = self._prices()
            await self._do(
                "place buy limit 0.08 at ask −3",
                lambda _: v.place_pending(
                    m,
                    "XAUUSD",
                    OrderType.BUY_LIMIT,
                    0.08,
                    round(ask - 3, 2),
                    sl=round(ask - 20, 2),
                    tp=round(ask + 20, 2),
                ),
                "L",
            )

        async def modify_limit() -> None:
            _bid, ask = self._prices()
            await self._do(
                "move the buy limit to ask −2.5",
                lambda _: v.modify_pending(
                    m,
                    self.ids["L"],
                    round(ask - 2.5, 2),
                    sl=round(ask - 20, 2),
                    tp=round(ask + 20, 2),
                ),
            )

        async def cancel_limit() -> None:
            await self._do("cancel the buy limit", lambda _: v.cancel_pending(m, self.ids["L"]))

        async def place_stop() -> None:
            _bid, ask = self._prices()
            await self._do(
                "place buy stop 0.06 at ask +0.30",
                lambda _: v.place_pending(
                    m,
                    "XAUUSD",
                    OrderType.BUY_STOP,
                    0.06,
                    round(ask + 0.3, 2),
                    sl=round(ask - 20, 2),
                ),
                "S",
            )

        async def open_c() -> None:
            bid, _ask = self._prices()
            await self._do(
                "buy 0.07 XAUUSD, SL −12",
                lambda _: v.market_order(m, "XAUUSD", Side.BUY, 0.07, sl=round(bid - 12, 2)),
                "C",
            )

        async def open_d() -> None:
            _bid, ask = self._prices()
            await self._do(
                "sell 0.07 XAUUSD, SL +12",
                lambda _: v.market_order(m, "XAUUSD", Side.SELL, 0.07, sl=round(ask + 12, 2)),
                "D",
            )

        async def close_by() -> None:
            await self._do(
                "close the buy 0.07 by the sell 0.07",
                lambda _: v.close_by(m, self.ids["C"], self.ids["D"]),
            )

        async def close_b() -> None:
            await self._do("close the sell 0.05", lambda _: v.close_position(m, self.ids["B"]))

        async def close_all() -> None:
            for position in v.positions(m):
                await self._do(
                    f"close #{position.position_id}",
                    lambda _, p=position: v.close_position(m, p.position_id),
                )
            for pending in v.pending_orders(m):
                await self._do(
                    f"cancel pending #{pending.order_id}",
                    lambda _, o=pending: v.cancel_pending(m, o.order_id),
                )

        return [open_a, modify_a, open_b, partial_a, place_limit, modify_limit, cancel_limit,
                place_stop, open_c, open_d, close_by, close_b, close_all]  # fmt: skip


# ------------------------------------------------------------------- the check


def unexpected_positions(terminal: PaperTerminal, observed: Observed) -> list[str]:
    """Follower positions that differ from what the links' orders and the venue say.

    For each follower, replay the orders it executed (an open's volume, each close's ratio
    through the same ``partial_close_volume`` the connector uses, close-by) and compare with the
    positions it holds; a copy its own SL/TP closed is expected to be gone; a copy of a master
    position that is still open must be there.
    """
    venue = terminal.venue
    problems: list[str] = []
    own_closes = {(t.master, t.position_id) for t in terminal.follower_activity
                  if isinstance(t, PositionClosed | PositionClosedBy)}  # fmt: skip
    master_open = {p.position_id for p in venue.positions(MASTER)}
    for follower in terminal.followers:
        expected: dict[str, tuple[Side, float]] = {}
        for order in (o for o in observed.orders if o.follower == follower):
            report = observed.reports.get(order.order_id)
            if isinstance(order, FollowerOpen):
                if isinstance(report, OrderFilled):
                    ref = master_ref(order.master, order.master_position_id)
                    expected[ref] = (report.side, report.volume)
                    if (follower, report.position_id) in own_closes:
                        expected.pop(ref)
            elif isinstance(order, FollowerClose):
                ref = master_ref(order.master, order.master_position_id)
                if ref in expected and isinstance(report, OrderFilled | OrderDone):
                    side, held = expected.pop(ref)
                    spec = venue.symbol_spec(follower, order.symbol)
                    remaining = round(held - partial_close_volume(held, order.ratio, spec), 8)
                    if remaining > 0:
                        new_ref = master_ref(order.master, order.new_master_position_id or
                                             order.master_position_id)  # fmt: skip
                        expected[new_ref] = (side, remaining)
            elif isinstance(order, FollowerCloseBy) and isinstance(report, OrderDone):
                pair = (order.master_position_id, order.master_opposite_position_id)
                for master_position in pair:
                    expected.pop(master_ref(order.master, master_position), None)
        held = {p.master_ref or f"?{p.position_id}": p for p in venue.positions(follower)}
        for ref, position in held.items():
            if (follower, position.position_id) in own_closes:
                continue
            want = expected.get(ref)
            if want is None:
                # A copy of a triggered pending order appears without an open order.
                master_id = ref.partition(":")[2]
                if master_id in master_open and position.client_order_id is not None:
                    continue
                problems.append(f"{follower}: holds {ref} {position.volume} it should not")
            elif (position.side, round(position.volume, 8)) != (want[0], round(want[1], 8)):
                problems.append(f"{follower}: {ref} is {position.side} {position.volume}, "
                                f"rules say {want[0]} {want[1]}")  # fmt: skip
        for ref in expected.keys() - held.keys():
            if ref.partition(":")[2] in master_open:
                problems.append(f"{follower}: missing its copy of {ref}")
    return problems


# ----------------------------------------------------------------------- output


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latencies(observed: Observed) -> dict[str, list[float]]:
    hops: dict[str, list[float]] = defaultdict(list)
    for report in observed.reports.values():
        t = report.trace
        if t.terminal_ns and t.follower_connector_ns:
            hops["event_to_order"].append((t.follower_connector_ns - t.terminal_ns) / 1e3)
            if t.connector_ns and t.replicator_in_ns and t.replicator_out_ns:
                hops["master_connector"].append((t.connector_ns - t.terminal_ns) / 1e3)
                hops["to_replicator"].append((t.replicator_in_ns - t.connector_ns) / 1e3)
                hops["replicator"].append((t.replicator_out_ns - t.replicator_in_ns) / 1e3)
                hops["to_follower_connector"].append(
                    (t.follower_connector_ns - t.replicator_out_ns) / 1e3
                )
        if isinstance(report, OrderFilled) and t.terminal_ns and t.follower_terminal_ns:
            hops["order_to_fill"].append((t.follower_terminal_ns - t.follower_connector_ns) / 1e3)
            hops["event_to_fill"].append((t.follower_terminal_ns - t.terminal_ns) / 1e3)
    return hops


def follower_table(
    terminal: PaperTerminal, observed: Observed, balances: dict[str, float]
) -> Table:
    table = Table(title="followers", title_justify="left")
    for column, justify in (("follower", "left"), ("rule", "left"), ("copied", "right"),
                            ("skipped", "right"), ("why skipped / reduced", "left"),
                            ("P&L USD", "right"), ("avg slippage", "right"),
                            ("master→fill p50", "right")):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    fills_by: dict[str, list[OrderFilled]] = defaultdict(list)
    opens = {o.order_id for o in observed.orders if isinstance(o, FollowerOpen)}
    for report in observed.reports.values():
        if isinstance(report, OrderFilled) and report.order_id in opens:
            fills_by[report.follower].append(report)
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    skipped: Counter[str] = Counter()
    for d in observed.decisions:
        reasons[d.follower][f"{d.outcome.value}: {d.rule.value.replace('_', ' ')}"] += 1
        if d.outcome.value == "skipped":
            skipped[d.follower] += 1
    for index, follower in enumerate(terminal.followers):
        fills = fills_by[follower]
        state = terminal.venue.account_state(follower)
        pnl = state.equity - balances[follower]
        # In points (0.01 on XAUUSD); positive means the follower filled worse than the master.
        slip = statistics.fmean(f.slippage for f in fills) / XAUUSD.tick_size if fills else 0.0
        e2f = [(f.trace.follower_terminal_ns - f.trace.terminal_ns) / 1e3
               for f in fills if f.trace.terminal_ns]  # fmt: skip
        why = ", ".join(f"{k} ×{n}" for k, n in reasons[follower].most_common(3)) or "—"
        latency = f"{_pct(e2f, 0.5) / 1e3:.2f} ms" if e2f else "—"
        table.add_row(
            follower, KINDS[index % len(KINDS)].rule, str(len(fills)), str(skipped[follower]),
            why, f"{pnl:+,.2f}", f"{slip:+.1f} pts", latency,
        )  # fmt: skip
    return table


def latency_table(hops: dict[str, list[float]]) -> Table:
    table = Table(title="latency per hop (µs)", title_justify="left")
    for column in ("hop", "n", "p50", "p99", "max"):
        table.add_column(column, justify="left" if column == "hop" else "right")
    labels = {
        "master_connector": "  master fill → event published (connector)",
        "to_replicator": "  event published → replicator received it",
        "replicator": "  replicator: rules → orders out",
        "to_follower_connector": "  orders out → follower connector received",
        "event_to_order": "master fill → order at follower connector",
        "order_to_fill": "order at follower connector → follower fill",
        "event_to_fill": "master fill → follower fill",
    }
    for key, label in labels.items():
        values = hops.get(key, [])
        table.add_row(label, str(len(values)), f"{_pct(values, 0.5):,.0f}",
                      f"{_pct(values, 0.99):,.0f}", f"{max(values, default=0):,.0f}")  # fmt: skip
    return table


def _amount(units: int, currency: str) -> str:
    return format_money(units, currency).removesuffix(f" {currency}")


def fee_table(fees: list[billing_demo.DemoFee], window: BillingWindow) -> Table:
    seconds = (window.end_ns - window.start_ns) / 1e9
    percent = billing_demo.PLATFORM_FEE_PERCENT
    table = Table(
        title=f"fees over the demo's {seconds:.0f} s window (platform fee {percent} %)",
        title_justify="left",
    )
    for column, justify in (("follower", "left"), ("module", "left"), ("amount", "right"),
                            ("platform fee", "right"), ("provider's part", "right"),
                            ("currency", "left"), ("charge", "left")):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for f in fees:
        state = f"{f.state}, {f.note}" if f.state is not None else f.note
        table.add_row(
            f.follower, f.module, _amount(f.amount_minor, f.currency),
            _amount(f.platform_fee_minor, f.currency), _amount(f.provider_minor, f.currency),
            f.currency, state,
        )  # fmt: skip
    return table


def _level(price: float | None) -> str:
    return f"{price:.2f}" if price else "—"


def live_view(terminal: PaperTerminal, observed: Observed, log_lines: list[str]) -> Group:
    venue = terminal.venue
    quote = venue.quote("XAUUSD")
    head = Table.grid(padding=(0, 2))
    price = f"XAUUSD {quote.bid:.2f} / {quote.ask:.2f}" if quote else "waiting for prices"
    head.add_row(f"[bold]tradecopy demo[/] {price}", f"events {observed.master_events}",
                 f"orders {len(observed.orders)}", f"reports {len(observed.reports)}")  # fmt: skip
    positions = Table(title="positions", title_justify="left")
    for column in ("account", "#", "side", "lots", "open", "SL", "TP", "copy of"):
        positions.add_column(column, justify="left" if column in ("account", "side") else "right")
    for account in (MASTER, *terminal.followers):
        for p in venue.positions(account):
            positions.add_row(account, p.position_id, p.side.value, f"{p.volume:.2f}",
                              f"{p.open_price:.2f}", _level(p.sl), _level(p.tp),
                              p.master_ref or "")  # fmt: skip
    hops = latencies(observed)
    e2f = hops.get("event_to_fill", [])
    tail = f"master fill → follower fill p50 {_pct(e2f, 0.5):,.0f} µs over {len(e2f)} fills"
    return Group(head, positions, "\n".join(log_lines[-6:]), tail)


# ------------------------------------------------------------------------- run


async def run_demo(
    seconds: float | None, followers: int, speed: float | None, as_json: bool,
    database_url: str | None = None, source: str = "script",
) -> dict[str, Any]:  # fmt: skip
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: {' or '.join(SOURCES)}")
    strategy = source == "strategy"
    if seconds is None:
        seconds = demo_strategy.DEFAULT_SECONDS if strategy else DEFAULT_SECONDS
    if speed is None:
        speed = demo_strategy.DEFAULT_SPEED if strategy else DEFAULT_SPEED
    console = Console(stderr=as_json)
    log_lines: list[str] = []

    def log(line: str) -> None:
        log_lines.append(f"{time.strftime('%H:%M:%S')}  {line}")

    with tempfile.TemporaryDirectory(prefix="tradecopy-demo-") as tmp:
        root = Path(tmp)
        ids = [follower_id(i) for i in range(followers)]
        stack = LocalStack(root / "nats", name="tradecopy-demo")
        # The paper venue runs as a connector limited to the demo's accounts; the demo's own
        # client (stack.nc) is the operator, which applies the links and watches everything.
        await stack.add_connector(CONNECTOR, masters=[MASTER], followers=ids)
        await stack.start()
        connector = None
        signal_path: demo_strategy.StrategySource | None = None
        ledger = None
        api: LocalApi | None = None
        postgres = None
        try:
            # PostgreSQL: the configured one (TRADECOPY_DATABASE_URL), else embedded, and one
            # ledger instance storing everything the demo does.
            database_url, postgres = await start_database(database_url, root=root / "postgres")
            await migrate(database_url)
            started_at = await _database_now(database_url)
            # Billing over the same database: four followers on one fee module each, from now
            # (the demo's window starts before the first copy can).
            window_start_ns = time.time_ns()
            start_equity = {
                f: round(KINDS[i % len(KINDS)].balance * 100) for i, f in enumerate(ids)
            }
            on_plan = await billing_demo.set_up(
                database_url, provider="demo", followers=start_equity, started_ns=window_start_ns
            )
            ledger = spawn_ledger(
                stack.url,
                database_url,
                instance="demo",
                env=stack.child_env(stack.user(Role.LEDGER)),
            )
            # The platform API over the same database: the demo's accounts under their venue
            # ids, an API key per follower (in the demo's temporary directory).
            api = await start_local_api(
                stack.url, database_url, root / "api", port=free_port(), masters=[MASTER],
                followers=ids, env=stack.child_env(stack.user(Role.API)), tenant_id="demo",
            )  # fmt: skip
            first = ids[0]
            console.print(
                f"API {api.url}  (a follower's positions while the demo runs: curl -s -H "
                f'"X-API-Key: $(cat {api.key_files[first]})" '
                f"{api.url}/v1/accounts/{first}/positions)",
                highlight=False,
                soft_wrap=True,
            )
            nc, js = stack.nc, stack.js
            [replicator] = stack.spawn_replicators(instance="demo")
            balances = {f: KINDS[i % len(KINDS)].balance for i, f in enumerate(ids)}
            links = []
            for i, follower in enumerate(ids):
                link = msgspec.convert(
                    {"link_id": f"link-{follower}", "master": MASTER, "follower": follower},
                    CopyLink,
                )
                links.append(msgspec.structs.replace(link, **KINDS[i % len(KINDS)].link))
            await stack.apply_links(links)
            accounts = [(MASTER, "USD", 10_000.0, 100, "master")]
            accounts += [(f, "USD", balances[f], 100, "follower") for f in ids]
            suffixed = msgspec.structs.replace(XAUUSD, symbol=SUFFIXED)
            terminal = PaperTerminal.open(
                root / "paper.state", accounts, (XAUUSD, suffixed), {"XAUUSD": [SUFFIXED]}
            )
            bars = load_bars()
            # A strategy needs candles: the bars' own time (demo_strategy's docstring).
            replay = PriceReplay(bars, start=START_BAR, speed=speed, stamp_wall_clock=not strategy,
                                 steps_per_leg=3)  # fmt: skip
            venue_nc = await stack.connect(f"{CONNECTOR}-venue", stack.connector_user(CONNECTOR))
            # The strategy's worker reads quotes on NATS like the venue: both from a publisher.
            feed = NatsQuotes(venue_nc, ["XAUUSD"]) if strategy else replay
            connector = PaperConnector(venue_nc, CONNECTOR, terminal, feed)
            observed = Observed()
            await js.subscribe(subjects.FOLLOWER_ORDERS, stream=FOLLOWER_ORDERS_STREAM,
                               cb=observed.on_order, ordered_consumer=True)  # fmt: skip
            await js.subscribe(subjects.EXECUTION_REPORTS, stream=EXECUTION_REPORTS_STREAM,
                               cb=observed.on_report, ordered_consumer=True)  # fmt: skip
            await js.subscribe(subjects.DECISIONS, stream=DECISIONS_STREAM,
                               cb=observed.on_decision, ordered_consumer=True)  # fmt: skip

            async def count_master(msg: Any) -> None:
                observed.master_events += 1

            await nc.subscribe(subjects.MASTER_EVENTS_IN, cb=count_master)
            if strategy:
                # The worker and the drive connect as `tradecopy signals run` does.
                signals_nc = await stack.connect("demo-signals", stack.user(Role.SIGNALS))
                signal_path = demo_strategy.StrategySource(
                    signals_nc, signals_nc.jetstream(), database_url, MASTER,
                    demo_strategy.replay_clock(bars[START_BAR].ts_ns), log,
                )  # fmt: skip
                await signal_path.start()
            await connector.start()
            if signal_path is not None:
                quotes_nc = await stack.connect("demo-quotes", stack.user(Role.QUOTES))
                signal_path.publish_quotes(quotes_nc, replay)
            await _wait_ready(stack, connector)
            await wait_for_ledger(js)
            log(f"NATS {stack.url}; replicator pid {replicator.pid}; {len(ids)} followers")
            steps: list[Callable[[], Any]] = []
            if signal_path is None:
                steps = ScriptedTrader(connector, log).steps()
            else:
                # The strategy trades on its own; the demo only watches for ``seconds``.
                steps = [signal_path.finish]
            pause = max(seconds / (len(steps) + 1), 0.2) if signal_path is None else seconds
            live = None
            if not as_json and console.is_terminal:
                # Manual refresh only: rich's refresh thread renders under the GIL and would
                # stall the event loop (and the latency being shown) several times a second.
                live = Live(live_view(terminal, observed, log_lines), console=console,
                            auto_refresh=False)  # fmt: skip
                live.start()
            try:
                for step in steps:
                    if signal_path is not None and live is not None:
                        # The strategy trades while the demo waits: redraw as it goes.
                        until = time.monotonic() + pause
                        while time.monotonic() < until:
                            await asyncio.sleep(min(1.0, max(0.0, until - time.monotonic())))
                            live.update(live_view(terminal, observed, log_lines), refresh=True)
                    else:
                        await asyncio.sleep(pause)
                    await step()
                    if live is not None:
                        # Draw only once this step's copies are done: a render holds the event
                        # loop for milliseconds and would sit in the copy path it measures.
                        await _quiesce(observed)
                        live.update(live_view(terminal, observed, log_lines), refresh=True)
                await _wait_all_reported(connector, observed, live, terminal, log_lines)
            finally:
                if live is not None:
                    live.stop()
            problems = unexpected_positions(terminal, observed)
            if signal_path is not None:
                problems += demo_strategy.unexpected_master_positions(
                    terminal.venue, MASTER, observed.orders, observed.reports
                )
            copies = [o for o in observed.orders if o.follower != MASTER]
            hops = latencies(observed)
            # Copies only: the strategy's own orders on the master are counted apart.
            copy_reports = [r for r in observed.reports.values() if r.follower != MASTER]
            rejected = [r for r in copy_reports if isinstance(r, OrderRejected)]
            summary = {
                "master_events": observed.master_events,
                "orders": len(copies),
                "fills": sum(isinstance(r, OrderFilled) for r in copy_reports),
                "rejected": len(rejected),
                "skipped": sum(d.outcome.value == "skipped" for d in observed.decisions),
                "unexpected_positions": len(problems),
                "latency_us": {
                    hop: {"p50": round(_pct(v, 0.5), 1), "p99": round(_pct(v, 0.99), 1)}
                    for hop, v in (
                        (h, hops.get(h, []))
                        for h in ("event_to_order", "order_to_fill", "event_to_fill")
                    )
                },
            }
            out = Console(stderr=as_json, width=max(console.width, 120))
            out.print("\n".join(log_lines))
            out.print(follower_table(terminal, observed, balances))
            out.print(latency_table(hops))
            for problem in problems:
                out.print(f"[red]unexpected:[/] {problem}")
            for r in rejected:
                out.print(f"rejected by the venue: {r.follower} {r.order_id}: {r.reason}")
            if signal_path is not None:
                summary["source"] = "strategy"
                summary["strategy_version"] = signal_path.version.version_id
                summary["signals"] = signal_path.signals
                summary["master_orders"] = len(observed.orders) - len(copies)
            else:
                summary["source"] = "script"
            summary["ledger"] = await _ledger_summary(js, database_url, started_at)
            summary["api"] = api.url
            out.print(_ledger_line(summary["ledger"], postgres is not None))
            # The ledger has caught up: its facts of the window are final, and billing's jobs
            # issue the window's charges from them as they would a week's.
            window = billing_demo.demo_window(window_start_ns, time.time_ns())
            await billing_demo.issue(database_url, window)
            fees = await billing_demo.fees(database_url, window, on_plan, start_equity)
            out.print(fee_table(fees, window))
            summary["fees"] = [
                {"follower": f.follower, "module": f.module, "amount_minor": f.amount_minor,
                 "currency": f.currency, "platform_fee_minor": f.platform_fee_minor}
                for f in fees
            ]  # fmt: skip
            summary["fees_window"] = {
                "window_id": window.window_id,
                "start_ns": window.start_ns,
                "end_ns": window.end_ns,
            }
            out.print(
                f"{summary['master_events']} master events → {summary['orders']} follower orders, "
                f"{summary['fills']} fills, {summary['skipped']} skipped, "
                f"{summary['unexpected_positions']} unexpected positions"
            )
            return summary
        finally:
            if signal_path is not None:
                await signal_path.stop()
            if connector is not None:
                await connector.stop()
            if api is not None:
                stop_process(api.proc)
            if ledger is not None:
                stop_process(ledger)
            await stack.stop()
            if postgres is not None:
                await postgres.stop()


async def _database_now(database_url: str) -> Any:
    conn = await ledger_store.connect(database_url)
    try:
        return await conn.fetchval("SELECT now()")
    finally:
        await conn.close()


async def _ledger_summary(js: Any, database_url: str, since: Any) -> dict[str, int]:
    """Rows the ledger stored during the demo, per kind, once it has caught up."""
    await wait_for_ledger_drained(js, 10)
    conn = await ledger_store.connect(database_url)
    try:
        counts = await ledger_store.stored_counts(conn, since=since)
    finally:
        await conn.close()
    return {kind.value: n for kind, n in counts.items()}


def _ledger_line(counts: dict[str, int], embedded: bool) -> str:
    names = {"master_event": "master events", "follower_order": "orders",
             "execution_report": "reports", "decision": "decisions",
             "rejection": "rejections", "account_state": "account states"}  # fmt: skip
    stored = ", ".join(f"{counts.get(kind, 0)} {name}" for kind, name in names.items())
    return f"ledger ({'embedded ' if embedded else ''}PostgreSQL): {stored}"


async def _wait_ready(stack: LocalStack, connector: PaperConnector) -> None:
    """Until prices flow and the replicator consumes (its consumers exist)."""
    deadline = time.monotonic() + 30
    while connector.quotes == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("no prices within 30 s")
        await asyncio.sleep(0.1)
    await stack.wait_for_replicator()


async def _quiesce(observed: Observed, timeout: float = 1.0) -> None:
    """Until every order seen so far has its report (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    await asyncio.sleep(0.05)  # the step's orders are still on their way
    while time.monotonic() < deadline:
        if all(o.order_id in observed.reports for o in observed.orders):
            return
        await asyncio.sleep(0.01)


async def _wait_all_reported(
    connector: PaperConnector, observed: Observed, live: Live | None,
    terminal: PaperTerminal, log_lines: list[str],
) -> None:  # fmt: skip
    """Wait until every order has its report (or 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        if live is not None:
            live.update(live_view(terminal, observed, log_lines), refresh=True)
        if observed.orders and all(o.order_id in observed.reports for o in observed.orders):
            await asyncio.sleep(0.5)
            if all(o.order_id in observed.reports for o in observed.orders):
                return


def main(
    seconds: float | None, followers: int, speed: float | None, as_json: bool,
    database_url: str | None = None, source: str = "script",
) -> int:  # fmt: skip
    summary = run_async(run_demo(seconds, followers, speed, as_json, database_url, source))
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    return 0 if summary["unexpected_positions"] == 0 else 1
