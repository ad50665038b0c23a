"""The MT5 connector (connectors/mt5/connector.py) against a MetaTrader5-shaped terminal over
the paper venue (connectors/mt5/paper.py): every follower order type through ``order_send``,
idempotency across restarts from the terminal's own comments, the outcome policy (rejected
on a definitive retcode, unknown without an answer), the master poll loop, and the lazy
import of the Windows-only package."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import WAIT_S, wait_until
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from connectors.contract import ConnectorRuntime, reports_at_receipt
from connectors.journal import MAGIC
from connectors.mt5 import protocol as mt5
from connectors.mt5.config import Mt5Config
from connectors.mt5.connector import Mt5Connector, Mt5ConnectorState, Mt5Terminal
from connectors.mt5.errors import (
    AccountNotHedging,
    TerminalConnectError,
    TerminalNotReady,
    TerminalUnavailable,
)
from connectors.mt5.paper import PaperMt5Api, PaperMt5Server
from connectors.mt5.parsing import symbol_spec
from connectors.paper.model import XAUUSD
from connectors.paper.venue import PaperVenue
from connectors.reports import (
    EXPIRED_REASON,
    NO_SUCH_POSITION,
    RETCODE_EXPIRED,
    RETCODE_NO_SUCH_POSITION,
)
from engine.core.comments import copy_comment, order_marker
from schemas import codec, subjects
from schemas.account import TradeMode
from schemas.common import OrderType, Side
from schemas.master import (
    PendingOrderPlaced,
    PendingOrderTriggered,
    PositionClosed,
    PositionModified,
    PositionOpened,
    PositionReduced,
)
from schemas.orders import (
    MANUAL_LINK_ID,
    FollowerClose,
    FollowerCloseAll,
    FollowerCloseBy,
    FollowerModify,
    FollowerOpen,
    FollowerOrder,
    FollowerPendingCancel,
    FollowerPendingModify,
    FollowerPendingPlace,
    manual_order_id,
)
from schemas.reports import (
    ExecutionReport,
    OrderDone,
    OrderFilled,
    OrderRejected,
    OrderUnknown,
)
from schemas.streams import (
    DUPLICATE_WINDOW_S,
    EXECUTION_REPORTS_STREAM,
    MASTER_EVENTS_STREAM,
    follower_orders_stream,
)

SYMBOL = "XAUUSD"
BID, ASK = 2000.00, 2000.30
MASTER, FOLLOWER = "m1", "f1"
MASTER_LOGIN, FOLLOWER_LOGIN = 5_001, 7_002


class RecordingApi(PaperMt5Api):
    """The paper terminal, keeping every request it was sent."""

    def __init__(self, server: PaperMt5Server, account: str, login: int) -> None:
        super().__init__(server, account, login)
        self.sent: list[dict[str, Any]] = []

    def order_send(self, request: dict[str, Any]) -> Any:
        self.sent.append(dict(request))
        return super().order_send(request)

    def trades(self) -> int:
        return len([r for r in self.sent if r["action"] != mt5.TRADE_ACTION_REMOVE])


class AnswerLost(RecordingApi):
    """The request reaches the server and runs; its answer never comes back."""

    def order_send(self, request: dict[str, Any]) -> Any:
        super().order_send(request)
        self._error = (-10005, "IPC timeout")
        return None


class Unreachable(RecordingApi):
    """Requests never reach the server and the package answers nothing."""

    def order_send(self, request: dict[str, Any]) -> Any:
        self.sent.append(dict(request))
        self._error = (-10004, "No IPC connection")
        return None


class TimedOutRetcode(RecordingApi):
    """The terminal answers TRADE_RETCODE_TIMEOUT; the request did not run."""

    def order_send(self, request: dict[str, Any]) -> Any:
        self.sent.append(dict(request))
        result = super().order_send({"action": 99})
        return result._replace(retcode=mt5.TRADE_RETCODE_TIMEOUT, comment="Request timeout")


class Hanging(RecordingApi):
    """order_send blocks until released, then runs and answers."""

    def __init__(self, server: PaperMt5Server, account: str, login: int) -> None:
        super().__init__(server, account, login)
        self.release = threading.Event()

    def order_send(self, request: dict[str, Any]) -> Any:
        self.release.wait(WAIT_S)
        return super().order_send(request)


def paper_server(**kwargs: Any) -> PaperMt5Server:
    venue = PaperVenue((XAUUSD,))
    for account in (MASTER, FOLLOWER, "m2"):
        venue.open_account(account, "USD", 10_000.0, 100)
    server = PaperMt5Server(venue, **kwargs)
    server.quote(SYMBOL, BID, ASK)
    return server


def config(role: str = "follower", account: str = FOLLOWER, **kwargs: Any) -> Mt5Config:
    defaults: dict[str, Any] = {"poll_ms": 5, "order_timeout_s": 5.0, "magic": 4242}
    return Mt5Config(
        connector_id="mt5-test", account_id=account, role=role, **{**defaults, **kwargs}
    )


def follower(
    server: PaperMt5Server, api_type: type[RecordingApi] = RecordingApi, **kwargs: Any
) -> tuple[Mt5Terminal, RecordingApi]:
    api = api_type(server, FOLLOWER, FOLLOWER_LOGIN)
    terminal = Mt5Terminal.open(config(login=FOLLOWER_LOGIN, **kwargs), api)
    return terminal, api


def master(server: PaperMt5Server, **kwargs: Any) -> tuple[Mt5Terminal, RecordingApi]:
    api = RecordingApi(server, MASTER, MASTER_LOGIN)
    terminal = Mt5Terminal.open(config("master", MASTER, login=MASTER_LOGIN, **kwargs), api)
    return terminal, api


def base(order_id: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "order_id": order_id, "link_id": "L1", "follower": FOLLOWER, "master": MASTER,
        "master_event_id": order_id.split(":")[0], "symbol": SYMBOL, "ts_ns": time.time_ns(),
        **kwargs,
    }  # fmt: skip


def open_order(order_id: str = "m1-501-opened:L1", ref: str = "501", **kwargs: Any) -> FollowerOpen:
    fields = {"side": Side.BUY, "volume": 0.1, "master_price": 2000.1, **kwargs}
    return FollowerOpen(**base(order_id), master_position_id=ref, **fields)


def pending_order(order_type: OrderType, price: float) -> FollowerPendingPlace:
    return FollowerPendingPlace(
        **base("m1-601-placed:L1"), master_order_id="601", order_type=order_type, volume=0.1,
        price=price,
    )  # fmt: skip


async def run(terminal: Mt5Terminal, order: FollowerOrder) -> ExecutionReport:
    return await terminal.execute(order, reports_at_receipt(order, time.time_ns()))


def positions(api: PaperMt5Api) -> list[Any]:
    return list(api.positions_get())


# --- follower orders ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "filling"),
    [
        (mt5.SYMBOL_FILLING_IOC, mt5.ORDER_FILLING_IOC),
        (mt5.SYMBOL_FILLING_FOK, mt5.ORDER_FILLING_FOK),
        (mt5.SYMBOL_FILLING_FOK | mt5.SYMBOL_FILLING_IOC, mt5.ORDER_FILLING_FOK),
    ],
)
async def test_open_is_a_market_deal_with_the_symbols_filling_deviation_magic_and_comment(
    allowed: int, filling: int
) -> None:
    terminal, api = follower(paper_server(filling_mode=allowed), deviation_points=15)
    report = await run(terminal, open_order(sl=1990.0, tp=2020.0))

    (request,) = api.sent
    assert request["action"] == mt5.TRADE_ACTION_DEAL
    assert request["type"] == mt5.ORDER_TYPE_BUY
    assert (request["type_filling"], request["deviation"], request["magic"]) == (filling, 15, 4242)
    assert request["comment"] == "tc.m1.501"
    assert request["price"] == ASK
    (held,) = positions(api)
    assert isinstance(report, OrderFilled)
    assert report.position_id == str(held.ticket)
    assert (report.side, report.volume, report.price) == (Side.BUY, 0.1, ASK)
    assert report.slippage == pytest.approx(ASK - 2000.1)
    assert (held.sl, held.tp, held.magic, held.comment) == (1990.0, 2020.0, 4242, "tc.m1.501")


async def test_an_order_id_executed_twice_trades_once() -> None:
    terminal, api = follower(paper_server())
    first = await run(terminal, open_order())
    again = await run(terminal, open_order())
    assert again == first
    assert len(api.sent) == 1
    assert len(positions(api)) == 1


async def test_partial_close_closes_the_ratio_of_the_copy_and_keeps_its_ticket() -> None:
    terminal, api = follower(paper_server())
    opened = await run(terminal, open_order(volume=0.3))
    close = FollowerClose(**base("m1-501-reduced-1:L1"), master_position_id="501", ratio=0.5)
    report = await run(terminal, close)

    request = api.sent[-1]
    assert request["position"] == int(opened.position_id)
    assert (request["type"], request["volume"]) == (mt5.ORDER_TYPE_SELL, 0.15)
    assert request["comment"] == order_marker(close.order_id)
    assert isinstance(report, OrderFilled)
    assert (report.side, report.volume, report.price) == (Side.SELL, 0.15, BID)
    (held,) = positions(api)
    assert (str(held.ticket), held.volume) == (opened.position_id, 0.15)
    assert (await run(terminal, close)) == report
    assert positions(api)[0].volume == 0.15


async def test_close_of_a_position_this_account_never_copied_is_nothing_to_do() -> None:
    terminal, api = follower(paper_server())
    await run(terminal, open_order())
    close = FollowerClose(**base("m1-999-closed:L1"), master_position_id="999")
    report = await run(terminal, close)
    assert isinstance(report, OrderDone)
    assert "no copy" in report.detail
    assert len(positions(api)) == 1


async def test_full_close_and_modify_act_on_the_copy() -> None:
    terminal, api = follower(paper_server())
    await run(terminal, open_order())
    modify = FollowerModify(**base("m1-501-modified-1:L1"), master_position_id="501",
                            sl=1995.0, tp=2050.0)  # fmt: skip
    report = await run(terminal, modify)
    assert isinstance(report, OrderDone)
    assert api.sent[-1]["action"] == mt5.TRADE_ACTION_SLTP
    assert (positions(api)[0].sl, positions(api)[0].tp) == (1995.0, 2050.0)

    close = FollowerClose(**base("m1-501-closed:L1"), master_position_id="501")
    report = await run(terminal, close)
    assert isinstance(report, OrderFilled)
    assert report.volume == 0.1
    assert positions(api) == []


def manual(kind: type[Any], client_order_id: str, **fields: Any) -> Any:
    """A person's order from the platform API: ``master`` is the account itself."""
    order_id = manual_order_id(FOLLOWER, client_order_id)
    return kind(order_id=order_id, link_id=MANUAL_LINK_ID, follower=FOLLOWER, master=FOLLOWER,
                master_event_id=order_id, symbol=SYMBOL, ts_ns=time.time_ns(), manual=True,
                **fields)  # fmt: skip


