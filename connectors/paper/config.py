"""The paper venue's configuration: the symbols it trades, their specs, and broker names.

``tradecopy up`` embeds :class:`PaperVenueConfig` as ``[paper.venue]``::

    [paper.venue]
    suffixes = [".", ".m", "-ecn"]          # usdjpy. / EURUSD.m / XAUUSD-ecn find the symbol
    aliases = { GOLD = "XAUUSD", NAS100 = "US100" }

    [[paper.venue.symbols]]                 # replaces the shipped defaults when given
    symbol = "USDJPY"
    base_currency = "USD"
    profit_currency = "JPY"
    margin_mode = "forex"
    contract_size = 100000
    digits = 3

The shipped defaults (:data:`DEFAULT_SYMBOLS`) cover every instrument of the four real MT4
statements in the project's test data (majors, JPY crosses, Scandinavian and CNH pairs, gold,
silver, bitcoin, oil and the US and Japanese indices), with those brokers' contract sizes.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from connectors.paper.model import MarginMode, SymbolConfig
from connectors.paper.names import SymbolNames
from schemas.account import TradeMode

Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}(?!\n)$")]
MaybeCurrency = Annotated[str, msgspec.Meta(pattern=r"^([A-Z]{3})?(?!\n)$")]
SymbolName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._#-]{1,64}(?!\n)$")]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0.0)]


class PaperSymbol(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One symbol the venue trades, as a broker specifies it (MT5's SymbolInfo)."""

    symbol: SymbolName
    profit_currency: Currency
    contract_size: PositiveFloat
    digits: Annotated[int, msgspec.Meta(ge=0, le=10)]
    base_currency: MaybeCurrency = ""
    """A currency pair's first currency: pairs also convert money for other symbols."""
    margin_currency: MaybeCurrency = ""
    """Empty: the base currency in forex mode, else the profit currency."""
    margin_mode: MarginMode = MarginMode.CFD_LEVERAGE
    tick_size: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    """0: one point (10 ** -digits)."""
    volume_min: PositiveFloat = 0.01
    volume_max: PositiveFloat = 100.0
    volume_step: PositiveFloat = 0.01
    margin_rate: PositiveFloat = 1.0
    stops_level_points: Annotated[int, msgspec.Meta(ge=0)] = 0
    trade_mode: TradeMode = TradeMode.FULL
    swap_long: float = 0.0
    """Points per lot per rollover; negative is a charge."""
    swap_short: float = 0.0
    triple_swap_weekday: Annotated[int, msgspec.Meta(ge=0, le=6)] = 2
    commission_per_lot: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    """Per lot and deal (entry and exit), in the profit currency."""

    def __post_init__(self) -> None:
        if self.volume_min > self.volume_max:
            raise ValueError(f"{self.symbol}: volume_min is above volume_max")
        if self.margin_mode is MarginMode.FOREX and not (
            self.base_currency or self.margin_currency
        ):
            raise ValueError(f"{self.symbol}: forex margin mode needs base_currency")

    def to_symbol_config(self) -> SymbolConfig:
        tick_size = self.tick_size or 10.0**-self.digits
        return SymbolConfig(
            symbol=self.symbol,
            contract_size=self.contract_size,
            tick_size=tick_size,
            tick_value=tick_size * self.contract_size,
            digits=self.digits,
            volume_min=self.volume_min,
            volume_max=self.volume_max,
            volume_step=self.volume_step,
            margin_rate=self.margin_rate,
            trade_mode=self.trade_mode,
            stops_level_points=self.stops_level_points,
            profit_currency=self.profit_currency,
            base_currency=self.base_currency,
            margin_currency=self.margin_currency,
            margin_mode=self.margin_mode,
            swap_long=self.swap_long,
            swap_short=self.swap_short,
            triple_swap_weekday=self.triple_swap_weekday,
            commission_per_lot=self.commission_per_lot,
        )


def _pair(symbol: str, digits: int | None = None) -> PaperSymbol:
    base, quote = symbol[:3], symbol[3:]
    return PaperSymbol(
        symbol=symbol,
        base_currency=base,
        profit_currency=quote,
        margin_mode=MarginMode.FOREX,
        contract_size=100_000.0,
        digits=(3 if quote == "JPY" else 5) if digits is None else digits,
    )


