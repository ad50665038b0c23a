"""MetaTrader 4 account statements (HTML "Statement" / "Detailed Statement") as typed records.

API (stable; the paper venue drives a paper master from it)::

    statement = parse_mt4_statement(path_or_text)   # Path, str path, HTML str or bytes
    parse_mt4_statement(path, encoding="gbk")        # the terminal's code page, when known
    statement.currency                # "USD", "JPY": the deposit currency
    statement.closed_trades           # list[StatementTrade], file order, pseudo-rows left out
    statement.open_trades             # list[StatementTrade], close_time None, close_price = market
    statement.cancelled_orders        # list[StatementOrder], closed section, ``cancelled``
    statement.working_orders          # list[StatementOrder], pending at statement time
    statement.balance_rows            # list[BalanceRow]: deposits, withdrawals, other credits
    statement.pseudo_trades           # list[StatementTrade]: broker summary rows, not trades
    statement.summary                 # StatementSummary: MT4's own summary lines (None = absent)
    statement.chains()                # list[list[StatementTrade]]: partial-close chains
    minor_units(amount, currency)     # a float as written → int minor units, half-even
    server_time_ns(moment, utc_offset=timedelta(0))  # server time → UTC nanoseconds

    StatementTrade: ticket, open_time, side, volume, symbol, open_price, sl, tp, close_time,
        close_price, commission, taxes, swap, profit, title, magic, comment;
        .net (profit + commission + swap + taxes), .close_reason ("sl", "tp", "stop_out",
        "partial", "client"), .to_ticket / .from_ticket (partial-close links)
    StatementOrder: ticket, open_time, order_type, volume, symbol, price, sl, tp, close_time,
        market_price, title, magic, comment
    BalanceRow: ticket, time, kind ("balance" or "credit"), comment, amount

Times are the broker's server time exactly as written (naive ``datetime``): a statement does not
say its server's UTC offset. ``server_time_ns`` turns one into UTC nanoseconds given the offset.
Money is ``float`` as written (thousands separated by spaces in the file); ``minor_units`` makes
it exact. S/L and T/P written as 0 mean "none" and are ``None`` here.

MT4 writes a partial close as two tickets: the closed part keeps the ticket with the closed size
and the comment ``to #B``; the remainder is a new ticket B with the same open time and price and
the comment ``from #A`` (until B is itself partly closed and becomes ``to #C``). The title of a
ticket cell is ``#<magic> <comment>`` when the order had a magic number, else the comment.

Some brokers (Alpari) archive old history into pseudo-rows: type ``buy``, size 0.01, item
``profit``, prices 0, titled "Summary trade result Q4 2013". They are no trades and go to
``pseudo_trades``, never to ``closed_trades``; MT4's own summary counts them, so callers that
compare with it add them back explicitly.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from engine.core.money import to_minor
from schemas.common import OrderType, Side

_ROW = re.compile(r"<tr\b[^>]*>(.*?)</tr>", re.S | re.I)
_CELL = re.compile(r"<td\b([^>]*)>(.*?)</td>", re.S | re.I)
_TITLE = re.compile(r'title="([^"]*)"', re.I)
_TAG = re.compile(r"<[^>]+>")
_MAGIC = re.compile(r"^#(\d+) (.*)$", re.S)
_LINK = re.compile(r"^(from|to) #(\d+)")
_SECTION = re.compile(r"<b>\s*(Closed Transactions|Open Trades|Working Orders|Summary|Details):")
_COUNT_PCT = re.compile(r"^(-?[\d .]+)\s*\(\s*(-?[\d .]+)%\s*\)$")
_PCT_AMOUNT = re.compile(r"^(-?[\d .]+)%\s*\(\s*(-?[\d .]+)\s*\)$")
_TIME_FORMAT = "%Y.%m.%d %H:%M:%S"
_PENDING_TYPES = {t.value.replace("_", " "): t for t in OrderType}
#: The item of a broker's archive pseudo-row (see the module docstring).
PSEUDO_ITEM = "profit"


@dataclass(frozen=True, slots=True)
class StatementTrade:
    """One market position row (closed or still open) of a statement."""

    ticket: int
    open_time: datetime
    side: Side
    volume: float
    symbol: str
    open_price: float
    sl: float | None
    tp: float | None
    close_time: datetime | None
    """``None`` for a trade still open at statement time."""
    close_price: float
    """The close price; for an open trade, the market price at statement time."""
    commission: float
    taxes: float
    swap: float
    profit: float
    title: str = ""
    magic: int = 0
    comment: str = ""

    @property
    def net(self) -> float:
        """Profit + commission + swap + taxes: what the trade did to the balance."""
        return self.profit + self.commission + self.swap + self.taxes

    @property
    def to_ticket(self) -> int | None:
        """The remainder's ticket when this row is the closed part of a partial close."""
        match = _LINK.match(self.comment)
        return int(match.group(2)) if match and match.group(1) == "to" else None

    @property
    def from_ticket(self) -> int | None:
        """The ticket this remainder was split from (``from #N``)."""
        match = _LINK.match(self.comment)
        return int(match.group(2)) if match and match.group(1) == "from" else None

    @property
    def close_reason(self) -> str:
        """``sl``, ``tp``, ``stop_out``, ``partial`` (the part closed of a partial close) or
        ``client`` (closed by the trader or an expert), from the terminal's comment."""
        comment = self.comment
        if "[sl" in comment:
            return "sl"
        if "[tp" in comment:
            return "tp"
        if comment.startswith("so:"):
            return "stop_out"
        if self.to_ticket is not None:
            return "partial"
        return "client"