async def test_manual_modify_and_closes_act_on_the_accounts_own_position_by_its_ticket() -> None:
    terminal, api = follower(paper_server())
    copied = await run(terminal, open_order(volume=0.3))
    by_hand = api.order_send({"action": mt5.TRADE_ACTION_DEAL, "symbol": SYMBOL, "volume": 0.2,
                              "type": mt5.ORDER_TYPE_SELL, "price": BID,
                              "type_filling": mt5.ORDER_FILLING_IOC})  # fmt: skip
    own = str(by_hand.order)
    assert isinstance(copied, OrderFilled) and own != copied.position_id

    modify = manual(FollowerModify, "web-sl-1", master_position_id=own, sl=2050.0, tp=1950.0)
    report = await run(terminal, modify)
    assert isinstance(report, OrderDone), report
    assert report.position_ids == [own]
    held = {str(p.ticket): p for p in positions(api)}
    assert (held[own].sl, held[own].tp) == (2050.0, 1950.0)
    assert (held[copied.position_id].sl, held[copied.position_id].tp) == (0.0, 0.0)

    partial = manual(FollowerClose, "web-close-1", master_position_id=copied.position_id,
                     ratio=0.5)  # fmt: skip
    report = await run(terminal, partial)
    assert isinstance(report, OrderFilled), report
    assert (report.position_id, report.side, report.volume) == (copied.position_id, Side.SELL,
                                                                0.15)  # fmt: skip
    sent = len(api.sent)
    assert await run(terminal, partial) == report  # a retried request trades once
    assert len(api.sent) == sent
    held = {str(p.ticket): p for p in positions(api)}
    assert (held[copied.position_id].volume, held[own].volume) == (0.15, 0.2)

    full = manual(FollowerClose, "web-close-2", master_position_id=own)
    report = await run(terminal, full)
    assert isinstance(report, OrderFilled), report
    assert (report.position_id, report.side, report.volume) == (own, Side.BUY, 0.2)
    assert [str(p.ticket) for p in positions(api)] == [copied.position_id]

    # The copy path is unchanged: the master's close still finds its (reduced) copy.
    close = FollowerClose(**base("m1-501-closed:L1"), master_position_id="501")
    report = await run(terminal, close)
    assert isinstance(report, OrderFilled)
    assert (report.position_id, report.volume) == (copied.position_id, 0.15)
    assert positions(api) == []


async def test_a_manual_order_for_a_position_the_account_does_not_hold_is_rejected() -> None:
    terminal, api = follower(paper_server())
    copied = await run(terminal, open_order())
    sent = len(api.sent)
    for order in (
        # The master's position id is no ticket here: a manual order never means a copy.
        manual(FollowerClose, "web-close-9", master_position_id="501"),
        manual(FollowerClose, "web-close-8", master_position_id="424242", ratio=0.5),
        manual(FollowerModify, "web-sl-9", master_position_id="424242", sl=1990.0),
    ):
        report = await run(terminal, order)
        assert isinstance(report, OrderRejected), report
        assert (report.code, report.reason) == (RETCODE_NO_SUCH_POSITION, NO_SUCH_POSITION)
    assert len(api.sent) == sent
    assert [str(p.ticket) for p in positions(api)] == [copied.position_id]


