"""``[paper.venue]``: configurable symbols and broker names (suffixes, aliases)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from connectors.paper.config import DEFAULT_SYMBOLS, PaperSymbol, PaperVenueConfig
from connectors.paper.names import SymbolNames
from connectors.paper.prices import Quote
from connectors.paper.venue import PaperVenue
from engine.core.statements import parse_mt4_statement
from schemas.common import Side
from schemas.master import PositionOpened

#: The real statements shipped with the tests (provenance: data/statements/README.md).
DATA = Path(__file__).parent / "data" / "statements"
STATEMENTS = ["alpari-2023", "ronnaru-2020", "onfin-2025", "startrader-2026"]


class UpConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Stands for ``tradecopy up``'s file: only the part this config is embedded in."""

    paper: PaperSection


class PaperSection(msgspec.Struct, forbid_unknown_fields=True):
    venue: PaperVenueConfig = msgspec.field(default_factory=PaperVenueConfig)


TOML = b"""
[paper.venue]
suffixes = [".", ".m", "-ecn"]
aliases = { GOLD = "XAUUSD", NAS100 = "US100" }

[[paper.venue.symbols]]
symbol = "USDJPY"
base_currency = "USD"
profit_currency = "JPY"
margin_mode = "forex"
contract_size = 100000
digits = 3

[[paper.venue.symbols]]
symbol = "XAUUSD"
profit_currency = "USD"
contract_size = 100
digits = 2
swap_long = -25.5
commission_per_lot = 3.5

[[paper.venue.symbols]]
symbol = "US100"
profit_currency = "USD"
contract_size = 10
digits = 1
"""


@pytest.mark.parametrize("name", STATEMENTS)
def test_the_defaults_trade_every_instrument_of_the_real_statements(name: str) -> None:
    statement = parse_mt4_statement(DATA / f"mt4-statement-{name}.htm")
    names = {t.symbol for t in (*statement.closed_trades, *statement.open_trades)}
    names |= {o.symbol for o in (*statement.cancelled_orders, *statement.working_orders)}
    config = PaperVenueConfig()
    assert {name: config.resolve(name) for name in names if config.resolve(name) is None} == {}


@pytest.mark.parametrize(
    ("broker", "venue"),
    [
        ("usdjpy.", "USDJPY"),  # ronnaru's suffix
        ("EURUSD.m", "EURUSD"),
        ("XAUUSD-ECN", "XAUUSD"),
        ("xauusd-ecn", "XAUUSD"),
        ("nq100_m", "US100"),  # alpari's mini index: suffix, then alias
        ("spx500_m", "US500"),  # alpari's 100 per lot
        ("spx500", "SPX500"),  # ronnaru's 250 per lot
        ("wst30_m", "US30"),
        ("brn", "UKOIL"),
        ("us_oil", "USOIL"),
        ("oilusd.", "USOIL"),
        ("jp225", "JP225"),
        ("GOLD", "XAUUSD"),
        ("gold.m", "XAUUSD"),
    ],
)
def test_broker_suffixes_and_aliases_find_the_venue_symbol(broker: str, venue: str) -> None:
    assert PaperVenueConfig().resolve(broker) == venue


@pytest.mark.parametrize("name", ["usdpln", "EURUSD.x", ".", "m"])
def test_names_the_venue_does_not_trade_resolve_to_nothing(name: str) -> None:
    assert PaperVenueConfig().resolve(name) is None


def test_only_one_suffix_comes_off_the_longest_first() -> None:
    names = SymbolNames(suffixes=[".", ".pro"])
    assert names.resolve("EURUSD.pro", ["EURUSD"]) == "EURUSD"
    assert names.resolve("EURUSD.pro.", ["EURUSD"]) is None


def test_the_venue_takes_orders_and_quotes_under_broker_names() -> None:
    venue = PaperVenue.from_config(PaperVenueConfig())
    venue.open_account("jpy-1", "JPY", 1_000_000.0, 100, money_digits=0)
    venue.on_quote(Quote(symbol="usdjpy.", bid=111.391, ask=111.401, ts_ns=1))
    quote = venue.quote("USDJPY")
    assert quote is not None and quote.symbol == "USDJPY"
    opened = venue.market_order("jpy-1", "usdjpy.", Side.BUY, 0.1)
    assert opened.ok, opened.reason
    [event] = opened.transactions
    assert isinstance(event, PositionOpened)
    assert (event.symbol, event.price) == ("USDJPY", 111.401)
    assert venue.symbol_spec("jpy-1", "usdjpy.").symbol == "USDJPY"


def test_the_up_file_embeds_the_config_as_paper_venue() -> None:
    config = msgspec.toml.decode(TOML, type=UpConfig).paper.venue
    assert [s.symbol for s in config.symbols] == ["USDJPY", "XAUUSD", "US100"]
    assert config.resolve("gold-ecn") == "XAUUSD"
    assert config.resolve("nas100") == "US100"
    usdjpy, xauusd, _ = config.symbol_configs()
    # One tick of one lot, in the profit currency: 0.001 x 100,000 = 100 JPY.
    assert (usdjpy.tick_size, usdjpy.tick_value, usdjpy.margin_ccy) == (0.001, 100.0, "USD")
    assert (xauusd.swap_long, xauusd.commission_per_lot) == (-25.5, 3.5)


def test_without_a_venue_section_the_defaults_apply() -> None:
    config = msgspec.toml.decode(b"[paper]\n", type=UpConfig).paper.venue
    assert tuple(config.symbols) == DEFAULT_SYMBOLS


@pytest.mark.parametrize(
    ("toml", "complaint"),
    [
        (b'[paper.venue]\naliases = { GOLD = "XAU" }\n', "aliases point at symbols not listed"),
        (
            b'[[paper.venue.symbols]]\nsymbol = "EURUSD"\nprofit_currency = "USD"\n'
            b'contract_size = 100000\ndigits = 5\nmargin_mode = "forex"\n'
            b"[paper.venue]\naliases = {}\n",
            "forex margin mode needs base_currency",
        ),
        (
            b'[[paper.venue.symbols]]\nsymbol = "X"\nprofit_currency = "usd"\n'
            b"contract_size = 1\ndigits = 2\n",
            "profit_currency",
        ),
        (
            b'[[paper.venue.symbols]]\nsymbol = "X"\nprofit_currency = "USD"\n'
            b"contract_size = 0\ndigits = 2\n",
            "contract_size",
        ),
        (b"[paper.venue]\nleverage = 5\n", "unknown field"),
    ],
)
def test_an_invalid_venue_config_is_refused_with_the_reason(toml: bytes, complaint: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=complaint):
        msgspec.toml.decode(toml, type=UpConfig)


def test_a_symbol_listed_twice_is_refused() -> None:
    twice = [PaperSymbol(symbol="XAUUSD", profit_currency="USD", contract_size=100.0,
                         digits=2)] * 2  # fmt: skip
    with pytest.raises(ValueError, match="listed twice"):
        PaperVenueConfig(symbols=twice, aliases={})
