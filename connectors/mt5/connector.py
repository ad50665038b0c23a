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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import structlog
from prometheus_client import Gauge

from connectors.contract import ConnectorRuntime
from connectors.journal import OrderJournal, OrderMemoryConfig
from connectors.mt5 import protocol as mt5
from connectors.mt5.config import Mt5Config
from connectors.mt5.diff import Snapshot, diff_snapshots, hold_deal_changes, take_snapshot
from connectors.mt5.errors import (
    INSTALL_HINT,
    AccountNotHedging,
    TerminalConnectError,
    TerminalNotReady,
    TerminalUnavailable,
)
from connectors.mt5.execution import MARKER_HISTORY_S, CopyMemory, Mt5Execution
from connectors.mt5.parsing import (
    account_state,
    measure_server_offset,
    parse_deal,
    server_seconds,
    symbol_spec,
)
from connectors.reports import OrderReports
from engine.core.comments import is_copy, is_marker
from schemas import codec
from schemas.account import AccountState, SymbolSpec, TerminalStatus
from schemas.master import MasterEvent
from schemas.orders import FollowerOrder
from schemas.reports import ExecutionReport, OrderUnknown

log = structlog.get_logger("tradecopy.mt5")

#: The deal history is re-read this far behind the last poll: late deals are not missed, and
#: an offset that was wrong by hours (before its first measurement, across DST) still finds
#: them (``seen_deals`` drops the ones told already).
DEAL_LOOKBACK_S = 6 * 3600
#: Deals are asked for up to this far ahead of now: server clocks run ahead of UTC.
DEAL_LOOKAHEAD_S = 86_400
RESOLVE_EVERY_S = 1.0
#: Each look for an unknown outcome's evidence searches days of history: while none turns up,
#: look half as often each time, down to once a minute (a new unknown outcome resets it).
RESOLVE_MAX_S = 60.0
_API_THREAD = "mt5-terminal"
#: Reads of one master poll before giving up on a consistent snapshot until the next poll.
SNAPSHOT_ATTEMPTS = 3
_RACED = object()
#: How long closes and pending-order departures wait for a ``history_deals_get`` that answers
#: ``None``: after that they are told without their deals (reason ``client``, last price).
DEALS_UNREAD_GRACE_S = 5.0


#: How often ``terminal_info()`` is read: connected to the server, AutoTrading allowed.
CONNECTION_CHECK_S = 1.0
TERMINAL_CONNECTED = Gauge(
    "tradecopy_terminal_connected", "1 while the terminal reaches its trade server", ["account"]
)
TERMINAL_SYNCHRONISED = Gauge("tradecopy_terminal_synchronised",
                              "1 while the connector's view of the terminal is current",
                              ["account"])  # fmt: skip
TERMINAL_TRADE_ALLOWED = Gauge("tradecopy_terminal_trade_allowed",
                               "1 while the terminal accepts trade requests (AutoTrading on)",
                               ["account"])  # fmt: skip


class ConnectionState(msgspec.Struct, kw_only=True):
    """What the terminal says about itself, for ``/healthz`` and for refusing work early."""

    connected: bool = True
    """The package reaches the terminal and the terminal its trade server."""
    synchronised: bool = True
    """The last poll read positions, orders and deals (the snapshot is current)."""
    trade_allowed: bool = True
    """AutoTrading is on (``terminal_info().trade_allowed``): else every request is 10027."""
    reason: str = ""
    """Why not ready, for operators; empty when ready."""
    last_error: tuple[int, str] = (1, "Success")
    reconnects: int = 0

    @property
    def ready(self) -> bool:
        return self.connected and self.trade_allowed


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
    if info is None:
        raise TerminalConnectError("MetaTrader5.account_info", api.last_error())
    require_hedging(info)