@dataclass(frozen=True, slots=True)
class StatementOrder:
    """One pending order row: cancelled (closed section) or working (still pending)."""

    ticket: int
    open_time: datetime
    order_type: OrderType
    volume: float
    symbol: str
    price: float
    sl: float | None
    tp: float | None
    close_time: datetime | None
    """When it was cancelled; ``None`` for a working order."""
    market_price: float
    title: str = ""
    magic: int = 0
    comment: str = ""


@dataclass(frozen=True, slots=True)
class BalanceRow:
    """A balance operation: deposit (+), withdrawal (−), dividend, transfer, bonus."""

    ticket: int
    time: datetime
    kind: str
    """``balance`` or ``credit``, as the statement's type column says."""
    comment: str
    amount: float


@dataclass(frozen=True, slots=True)
class StatementSummary:
    """The statement's own summary lines; ``None`` where the file has no such line."""

    deposit_withdrawal: float | None = None
    credit_facility: float | None = None
    closed_trade_pl: float | None = None
    floating_pl: float | None = None
    margin: float | None = None
    balance: float | None = None
    equity: float | None = None
    free_margin: float | None = None
    gross_profit: float | None = None
    gross_loss: float | None = None
    """As MT4 writes it: a positive number (the size of the summed losses)."""
    total_net_profit: float | None = None
    profit_factor: float | None = None
    expected_payoff: float | None = None
    absolute_drawdown: float | None = None
    maximal_drawdown: float | None = None
    maximal_drawdown_pct: float | None = None
    relative_drawdown_pct: float | None = None
    total_trades: int | None = None
    short_positions: int | None = None
    short_won_pct: float | None = None
    long_positions: int | None = None
    long_won_pct: float | None = None
    profit_trades: int | None = None
    profit_trades_pct: float | None = None
    """The win rate in percent, as MT4 rounds it (two decimals)."""
    loss_trades: int | None = None
    loss_trades_pct: float | None = None
    largest_profit_trade: float | None = None
    largest_loss_trade: float | None = None
    average_profit_trade: float | None = None
    average_loss_trade: float | None = None
    closed_totals: tuple[float, float, float, float] | None = None
    """The closed section's column sums: commission, taxes, swap, profit."""
    text: dict[str, str] = field(default_factory=dict)
    """Every summary label (lower case, e.g. ``"largest profit trade"``) → its text as written."""


@dataclass(frozen=True, slots=True)
class Mt4Statement:
    """One statement: header, every section's rows and the summary lines."""

    broker: str
    account: str
    currency: str
    generated: str
    """The statement's own time stamp, as written (``2023 July 29, 13:27``)."""
    closed_trades: list[StatementTrade]
    open_trades: list[StatementTrade]
    cancelled_orders: list[StatementOrder]
    working_orders: list[StatementOrder]
    balance_rows: list[BalanceRow]
    pseudo_trades: list[StatementTrade]
    summary: StatementSummary

    def chains(self) -> list[list[StatementTrade]]:
        """Every position's rows in order, following ``to #N`` links through partial closes.

        A position never partly closed is a chain of one. A chain's last row is the final close,
        or an open trade when the remainder is still open. A link to a ticket the statement
        does not hold ends the chain there.
        """
        by_ticket = {t.ticket: t for t in (*self.closed_trades, *self.open_trades)}
        targets = {t.to_ticket for t in by_ticket.values() if t.to_ticket is not None}
        chains: list[list[StatementTrade]] = []
        for trade in (*self.closed_trades, *self.open_trades):
            if trade.ticket in targets:
                continue  # a remainder: its chain starts at the split position
            chain = [trade]
            seen = {trade.ticket}
            nxt = trade.to_ticket
            while nxt is not None and nxt in by_ticket and nxt not in seen:
                piece = by_ticket[nxt]
                chain.append(piece)
                seen.add(nxt)
                nxt = piece.to_ticket
            chains.append(chain)
        return chains