async def test_a_manual_close_whose_answer_was_lost_settles_from_its_marker() -> None:
    terminal, api = follower(paper_server(), AnswerLost)
    copied = await run(terminal, open_order())
    assert isinstance(copied, OrderFilled)
    report = await run(terminal, manual(FollowerClose, "web-close-3",
                                        master_position_id=copied.position_id))  # fmt: skip
    assert isinstance(report, OrderFilled), report
    assert (report.position_id, report.volume) == (copied.position_id, 0.1)
    assert positions(api) == []


async def test_close_by_closes_the_two_copies_against_each_other() -> None:
    terminal, api = follower(paper_server())
    await run(terminal, open_order("m1-501-opened:L1", "501", volume=0.2))
    await run(terminal, open_order("m1-502-opened:L1", "502", side=Side.SELL, volume=0.1))
    close_by = FollowerCloseBy(**base("m1-900-closed_by:L1"), master_position_id="501",
                               master_opposite_position_id="502")  # fmt: skip
    report = await run(terminal, close_by)
    assert isinstance(report, OrderDone)
    assert api.sent[-1]["action"] == mt5.TRADE_ACTION_CLOSE_BY
    (rest,) = positions(api)
    assert (rest.comment, rest.volume) == ("tc.m1.501", 0.1)


async def test_a_lost_close_by_settles_from_its_deals_when_the_server_rewrites_the_comment() -> (
    None
):
    server = paper_server(close_by_comment="close by")  # the server's comment, not ours
    terminal, _ = follower(server)
    await run(terminal, open_order("m1-501-opened:L1", "501", volume=0.2))
    await run(terminal, open_order("m1-502-opened:L1", "502", side=Side.SELL, volume=0.1))
    lost = AnswerLost(server, FOLLOWER, FOLLOWER_LOGIN)
    terminal.execution.api = lost
    close_by = FollowerCloseBy(**base("m1-900-closed_by:L1"), master_position_id="501",
                               master_opposite_position_id="502")  # fmt: skip
    report = await run(terminal, close_by)
    assert isinstance(report, OrderDone)
    assert len(report.position_ids) == 2
    assert terminal.unsettled == {}


async def test_close_by_on_a_symbol_without_the_close_by_flag_is_two_closes() -> None:
    server = paper_server(order_mode=127 & ~mt5.SYMBOL_ORDER_CLOSEBY)
    terminal, api = follower(server)
    await run(terminal, open_order("m1-501-opened:L1", "501", volume=0.2))
    await run(terminal, open_order("m1-502-opened:L1", "502", side=Side.SELL, volume=0.1))
    close_by = FollowerCloseBy(**base("m1-900-closed_by:L1"), master_position_id="501",
                               master_opposite_position_id="502")  # fmt: skip
    report = await run(terminal, close_by)
    assert isinstance(report, OrderDone)
    assert all(r["action"] != mt5.TRADE_ACTION_CLOSE_BY for r in api.sent)
    (rest,) = positions(api)
    assert (rest.comment, rest.volume) == ("tc.m1.501", 0.1)


async def test_close_all_closes_only_that_masters_copies_and_pending_orders() -> None:
    terminal, api = follower(paper_server())
    await run(terminal, open_order("m1-501-opened:L1", "501"))
    await run(terminal, open_order("m1-502-opened:L1", "502", side=Side.SELL))
    other = FollowerOpen(**{**base("m2-7-opened:L2"), "master": "m2"}, master_position_id="7",
                         side=Side.BUY, volume=0.1)  # fmt: skip
    await run(terminal, other)
    place = pending_order(OrderType.BUY_LIMIT, 1990.0)
    await run(terminal, place)

    report = await run(terminal, FollowerCloseAll(**base("stop:L1"), reason="equity stop"))
    assert isinstance(report, OrderDone)
    assert len(report.position_ids) == 2
    assert [p.comment for p in positions(api)] == ["tc.m2.7"]
    assert api.orders_get() == ()


async def test_pending_order_is_placed_modified_and_cancelled_on_its_copy() -> None:
    server = paper_server(server_utc_offset_s=3 * 3600)
    terminal, api = follower(server, server_utc_offset_s=3 * 3600)
    expires = (int(time.time()) + 7200) * 1_000_000_000
    place = FollowerPendingPlace(
        **base("m1-601-placed:L1"), master_order_id="601", order_type=OrderType.SELL_STOP,
        volume=0.2, price=1990.0, sl=1995.0, expiration_ns=expires,
    )  # fmt: skip
    report = await run(terminal, place)
    assert isinstance(report, OrderDone)
    (order,) = api.orders_get()
    assert (order.type, order.price_open, order.sl, order.comment) == (
        mt5.ORDER_TYPE_SELL_STOP, 1990.0, 1995.0, "tc.m1.601",
    )  # fmt: skip
    assert api.sent[-1]["type_time"] == mt5.ORDER_TIME_SPECIFIED
    assert api.sent[-1]["expiration"] == expires // 1_000_000_000 + 3 * 3600
    assert report.position_ids == [str(order.ticket)]
    assert (await run(terminal, place)) == report
    assert len(api.orders_get()) == 1

    modify = FollowerPendingModify(**base("m1-601-pending_modified-1:L1"),
                                   master_order_id="601", price=1985.0, sl=1992.0)  # fmt: skip
    assert isinstance(await run(terminal, modify), OrderDone)
    (order,) = api.orders_get()
    assert (order.price_open, order.sl, order.time_expiration) == (1985.0, 1992.0, 0)

    cancel = FollowerPendingCancel(**base("m1-601-cancelled:L1"), master_order_id="601")
    assert isinstance(await run(terminal, cancel), OrderDone)
    assert api.orders_get() == ()


async def test_master_trigger_reuses_a_follower_copy_that_triggered_already() -> None:
    server = paper_server()
    terminal, api = follower(server)
    place = pending_order(OrderType.BUY_STOP, 2001.0)
    await run(terminal, place)
    server.quote(SYMBOL, 2001.0, 2001.3)  # the follower's stop triggers
    (triggered,) = positions(api)
    sent = len(api.sent)

    opened = open_order("m1-601-triggered:L1", "601", master_order_id="601")
    report = await run(terminal, opened)
    assert isinstance(report, OrderFilled)
    assert report.position_id == str(triggered.ticket)
    assert len(api.sent) == sent
    assert len(positions(api)) == 1


async def test_master_trigger_replaces_a_follower_copy_still_waiting() -> None:
    terminal, api = follower(paper_server())
    place = pending_order(OrderType.BUY_STOP, 2010.0)
    await run(terminal, place)
    report = await run(terminal, open_order("m1-601-triggered:L1", "601", master_order_id="601"))
    assert isinstance(report, OrderFilled)
    assert api.orders_get() == ()
    assert len(positions(api)) == 1


