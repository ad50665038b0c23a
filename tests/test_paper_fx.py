"""Money in another currency on the paper venue: profit, margin, swap and commission converted
to the account currency at the live conversion quote, on MT5's side, worked out by hand.

Prices are the ones the project's real MT4 statements wrote for these symbols (alpari 2023:
USDJPY 133.355, GBPJPY 163.776, EURUSD 1.08854, GBPUSD 1.24655; ronnaru 2020: EURUSD 1.12593,
USDJPY 111.391, EURJPY 122.438, JP225 21723), with a spread of a few points around them.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from connectors.paper import fx
from connectors.paper.config import PaperSymbol, PaperVenueConfig
from connectors.paper.model import Retcode
from connectors.paper.prices import Quote
from connectors.paper.venue import PaperVenue
from schemas.common import Side
from schemas.master import PositionClosed, PositionReduced

USD, JPY = "usd-1", "jpy-1"
MONDAY_NOON = int(datetime(2023, 6, 5, 12, tzinfo=UTC).timestamp()) * 1_000_000_000
HOUR = 3_600 * 1_000_000_000


def venue(config: PaperVenueConfig | None = None) -> PaperVenue:
    paper = PaperVenue.from_config(config or PaperVenueConfig())
    paper.open_account(USD, "USD", 100_000.0, 100)
    paper.open_account(JPY, "JPY", 10_000_000.0, 100, money_digits=0)
    return paper


def quote(paper: PaperVenue, symbol: str, bid: float, ask: float, ts: int = MONDAY_NOON) -> None:
    paper.on_quote(Quote(symbol=symbol, bid=bid, ask=ask, ts_ns=ts))


def balance(paper: PaperVenue, account: str) -> float:
    return paper.account_state(account).balance


# ------------------------------------------------------------------- which pair, which side


@pytest.mark.parametrize(
    ("source", "target", "pairs", "multiply"),
    [
        ("JPY", "USD", "USDJPY", (False,)),  # direct pair, the money is its quote: divide
        ("GBP", "USD", "GBPUSD", (True,)),  # the money is the base: multiply
        ("USD", "JPY", "USDJPY", (True,)),
        ("CHF", "JPY", "CHFJPY", (True,)),  # a direct cross wins over going through USD
        ("CAD", "NOK", "USDCAD*USDNOK", (False, True)),  # no CADNOK: through USD
        ("USD", "USD", "", ()),
    ],
)
def test_the_conversion_is_the_direct_or_inverse_pair_else_a_cross_through_usd(
    source: str, target: str, pairs: str, multiply: tuple[bool, ...]
) -> None:
    symbols = venue().symbols
    conversion = fx.find_conversion(symbols, source, target)
    assert conversion is not None
    assert conversion.pairs == pairs
    assert tuple(leg.multiply for leg in conversion.legs) == multiply


def test_a_currency_no_pair_reaches_has_no_conversion() -> None:
    assert fx.find_conversion(venue().symbols, "USD", "EUR") is not None
    assert fx.find_conversion(venue().symbols, "USD", "PLN") is None


def test_a_gain_converts_at_the_side_that_makes_it_smaller_a_loss_at_the_larger() -> None:
    usdjpy = {"USDJPY": Quote(symbol="USDJPY", bid=133.855, ask=133.865, ts_ns=1)}
    gbpusd = {"GBPUSD": Quote(symbol="GBPUSD", bid=1.24655, ask=1.24665, ts_ns=1)}
    divide = fx.Conversion("JPY", "USD", (fx.ConversionLeg("USDJPY", False),))
    multiply = fx.Conversion("GBP", "USD", (fx.ConversionLeg("GBPUSD", True),))
    # Dividing: a gain by the ask (smaller), a loss by the bid (larger).
    assert fx.convert_money(divide, usdjpy, 49_000.0) == pytest.approx(49_000 / 133.865)
    assert fx.convert_money(divide, usdjpy, -51_000.0) == pytest.approx(-51_000 / 133.855)
    # Multiplying: a gain at the bid, a loss at the ask.
    assert fx.convert_money(multiply, gbpusd, 200.0) == pytest.approx(200 * 1.24655)
    assert fx.convert_money(multiply, gbpusd, -200.0) == pytest.approx(-200 * 1.24665)
    # Margin: a buy's at the larger side, a sell's at the smaller.
    assert fx.margin_rate(multiply, gbpusd, Side.BUY) == 1.24665
    assert fx.margin_rate(multiply, gbpusd, Side.SELL) == 1.24655
    assert fx.margin_rate(divide, usdjpy, Side.BUY) == pytest.approx(1 / 133.855)


# ------------------------------------------------------------------------ a USD account


def test_usdjpy_on_a_usd_account_converts_its_yen_profit_at_usdjpy_itself() -> None:
    paper = venue()
    quote(paper, "USDJPY", 133.355, 133.365)
    opened = paper.market_order(USD, "USDJPY", Side.BUY, 1.0)
    assert (opened.price, opened.conversion) == (133.365, "USDJPY")
    # Forex margin in the base currency, USD: 1 lot x 100,000 / 100 = 1,000.00, no conversion.
    assert paper.account_state(USD).margin == 1_000.00
    quote(paper, "USDJPY", 133.855, 133.865, MONDAY_NOON + HOUR)
    closed = paper.close_position(USD, opened.position_id or "")
    # 0.490 x 100,000 x 1 lot = 49,000 JPY, a gain: / ask 133.865 = 366.0404 → 366.04.
    assert closed.profit == 366.04
    assert balance(paper, USD) == 100_366.04
    [event] = closed.transactions
    assert isinstance(event, PositionClosed)
    assert (event.price, event.profit, event.commission, event.swap) == (
        133.855,
        366.04,
        0.0,
        0.0,
    )


def test_a_usdjpy_loss_converts_at_the_bid() -> None:
    paper = venue()
    quote(paper, "USDJPY", 133.355, 133.365)
    sold = paper.market_order(USD, "USDJPY", Side.SELL, 1.0)
    quote(paper, "USDJPY", 133.855, 133.865, MONDAY_NOON + HOUR)
    # Sold at 133.355, bought back at 133.865: -0.510 x 100,000 = -51,000 JPY, a loss:
    # / bid 133.855 = -381.0093 → -381.01 (the ask would have said -380.98).
    assert paper.close_position(USD, sold.position_id or "").profit == -381.01


def test_gbpjpy_on_a_usd_account_takes_profit_by_usdjpy_and_margin_by_gbpusd() -> None:
    paper = venue()
    quote(paper, "USDJPY", 133.855, 133.865)
    quote(paper, "GBPUSD", 1.24655, 1.24665)
    quote(paper, "GBPJPY", 163.776, 163.786)
    bought = paper.market_order(USD, "GBPJPY", Side.BUY, 1.0)
    assert bought.ok, bought.reason
    # Margin: 1 lot x 100,000 GBP / 100 = 1,000 GBP; a buy's at the GBPUSD ask: 1,246.65 USD.
    assert paper.account_state(USD).margin == 1_246.65
    assert paper.positions(USD)[0].conversion == "USDJPY"
    quote(paper, "GBPJPY", 164.276, 164.286, MONDAY_NOON + HOUR)
    closed = paper.close_position(USD, bought.position_id or "")
    # 164.276 - 163.786 = 0.490 x 100,000 = 49,000 JPY / USDJPY ask 133.865 = 366.04 USD.
    assert (closed.profit, closed.conversion) == (366.04, "USDJPY")


def test_eurgbp_on_a_usd_account_takes_profit_by_gbpusd_and_margin_by_eurusd() -> None:
    paper = venue()
    quote(paper, "GBPUSD", 1.24655, 1.24665)
    quote(paper, "EURUSD", 1.08854, 1.08864)
    # EURGBP from the same statement's EURUSD / GBPUSD: 0.87324.
    quote(paper, "EURGBP", 0.87324, 0.87334)
    sold = paper.market_order(USD, "EURGBP", Side.SELL, 1.0)
    assert sold.ok, sold.reason
    # Margin: 1,000 EUR; a sell's at the EURUSD bid: 1,088.54 USD.
    assert paper.account_state(USD).margin == 1_088.54
    quote(paper, "EURGBP", 0.87114, 0.87124, MONDAY_NOON + HOUR)
    closed = paper.close_position(USD, sold.position_id or "")
    # Sold 0.87324, bought back 0.87124: 200 GBP, a gain, x GBPUSD bid 1.24655 = 249.31 USD.
    assert (closed.profit, closed.conversion) == (249.31, "GBPUSD")


def test_jp225_on_a_usd_account_converts_yen_by_usdjpy() -> None:
    paper = venue()
    quote(paper, "USDJPY", 133.355, 133.365)
    quote(paper, "JP225", 21_718.0, 21_723.0)
    bought = paper.market_order(USD, "JP225", Side.BUY, 0.1)
    # CFD margin: 0.1 x 1,000 x 21,723 / 100 = 21,723 JPY; a buy's at the larger side,
    # dividing by the bid 133.355: 162.896 → 162.90 USD.
    assert paper.account_state(USD).margin == 162.90
    quote(paper, "USDJPY", 133.855, 133.865, MONDAY_NOON + HOUR)
    quote(paper, "JP225", 21_819.0, 21_824.0, MONDAY_NOON + HOUR)
    closed = paper.close_position(USD, bought.position_id or "")
    # 21,819 - 21,723 = 96 points x 1,000 x 0.1 = 9,600 JPY / ask 133.865 = 71.714 → 71.71.
    assert (closed.profit, closed.conversion) == (71.71, "USDJPY")


def test_floating_profit_and_equity_are_in_the_account_currency() -> None:
    paper = venue()
    quote(paper, "USDJPY", 133.355, 133.365)
    paper.market_order(USD, "USDJPY", Side.BUY, 1.0)
    quote(paper, "USDJPY", 133.855, 133.865, MONDAY_NOON + HOUR)
    assert paper.account_state(USD).equity == 100_366.04


# ------------------------------------------------------------------------ a JPY account


def test_eurusd_on_a_jpy_account_takes_profit_by_usdjpy_and_margin_by_eurjpy() -> None:
    paper = venue()
    quote(paper, "USDJPY", 111.391, 111.401)
    quote(paper, "EURJPY", 122.438, 122.448)
    quote(paper, "EURUSD", 1.12593, 1.12603)
    bought = paper.market_order(JPY, "EURUSD", Side.BUY, 1.0)
    assert (bought.ok, bought.conversion) == (True, "USDJPY")
    # Margin: 1,000 EUR; a buy's at the EURJPY ask: 122,448 JPY (no minor unit in yen).
    assert paper.account_state(JPY).margin == 122_448
    quote(paper, "EURUSD", 1.12803, 1.12813, MONDAY_NOON + HOUR)
    closed = paper.close_position(JPY, bought.position_id or "")
    # 1.12803 - 1.12603 = 0.00200 x 100,000 = 200 USD, a gain, x USDJPY bid 111.391
    # = 22,278.2 → 22,278 JPY.
    assert closed.profit == 22_278
    assert balance(paper, JPY) == 10_022_278


def test_a_partial_close_reports_the_converted_profit_of_the_closed_part() -> None:
    paper = venue()
    quote(paper, "USDJPY", 111.391, 111.401)
    quote(paper, "EURJPY", 122.438, 122.448)
    quote(paper, "EURUSD", 1.12593, 1.12603)
    bought = paper.market_order(JPY, "EURUSD", Side.BUY, 1.0)
    quote(paper, "EURUSD", 1.12803, 1.12813, MONDAY_NOON + HOUR)
    reduced = paper.close_position(JPY, bought.position_id or "", 0.4)
    [event] = reduced.transactions
    assert isinstance(event, PositionReduced)
    # 0.00200 x 100,000 x 0.4 = 80 USD x 111.391 = 8,911.28 → 8,911 JPY.
    assert (event.profit, event.commission, event.swap) == (8_911, 0.0, 0.0)
    # The remainder holds its share of the margin: 0.6 x 122,448 = 73,468.8 → 73,469 yen.
    assert paper.account_state(JPY).margin == 73_469


# ---------------------------------------------------------------------- refusals


def test_without_the_conversion_quote_an_open_is_refused_with_the_pair_it_needs() -> None:
    paper = venue()
    quote(paper, "GBPUSD", 1.24655, 1.24665)
    quote(paper, "GBPJPY", 163.776, 163.786)
    refused = paper.market_order(USD, "GBPJPY", Side.BUY, 1.0)
    assert (refused.ok, refused.retcode) == (False, Retcode.PRICE_OFF)
    assert refused.reason == (
        "no quote for USDJPY yet: it converts the JPY profit of GBPJPY to USD"
    )
    assert paper.positions(USD) == []
    quote(paper, "USDJPY", 133.855, 133.865)
    assert paper.market_order(USD, "GBPJPY", Side.BUY, 1.0).ok


def test_without_the_margin_conversion_quote_an_open_is_refused_too() -> None:
    paper = venue()
    quote(paper, "USDJPY", 133.855, 133.865)
    quote(paper, "GBPJPY", 163.776, 163.786)
    refused = paper.market_order(USD, "GBPJPY", Side.BUY, 1.0)
    assert refused.retcode == Retcode.PRICE_OFF
    assert "GBPUSD" in refused.reason and "GBP margin" in refused.reason


def test_a_symbol_no_configured_pair_converts_is_refused_and_named() -> None:
    only_yen = PaperVenueConfig(
        symbols=[
            PaperSymbol(symbol="JP225", profit_currency="JPY", contract_size=1_000.0, digits=0)
        ],
        aliases={},
    )
    paper = venue(only_yen)
    quote(paper, "JP225", 21_718.0, 21_723.0)
    refused = paper.market_order(USD, "JP225", Side.BUY, 0.1)
    assert (refused.ok, refused.retcode) == (False, Retcode.INVALID)
    assert "no pair that converts JPY to USD" in refused.reason
    assert paper.conversion(USD, "JP225") is None
    assert paper.market_order(JPY, "JP225", Side.BUY, 0.1).ok  # yen on a yen account


def test_the_symbol_spec_tick_value_is_in_the_account_currency() -> None:
    paper = venue()
    quote(paper, "USDJPY", 133.855, 133.865)
    spec = paper.symbol_spec(USD, "USDJPY")
    # One tick (0.001) of one lot is 100 JPY; the losing side divides by the bid.
    assert spec.tick_value == pytest.approx(100 / 133.855)


# ------------------------------------------------------------------- swap and commission


def with_costs(**fields: float) -> PaperVenueConfig:
    defaults = PaperVenueConfig()
    symbols = [
        msgspec.structs.replace(s, **fields) if s.symbol in ("USDJPY", "EURUSD") else s
        for s in defaults.symbols
    ]
    return msgspec.structs.replace(defaults, symbols=symbols)


def test_swap_accrues_per_rollover_in_the_account_currency_triple_on_wednesday_night() -> None:
    paper = venue(with_costs(swap_long=-5.0))
    quote(paper, "USDJPY", 133.355, 133.365)
    bought = paper.market_order(USD, "USDJPY", Side.BUY, 1.0)
    tuesday = int(datetime(2023, 6, 6, 0, 0, 1, tzinfo=UTC).timestamp()) * 1_000_000_000
    quote(paper, "USDJPY", 133.355, 133.365, tuesday)
    # Monday night: -5 points x 0.001 x 100,000 = -500 JPY, a charge: / bid 133.355 = -3.75.
    assert paper.positions(USD)[0].swap == -3.75
    thursday = tuesday + 2 * 24 * HOUR
    quote(paper, "USDJPY", 133.355, 133.365, thursday)
    # Tuesday night -3.75 again, Wednesday night three days: -1,500 JPY / 133.355 = -11.25.
    assert paper.positions(USD)[0].swap == -18.75
    # Equity: floating -0.010 x 100,000 = -1,000 JPY / bid 133.355 = -7.50, plus the swap.
    assert paper.account_state(USD).equity == 100_000 - 7.50 - 18.75
    closed = paper.close_position(USD, bought.position_id or "")
    [event] = closed.transactions
    assert isinstance(event, PositionClosed)
    assert event.swap == -18.75
    assert balance(paper, USD) == round(100_000 + (event.profit or 0) - 18.75, 2)


def test_commission_is_charged_on_entry_and_exit_and_reported_on_the_close() -> None:
    paper = venue(with_costs(commission_per_lot=3.5))
    quote(paper, "EURUSD", 1.08854, 1.08864)
    bought = paper.market_order(USD, "EURUSD", Side.BUY, 2.0)
    # 3.5 USD x 2 lots on the entry deal, booked at once.
    assert (bought.commission, balance(paper, USD)) == (-7.0, 99_993.0)
    quote(paper, "EURUSD", 1.08954, 1.08964, MONDAY_NOON + HOUR)
    reduced = paper.close_position(USD, bought.position_id or "", 0.5)
    [event] = reduced.transactions
    assert isinstance(event, PositionReduced)
    # 0.5 lot: exit 1.75 plus its quarter of the entry 1.75; profit 0.00090 x 50,000 = 45.
    assert (event.profit, event.commission) == (45.0, -3.5)
    closed = paper.close_position(USD, bought.position_id or "")
    assert (closed.profit, closed.commission) == (135.0, -10.5)
    assert balance(paper, USD) == 100_000 - 7.0 + 45.0 - 1.75 + 135.0 - 5.25