def minor_units(amount: float, currency: str) -> int:
    """A statement amount (float as written) in integer minor units, rounded half-even.

    ``repr`` of a float is its shortest round-trip decimal, i.e. the digits the file wrote.
    """
    return to_minor(Decimal(repr(amount)), currency)


def server_time_ns(moment: datetime, utc_offset: timedelta = timedelta(0)) -> int:
    """A statement time (broker server time) in UTC nanoseconds, given the server's offset."""
    utc = (moment - utc_offset).replace(tzinfo=UTC)
    return int(utc.timestamp()) * 1_000_000_000 + utc.microsecond * 1000


def parse_mt4_statement(source: str | bytes | Path, encoding: str | None = None) -> Mt4Statement:
    """Parse an MT4 statement from a path, its HTML text or its raw bytes.

    MT4 writes the file in the terminal's ANSI code page and does not name it. Without
    ``encoding``, UTF-8 is tried, then cp1252 (undecodable bytes become U+FFFD); only comments
    can hold non-ASCII text, so numbers and times never depend on it. A terminal on a Chinese
    Windows writes GBK: pass ``encoding="gbk"`` to read its comments as written.
    """
    text = _read(source, encoding)
    header = text.split("Closed Transactions:", 1)[0]
    broker = _first(r'font: 20pt[^"]*"><b>(.*?)</b>', header)
    account = _first(r"<b>Account:\s*(.*?)</b>", header)
    currency = _first(r"<b>Currency:\s*([A-Za-z]{3})\s*</b>", header)
    if not currency:
        raise ValueError("not an MT4 statement: no 'Currency:' in the header")
    generated = _first(r"<td colspan=\d+ align=right><b>(\d{4} \w+ \d+, [\d:]+)</b>", header)
    parts = _SECTION.split(text)
    sections: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sections[name] = body
    closed_rows = sections.get("Closed Transactions", "")
    closed, pseudo, cancelled, balance, totals = _closed_section(closed_rows)
    open_trades, _, _, _, _ = _closed_section(sections.get("Open Trades", ""))
    _, _, working, _, _ = _closed_section(sections.get("Working Orders", ""))
    summary = _summary(sections.get("Summary", "") + sections.get("Details", ""), totals)
    return Mt4Statement(
        broker=html.unescape(_TAG.sub("", broker)).strip(),
        account=html.unescape(account).strip(),
        currency=currency.upper(),
        generated=generated,
        closed_trades=closed,
        open_trades=open_trades,
        cancelled_orders=cancelled,
        working_orders=working,
        balance_rows=balance,
        pseudo_trades=pseudo,
        summary=summary,
    )


def _read(source: str | bytes | Path, encoding: str | None) -> str:
    if isinstance(source, str) and "<" in source:
        return source
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    if encoding is not None:
        return raw.decode(encoding)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # MT4 writes statements in the terminal's ANSI code page; cp1252 is the western one.
        return raw.decode("cp1252", errors="replace")


def _first(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.S)
    return match.group(1) if match else ""


def _cells(row: str) -> list[tuple[str, str]]:
    """(attributes, text) of every cell of a row, entities decoded, tags stripped."""
    return [
        (attrs, html.unescape(_TAG.sub("", body)).replace("\xa0", " ").strip())
        for attrs, body in _CELL.findall(row)
    ]


def _number(text: str) -> float:
    cleaned = text.replace(" ", "").replace("\xa0", "")
    return float(cleaned) if cleaned else 0.0


def _level(text: str) -> float | None:
    value = _number(text)
    return value if value != 0 else None


def _time(text: str) -> datetime | None:
    return datetime.strptime(text, _TIME_FORMAT) if text else None


def _magic_and_comment(title: str) -> tuple[int, str]:
    match = _MAGIC.match(title)
    if match:
        return int(match.group(1)), match.group(2)
    return 0, title


