"""The MetaTrader5-package connector: one terminal behind the connector contract.

``Mt5Terminal`` implements ``connectors.contract.Terminal`` on top of an injected ``api`` —
the MetaTrader5 module in production (imported only by :func:`load_api`, so this module
imports on any OS), or anything shaped like it (``connectors.mt5.paper``). A master is
watched by polling (the package has no event callback): every ``poll_ms`` its positions,
pending orders and new deals are read, diffed against the last snapshot (``diff.py``) and the
resulting events go to an outbox that the runtime publishes. A follower's orders go out
through ``order_send`` (``execution.py``).

Every api call runs on one dedicated thread: the package is one IPC channel to the terminal,
calls are never interleaved, and a hung ``order_send`` blocks neither the event loop nor the
runtime — after ``order_timeout_s`` its order is reported unknown and settled when the answer
(or the terminal's evidence) arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import structlog

from connectors.contract import ConnectorRuntime
from connectors.journal import OrderJournal, OrderMemoryConfig
from connectors.mt5 import protocol as mt5
from connectors.mt5.config import Mt5Config
from connectors.mt5.diff import Snapshot, diff_snapshots, take_snapshot
from connectors.mt5.errors import (
    INSTALL_HINT,
    TerminalConnectError,
    TerminalNotReady,
    TerminalUnavailable,
)
from connectors.mt5.execution import MARKER_HISTORY_S, CopyMemory, Mt5Execution
from connectors.mt5.parsing import account_state, parse_deal, server_seconds, symbol_spec
from connectors.reports import OrderReports
from engine.core.comments import is_copy, is_marker
from schemas import codec
from schemas.account import AccountState, SymbolSpec
from schemas.master import MasterEvent
from schemas.orders import FollowerOrder
from schemas.reports import ExecutionReport, OrderUnknown

log = structlog.get_logger("tradecopy.mt5")

#: The deal history is re-read this far behind the last poll: late deals are not missed.
DEAL_LOOKBACK_S = 60
#: Deals are asked for up to this far ahead of now: server clocks run ahead of UTC.
DEAL_LOOKAHEAD_S = 86_400
RESOLVE_EVERY_S = 1.0


def load_api() -> Any:
    """The MetaTrader5 module, imported only now: it exists only on Windows."""
    try:
        import MetaTrader5  # type: ignore[import-not-found]
    except ImportError as exc:
        raise TerminalUnavailable(
            f"the MetaTrader5 package is not installed here; {INSTALL_HINT}"
        ) from exc
    return MetaTrader5


def connect(api: Any, config: Mt5Config) -> None:
    """Start (or attach to) the terminal and log in to the configured account."""
    kwargs: dict[str, Any] = {}
    if config.login:
        kwargs = {"login": config.login, "password": config.resolved_password()}
        if config.server:
            kwargs["server"] = config.server
    args = (config.terminal_path,) if config.terminal_path else ()
    if not api.initialize(*args, **kwargs):
        raise TerminalConnectError("MetaTrader5.initialize", api.last_error())
    info = api.account_info()
    if config.login and (info is None or int(info.login) != config.login):
        # Trading the wrong account is worse than not trading at all.
        found = None if info is None else int(info.login)
        raise TerminalConnectError(f"login to account {config.login}", f"terminal is on {found}")


class Mt5ConnectorState(msgspec.Struct, kw_only=True):
    """What survives a restart besides the terminal itself and the order memory: committed
    in the order journal's frames (``connectors.journal``), with the reports of the commit."""

    snapshot: Snapshot | None = None
    deals_from_s: int = 0
    seen_deals: dict[int, int] = {}
    outbox: list[bytes] = []
    reports: dict[str, bytes] = {}
    """Only in state files from before the order journal: moved into it on open."""
    aliases: dict[str, str] = {}