def require_hedging(info: Any) -> None:
    """Refuse a netting (or exchange) account: see ``AccountNotHedging``."""
    if int(info.margin_mode) != mt5.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING:
        log.error("mt5_account_not_hedging", login=int(info.login),
                  margin_mode=int(info.margin_mode))  # fmt: skip
        raise AccountNotHedging(int(info.login), int(info.margin_mode))


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
    deals_read: bool = True
    """False: ``history_deals_get`` answered ``None`` and ``deals`` is empty for want of it."""


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
        self._resolve_every = RESOLVE_EVERY_S
        self._next_resolve = 0.0
        """Orders reported unknown, by id: resolved from the terminal's evidence later."""
        self.resolved: deque[ExecutionReport] = deque(maxlen=1_000)
        """Outcomes that replaced an unknown report (for logs and operators)."""
        self.snapshot: Snapshot | None = None
        self.deals_from_s = 0
        self.seen_deals: dict[int, int] = {}
        self._specs: list[SymbolSpec] | None = None
        self.connection = ConnectionState()
        # Series from the start, at 0 until the terminal has been read (terminal_status).
        for gauge in (TERMINAL_CONNECTED, TERMINAL_SYNCHRONISED, TERMINAL_TRADE_ALLOWED):
            gauge.labels(self.account).set(0)
        self._connection_checked = 0.0
        self._reconnect_at = 0.0
        self._backoff_s = config.reconnect_backoff_s
        self.offset_measured_ns = 0
        """When the server offset was last measured from a fresh tick (0: never)."""
        self._offset_checked = 0.0
        self.deals_unread_since_ns = 0
        """When ``history_deals_get`` started answering ``None`` (0: it answers)."""
        self._state: AccountState | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_API_THREAD)
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
        self.check_server_offset(force=True)
        now_ns = time.time_ns()
        now_s = server_seconds(now_ns, self.offset_s)
        history = self.api.history_deals_get(now_s - MARKER_HISTORY_S, now_s + DEAL_LOOKAHEAD_S)
        history = history or ()
        parsed = (parse_deal(d, self.offset_s) for d in history)
        self.memory.remember_deals(
            d for d in parsed if d is not None and (is_copy(d.comment) or is_marker(d.comment))
        )
        info = self.api.account_info()
        if info is not None:
            require_hedging(info)  # on every (re)connect: the terminal may have switched login
            self._state = account_state(
                self.account, info, open_positions=len(positions), now_ns=now_ns
            )
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
            self._state = self._on_api_thread(self._read_account_state, account)
        return msgspec.structs.replace(self._state, terminal=self.terminal_status())

    def _read_account_state(self, account: str) -> AccountState:
        info = self.api.account_info()
        if info is None:
            raise TerminalNotReady(f"account_info failed: {self.api.last_error()}")
        positions = self.api.positions_get() or ()
        return account_state(account, info, open_positions=len(positions), now_ns=time.time_ns())

    def symbol_specs(self, account: str) -> Iterable[SymbolSpec]:
        if self._specs is not None:  # just read on the api thread by ``refresh_specs``
            specs, self._specs = self._specs, None
            return specs
        return self._on_api_thread(self._read_symbol_specs, account)

    def _on_api_thread(self, read: Callable[[str], Any], account: str) -> Any:
        """Run a read on the api thread (the package is one IPC channel: calls from two
        threads interleave), waiting for it; directly when already on that thread."""
        if threading.current_thread().name.startswith(_API_THREAD):
            return read(account)
        return self._executor.submit(read, account).result(self.config.order_timeout_s)

    def _read_symbol_specs(self, account: str) -> list[SymbolSpec]:
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
            self._executor, self._run_order, order, reports
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

    def _run_order(self, order: FollowerOrder, reports: OrderReports) -> ExecutionReport:
        """On the api thread: refuse work the terminal cannot do (nothing is sent, the order
        stays unacknowledged and comes again), else run it."""
        self.check_connection(force=True)
        if not self.connection.ready:
            raise TerminalNotReady(self.connection.reason)
        return self.execution.run(order, reports)

    def commit(self) -> None:
        """Make the executed orders durable: their reports and this terminal's state, in one
        journal frame, fsynced (see ConnectorRuntime)."""
        self._write(durable=None)

    # ------------------------------------------------------------------- polling

    async def run(self, runtime: ConnectorRuntime) -> None:
        """Poll every ``poll_ms``: diff a master into its outbox and publish it; keep the
        account state fresh; resolve orders whose outcome was unknown."""
        interval = self.config.poll_ms / 1000
        self._next_resolve = time.monotonic() + RESOLVE_EVERY_S
        next_specs = time.monotonic() + self.config.specs_refresh_s
        while True:
            try:
                if time.monotonic() >= next_specs:
                    next_specs = time.monotonic() + self.config.specs_refresh_s
                    await self.refresh_specs(runtime)
                await self.poll()
                if self.outbox:
                    await runtime.flush_outbox()
                    self.save()
                if self.unsettled and time.monotonic() >= self._next_resolve:
                    found = await self.resolve_unknown_outcomes()
                    self._resolve_every = next_resolve_delay(self._resolve_every, bool(found))
                    self._next_resolve = time.monotonic() + self._resolve_every
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS or terminal away: the next round tries again
                log.warning("mt5_poll_failed", account=self.account, error=repr(exc))
            await asyncio.sleep(interval)

    async def refresh_specs(self, runtime: ConnectorRuntime) -> None:
        """Re-read the symbol specs on the api thread and republish them with the state."""
        loop = asyncio.get_running_loop()
        for account in (*self.master_accounts(), *self.follower_accounts()):
            self._specs = await loop.run_in_executor(
                self._executor, self._read_symbol_specs, account
            )
            await runtime.refresh_account(account)

    async def poll(self) -> list[MasterEvent]:
        """Read the terminal once; a master's changes since the last poll go to the outbox."""
        records = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._read_terminal
        )
        return [] if records is None else self.apply(records)

    def check_server_offset(self, *, force: bool = False) -> int:
        """Measure the trade server's UTC offset from the freshest tick (on the api thread),
        at start and every ``server_offset_check_s``; without a fresh tick (weekend, no
        quotes) the last offset stays. Returns the offset in use."""
        config = self.config
        due = time.monotonic() - self._offset_checked >= config.server_offset_check_s
        if not config.measure_server_offset or not (force or due):
            return self.offset_s
        self._offset_checked = time.monotonic()
        names = config.symbols or tuple(s.name for s in self.api.symbols_get() or () if s.visible)
        ticks = (self.api.symbol_info_tick(name) for name in names)
        freshest = max((int(t.time_msc or 0) for t in ticks if t is not None), default=0)
        now_ns = time.time_ns()
        measured = measure_server_offset(freshest, now_ns)
        if measured is None:
            log.info("mt5_server_offset_unmeasured", account=self.account,
                     offset_s=self.offset_s, freshest_tick_msc=freshest)  # fmt: skip
            return self.offset_s
        if measured != self.offset_s:
            log.info("mt5_server_offset_changed", account=self.account,
                     offset_s=measured, was_s=self.offset_s)  # fmt: skip
        self.offset_s = self.execution.offset_s = measured
        self.offset_measured_ns = now_ns
        return measured

    def check_connection(self, *, force: bool = False) -> ConnectionState:
        """Read ``terminal_info()`` (on the api thread, at most every ``CONNECTION_CHECK_S``
        unless forced); a lost IPC channel (the terminal restarted or auto-updated under the
        package) is re-attached with ``shutdown()`` + ``initialize()``, with backoff, and
        reconciled like a start."""
        state = self.connection
        now = time.monotonic()
        if not force and state.connected and now - self._connection_checked < CONNECTION_CHECK_S:
            return state
        self._connection_checked = now
        info = self.api.terminal_info()
        if info is None:
            code, message = self.api.last_error()
            state.last_error = (int(code), str(message))
            state.connected = False
            state.reason = f"terminal does not answer: last_error ({code}, {message})"
            if int(code) in mt5.IPC_ERROR_CODES:
                self._reattach(now)
            return state
        state.connected = bool(info.connected)
        state.trade_allowed = bool(info.trade_allowed)
        if not state.connected:
            state.reason = "terminal is not connected to its trade server (data would be stale)"
        elif not state.trade_allowed:
            state.reason = (
                "AutoTrading is disabled in the terminal (terminal_info().trade_allowed): "
                "every request would be refused with 10027; enable Algo Trading"
            )
        else:
            state.reason = ""
        return state

    def _reattach(self, now: float) -> None:
        if now < self._reconnect_at:
            return
        state = self.connection
        log.warning("mt5_terminal_reattaching", account=self.account,
                    error=state.last_error, backoff_s=self._backoff_s)  # fmt: skip
        with contextlib.suppress(Exception):
            self.api.shutdown()  # drop the dead IPC channel, or initialize() reuses it
        try:
            connect(self.api, self.config)
            self.start()  # crash-only: a re-attach reconciles exactly like a start
        except Exception as exc:
            code, message = self.api.last_error()
            state.reason = f"re-attaching to the terminal failed: {exc}"
            state.last_error = (int(code), str(message))
            self._reconnect_at = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self.config.reconnect_backoff_max_s)
            log.warning("mt5_terminal_reattach_failed", account=self.account, error=repr(exc),
                        retry_in_s=self._reconnect_at - now)  # fmt: skip
            return
        self._backoff_s = self.config.reconnect_backoff_s
        state.reconnects += 1
        self.check_connection(force=True)
        log.info("mt5_terminal_reattached", account=self.account, reconnects=state.reconnects)

    def terminal_status(self) -> TerminalStatus:
        """The connection state as the contract carries it in the account state, and as
        metrics (``tradecopy_terminal_*{account}``)."""
        state = self.connection
        code, message = state.last_error
        status = TerminalStatus(
            connected=state.connected, synchronised=state.synchronised,
            trade_allowed=state.trade_allowed, reason=state.reason[:256],
            last_error_code=int(code), last_error=str(message)[:256],
        )  # fmt: skip
        TERMINAL_CONNECTED.labels(self.account).set(status.connected)
        TERMINAL_SYNCHRONISED.labels(self.account).set(status.synchronised)
        TERMINAL_TRADE_ALLOWED.labels(self.account).set(status.trade_allowed)
        return status

    def health(self) -> dict[str, object]:
        """The terminal's connection state for ``/healthz`` (merged with the runtime's)."""
        state = self.connection
        self.terminal_status()  # keeps the metrics as current as the health check
        return {
            "terminal_ready": state.ready and state.synchronised,
            "terminal_connected": state.connected,
            "terminal_synchronised": state.synchronised,
            "terminal_trade_allowed": state.trade_allowed,
            "terminal_reason": state.reason,
            "terminal_last_error": list(state.last_error),
            "terminal_reconnects": state.reconnects,
            "server_utc_offset_s": self.offset_s,
            "unknown_outcomes": len(self.unsettled),
        }

    def _read_terminal(self) -> TerminalRecords | None:
        api = self.api
        state = self.check_connection()
        if not state.connected:
            state.synchronised = False
            return None  # a disconnected terminal shows stale positions: diff nothing
        self.check_server_offset()
        now_ns = time.time_ns()
        positions, orders, deals = self._read_consistent(now_ns)
        if positions is _RACED:
            return None  # trading went on under every attempt: the next poll tries again
        deals_read = deals is not None
        if not deals_read:
            # Users see None for an empty window as well as for a failed read; either way
            # positions and orders still tell SL/TP and pending changes (see ``apply``).
            log.info("mt5_history_deals_none", account=self.account, error=api.last_error(),
                     date_from=self.deals_from_s)  # fmt: skip
            deals = ()
        # No answer is not "nothing open": diffing it would close every position.
        if positions is None or orders is None:
            error = api.last_error()
            log.warning("mt5_poll_unanswered", account=self.account, error=error)
            self.connection.synchronised = False
            self.connection.last_error = (int(error[0]), str(error[1]))
            self._connection_checked = 0.0  # look at the terminal on the next poll
            return None
        self.connection.synchronised = True
        return TerminalRecords(tuple(positions), tuple(orders), tuple(deals),
                               api.account_info(), now_ns, deals_read)  # fmt: skip

    def _read_consistent(self, now_ns: int) -> tuple[Any, Any, Any]:
        """Positions, orders and (master) deals as one snapshot: the package reads them one
        call at a time, so a close or a trigger between the calls would show a position open
        whose closing deal is already seen (told later as a client close at the last price),
        or an order gone whose position is not there yet (a false cancel). The deals are read
        before and after; a new deal in between means something traded: read again."""
        api = self.api
        if self.config.role != "master":
            return api.positions_get(), api.orders_get(), ()
        now_s = server_seconds(now_ns, self.offset_s)
        window = (self.deals_from_s, now_s + DEAL_LOOKAHEAD_S)
        for attempt in range(SNAPSHOT_ATTEMPTS):
            before = api.history_deals_get(*window)
            positions, orders = api.positions_get(), api.orders_get()
            deals = api.history_deals_get(*window)
            if before is None or deals is None or _tickets(before) == _tickets(deals):
                return positions, orders, deals
            log.info("mt5_poll_raced", account=self.account, attempt=attempt)
        return _RACED, None, None

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
        if records.deals_read:
            self.deals_unread_since_ns = 0
        else:
            self.deals_unread_since_ns = self.deals_unread_since_ns or now_ns
            waited_s = (now_ns - self.deals_unread_since_ns) / 1e9
            if self.snapshot is not None and waited_s < DEALS_UNREAD_GRACE_S:
                # Closes and triggers need their deals (reason, price, close-by): hold them
                # for a poll that reads the history; the lookback window still covers them.
                current = hold_deal_changes(self.snapshot, current)
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
            if order.order_id not in self.unsettled:
                # A new unknown outcome: look for its evidence soon, whatever the backoff was.
                self._resolve_every = RESOLVE_EVERY_S
                self._next_resolve = min(self._next_resolve, time.monotonic() + RESOLVE_EVERY_S)
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


def _tickets(deals: Iterable[Any]) -> set[int]:
    return {int(d.ticket) for d in deals}


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


def next_resolve_delay(current_s: float, found: bool) -> float:
    """Seconds until the next look for unknown outcomes' evidence: back to the quick pace when
    something was found, otherwise twice as long, at most ``RESOLVE_MAX_S``."""
    if found:
        return RESOLVE_EVERY_S
    return min(max(current_s, RESOLVE_EVERY_S) * 2, RESOLVE_MAX_S)