async def test_mt4_renewed_master_ticket_still_finds_the_copy() -> None:
    terminal, api = follower(paper_server())
    await run(terminal, open_order(volume=0.2))
    reduce = FollowerClose(**base("m1-501-reduced:L1"), master_position_id="501", ratio=0.5,
                           new_master_position_id="777")  # fmt: skip
    await run(terminal, reduce)
    close = FollowerClose(**base("m1-777-closed:L1"), master_position_id="777")
    report = await run(terminal, close)
    assert isinstance(report, OrderFilled)
    assert positions(api) == []


# --- outcome policy -------------------------------------------------------------------------


async def test_a_definitive_retcode_is_a_rejection_with_the_terminals_code_and_comment() -> None:
    terminal, api = follower(paper_server())
    report = await run(terminal, open_order(volume=100.0))  # 100 lots of gold: no money
    assert isinstance(report, OrderRejected)
    assert report.code == 10019  # TRADE_RETCODE_NO_MONEY
    assert "not enough money" in report.reason
    assert positions(api) == []
    assert terminal.unsettled == {}


async def test_an_unsupported_filling_mode_is_the_terminals_rejection() -> None:
    server = paper_server(filling_mode=0)  # market execution and no FOK/IOC: nothing fits
    terminal, _ = follower(server)
    report = await run(terminal, open_order())
    assert isinstance(report, OrderRejected)
    assert report.code == mt5.TRADE_RETCODE_INVALID_FILL


async def test_instant_execution_without_flags_opens_with_fok_never_the_refused_return() -> None:
    server = paper_server(
        execution_mode=mt5.SYMBOL_TRADE_EXECUTION_INSTANT, filling_mode=0,
        refused_fillings=frozenset({mt5.ORDER_FILLING_RETURN}),
    )  # fmt: skip
    terminal, api = follower(server)
    report = await run(terminal, open_order())
    assert isinstance(report, OrderFilled)
    assert api.sent[-1]["type_filling"] == mt5.ORDER_FILLING_FOK


async def test_a_pending_order_is_placed_with_return_where_fok_and_ioc_are_refused() -> None:
    server = paper_server(
        refused_fillings=frozenset({mt5.ORDER_FILLING_FOK, mt5.ORDER_FILLING_IOC})
    )
    terminal, api = follower(server)
    report = await run(terminal, pending_order(OrderType.BUY_LIMIT, 1990.0))
    assert isinstance(report, OrderDone)
    assert api.sent[-1]["type_filling"] == mt5.ORDER_FILLING_RETURN


async def test_a_refused_filling_mode_falls_back_to_the_next_the_symbol_allows() -> None:
    server = paper_server(refused_fillings=frozenset({mt5.ORDER_FILLING_FOK}))
    terminal, api = follower(server)  # flags say FOK|IOC, the broker refuses FOK anyway
    report = await run(terminal, open_order())
    assert isinstance(report, OrderFilled)
    assert [r["type_filling"] for r in api.sent] == [mt5.ORDER_FILLING_FOK, mt5.ORDER_FILLING_IOC]


async def test_an_open_with_a_stop_inside_the_stops_level_opens_without_that_stop() -> None:
    terminal, api = follower(paper_server(stops_level_points=500))  # 5.00 on gold
    report = await run(terminal, open_order(sl=1999.0, tp=2020.0))  # sl 1.00 under the bid
    assert isinstance(report, OrderFilled)
    (held,) = positions(api)
    assert (held.sl, held.tp) == (0.0, 2020.0)


async def test_an_unpriced_fill_without_its_deal_yet_reports_the_requested_price() -> None:
    terminal, api = follower(paper_server())
    api.unpriced_fills = True
    report = await run(terminal, open_order())
    assert isinstance(report, OrderFilled)
    assert report.price == ASK  # not 0.0
    assert report.slippage == pytest.approx(ASK - 2000.1)


async def test_a_throttled_open_and_a_repriced_close_are_sent_again() -> None:
    terminal, api = follower(paper_server())
    api.busy_answers = [10024]  # TRADE_RETCODE_TOO_MANY_REQUESTS: nothing ran
    assert isinstance(await run(terminal, open_order()), OrderFilled)
    api.busy_answers = [10020]  # TRADE_RETCODE_PRICE_CHANGED on the close
    close = FollowerClose(**base("m1-501-closed:L1"), master_position_id="501")
    assert isinstance(await run(terminal, close), OrderFilled)
    assert len(api.sent) == 4
    assert positions(api) == []


def test_specs_and_account_state_are_read_on_the_terminals_thread() -> None:
    class ThreadRecording(RecordingApi):
        threads: set[str] = set()

        def symbols_get(self, group: str | None = None) -> Any:
            self.threads.add(threading.current_thread().name)
            return super().symbols_get(group)

        def account_info(self) -> Any:
            self.threads.add(threading.current_thread().name)
            return super().account_info()

    terminal, api = follower(paper_server(), ThreadRecording)
    api.threads.clear()
    terminal._state = None
    assert terminal.symbol_specs(FOLLOWER)
    assert terminal.account_state(FOLLOWER).account == FOLLOWER
    assert api.threads and all(t.startswith("mt5-terminal") for t in api.threads)


async def test_symbol_specs_are_republished_while_running_not_only_at_start() -> None:
    class Runtime:
        refreshed: list[str] = []

        async def flush_outbox(self) -> None: ...

        async def refresh_account(self, account: str) -> None:
            self.refreshed.append(account)

    terminal, _ = follower(paper_server(), specs_refresh_s=0.01)
    runtime = Runtime()
    task = asyncio.create_task(terminal.run(runtime))  # type: ignore[arg-type]
    await wait_until(lambda: len(runtime.refreshed) >= 2, "specs republished twice")
    task.cancel()
    assert set(runtime.refreshed) == {FOLLOWER}


async def test_a_request_the_package_refuses_with_minus_2_is_rejected_not_unknown() -> None:
    server = paper_server(refuse_requests=(-2, 'Invalid "comment" argument'))
    terminal, api = follower(server)
    report = await run(terminal, open_order())
    assert isinstance(report, OrderRejected)
    assert report.code == -2
    assert "comment" in report.reason
    assert terminal.unsettled == {}
    assert positions(api) == []


async def test_only_ipc_errors_leave_a_none_answer_unknown() -> None:
    for code in (-10001, -10004, -10005):
        server = paper_server(refuse_requests=(code, "IPC"))
        terminal, _ = follower(server)
        report = await run(terminal, open_order())
        assert isinstance(report, OrderUnknown), code


async def test_a_lost_answer_is_settled_from_the_copys_comment() -> None:
    terminal, api = follower(paper_server(), AnswerLost)
    report = await run(terminal, open_order())
    (held,) = positions(api)
    assert isinstance(report, OrderFilled)
    assert report.position_id == str(held.ticket)
    assert terminal.unsettled == {}


async def test_no_answer_and_no_trade_is_unknown_never_rejected() -> None:
    terminal, api = follower(paper_server(), Unreachable)
    report = await run(terminal, open_order())
    assert isinstance(report, OrderUnknown)
    assert "No IPC connection" in report.reason
    assert list(terminal.unsettled) == [report.order_id]
    assert positions(api) == []