def upgrade_state_file(data: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """An old whole-file state → (the journal's state, the reports it remembered)."""
    state = msgspec.msgpack.decode(data, type=Mt5ConnectorState)
    reports, state.reports = state.reports, {}
    return msgspec.msgpack.encode(state), list(reports.items())


class TerminalRecords(msgspec.Struct, frozen=True):
    """One poll's raw records (read on the terminal thread, used on the event loop)."""

    positions: tuple[Any, ...]
    orders: tuple[Any, ...]
    deals: tuple[Any, ...]
    account: Any
    now_ns: int


class Mt5Terminal:
    """The venue-specific half of the MT5 connector (see ``connectors.contract``)."""

    def __init__(
        self,
        api: Any,
        config: Mt5Config,
        *,
        order_memory: OrderMemoryConfig | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.api = api
        self.config = config
        self.account = config.account_id
        self.offset_s = config.server_utc_offset_s
        self.state_path = Path(config.state_path) if config.state_path else None
        self.memory = CopyMemory()
        self.execution = Mt5Execution(api, config, self.memory)
        self.outbox: list[MasterEvent] = []
        self.journal = OrderJournal(self.state_path, order_memory, legacy=upgrade_state_file,
                                    clock=wall_clock)  # fmt: skip
        """Executed order ids → reports (an unknown one until settled), and this terminal's
        state (``connectors.journal``)."""
        self.unsettled: dict[str, FollowerOrder] = {}
        """Orders reported unknown, by id: resolved from the terminal's evidence later."""
        self.resolved: deque[ExecutionReport] = deque(maxlen=1_000)
        """Outcomes that replaced an unknown report (for logs and operators)."""
        self.snapshot: Snapshot | None = None
        self.deals_from_s = 0
        self.seen_deals: dict[int, int] = {}
        self._state: AccountState | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mt5-terminal")
        self._load()

    @classmethod
    def open(
        cls,
        config: Mt5Config,
        api: Any = None,
        *,
        order_memory: OrderMemoryConfig | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
    ) -> Mt5Terminal:
        """Connect a terminal (the MetaTrader5 package unless ``api`` is given) and start."""
        api = load_api() if api is None else api
        connect(api, config)
        terminal = cls(api, config, order_memory=order_memory, wall_clock=wall_clock)
        terminal.start()
        return terminal

    # ------------------------------------------------------------ reconciliation

    def start(self) -> None:
        """The reconciliation entry point, on every (re)connect: a full status from the terminal.

        Rebuilds which follower position copies which master trade (from comments) and which
        follower orders already ran (from deal markers); on a master's first start what is
        open now is the baseline (week-old trades are not news), after a restart the saved
        snapshot is diffed against the terminal on the first poll.
        """
        positions, orders = self.api.positions_get(), self.api.orders_get()
        if positions is None or orders is None:
            raise TerminalNotReady(f"the terminal does not answer: {self.api.last_error()}")
        self.memory.rebuild(positions, orders)
        now_ns = time.time_ns()
        now_s = server_seconds(now_ns, self.offset_s)
        history = self.api.history_deals_get(now_s - MARKER_HISTORY_S, now_s + DEAL_LOOKAHEAD_S)
        history = history or ()
        parsed = (parse_deal(d, self.offset_s) for d in history)
        self.memory.remember_deals(
            d
            for d in parsed
            if d is not None and (is_copy(d.comment) or is_marker(d.comment))
        )
        info = self.api.account_info()
        if info is not None:
            self._state = account_state(
                self.account, info, open_positions=len(positions), now_ns=now_ns
            )
            if int(info.margin_mode) != mt5.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING:
                log.warning("mt5_account_not_hedging", account=self.account,
                            margin_mode=int(info.margin_mode))  # fmt: skip
        if self.config.role == "master" and self.snapshot is None:
            self.snapshot = take_snapshot(positions, orders, self.offset_s)
            self.deals_from_s = now_s - DEAL_LOOKBACK_S
            self.seen_deals = {int(d.ticket): int(d.time) for d in history}
            self.save()  # a restart diffs from here: nothing that happens next is lost
        log.info("mt5_terminal_started", account=self.account, role=self.config.role,
                 copies=len(self.memory.positions), outbox=len(self.outbox))  # fmt: skip

    # ------------------------------------------------------------ Terminal protocol

    def master_accounts(self) -> Sequence[str]:
        return (self.account,) if self.config.role == "master" else ()

    def follower_accounts(self) -> Sequence[str]:
        return (self.account,) if self.config.role == "follower" else ()

    def account_state(self, account: str) -> AccountState:
        if self._state is None:
            info = self.api.account_info()
            if info is None:
                raise TerminalNotReady(f"account_info failed: {self.api.last_error()}")
            positions = self.api.positions_get() or ()
            self._state = account_state(
                account, info, open_positions=len(positions), now_ns=time.time_ns()
            )
        return self._state

    def symbol_specs(self, account: str) -> Iterable[SymbolSpec]:
        if self.config.symbols:
            infos = [self.api.symbol_info(s) for s in self.config.symbols]
        else:
            infos = [s for s in self.api.symbols_get() or () if s.visible]
        now = time.time_ns()
        specs = [symbol_spec(account, info, now) for info in infos if info is not None]
        return [spec for spec in specs if spec is not None]

    def unpublished_events(self) -> list[MasterEvent]:
        return list(self.outbox)

    def published(self, events: Sequence[MasterEvent]) -> None:
        done = {e.event_id for e in events}
        self.outbox = [e for e in self.outbox if e.event_id not in done]

    async def execute(self, order: FollowerOrder, reports: OrderReports) -> ExecutionReport:
        """Run once per order id; an order reported unknown is resolved, never run twice."""
        previous = self.journal.get(order.order_id)
        if previous is not None:
            report = codec.execution_report_decoder.decode(previous)
            if not isinstance(report, OrderUnknown):
                self.journal.recall(order.order_id)  # came again: remembered anew
                return report
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self.execution.run, order, reports
        )
        try:
            report = await asyncio.wait_for(asyncio.shield(future), self.config.order_timeout_s)
        except TimeoutError:
            report = reports.unknown(
                f"no answer from the terminal within {self.config.order_timeout_s:g}s"
            )
            future.add_done_callback(lambda done: self._late_answer(order, done))
        self._remember(order, report)
        return report

    def commit(self) -> None:
        """Make the executed orders durable: their reports and this terminal's state, in one
        journal frame, fsynced (see ConnectorRuntime)."""
        self._write(durable=None)

    # ------------------------------------------------------------------- polling

    async def run(self, runtime: ConnectorRuntime) -> None:
        """Poll every ``poll_ms``: diff a master into its outbox and publish it; keep the
        account state fresh; resolve orders whose outcome was unknown."""
        interval = self.config.poll_ms / 1000
        next_resolve = time.monotonic() + RESOLVE_EVERY_S
        while True:
            try:
                await self.poll()
                if self.outbox:
                    await runtime.flush_outbox()
                    self.save()
                if self.unsettled and time.monotonic() >= next_resolve:
                    next_resolve = time.monotonic() + RESOLVE_EVERY_S
                    await self.resolve_unknown_outcomes()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS or terminal away: the next round tries again
                log.warning("mt5_poll_failed", account=self.account, error=repr(exc))
            await asyncio.sleep(interval)

    async def poll(self) -> list[MasterEvent]:
        """Read the terminal once; a master's changes since the last poll go to the outbox."""
        records = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._read_terminal
        )
        return [] if records is None else self.apply(records)

    def _read_terminal(self) -> TerminalRecords | None:
        api = self.api
        now_ns = time.time_ns()
        positions, orders = api.positions_get(), api.orders_get()
        deals: Any = ()
        if self.config.role == "master":
            now_s = server_seconds(now_ns, self.offset_s)
            deals = api.history_deals_get(self.deals_from_s, now_s + DEAL_LOOKAHEAD_S)
        # No answer is not "nothing open": diffing it would close every position.
        if positions is None or orders is None or deals is None:
            log.warning("mt5_poll_unanswered", account=self.account, error=api.last_error())
            return None
        return TerminalRecords(tuple(positions), tuple(orders), tuple(deals),
                               api.account_info(), now_ns)  # fmt: skip

    def apply(self, records: TerminalRecords) -> list[MasterEvent]:
        """Take one poll's records: new state, copies map, and (master) the diff's events."""
        now_ns = records.now_ns
        self.memory.rebuild(records.positions, records.orders)
        if records.account is not None:
            self._state = account_state(
                self.account, records.account, open_positions=len(records.positions),
                now_ns=now_ns,
            )  # fmt: skip
        if self.config.role != "master":
            return []
        seen = self.seen_deals
        new_deals = [d for d in records.deals if int(d.ticket) not in seen]
        current = take_snapshot(records.positions, records.orders, self.offset_s)
        if self.snapshot is None:
            events, snapshot = [], current
        else:
            events, snapshot = diff_snapshots(
                self.account, self.snapshot, current, new_deals, now_ns=now_ns,
                server_utc_offset_s=self.offset_s,
            )  # fmt: skip
        for deal in new_deals:
            seen[int(deal.ticket)] = int(deal.time)
        now_s = server_seconds(now_ns, self.offset_s)
        self.deals_from_s = now_s - DEAL_LOOKBACK_S
        self.seen_deals = {t: s for t, s in seen.items() if s >= self.deals_from_s}
        self.snapshot = snapshot
        recorded = self.record(events, now_ns)
        if recorded:
            # Snapshot and outbox in one write: a crash re-diffs the same change into the
            # same event ids, which JetStream's duplicate window drops.
            self.save()
        return recorded

    def record(self, events: Iterable[MasterEvent], terminal_ns: int) -> list[MasterEvent]:
        stamped = [
            msgspec.structs.replace(
                e, trace=msgspec.structs.replace(e.trace, terminal_ns=terminal_ns)
            )
            for e in events
        ]
        self.outbox.extend(stamped)
        for event in stamped:
            log.info("mt5_master_event", account=self.account, event_id=event.event_id,
                     kind=type(event).__name__)  # fmt: skip
        return stamped

    # -------------------------------------------------------- unknown outcomes

    async def resolve_unknown_outcomes(self) -> list[ExecutionReport]:
        """Look for the evidence of every order whose outcome is unknown; returns the
        outcomes found."""
        loop = asyncio.get_running_loop()
        resolved = []
        for order in list(self.unsettled.values()):
            reports = OrderReports(order, order.trace)
            try:
                report = await loop.run_in_executor(
                    self._executor, self.execution.evidence, order, reports
                )
            except TerminalNotReady:
                return resolved
            if report is not None:
                self._record_resolved(order, report)
                resolved.append(report)
        return resolved

    def _late_answer(self, order: FollowerOrder, done: asyncio.Future[ExecutionReport]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        report = done.result()
        if not isinstance(report, OrderUnknown):
            self._record_resolved(order, report)

    def _record_resolved(self, order: FollowerOrder, report: ExecutionReport) -> None:
        self._remember(order, report)
        self.resolved.append(report)
        log.info("mt5_order_settled", order=order.order_id, status=type(report).__name__)

    def _remember(self, order: FollowerOrder, report: ExecutionReport) -> None:
        self.journal.record(order.order_id, codec.encode(report))
        if isinstance(report, OrderUnknown):
            self.unsettled[order.order_id] = order
        else:
            self.unsettled.pop(order.order_id, None)

    # --------------------------------------------------------------- persistence

    @property
    def reports(self) -> OrderJournal:
        """Encoded execution reports by order id (the journal, read as a mapping)."""
        return self.journal

    def _load(self) -> None:
        if self.journal.state is None:
            return
        state = msgspec.msgpack.decode(self.journal.state, type=Mt5ConnectorState)
        self.snapshot = state.snapshot
        self.deals_from_s = state.deals_from_s
        self.seen_deals = dict(state.seen_deals)
        self.outbox = [codec.master_event_decoder.decode(e) for e in state.outbox]
        self.memory.aliases = dict(state.aliases)

    def save(self) -> None:
        """Append snapshot, outbox and aliases (and reports not yet committed) to the journal,
        without fsync: it survives a crash of the process."""
        self._write(durable=False)

    def _write(self, durable: bool | None) -> None:
        state = None
        if self.journal.persistent:
            state = msgspec.msgpack.encode(Mt5ConnectorState(
                snapshot=self.snapshot, deals_from_s=self.deals_from_s,
                seen_deals=self.seen_deals, outbox=[codec.encode(e) for e in self.outbox],
                aliases=self.memory.aliases,
            ))  # fmt: skip
        self.journal.commit(state, durable=durable)

    def close(self) -> None:
        self.commit()
        self.journal.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


class Mt5Connector:
    """A connector process: one MT5 terminal, its poll loop and the NATS runtime."""

    def __init__(self, nc: Any, terminal: Mt5Terminal) -> None:
        self.terminal = terminal
        self.runtime = ConnectorRuntime(nc, terminal.config.connector_id, terminal)
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.runtime.start()
        self._poller = asyncio.create_task(self.terminal.run(self.runtime))

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
        await self.runtime.stop()
        self.terminal.close()
