"""The paper connector: a PaperVenue behind the connector contract, on real prices."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import structlog

from connectors.contract import ConnectorRuntime
from connectors.journal import OrderJournal, OrderMemoryConfig
from connectors.paper.model import XAUUSD, Position, Result, SymbolConfig, VenueState
from connectors.paper.names import SymbolNames
from connectors.paper.prices import PriceReplay, Quote
from connectors.paper.quotes import NatsQuotes
from connectors.paper.venue import PaperVenue
from connectors.reports import (
    NO_PENDING_COPY,
    NO_POSITION_COPY,
    NO_SUCH_POSITION,
    NOT_BOTH_COPIES,
    RETCODE_NO_SUCH_POSITION,
    RETCODE_PRICE_DEVIATION,
    OrderReports,
)
from engine.core.prices import within_deviation
from engine.core.volume import partial_close_volume
from schemas import codec
from schemas.account import AccountState, SymbolSpec
from schemas.common import Side
from schemas.master import MasterEvent
from schemas.orders import (
    DeviationPolicy,
    FollowerClose,
    FollowerCloseAll,
    FollowerCloseBy,
    FollowerModify,
    FollowerOpen,
    FollowerOrder,
    FollowerPendingCancel,
    FollowerPendingModify,
    FollowerPendingPlace,
)
from schemas.reports import ExecutionReport

log = structlog.get_logger("tradecopy.paper")


class PaperConnectorState(msgspec.Struct, kw_only=True):
    """The terminal's own state, committed in the order journal's frames: as small as the
    venue's open positions and the outbox, whatever the history."""

    venue: bytes
    """``PaperVenue.snapshot(with_executed=False)``: the order memory is the journal's."""
    outbox: list[bytes] = []
    reports: dict[str, bytes] = {}
    """Only in state files from before the order journal (whole-file msgpack, with the
    venue's idempotency memory inside): moved into the journal on open."""


class VenueResult(msgspec.Struct, frozen=True, tag_field="status", tag="venue_result"):
    """A journal entry upgraded from an old state file's venue memory: the venue's result of
    an order whose report had been forgotten. A repeat of the order gets it back from the
    venue (as ``duplicate``), exactly as the old format did."""

    account: str
    result: bytes


_stored_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
    ExecutionReport | VenueResult
)
_result_decoder = msgspec.msgpack.Decoder(Result)