async def test_a_timeout_retcode_is_unknown_and_settles_when_the_copy_shows_up() -> None:
    server = paper_server()
    terminal, api = follower(server, TimedOutRetcode)
    order = open_order()
    report = await run(terminal, order)
    assert isinstance(report, OrderUnknown)
    assert await terminal.resolve_unknown_outcomes() == []

    # The server executed it after all: the copy appears with the order's comment.
    PaperMt5Api(server, FOLLOWER, FOLLOWER_LOGIN).order_send({
        "action": mt5.TRADE_ACTION_DEAL, "symbol": SYMBOL, "volume": 0.1,
        "type": mt5.ORDER_TYPE_BUY, "comment": "tc.m1.501",
        "type_filling": mt5.ORDER_FILLING_FOK,
    })  # fmt: skip
    (settled,) = await terminal.resolve_unknown_outcomes()
    assert isinstance(settled, OrderFilled)
    assert terminal.unsettled == {}
    assert (await run(terminal, order)) == settled
    assert len(positions(api)) == 1


async def test_a_hung_order_send_is_unknown_after_the_timeout_and_settles_on_the_answer() -> None:
    terminal, api = follower(paper_server(), Hanging, order_timeout_s=0.05)
    order = open_order()
    report = await run(terminal, order)
    assert isinstance(report, OrderUnknown)
    assert "within 0.05s" in report.reason

    api.release.set()
    await wait_until(lambda: not terminal.unsettled, "the late answer to settle the order")
    settled = codec.execution_report_decoder.decode(terminal.reports[order.order_id])
    assert isinstance(settled, OrderFilled)
    assert len(positions(api)) == 1


async def test_a_terminal_that_does_not_answer_leaves_the_order_for_redelivery() -> None:
    class Disconnected(RecordingApi):
        def positions_get(self, **kwargs: Any) -> Any:
            return None

    terminal, api = follower(paper_server())
    terminal.execution.api = Disconnected(api.server, FOLLOWER, FOLLOWER_LOGIN)
    with pytest.raises(TerminalNotReady):
        await run(terminal, open_order())
    assert "m1-501-opened:L1" not in terminal.reports


# --- terminal connection --------------------------------------------------------------------


async def test_a_terminal_restart_is_reattached_with_backoff_and_polling_resumes() -> None:
    server = paper_server()
    terminal, api = master(server, reconnect_backoff_s=0.01)
    api.ipc_lost = True  # auto-update: the terminal process under the package is gone
    api.initialize_failures = 1  # and the new one is not up at the first attempt
    assert await terminal.poll() == []
    health = terminal.health()
    assert (health["terminal_connected"], health["terminal_ready"]) == (False, False)
    assert health["terminal_last_error"][0] in mt5.IPC_ERROR_CODES
    assert "re-attaching" in str(health["terminal_reason"])

    master_trade(PaperMt5Api(server, MASTER, MASTER_LOGIN), action=mt5.TRADE_ACTION_DEAL,
                 type=mt5.ORDER_TYPE_BUY, volume=0.1)  # fmt: skip
    await asyncio.sleep(0.02)  # the backoff
    events = await terminal.poll()
    assert [type(e) for e in events] == [PositionOpened]
    health = terminal.health()
    assert (health["terminal_ready"], health["terminal_reconnects"]) == (True, 1)


async def test_autotrading_off_is_not_ready_with_the_reason_and_sends_nothing() -> None:
    terminal, api = follower(paper_server())
    api.trade_allowed = False
    with pytest.raises(TerminalNotReady, match="AutoTrading"):
        await run(terminal, open_order())
    assert api.sent == []
    assert "m1-501-opened:L1" not in terminal.reports
    assert terminal.health()["terminal_trade_allowed"] is False
    # The same state travels in the account state, for the platform, and as a metric.
    status = terminal.account_state(terminal.account).terminal
    assert status is not None
    assert (status.connected, status.trade_allowed) == (True, False)
    assert "AutoTrading" in status.reason
    labels = {"account": terminal.account}
    assert REGISTRY.get_sample_value("tradecopy_terminal_trade_allowed", labels) == 0.0

    api.trade_allowed = True  # the operator turns Algo Trading on: the redelivery trades
    assert isinstance(await run(terminal, open_order()), OrderFilled)


async def test_a_terminal_off_its_trade_server_is_not_diffed() -> None:
    server = paper_server()
    terminal, api = master(server)
    api.connected = False
    master_trade(api, action=mt5.TRADE_ACTION_DEAL, type=mt5.ORDER_TYPE_BUY, volume=0.1)
    assert await terminal.poll() == []  # what it shows now may be stale
    assert terminal.health()["terminal_synchronised"] is False
    api.connected = True
    terminal._connection_checked = 0.0  # the next check is due
    assert [type(e) for e in await terminal.poll()] == [PositionOpened]


# --- restarts -------------------------------------------------------------------------------


async def test_a_restart_rebuilds_the_copies_from_comments_and_trades_nothing_twice() -> None:
    server = paper_server()
    before, _ = follower(server)
    opened = await run(before, open_order())
    reduced = FollowerClose(**base("m1-501-reduced-1:L1"), master_position_id="501",
                            ratio=0.5)  # fmt: skip
    first_close = await run(before, reduced)
    before.close()

    after, api = follower(server)  # no state file: only the terminal remembers
    assert after.memory.positions == {"tc.m1.501": opened.position_id}
    assert after.reports == {}
    again = await run(after, open_order())
    assert isinstance(again, OrderFilled)
    assert again.position_id == opened.position_id
    close_again = await run(after, reduced)
    assert isinstance(close_again, OrderFilled)
    assert (close_again.volume, close_again.price) == (first_close.volume, first_close.price)
    assert api.sent == []
    assert positions(api)[0].volume == 0.05

    done = await run(after, FollowerClose(**base("m1-501-closed:L1"), master_position_id="501"))
    assert isinstance(done, OrderFilled)
    assert positions(api) == []


async def test_an_open_redelivered_after_its_copy_closed_does_not_open_again() -> None:
    server = paper_server()
    before, _ = follower(server)
    opened = await run(before, open_order(sl=1990.0))
    server.quote(SYMBOL, 1989.0, 1989.3)  # the follower's copy stops out on its own SL
    before.close()

    after, api = follower(server)
    assert positions(api) == []
    again = await run(after, open_order(sl=1990.0))
    assert isinstance(again, OrderFilled)
    assert (again.position_id, again.price) == (opened.position_id, opened.price)
    assert api.sent == []


async def test_an_expired_open_is_rejected_unsent_unless_its_copy_ran_before() -> None:
    server = paper_server()
    before, _ = follower(server)
    stopped = await run(before, open_order(sl=1990.0))
    kept = await run(before, open_order("m1-502-opened:L1", "502"))
    server.quote(SYMBOL, 1989.0, 1989.3)  # the first copy stops out on its own SL
    before.close()

    after, api = follower(server)  # no state file: only the terminal remembers
    expired = time.time_ns() - 1
    # Redelivered past their signal age: the copy held and the closed copy's deal answer.
    held = await run(after, open_order("m1-502-opened:L1", "502", expires_ns=expired))
    assert isinstance(held, OrderFilled)
    assert (held.position_id, held.price) == (kept.position_id, kept.price)
    closed = await run(after, open_order(sl=1990.0, expires_ns=expired))
    assert isinstance(closed, OrderFilled)
    assert (closed.position_id, closed.price) == (stopped.position_id, stopped.price)

    fresh = await run(after, open_order("m1-503-opened:L1", "503", expires_ns=expired))
    assert isinstance(fresh, OrderRejected)
    assert (fresh.code, fresh.reason) == (RETCODE_EXPIRED, EXPIRED_REASON)
    assert api.sent == []
    assert [p.comment for p in positions(api)] == [copy_comment(MASTER, "502")]