def _cfd(symbol: str, currency: str, contract_size: float, digits: int) -> PaperSymbol:
    return PaperSymbol(
        symbol=symbol, profit_currency=currency, contract_size=contract_size, digits=digits
    )


#: Every instrument of the statements in the test data, contract sizes as those brokers
#: booked them (profit / (price move x lots) of their trades). Where two brokers size one
#: index differently both are here: alpari's ``spx500_m`` (100 per lot) is ``US500``,
#: ronnaru's ``spx500`` (250 per lot) is ``SPX500``.
DEFAULT_SYMBOLS: tuple[PaperSymbol, ...] = (
    *(_pair(s) for s in ("EURUSD", "GBPUSD", "AUDUSD", "NZDUSD", "USDJPY", "USDCHF", "USDCAD")),
    *(_pair(s) for s in ("EURJPY", "GBPJPY", "AUDJPY", "NZDJPY", "CADJPY", "CHFJPY")),
    *(_pair(s) for s in ("EURGBP", "EURAUD", "EURCHF", "AUDCAD", "CADCHF")),
    *(_pair(s) for s in ("USDNOK", "USDSEK", "USDCNH")),
    _cfd("XAUUSD", "USD", 100.0, 2),
    _cfd("XAGUSD", "USD", 5_000.0, 3),
    _cfd("BTCUSD", "USD", 1.0, 2),
    _cfd("UKOIL", "USD", 1_000.0, 2),
    _cfd("USOIL", "USD", 1_000.0, 2),
    _cfd("US100", "USD", 10.0, 1),
    _cfd("US30", "USD", 1.0, 0),
    _cfd("US500", "USD", 100.0, 1),
    _cfd("SPX500", "USD", 250.0, 1),
    _cfd("JP225", "JPY", 1_000.0, 0),
)

#: Broker names of the statements' instruments that are not the venue's names.
DEFAULT_ALIASES: dict[str, str] = {
    "GOLD": "XAUUSD",
    "SILVER": "XAGUSD",
    "NQ100": "US100",
    "NAS100": "US100",
    "USTEC": "US100",
    "WST30": "US30",
    "DJ30": "US30",
    "SPX500_M": "US500",
    "BRN": "UKOIL",
    "BRENT": "UKOIL",
    "US_OIL": "USOIL",
    "OILUSD": "USOIL",
    "WTI": "USOIL",
    "JPN225": "JP225",
    "NIKKEI": "JP225",
}

#: Broker suffixes stripped before the lookup (longest first, case ignored).
DEFAULT_SUFFIXES: tuple[str, ...] = (".", ".m", "_m", "-ecn", ".ecn", ".pro", ".raw", "_raw")


class PaperVenueConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[paper.venue]``: what the paper venue trades and the names brokers give it."""

    symbols: list[PaperSymbol] = msgspec.field(default_factory=lambda: list(DEFAULT_SYMBOLS))
    aliases: dict[str, str] = msgspec.field(default_factory=lambda: dict(DEFAULT_ALIASES))
    """Broker name → venue symbol, case ignored (``GOLD = "XAUUSD"``)."""
    suffixes: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_SUFFIXES))
    stop_out_level: PositiveFloat = 50.0

    def __post_init__(self) -> None:
        names = [s.symbol.upper() for s in self.symbols]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"symbols listed twice: {duplicates}")
        unknown = sorted(v for v in self.aliases.values() if v.upper() not in names)
        if unknown:
            raise ValueError(f"aliases point at symbols not listed: {unknown}")

    def symbol_configs(self) -> list[SymbolConfig]:
        return [s.to_symbol_config() for s in self.symbols]

    def names(self) -> SymbolNames:
        return SymbolNames(aliases=dict(self.aliases), suffixes=list(self.suffixes))

    def resolve(self, name: str) -> str | None:
        """The venue symbol a broker name means (``usdjpy.`` → ``USDJPY``), or None."""
        return self.names().resolve(name, [s.symbol for s in self.symbols])