def upgrade_state_file(data: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """An old whole-file state → (the journal's state, its records): the reports, and the
    venue's remembered results of orders whose reports were already forgotten."""
    old = msgspec.msgpack.decode(data, type=PaperConnectorState)
    venue = msgspec.msgpack.decode(old.venue, type=VenueState)
    records: dict[str, bytes] = {}
    for book in venue.accounts:
        for client_order_id, result in book.executed.items():
            stored = VenueResult(account=book.account_id, result=msgspec.msgpack.encode(result))
            records[client_order_id] = msgspec.msgpack.encode(stored)
        book.executed, book.executed_ns = {}, {}
    records.update(old.reports)  # a report says more than the venue's result
    state = PaperConnectorState(venue=msgspec.msgpack.encode(venue), outbox=old.outbox)
    return msgspec.msgpack.encode(state), list(records.items())


def master_ref(master: str, ref: str) -> str:
    return f"{master}:{ref}"


class PaperTerminal:
    """The venue-specific half of the paper connector (see ``connectors.contract``)."""

    def __init__(
        self,
        venue: PaperVenue,
        masters: Iterable[str],
        followers: Iterable[str],
        state_path: Path | None = None,
        outbox: list[MasterEvent] | None = None,
        journal: OrderJournal | None = None,
        aliases: dict[str, list[str]] | None = None,
    ) -> None:
        self.venue = venue
        self.aliases = aliases or {}
        """Symbols quoted like another (a broker suffix): ``{"XAUUSD": ["XAUUSD.m"]}``."""
        self.journal = journal if journal is not None else OrderJournal(None)
        """Executed order ids → reports, and the terminal's state (``connectors.journal``)."""
        self.follower_activity: deque[MasterEvent] = deque(maxlen=10_000)
        """The venue's own changes on follower accounts (SL/TP hits, stop-outs)."""
        self.masters = tuple(masters)
        self.followers = tuple(followers)
        self.state_path = state_path
        self.outbox: list[MasterEvent] = outbox or []
        self.quote_seen = asyncio.Event()
        self.changed = False
        """The venue changed (a trade, or fills/SL/TP/stop-out on a quote) since the last save."""

    # --------------------------------------------------------------- persistence

    @classmethod
    def open(
        cls,
        state_path: Path,
        accounts: Sequence[tuple[str, str, float, int, str]],
        symbols: Sequence[SymbolConfig] = (XAUUSD,),
        aliases: dict[str, list[str]] | None = None,
        *,
        order_memory: OrderMemoryConfig | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
        names: SymbolNames | None = None,
    ) -> PaperTerminal:
        """Restore from ``state_path`` (and its journal) if there, else open the accounts fresh.

        ``accounts`` rows: (id, currency, balance, leverage, role) with role master/follower.
        ``symbols`` and ``names`` usually come from ``PaperVenueConfig`` (``[paper.venue]``):
        ``config.symbol_configs()`` and ``config.names()``.
        Opening an account that exists changes nothing: start-up and recovery are one path.
        A state file of the old whole-file format is upgraded on the way.
        """
        journal = OrderJournal(state_path, order_memory, legacy=upgrade_state_file,
                               clock=wall_clock)  # fmt: skip
        outbox: list[MasterEvent] = []
        # The journal remembers the follower orders: the venue need not (its memory would
        # only grow the process with history).
        if journal.state is not None:
            state = msgspec.msgpack.decode(journal.state, type=PaperConnectorState)
            venue = PaperVenue.restore(state.venue, symbols, order_memory=order_memory,
                                       wall_clock=wall_clock, remember_client_orders=False,
                                       names=names)  # fmt: skip
            outbox = [codec.master_event_decoder.decode(e) for e in state.outbox]
        else:
            venue = PaperVenue(symbols, order_memory=order_memory, wall_clock=wall_clock,
                               remember_client_orders=False, names=names)  # fmt: skip
        for account, currency, balance, leverage, _ in accounts:
            venue.open_account(account, currency, balance, leverage)
        masters = [a for a, *_, role in accounts if role == "master"]
        followers = [a for a, *_, role in accounts if role == "follower"]
        return cls(venue, masters, followers, state_path, outbox, journal, aliases)

    @property
    def reports(self) -> OrderJournal:
        """Encoded execution reports by order id (the journal, read as a mapping)."""
        return self.journal

    def save(self) -> None:
        """Append the venue and outbox (and any reports not yet committed) to the journal,
        without fsync: it survives a crash of the process, as a master's trade needs."""
        self._write(durable=False)

    def commit(self) -> None:
        """Make the executed orders durable: their reports and the venue state they left,
        in one journal frame, fsynced (see ConnectorRuntime)."""
        self._write(durable=None)

    def close(self) -> None:
        self.journal.close()

    def _write(self, durable: bool | None) -> None:
        self.changed = False
        state = None
        if self.journal.persistent:
            # Without the venue's order memory: the journal holds it, and a write per batch
            # must not grow with history.
            state = msgspec.msgpack.encode(PaperConnectorState(
                venue=self.venue.snapshot(with_executed=False),
                outbox=[codec.encode(e) for e in self.outbox],
            ))  # fmt: skip
        self.journal.commit(state, durable=durable)

    # ------------------------------------------------------------ Terminal protocol

    def master_accounts(self) -> Sequence[str]:
        return self.masters

    def follower_accounts(self) -> Sequence[str]:
        return self.followers

    def account_state(self, account: str) -> AccountState:
        return self.venue.account_state(account, time.time_ns())

    def symbol_specs(self, account: str) -> Iterable[SymbolSpec]:
        return [self.venue.symbol_spec(account, s) for s in self.venue.symbols]

    def unpublished_events(self) -> list[MasterEvent]:
        return list(self.outbox)

    def published(self, events: Sequence[MasterEvent]) -> None:
        done = {e.event_id for e in events}
        self.outbox = [e for e in self.outbox if e.event_id not in done]

    # ------------------------------------------------------------------ trading

    def record(self, transactions: Iterable[MasterEvent]) -> list[MasterEvent]:
        """Queue the master accounts' transactions for publication (the outbox)."""
        now = time.time_ns()
        # The venue's clock may be replayed history; the terminal stamp is the wall-clock
        # moment of the fill, so master fill → follower fill can be measured.
        mine = [
            msgspec.structs.replace(t, trace=msgspec.structs.replace(t.trace, terminal_ns=now))
            for t in transactions
            if t.master in self.masters
        ]
        if mine:
            self.outbox.extend(mine)
        return mine

    def trade(self, action: Callable[[PaperVenue], Result]) -> Result:
        """Run one trade request on the venue (the scripted or manual master trader).

        The caller persists (``save``) — the connector does it while the resulting master
        events travel, so the save costs the hop nothing.
        """
        result = action(self.venue)
        if result.transactions:
            self.changed = True
        self.record(result.transactions)
        return result

    def on_quote(self, quote: Quote) -> list[MasterEvent]:
        transactions = self.venue.on_quote(quote)
        for alias in self.aliases.get(quote.symbol, ()):
            transactions += self.venue.on_quote(msgspec.structs.replace(quote, symbol=alias))
        self.quote_seen.set()
        if transactions:
            self.changed = True
        self.follower_activity.extend(t for t in transactions if t.master in self.followers)
        return self.record(transactions)

    # ----------------------------------------------------------- follower orders

    async def execute(self, order: FollowerOrder, reports: OrderReports) -> ExecutionReport:
        previous = self.journal.recall(order.order_id)
        if previous is not None:
            stored = _stored_decoder.decode(previous)
            if not isinstance(stored, VenueResult):
                return stored
            # Upgraded from an old state file: the venue recognises the order as it used to.
            result = _result_decoder.decode(stored.result)
            self.venue.remember(stored.account, order.order_id, result)
        report = await self._execute(order, reports)
        # A master account's own trades (manual orders: signal sources drive paper masters
        # through the API) are master events like any trade of its terminal; _execute
        # queued them (record) for the runtime to publish after the report.
        # No await between the venue's change and this record: a commit from another
        # account's batch takes both or neither.
        self.journal.record(order.order_id, codec.encode(report))
        return report

    async def _execute(self, order: FollowerOrder, reports: OrderReports) -> ExecutionReport:
        venue, account = self.venue, order.follower
        if isinstance(order, FollowerOpen):
            return await self._open(order, reports)
        if isinstance(order, FollowerClose):
            position = self._position_of(order)
            if position is None:
                if order.manual:
                    return reports.rejected(RETCODE_NO_SUCH_POSITION, NO_SUCH_POSITION)
                return reports.done(NO_POSITION_COPY)
            spec = venue.symbol_spec(account, position.symbol)
            volume = partial_close_volume(position.volume, order.ratio, spec)
            if volume <= 0:
                return reports.done("the ratio rounds to nothing on this position")
            result = venue.close_position(
                account,
                position.position_id,
                None if volume >= position.volume else volume,
                client_order_id=order.order_id,
            )
            self.record(result.transactions)
            if result.ok and order.new_master_position_id and volume < position.volume:
                venue.rekey_master_ref(
                    account,
                    position.position_id,
                    master_ref(order.master, order.new_master_position_id),
                )
            return _filled(reports, result, position.symbol, position.side.flipped(), closing=True)
        if isinstance(order, FollowerModify):
            position = self._position_of(order)
            if position is None:
                if order.manual:
                    return reports.rejected(RETCODE_NO_SUCH_POSITION, NO_SUCH_POSITION)
                return reports.done(NO_POSITION_COPY)
            result = venue.modify_position(
                account, position.position_id, order.sl, order.tp, client_order_id=order.order_id
            )
            self.record(result.transactions)
            return _outcome(reports, result, "SL/TP modified", [position.position_id])
        if isinstance(order, FollowerCloseBy):
            first = venue.position_by_master_ref(
                account, master_ref(order.master, order.master_position_id)
            )
            second = venue.position_by_master_ref(
                account, master_ref(order.master, order.master_opposite_position_id)
            )
            if first is None or second is None:
                return reports.done(NOT_BOTH_COPIES)
            result = venue.close_by(
                account, first.position_id, second.position_id, client_order_id=order.order_id
            )
            self.record(result.transactions)
            ids = [first.position_id, second.position_id]
            return _outcome(reports, result, "closed by the opposite copy", ids)
        if isinstance(order, FollowerCloseAll):
            return self._close_all(order, reports)
        if isinstance(order, FollowerPendingPlace):
            result = venue.place_pending(
                account, order.symbol, order.order_type, order.volume, order.price,
                sl=order.sl, tp=order.tp, expiration_ns=order.expiration_ns, magic=order.magic,
                comment=order.comment, client_order_id=order.order_id,
                master_ref=master_ref(order.master, order.master_order_id),
            )  # fmt: skip
            self.record(result.transactions)
            return _outcome(reports, result, "pending order placed", [result.order_id or ""])
        if isinstance(order, FollowerPendingModify | FollowerPendingCancel):
            pending = venue.pending_by_master_ref(
                account, master_ref(order.master, order.master_order_id)
            )
            if pending is None:
                return reports.done(NO_PENDING_COPY)
            if isinstance(order, FollowerPendingCancel):
                result = venue.cancel_pending(
                    account, pending.order_id, client_order_id=order.order_id
                )
                self.record(result.transactions)
                return _outcome(reports, result, "pending order cancelled", [])
            result = venue.modify_pending(
                account, pending.order_id, order.price, sl=order.sl, tp=order.tp,
                expiration_ns=order.expiration_ns, client_order_id=order.order_id,
            )  # fmt: skip
            self.record(result.transactions)
            return _outcome(reports, result, "pending order modified", [])
        raise TypeError(f"unhandled follower order {type(order).__name__}")  # pragma: no cover

    def _position_of(self, order: FollowerClose | FollowerModify) -> Position | None:
        """The follower position an order acts on: a copy by its master's position, a manual
        order's by the follower's own position id (``schemas.orders``, ``manual``)."""
        if order.manual:
            return self.venue.position(order.follower, order.master_position_id)
        ref = master_ref(order.master, order.master_position_id)
        return self.venue.position_by_master_ref(order.follower, ref)

    async def _open(self, order: FollowerOpen, reports: OrderReports) -> ExecutionReport:
        venue, account = self.venue, order.follower
        ref = master_ref(order.master, order.master_position_id)
        existing = venue.position_by_master_ref(account, ref)
        if order.master_order_id is not None:
            # The master's pending order triggered: our copy may have triggered already, or be
            # waiting; either way the follower ends with one position for it.
            order_ref = master_ref(order.master, order.master_order_id)
            existing = existing or venue.position_by_master_ref(account, order_ref)
            pending = venue.pending_by_master_ref(account, order_ref)
            if existing is None and pending is not None:
                venue.cancel_pending(account, pending.order_id)
        if existing is not None:
            if existing.master_ref != ref:
                venue.rekey_master_ref(account, existing.position_id, ref)
            return _filled_from(reports, existing)
        # Only now: an open that ran before its signal expired reports that fill above.
        if reports.signal_expired:
            return reports.expired()
        if order.max_price_deviation is not None and not await self._price_ok(order):
            return reports.rejected(
                RETCODE_PRICE_DEVIATION,
                f"price moved more than {order.max_price_deviation} from the master's "
                f"fill {order.master_price}",
            )
        result = venue.market_order(
            account, order.symbol, order.side, order.volume, sl=order.sl, tp=order.tp,
            magic=order.magic, comment=order.comment, client_order_id=order.order_id,
            master_ref=ref,
        )  # fmt: skip
        self.record(result.transactions)
        return _filled(reports, result, order.symbol, order.side)

    async def _price_ok(self, order: FollowerOpen) -> bool:
        deadline = time.monotonic() + (
            order.deviation_wait_ms / 1000 if order.deviation_policy is DeviationPolicy.WAIT else 0
        )
        while True:
            quote = self.venue.quote(order.symbol)
            if quote is not None and within_deviation(
                order.side, order.master_price, quote.bid, quote.ask, order.max_price_deviation
            ):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.quote_seen.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.quote_seen.wait(), remaining)

    def _close_all(self, order: FollowerCloseAll, reports: OrderReports) -> ExecutionReport:
        venue, account = self.venue, order.follower
        prefix = f"{order.master}:"
        closed = []
        for position in venue.positions(account):
            if position.master_ref and position.master_ref.startswith(prefix):
                result = venue.close_position(
                    account, position.position_id,
                    client_order_id=f"{order.order_id}:{position.position_id}",
                )  # fmt: skip
                self.record(result.transactions)
                if result.ok:
                    closed.append(position.position_id)
        for pending in venue.pending_orders(account):
            if pending.master_ref and pending.master_ref.startswith(prefix):
                cancelled = venue.cancel_pending(
                    account, pending.order_id,
                    client_order_id=f"{order.order_id}:{pending.order_id}",
                )  # fmt: skip
                self.record(cancelled.transactions)
        return reports.done(f"closed {len(closed)} position(s): {order.reason}", closed)