def test_a_terminal_logged_in_to_another_account_is_refused() -> None:
    class KeepsItsAccount(RecordingApi):
        def initialize(self, path: str | None = None, **kwargs: Any) -> bool:
            return True  # attached, but still on its own account

    server = paper_server()
    with pytest.raises(TerminalConnectError, match="Authorization failed"):
        Mt5Terminal.open(config(login=999), RecordingApi(server, FOLLOWER, FOLLOWER_LOGIN))
    with pytest.raises(TerminalConnectError, match="login to account 999"):
        Mt5Terminal.open(config(login=999), KeepsItsAccount(server, FOLLOWER, FOLLOWER_LOGIN))


@pytest.mark.parametrize(
    "margin_mode", [mt5.ACCOUNT_MARGIN_MODE_RETAIL_NETTING, mt5.ACCOUNT_MARGIN_MODE_EXCHANGE]
)
def test_a_netting_account_is_refused_at_start_with_the_reason(margin_mode: int) -> None:
    server = paper_server(margin_mode=margin_mode)
    api = RecordingApi(server, FOLLOWER, FOLLOWER_LOGIN)
    with pytest.raises(AccountNotHedging, match="needs a hedging account"):
        Mt5Terminal.open(config(login=FOLLOWER_LOGIN), api)
    assert api.sent == []


async def test_reports_survive_a_restart_in_the_state_file(tmp_path: Path) -> None:
    server = paper_server()
    state = str(tmp_path / "f1.state")
    before, _ = follower(server, state_path=state)
    report = await run(before, open_order())
    before.commit()
    after, api = follower(server, state_path=state)
    assert (await run(after, open_order())) == report
    assert api.sent == []


# --- master polling -------------------------------------------------------------------------


def master_trade(api: PaperMt5Api, **request: Any) -> Any:
    """The master's own trading (a person or an EA in the terminal)."""
    defaults = {"symbol": SYMBOL, "type_filling": mt5.ORDER_FILLING_IOC}
    result = api.order_send({**defaults, **request})
    assert result.retcode in mt5.SUCCESS_RETCODES, result
    return result


async def test_master_poll_turns_terminal_changes_into_outbox_events() -> None:
    server = paper_server(server_utc_offset_s=2 * 3600)
    terminal, api = master(server, server_utc_offset_s=2 * 3600)
    assert await terminal.poll() == []

    opened = master_trade(api, action=mt5.TRADE_ACTION_DEAL, type=mt5.ORDER_TYPE_BUY,
                          volume=0.3, sl=1980.0, comment="manual")  # fmt: skip
    (event,) = await terminal.poll()
    assert isinstance(event, PositionOpened)
    assert (event.position_id, event.volume, event.price, event.sl) == (
        str(opened.order), 0.3, ASK, 1980.0,
    )  # fmt: skip
    assert abs(event.ts_ns - time.time_ns()) < 5_000_000_000  # UTC, not server time
    assert event.trace.terminal_ns > 0

    master_trade(api, action=mt5.TRADE_ACTION_SLTP, position=opened.order, sl=1985.0)
    master_trade(api, action=mt5.TRADE_ACTION_DEAL, type=mt5.ORDER_TYPE_SELL,
                 position=opened.order, volume=0.1)  # fmt: skip
    master_trade(api, action=mt5.TRADE_ACTION_PENDING, type=mt5.ORDER_TYPE_SELL_LIMIT,
                 volume=0.1, price=2010.0)  # fmt: skip
    events = await terminal.poll()
    assert [type(e) for e in events] == [PendingOrderPlaced, PositionModified, PositionReduced]
    assert (events[2].volume_before, events[2].volume_after, events[2].price) == (0.3, 0.2, BID)

    server.quote(SYMBOL, 2010.0, 2010.3)  # the sell limit triggers
    server.quote(SYMBOL, 1984.0, 1984.3)  # the buy's stop loss is hit
    events = await terminal.poll()
    assert [type(e) for e in events] == [PendingOrderTriggered, PositionClosed]
    assert (events[1].reason, events[1].volume) == ("sl", 0.2)
    assert terminal.unpublished_events() == terminal.outbox
    assert len(terminal.outbox) == 6


async def test_a_none_deal_history_never_blocks_the_poll_and_holds_closes_for_their_deals() -> None:
    server = paper_server()
    terminal, api = master(server)
    opened = master_trade(api, action=mt5.TRADE_ACTION_DEAL, type=mt5.ORDER_TYPE_BUY,
                          volume=0.2, sl=1980.0)  # fmt: skip
    assert [type(e) for e in await terminal.poll()] == [PositionOpened]

    api.history_none = True  # a quiet master: the package answers None for the window
    master_trade(api, action=mt5.TRADE_ACTION_SLTP, position=opened.order, sl=1985.0)
    master_trade(api, action=mt5.TRADE_ACTION_PENDING, type=mt5.ORDER_TYPE_SELL_LIMIT,
                 volume=0.1, price=2010.0)  # fmt: skip
    events = await terminal.poll()
    assert [type(e) for e in events] == [PendingOrderPlaced, PositionModified]

    server.quote(SYMBOL, 1984.0, 1984.3)  # the stop loss is hit; its deal is not readable
    assert await terminal.poll() == []  # held: a close without its deal would be "client"
    api.history_none = False
    (closed,) = await terminal.poll()
    assert isinstance(closed, PositionClosed)
    assert (closed.reason, closed.volume) == ("sl", 0.2)


async def test_the_server_clock_offset_is_measured_from_a_fresh_tick_not_configured() -> None:
    server = paper_server(server_utc_offset_s=3 * 3600)  # UTC+3, the config says nothing
    terminal, api = master(server, server_offset_check_s=0.001)
    assert terminal.offset_s == 3 * 3600
    master_trade(api, action=mt5.TRADE_ACTION_DEAL, type=mt5.ORDER_TYPE_BUY, volume=0.1)
    (event,) = await terminal.poll()
    assert abs(event.ts_ns - time.time_ns()) < 5_000_000_000  # UTC, not 3 hours ahead

    server.server_utc_offset_s = 2 * 3600  # DST ends: the server clock goes back an hour
    server.quote(SYMBOL, BID, ASK)
    await asyncio.sleep(0.01)  # past server_offset_check_s
    await terminal.poll()
    assert (terminal.offset_s, terminal.execution.offset_s) == (2 * 3600, 2 * 3600)