def _closed_section(
    body: str,
) -> tuple[
    list[StatementTrade],
    list[StatementTrade],
    list[StatementOrder],
    list[BalanceRow],
    tuple[float, float, float, float] | None,
]:
    """Rows of a trade table: trades, pseudo-rows, pending orders, balance rows, column sums."""
    trades: list[StatementTrade] = []
    pseudo: list[StatementTrade] = []
    orders: list[StatementOrder] = []
    balance: list[BalanceRow] = []
    totals: tuple[float, float, float, float] | None = None
    for row in _ROW.findall(body):
        title_match = _TITLE.search(row.split("</td>", 1)[0])
        title = html.unescape(title_match.group(1)) if title_match else ""
        cells = _cells(row)
        texts = [text for _, text in cells]
        if len(cells) == 5 and cells[0][0].strip().startswith("colspan=10"):
            totals = (_number(texts[1]), _number(texts[2]), _number(texts[3]), _number(texts[4]))
            continue
        if len(cells) < 5 or not texts[0].isdigit():
            continue  # headers, comment lines under a trade, "No transactions", sums
        ticket, kind = int(texts[0]), texts[2].lower()
        magic, comment = _magic_and_comment(title)
        if kind in ("balance", "credit") and len(cells) == 5:
            moment = _time(texts[1])
            if moment is not None:
                comment = texts[3] or title
                balance.append(BalanceRow(ticket, moment, kind, comment, _number(texts[4])))
            continue
        opened = _time(texts[1])
        if opened is None:
            continue
        if kind in ("buy", "sell") and len(cells) >= 14:
            trade = StatementTrade(
                ticket=ticket, open_time=opened, side=Side(kind), volume=_number(texts[3]),
                symbol=texts[4], open_price=_number(texts[5]), sl=_level(texts[6]),
                tp=_level(texts[7]), close_time=_time(texts[8]), close_price=_number(texts[9]),
                commission=_number(texts[10]), taxes=_number(texts[11]), swap=_number(texts[12]),
                profit=_number(texts[13]), title=title, magic=magic, comment=comment,
            )  # fmt: skip
            is_pseudo = trade.symbol.lower() == PSEUDO_ITEM and trade.open_price == 0
            (pseudo if is_pseudo else trades).append(trade)
        elif kind in _PENDING_TYPES and len(cells) >= 10:
            orders.append(StatementOrder(
                ticket=ticket, open_time=opened, order_type=_PENDING_TYPES[kind],
                volume=_number(texts[3]), symbol=texts[4], price=_number(texts[5]),
                sl=_level(texts[6]), tp=_level(texts[7]), close_time=_time(texts[8]),
                market_price=_number(texts[9]), title=title, magic=magic, comment=comment,
            ))  # fmt: skip
    return trades, pseudo, orders, balance, totals


_AMOUNTS = {
    "deposit/withdrawal": "deposit_withdrawal",
    "credit facility": "credit_facility",
    "closed trade p/l": "closed_trade_pl",
    "floating p/l": "floating_pl",
    "margin": "margin",
    "balance": "balance",
    "equity": "equity",
    "free margin": "free_margin",
    "gross profit": "gross_profit",
    "gross loss": "gross_loss",
    "total net profit": "total_net_profit",
    "profit factor": "profit_factor",
    "expected payoff": "expected_payoff",
    "absolute drawdown": "absolute_drawdown",
    "largest profit trade": "largest_profit_trade",
    "largest loss trade": "largest_loss_trade",
    "average profit trade": "average_profit_trade",
    "average loss trade": "average_loss_trade",
}
_COUNTS = {
    "short positions (won %)": ("short_positions", "short_won_pct"),
    "long positions (won %)": ("long_positions", "long_won_pct"),
    "profit trades (% of total)": ("profit_trades", "profit_trades_pct"),
    "loss trades (% of total)": ("loss_trades", "loss_trades_pct"),
}


def _summary(body: str, totals: tuple[float, float, float, float] | None) -> StatementSummary:
    text: dict[str, str] = {}
    for row in _ROW.findall(body):
        cells = [t for _, t in _cells(row)]
        prefix = ""
        i = 0
        while i < len(cells):
            label = cells[i]
            if label in ("Largest", "Average", "Maximum", "Maximal"):
                prefix = label.lower() + " "
            elif label.endswith(":") and i + 1 < len(cells):
                text[prefix + label[:-1].lower()] = cells[i + 1]
                i += 1
            i += 1
    values: dict[str, object] = {"closed_totals": totals, "text": text}
    for label, name in _AMOUNTS.items():
        if label in text:
            values[name] = _number(text[label])
    for label, (count, pct) in _COUNTS.items():
        match = _COUNT_PCT.match(text.get(label, ""))
        if match:
            values[count] = int(_number(match.group(1)))
            values[pct] = _number(match.group(2))
    if "total trades" in text:
        values["total_trades"] = int(_number(text["total trades"]))
    match = _COUNT_PCT.match(text.get("maximal drawdown", ""))
    if match:
        values["maximal_drawdown"] = _number(match.group(1))
        values["maximal_drawdown_pct"] = _number(match.group(2))
    match = _PCT_AMOUNT.match(text.get("relative drawdown", ""))
    if match:
        values["relative_drawdown_pct"] = _number(match.group(1))
    return StatementSummary(**values)  # type: ignore[arg-type]