def _filled(
    reports: OrderReports, result: Result, symbol: str, side: Side, *, closing: bool = False
) -> ExecutionReport:
    """A market deal's venue result as the order's report; a close carries the money it
    booked (profit, commission, swap in the account currency)."""
    if not result.ok:
        return reports.rejected(result.retcode, result.reason)
    report = reports.filled(symbol, result.position_id or "", side, result.volume,
                            result.price, terminal_ns=time.time_ns())  # fmt: skip
    if closing:
        report = msgspec.structs.replace(
            report, profit=result.profit, commission=result.commission, swap=result.swap
        )
    return report


def _filled_from(reports: OrderReports, position: Position) -> ExecutionReport:
    """The fill an open made before, from the position it left."""
    return reports.filled(position.symbol, position.position_id, position.side,
                          position.volume, position.open_price)  # fmt: skip


def _outcome(
    reports: OrderReports, result: Result, detail: str, position_ids: list[str]
) -> ExecutionReport:
    """A venue result without a fill as the order's report."""
    if not result.ok:
        return reports.rejected(result.retcode, result.reason)
    return reports.done(detail, position_ids)


class PaperConnector:
    """A connector process: the paper terminal, its price feed and the NATS runtime."""

    def __init__(
        self,
        nc: Any,
        connector_id: str,
        terminal: PaperTerminal,
        replay: PriceReplay | NatsQuotes | None,
    ) -> None:
        self.terminal = terminal
        self.runtime = ConnectorRuntime(nc, connector_id, terminal)
        self.replay = replay
        self._feed: asyncio.Task[None] | None = None
        self.quotes = 0

    async def start(self) -> None:
        await self.runtime.start()
        if isinstance(self.replay, NatsQuotes):
            await self.replay.start()
        if self.replay is not None:
            self._feed = asyncio.create_task(self._run_feed(self.replay))

    async def stop(self) -> None:
        if isinstance(self.replay, NatsQuotes):
            await self.replay.stop()
        if self._feed is not None:
            self._feed.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._feed
        await self.runtime.stop()
        self.terminal.commit()

    async def _run_feed(self, replay: PriceReplay | NatsQuotes) -> None:
        terminal = self.terminal
        async for quote in replay.quotes():
            self.quotes += 1
            terminal.on_quote(quote)
            if not (terminal.changed or terminal.outbox):
                continue
            try:
                await self.runtime.flush_outbox(
                    while_in_flight=terminal.save if terminal.changed else None
                )
            except Exception as exc:  # NATS away: the outbox keeps them for the next try
                log.warning("master_events_publish_failed", error=repr(exc))
                if terminal.changed:
                    terminal.save()

    async def trade(self, action: Callable[[PaperVenue], Result]) -> Result:
        """A master trade: execute on the venue, then publish what it caused."""
        result = self.terminal.trade(action)
        # Persisting while the events are on the wire: a crash in that window can leave an
        # event published whose trade the paper venue then forgets (the only such window).
        try:
            await self.runtime.flush_outbox(while_in_flight=self.terminal.save)
        finally:
            if self.terminal.changed:  # the publish failed before the save: save now
                self.terminal.save()
        return result