def test_a_stale_tick_keeps_the_last_offset() -> None:
    server = paper_server(server_utc_offset_s=3 * 3600)
    stale_ns = time.time_ns() - 4_800 * 1_000_000_000  # the last quote, 80 minutes ago
    server.quote(SYMBOL, BID, ASK, ts_ns=stale_ns)
    terminal, _ = master(server, server_utc_offset_s=7200)
    assert terminal.offset_s == 7200


async def test_a_stop_hit_between_the_polls_reads_is_told_with_its_reason_and_price() -> None:
    server = paper_server()
    terminal, api = master(server)
    master_trade(api, action=mt5.TRADE_ACTION_DEAL, type=mt5.ORDER_TYPE_BUY, volume=0.1,
                 sl=1985.0)  # fmt: skip
    assert [type(e) for e in await terminal.poll()] == [PositionOpened]

    api.between_reads = lambda: server.quote(SYMBOL, 1984.0, 1984.3)  # after positions_get
    events = await terminal.poll()
    events += await terminal.poll()
    (closed,) = events
    assert isinstance(closed, PositionClosed)
    assert (closed.reason, closed.price) == ("sl", 1984.0)


async def test_a_pending_trigger_between_the_polls_reads_is_no_false_cancel() -> None:
    server = paper_server()
    terminal, api = master(server)
    master_trade(api, action=mt5.TRADE_ACTION_PENDING, type=mt5.ORDER_TYPE_SELL_LIMIT,
                 volume=0.1, price=2010.0)  # fmt: skip
    assert [type(e) for e in await terminal.poll()] == [PendingOrderPlaced]

    api.between_reads = lambda: server.quote(SYMBOL, 2010.0, 2010.3)  # the limit triggers
    events = await terminal.poll()
    events += await terminal.poll()
    assert [type(e) for e in events] == [PendingOrderTriggered]


async def test_master_first_start_takes_what_is_open_as_the_baseline() -> None:
    server = paper_server()
    api = RecordingApi(server, MASTER, MASTER_LOGIN)
    master_trade(api, action=mt5.TRADE_ACTION_DEAL, type=mt5.ORDER_TYPE_BUY, volume=0.1)
    terminal = Mt5Terminal.open(config("master", MASTER), api)
    assert await terminal.poll() == []
    assert terminal.outbox == []


async def test_a_master_restarted_before_saving_re_diffs_the_change_into_the_same_ids(
    tmp_path: Path,
) -> None:
    server = paper_server()
    live, crashed_at = tmp_path / "live", tmp_path / "before-save"
    state = live / "m1.state"
    terminal, api = master(server, state_path=str(state))
    master_trade(api, action=mt5.TRADE_ACTION_DEAL, type=mt5.ORDER_TYPE_SELL, volume=0.1)
    shutil.copytree(live, crashed_at)  # the snapshot and its journal, as they were
    first = await terminal.poll()
    terminal.close()

    shutil.rmtree(live)
    shutil.copytree(crashed_at, live)  # the crash came before the poll's save
    restarted, _ = master(server, state_path=str(state))
    again = await restarted.poll()
    assert [e.event_id for e in again] == [e.event_id for e in first]
    assert len(first) == 1


async def test_master_events_reach_jetstream_once_through_the_runtime(
    nc: Client, js: JetStreamContext, tmp_path: Path
) -> None:
    server = paper_server()
    terminal, api = master(server, state_path=str(tmp_path / "m1.state"))
    connector = Mt5Connector(nc, terminal)
    await connector.start()
    try:
        opened = master_trade(api, action=mt5.TRADE_ACTION_DEAL, type=mt5.ORDER_TYPE_BUY,
                              volume=0.1)  # fmt: skip

        async def stored() -> int:
            return (await js.stream_info(MASTER_EVENTS_STREAM)).state.messages

        deadline = time.monotonic() + WAIT_S
        while await stored() < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert terminal.outbox == []
        info = await js.stream_info(MASTER_EVENTS_STREAM)
        stored_event = (await js.get_msg(MASTER_EVENTS_STREAM, info.state.last_seq)).data
        duplicate = codec.master_event_decoder.decode(stored_event)
        await connector.runtime.publish_master_events([duplicate])
        assert await stored() == 1
        assert duplicate.event_id == f"m1-{opened.order}-opened"
    finally:
        await connector.stop()


async def test_follower_order_over_nats_is_executed_and_reported(
    nc: Client, js: JetStreamContext
) -> None:
    server = paper_server()
    terminal, api = follower(server)
    runtime = ConnectorRuntime(nc, "mt5-test", terminal)
    await runtime.start()
    reports: list[ExecutionReport] = []

    async def on_report(msg: Any) -> None:
        reports.append(codec.execution_report_decoder.decode(msg.data))

    await js.subscribe(subjects.EXECUTION_REPORTS, stream=EXECUTION_REPORTS_STREAM,
                       cb=on_report, ordered_consumer=True)  # fmt: skip
    try:
        order = open_order()
        await js.publish(subjects.follower_orders(FOLLOWER), codec.encode(order))
        await wait_until(lambda: reports, "the execution report")
        (report,) = reports
        assert isinstance(report, OrderFilled)
        assert report.position_id == str(positions(api)[0].ticket)
    finally:
        await runtime.stop()
        terminal.close()


# --- account, symbols, records --------------------------------------------------------------


def test_account_state_and_symbol_specs_come_from_the_terminal() -> None:
    terminal, _ = follower(paper_server(), symbols=(SYMBOL,))
    state = terminal.account_state(FOLLOWER)
    assert (state.account, state.currency, state.balance, state.leverage) == (
        FOLLOWER, "USD", 10_000.0, 100,
    )  # fmt: skip
    (spec,) = terminal.symbol_specs(FOLLOWER)
    assert (spec.symbol, spec.contract_size, spec.tick_size, spec.tick_value, spec.digits) == (
        SYMBOL, 100.0, 0.01, 1.0, 2,
    )  # fmt: skip
    assert (spec.volume_min, spec.volume_max, spec.volume_step) == (0.01, 100.0, 0.01)
    assert spec.trade_mode is TradeMode.FULL


@pytest.mark.parametrize(
    ("code", "mode"),
    [(0, TradeMode.DISABLED), (1, TradeMode.LONG_ONLY), (2, TradeMode.SHORT_ONLY),
     (3, TradeMode.CLOSE_ONLY), (4, TradeMode.FULL)],
)  # fmt: skip
def test_symbol_trade_mode_maps_to_ours(code: int, mode: TradeMode) -> None:
    info = PaperMt5Api(paper_server(), FOLLOWER, 1).symbol_info(SYMBOL)._replace(trade_mode=code)
    spec = symbol_spec(FOLLOWER, info)
    assert spec is not None
    assert spec.trade_mode is mode


def test_a_symbol_without_a_tick_value_yet_has_no_spec() -> None:
    info = PaperMt5Api(paper_server(), FOLLOWER, 1).symbol_info(SYMBOL)
    unquoted = info._replace(trade_tick_value=0.0, trade_tick_value_profit=0.0)
    assert symbol_spec(FOLLOWER, unquoted) is None


