"""MT4 statement parsing: four real broker statements, every section, chains and summary lines."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from engine.core.money import to_minor
from engine.core.statements import (
    Mt4Statement,
    minor_units,
    parse_mt4_statement,
    server_time_ns,
)
from schemas.common import OrderType, Side

#: The four real statements shipped with the tests (their provenance: data/statements/README.md).
STATEMENTS = Path(__file__).parent / "data" / "statements"
ALPARI = "mt4-statement-alpari-2023.htm"
ONFIN = "mt4-statement-onfin-2025.htm"
RONNARU = "mt4-statement-ronnaru-2020.htm"
STARTRADER = "mt4-statement-startrader-2026.htm"
_CACHE: dict[str, Mt4Statement] = {}


def statement(name: str) -> Mt4Statement:
    path = STATEMENTS / name
    if name not in _CACHE:
        _CACHE[name] = parse_mt4_statement(path)
    return _CACHE[name]


@pytest.mark.parametrize(
    ("name", "currency", "closed", "open_", "cancelled", "working", "balance", "pseudo"),
    [
        # ~2,066 in the data README: 2,064 trades + 25 archive pseudo-rows = MT4's 2,089.
        (ALPARI, "USD", 2064, 3, 8, 1, 126, 25),
        (ONFIN, "USD", 4520, 0, 31, 0, 7, 0),
        (RONNARU, "JPY", 1761, 22, 132, 4, 2, 0),
        (STARTRADER, "USD", 422, 0, 413, 17, 3, 0),
    ],
)
def test_every_statement_parses_into_its_sections(
    name: str,
    currency: str,
    closed: int,
    open_: int,
    cancelled: int,
    working: int,
    balance: int,
    pseudo: int,
) -> None:
    parsed = statement(name)
    assert parsed.currency == currency
    assert len(parsed.closed_trades) == closed
    assert len(parsed.open_trades) == open_
    assert len(parsed.cancelled_orders) == cancelled
    assert len(parsed.working_orders) == working
    assert len(parsed.balance_rows) == balance
    assert len(parsed.pseudo_trades) == pseudo


@pytest.mark.parametrize("name", [ALPARI, ONFIN, RONNARU])
def test_trades_and_pseudo_rows_add_up_to_mt4s_total_trades(name: str) -> None:
    parsed = statement(name)
    summary = parsed.summary
    total = len(parsed.closed_trades) + len(parsed.pseudo_trades)
    assert total == summary.total_trades
    assert summary.short_positions is not None and summary.long_positions is not None
    sells = sum(t.side is Side.SELL for t in (*parsed.closed_trades, *parsed.pseudo_trades))
    assert sells == summary.short_positions
    assert total - sells == summary.long_positions


def test_a_closed_row_reads_every_column() -> None:
    first = statement(ONFIN).closed_trades[0]
    assert (first.ticket, first.side, first.volume, first.symbol) == (
        26224746,
        Side.SELL,
        0.1,
        "xauusd",
    )
    assert first.open_time == datetime(2025, 8, 11, 17, 46, 10)
    assert first.close_time == datetime(2025, 8, 11, 17, 46, 34)
    assert (first.open_price, first.close_price) == (3346.48, 3345.97)
    assert (first.sl, first.tp) == (None, None)  # written as 0.00: no level
    assert (first.commission, first.taxes, first.swap, first.profit) == (0.0, 0.0, 0.0, 5.1)
    assert first.close_reason == "client"


def test_the_ticket_title_gives_magic_comment_and_close_reason() -> None:
    row = next(t for t in statement(STARTRADER).closed_trades if t.ticket == 42098168)
    assert (row.magic, row.comment, row.close_reason) == (8002, "The_XAUUSD_4[sl]", "sl")
    assert (row.sl, row.tp, row.close_price, row.profit) == (4545.79, 4488.79, 4545.79, -800.0)


def test_close_reasons_cover_stop_out_and_gapped_levels() -> None:
    stop_out = next(t for t in statement(ALPARI).closed_trades if t.ticket == 1523071736)
    assert stop_out.comment == "so: 59.7%/15.0/25.2" and stop_out.close_reason == "stop_out"
    gapped = next(t for t in statement(RONNARU).closed_trades if t.ticket == 10881090)
    assert gapped.comment == "[tp/gap]" and gapped.close_reason == "tp"
    reasons = Counter(t.close_reason for t in statement(ALPARI).closed_trades)
    assert reasons == {"client": 964, "sl": 870, "partial": 203, "tp": 14, "stop_out": 13}


def test_partial_close_chains_follow_the_to_links() -> None:
    parsed = statement(ALPARI)
    chains = parsed.chains()
    assert Counter(len(c) for c in chains) == {1: 1683, 2: 161, 3: 18, 4: 2}
    links = sum(t.to_ticket is not None for t in parsed.closed_trades)
    assert links == 203 == sum(len(c) - 1 for c in chains)
    for chain in chains:  # a remainder keeps the position's open time, price, side and symbol
        assert len({(p.open_time, p.open_price, p.side, p.symbol) for p in chain}) == 1
    every_row = [t.ticket for c in chains for t in c]
    assert sorted(every_row) == sorted(
        t.ticket for t in (*parsed.closed_trades, *parsed.open_trades)
    )
    four = next(c for c in chains if c[0].ticket == 1525695569)
    assert [(p.ticket, p.volume) for p in four] == [
        (1525695569, 0.02),
        (1525705399, 0.01),
        (1525705492, 0.01),
        (1525710597, 0.01),
    ]
    assert four[-1].from_ticket == 1525705492 and four[-1].close_reason == "tp"


def test_a_chain_can_end_in_a_still_open_remainder() -> None:
    parsed = statement(ALPARI)
    chain = next(c for c in parsed.chains() if c[0].ticket == 1528626815)
    assert [t.ticket for t in chain] == [1528626815, 1528658700]
    assert chain[0].to_ticket == 1528658700 and chain[0].close_reason == "partial"
    assert chain[1].close_time is None and chain[1].from_ticket == 1528626815


def test_archive_pseudo_rows_are_kept_apart_from_trades() -> None:
    parsed = statement(ALPARI)
    assert all(t.symbol == "profit" and t.open_price == 0 for t in parsed.pseudo_trades)
    assert all(t.title.startswith("Summary trade result") for t in parsed.pseudo_trades)
    assert not any(t.symbol == "profit" for t in parsed.closed_trades)


def test_detailed_summary_lines_are_read_as_written() -> None:
    summary = statement(ALPARI).summary
    assert (summary.gross_profit, summary.gross_loss, summary.total_net_profit) == (
        3302.53,
        5085.31,
        -1782.78,
    )
    assert (summary.profit_factor, summary.expected_payoff) == (0.65, -0.85)
    assert (summary.largest_profit_trade, summary.largest_loss_trade) == (224.73, -225.58)
    assert (summary.average_profit_trade, summary.average_loss_trade) == (6.94, -3.15)
    assert (summary.profit_trades, summary.profit_trades_pct) == (476, 22.79)
    assert (summary.loss_trades, summary.loss_trades_pct) == (1613, 77.21)
    assert (summary.total_trades, summary.short_won_pct, summary.long_won_pct) == (
        2089,
        22.31,
        23.21,
    )
    assert (summary.maximal_drawdown, summary.maximal_drawdown_pct) == (1896.06, 518.8)
    assert summary.relative_drawdown_pct == 518.8
    assert (summary.deposit_withdrawal, summary.balance, summary.equity) == (
        1902.77,
        119.99,
        141.83,
    )
    assert summary.text["maximum consecutive wins ($)"] == "9 (56.53)"


@pytest.mark.parametrize("name", [ALPARI, ONFIN, RONNARU, STARTRADER])
def test_summary_lines_reconcile_with_the_rows(name: str) -> None:
    parsed = statement(name)
    currency, summary = parsed.currency, parsed.summary
    rows = (*parsed.closed_trades, *parsed.pseudo_trades)

    def units(amount: float) -> int:
        return minor_units(amount, currency)

    nets = [units(t.profit) + units(t.commission) + units(t.swap) + units(t.taxes) for t in rows]
    assert summary.closed_trade_pl is not None
    assert sum(nets) == units(summary.closed_trade_pl)
    assert summary.closed_totals is not None
    commission, taxes, swap, profit = summary.closed_totals
    assert sum(units(t.commission) for t in rows) == units(commission)
    assert sum(units(t.taxes) for t in rows) == units(taxes)
    assert sum(units(t.swap) for t in rows) == units(swap)
    assert sum(units(t.profit) for t in rows) == units(profit)
    assert summary.deposit_withdrawal is not None and summary.balance is not None
    cash = sum(units(b.amount) for b in parsed.balance_rows)
    assert cash == units(summary.deposit_withdrawal)
    assert cash + sum(nets) == units(summary.balance)


def test_floating_pl_is_the_open_trades_net() -> None:
    parsed = statement(ALPARI)
    floating = sum(minor_units(t.net, "USD") for t in parsed.open_trades)
    assert parsed.summary.floating_pl is not None
    assert floating == minor_units(parsed.summary.floating_pl, "USD") == 2184


def test_a_plain_statement_has_no_detail_lines() -> None:
    summary = statement(STARTRADER).summary
    assert summary.gross_profit is None and summary.profit_factor is None
    assert summary.total_trades is None
    assert (summary.closed_trade_pl, summary.balance) == (172705.68, 62705.68)


def test_cancelled_and_working_orders_keep_their_type_and_times() -> None:
    parsed = statement(STARTRADER)
    assert all(
        o.close_time is not None and o.comment == "cancelled" for o in parsed.cancelled_orders
    )
    assert Counter(o.order_type for o in (*parsed.cancelled_orders, *parsed.working_orders)) == {
        OrderType.BUY_STOP: 273,
        OrderType.SELL_STOP: 157,
    }
    first = parsed.working_orders[0]
    assert (first.ticket, first.order_type, first.price, first.sl, first.tp) == (
        48193791,
        OrderType.BUY_STOP,
        4772.17,
        4765.17,
        4805.17,
    )
    assert first.close_time is None and first.magic == 8008
    cancelled = statement(ONFIN).cancelled_orders[0]
    assert (cancelled.magic, cancelled.comment, cancelled.close_time) == (
        777,
        "cancelled",
        datetime(2025, 9, 30, 19, 28, 31),
    )


def test_balance_rows_keep_deposits_and_withdrawals_signed() -> None:
    rows = statement(STARTRADER).balance_rows
    assert [(r.comment, r.amount) for r in rows] == [
        ("STAR-Deposit", 10000.0),
        ("STAR-Withdrawal", -35000.0),
        ("STAR-Withdrawal", -85000.0),
    ]
    assert statement(RONNARU).balance_rows[0].amount == 200000.0  # "200 000": spaced thousands


def test_a_statement_in_a_code_page_other_than_utf8_decodes() -> None:
    path = STATEMENTS / STARTRADER
    if not path.exists():
        pytest.skip(f"{path} missing")
    default = statement(STARTRADER)  # not UTF-8: read as cp1252, numbers unaffected
    assert default.working_orders[0].comment.endswith("_XAUUSD_3")
    chinese = parse_mt4_statement(path, encoding="gbk")  # what this terminal really wrote
    row = next(t for t in chinese.closed_trades if t.magic == 16384)
    assert row.comment == "预测未来版通道指标"
    assert [t.profit for t in chinese.closed_trades] == [t.profit for t in default.closed_trades]


def test_text_bytes_and_path_parse_the_same() -> None:
    path = STATEMENTS / ONFIN
    if not path.exists():
        pytest.skip(f"{path} missing")
    raw = path.read_bytes()
    from_bytes = parse_mt4_statement(raw)
    from_text = parse_mt4_statement(raw.decode("utf-8"))
    assert from_bytes == from_text == parse_mt4_statement(str(path))


def test_html_that_is_no_statement_is_refused() -> None:
    with pytest.raises(ValueError, match="Currency"):
        parse_mt4_statement("<html><body><table></table></body></html>")


def test_amounts_become_minor_units_half_even() -> None:
    assert minor_units(5.1, "USD") == 510
    assert minor_units(-1782.78, "USD") == -178278
    assert minor_units(0.125, "USD") == 12  # half-even: 12.5 cents → 12
    assert minor_units(0.135, "USD") == 14
    assert minor_units(200000.0, "JPY") == 200000
    assert minor_units(-36203.0, "JPY") == to_minor(Decimal("-36203"), "JPY")


def test_server_time_becomes_utc_nanoseconds_given_the_offset() -> None:
    moment = datetime(2025, 8, 11, 12, 29, 35)
    assert server_time_ns(moment) == 1754915375 * 10**9
    assert server_time_ns(moment, timedelta(hours=3)) == (1754915375 - 3 * 3600) * 10**9