def test_paper_records_have_the_packages_fields_in_order() -> None:
    api = PaperMt5Api(paper_server(), FOLLOWER, 1)
    api.order_send({"action": mt5.TRADE_ACTION_DEAL, "symbol": SYMBOL, "volume": 0.1,
                    "type": mt5.ORDER_TYPE_BUY, "type_filling": mt5.ORDER_FILLING_FOK})  # fmt: skip
    assert api.positions_get()[0]._fields == (
        "ticket", "time", "time_msc", "time_update", "time_update_msc", "type", "magic",
        "identifier", "reason", "volume", "price_open", "sl", "tp", "price_current", "swap",
        "profit", "symbol", "comment", "external_id",
    )  # fmt: skip
    assert api.history_deals_get(0, 2**40)[0]._fields == (
        "ticket", "order", "time", "time_msc", "type", "entry", "magic", "position_id",
        "reason", "volume", "price", "commission", "swap", "profit", "fee", "symbol", "comment",
        "external_id",
    )  # fmt: skip
    assert api.account_info()._fields[:10] == (
        "login", "trade_mode", "leverage", "limit_orders", "margin_so_mode", "trade_allowed",
        "trade_expert", "margin_mode", "currency_digits", "fifo_close",
    )  # fmt: skip
    info = api.symbol_info(SYMBOL)
    assert len(info._fields) == 96
    assert info._fields.index("filling_mode") == 26
    assert info._fields[-3:] == ("name", "page", "path")


def test_a_comment_longer_than_metatrader_keeps_is_refused_by_the_package() -> None:
    api = PaperMt5Api(paper_server(), FOLLOWER, 1)
    assert api.order_send({"action": mt5.TRADE_ACTION_DEAL, "comment": "x" * 32}) is None
    assert api.last_error()[0] == mt5.RES_E_INVALID_PARAMS


@pytest.mark.parametrize(
    ("master_id", "ref"),
    [("m1", "501"), ("a" * 64, "501"), ("m1", "9" * 40), ("b" * 64, "12345678901234567890")],
)
def test_copy_comments_fit_metatrader_and_never_collide(master_id: str, ref: str) -> None:
    comment = copy_comment(master_id, ref)
    assert len(comment) <= mt5.COMMENT_MAX
    assert comment.startswith(("tc.", "tc-"))
    assert comment != copy_comment(master_id, ref + "1")
    assert comment != copy_comment(master_id + "x", ref)
    assert len(order_marker(f"{master_id}-{ref}-closed:L1")) <= mt5.COMMENT_MAX


# --- configuration and the Windows-only package ---------------------------------------------


def test_importing_connectors_mt5_works_without_the_metatrader5_package() -> None:
    code = (
        "import sys, connectors.mt5, connectors.mt5.connector, connectors.mt5.paper;"
        "assert 'MetaTrader5' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_opening_a_terminal_without_the_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "MetaTrader5", None)  # import fails as on Linux
    with pytest.raises(TerminalUnavailable) as caught:
        Mt5Terminal.open(config())
    message = str(caught.value)
    assert "tradecopy[mt5]" in message
    assert "Windows" in message


def test_password_comes_from_the_environment_and_never_shows(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TRADECOPY_MT5_PASSWORD", "s3cret")
    cfg = config(password="")
    assert cfg.resolved_password() == "s3cret"
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    assert config(password_file=str(secret)).resolved_password() == "from-file"
    assert "s3cret" not in repr(config(password="s3cret"))
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"connector_id":"c","account_id":"a","role":"master","pasword":"x"}',
            type=Mt5Config,
        )


# --- exactly once beyond the dedup window (the order journal) -------------------------------


class WallClock:
    """The terminal's wall clock, moved by a test to age its order memory."""

    def __init__(self) -> None:
        self.now = time.time_ns()

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1_000_000_000)


def journaled_follower(
    server: PaperMt5Server, state: Path, clock: WallClock
) -> tuple[Mt5Terminal, RecordingApi]:
    api = RecordingApi(server, FOLLOWER, FOLLOWER_LOGIN)
    cfg = config(login=FOLLOWER_LOGIN, state_path=str(state))
    return Mt5Terminal.open(cfg, api, wall_clock=clock), api


@pytest.mark.parametrize("age_s", [DUPLICATE_WINDOW_S + 1, follower_orders_stream().max_age - 60])
async def test_an_order_redelivered_after_the_dedup_window_and_a_restart_trades_nothing(
    tmp_path: Path, age_s: float
) -> None:
    """The open, its partial close and its close come again long after JetStream's duplicate
    window, to a restarted terminal: each gets its first report, byte for byte (not one
    rebuilt from the terminal's evidence), and nothing is sent to the terminal."""
    server, clock, state = paper_server(), WallClock(), tmp_path / "f1.state"
    before, _ = journaled_follower(server, state, clock)
    orders = [
        open_order(volume=0.2),
        FollowerClose(**base("m1-501-reduced-1:L1"), master_position_id="501", ratio=0.5),
        FollowerClose(**base("m1-501-closed:L1"), master_position_id="501"),
    ]
    first = [await run(before, order) for order in orders]
    before.commit()
    before.close()
    assert [type(r) for r in first] == [OrderFilled] * 3

    clock.advance(age_s)
    after, api = journaled_follower(server, state, clock)
    assert [await run(after, order) for order in orders] == first
    assert api.sent == [] and positions(api) == []


def test_an_old_format_state_file_loads_into_the_journal(tmp_path: Path) -> None:
    """A state file written before the journal: one msgpack object, reports inside."""
    server, state = paper_server(), tmp_path / "f1.state"
    kept = OrderRejected(order_id="o-1", link_id="L1", follower=FOLLOWER, ts_ns=1, code=10019,
                         reason="not enough money")  # fmt: skip
    old = Mt5ConnectorState(reports={"o-1": codec.encode(kept)}, aliases={"tc.m1.9": "tc.m1.8"})
    state.write_bytes(msgspec.msgpack.encode(old))
    terminal, _ = journaled_follower(server, state, WallClock())
    assert state.read_bytes().startswith(MAGIC)
    assert dict(terminal.reports) == {"o-1": codec.encode(kept)}
    assert terminal.memory.aliases == {"tc.m1.9": "tc.m1.8"}


def test_the_evidence_search_for_unknown_outcomes_backs_off_while_nothing_turns_up() -> None:
    """Each search reads days of history: without a finding it runs half as often each time,
    down to once a minute, and a finding brings the quick pace back."""
    from connectors.mt5.connector import RESOLVE_EVERY_S, RESOLVE_MAX_S, next_resolve_delay

    delays, delay = [], RESOLVE_EVERY_S
    for _ in range(8):
        delay = next_resolve_delay(delay, found=False)
        delays.append(delay)
    assert delays[:4] == [2 * RESOLVE_EVERY_S, 4 * RESOLVE_EVERY_S, 8 * RESOLVE_EVERY_S,
                          16 * RESOLVE_EVERY_S]  # fmt: skip
    assert delays[-1] == RESOLVE_MAX_S
    assert next_resolve_delay(RESOLVE_MAX_S, found=True) == RESOLVE_EVERY_S
