"""The copy link: how one follower account copies one master account."""

from __future__ import annotations

import enum
import re
from typing import Annotated

import msgspec

from schemas.common import AccountId
from schemas.orders import DeviationPolicy

PositiveFloat = Annotated[float, msgspec.Meta(gt=0.0)]
Percent = Annotated[float, msgspec.Meta(gt=0.0, le=100.0)]
# Counts: int64 on the wire, like every integer (msgpack carries no wider one).
PositiveInt = Annotated[int, msgspec.Meta(gt=0, le=2**63 - 1)]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}(?!\n)$")]
# (?!\n) before $: a bare $ also matches before a trailing newline ("ok\n").
LINK_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}(?!\n)$"
_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d\Z")
# MetaTrader magic numbers: int in MT4, ulong in MT5 (in practice far below 2**63).
Magic = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


# Sizing modes: a tagged union, ``mode = "..."`` in the link file.


class FixedLot(_Config, tag="fixed_lot", tag_field="mode"):
    lots: PositiveFloat


class Multiplier(_Config, tag="multiplier", tag_field="mode"):
    factor: PositiveFloat = 1.0


class BalanceRatio(_Config, tag="balance_ratio", tag_field="mode"):
    """Master volume × follower balance / master balance × factor."""

    factor: PositiveFloat = 1.0


class EquityRatio(_Config, tag="equity_ratio", tag_field="mode"):
    factor: PositiveFloat = 1.0


class FreeMarginRatio(_Config, tag="free_margin_ratio", tag_field="mode"):
    factor: PositiveFloat = 1.0


class RiskPercent(_Config, tag="risk_percent", tag_field="mode"):
    """Lose ``percent`` of follower equity if the stop loss is hit; no SL, no copy."""

    percent: Percent


class RiskAmount(_Config, tag="risk_amount", tag_field="mode"):
    """Lose ``amount`` (in ``currency``, default the follower's) if the stop loss is hit."""

    amount: PositiveFloat
    currency: Currency | None = None


Sizing = (
    FixedLot | Multiplier | BalanceRatio | EquityRatio | FreeMarginRatio | RiskPercent | RiskAmount
)


class BelowMin(enum.StrEnum):
    SKIP = "skip"
    FORCE_MIN = "force_min"


class Direction(enum.StrEnum):
    BOTH = "both"
    BUY_ONLY = "buy_only"
    SELL_ONLY = "sell_only"


class ProtectionAction(enum.StrEnum):
    PAUSE = "pause"
    """Stop opening new copies; closes and modifications still follow the master."""
    CLOSE_ALL = "close_all"
    """Pause, and close everything this link opened."""


class TradingHours(_Config):
    """Open new copies only inside ``start``–``end`` local time on ``days`` (1 = Monday).

    ``end`` before ``start`` spans midnight. Closes and modifications are never held back.
    """

    start: str
    end: str
    timezone: str = "Europe/Berlin"
    days: list[Annotated[int, msgspec.Meta(ge=1, le=7)]] = msgspec.field(
        default_factory=lambda: [1, 2, 3, 4, 5, 6, 7]
    )

    def __post_init__(self) -> None:
        problems = trading_hours_problems(self.start, self.end, self.timezone)
        if problems:
            raise ValueError(problems[0][1])


def trading_hours_problems(start: object, end: object, timezone: object) -> list[tuple[str, str]]:
    """Every invalid field of a trading-hours window as ``(field, message)``."""
    problems = []
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, str) or not _HHMM.match(value):
            problems.append((name, f"`{name}` must be HH:MM (24h), got {value!r}"))
    if not _is_time_zone(timezone):
        problems.append(("timezone", f"`timezone` {timezone!r} is not a known time zone"))
    return problems


def _is_time_zone(name: object) -> bool:
    from zoneinfo import ZoneInfo

    if not isinstance(name, str) or not name:
        return False
    try:
        ZoneInfo(name)
    except Exception:  # ZoneInfoNotFoundError, ValueError, or OSError for "Europe" and
        return False  # over-long names: all mean "not a time zone"
    return True


class SymbolMapping(_Config):
    """Master symbol → follower symbol: explicit pairs first, then prefix/suffix rules.

    ``strip_prefix``/``strip_suffix`` remove the master broker's decoration, then
    ``add_prefix``/``add_suffix`` add the follower's. Case is preserved throughout.
    """

    pairs: dict[str, str] = {}
    strip_prefix: str = ""
    strip_suffix: str = ""
    add_prefix: str = ""
    add_suffix: str = ""


class CopyLink(_Config):
    link_id: Annotated[str, msgspec.Meta(pattern=LINK_ID_PATTERN)]
    master: AccountId
    follower: AccountId
    enabled: bool = True

    sizing: Sizing = Multiplier()
    max_lot: PositiveFloat | None = None
    """Cap on every follower order's volume (also the protection 'max lot per order')."""
    below_min: BelowMin = BelowMin.SKIP

    symbols_include: list[str] = []
    """When not empty, only these master symbols are copied (case-insensitive)."""
    symbols_exclude: list[str] = []
    symbol_mapping: SymbolMapping = SymbolMapping()
    direction: Direction = Direction.BOTH
    copy_pending: bool = True
    magic_include: list[Magic] = []
    magic_exclude: list[Magic] = []
    trading_hours: TradingHours | None = None
    reverse: bool = False
    copy_sl_tp: bool = True
    copy_sl_tp_modifications: bool = True
    copy_partial_closes: bool = True
    magic: Magic = 0
    """Magic number stamped on the follower's orders."""

    max_open_positions: PositiveInt | None = None
    max_signal_age_ms: Annotated[int, msgspec.Meta(gt=0, le=86_400_000)] | None = None
    max_price_deviation: PositiveFloat | None = None
    """In price units of the follower's symbol (e.g. 0.50 on XAUUSD)."""
    deviation_policy: DeviationPolicy = DeviationPolicy.SKIP
    deviation_wait_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 0
    daily_trade_limit: PositiveInt | None = None
    """New copies per day, the day in Europe/Berlin."""

    equity_stop: PositiveFloat | None = None
    """Follower equity at or below this (deposit currency) triggers the protection action."""
    max_drawdown_percent: Percent | None = None
    """Equity this far below its peak triggers the protection action."""
    daily_loss_percent: Percent | None = None
    """Equity this far below the day's starting equity (Europe/Berlin day) triggers it."""
    protection_action: ProtectionAction = ProtectionAction.PAUSE

    def __post_init__(self) -> None:
        problems = link_problems(
            self.master, self.follower, self.symbols_include, self.symbols_exclude
        )
        if problems:
            raise ValueError(problems[0][1])


def link_problems(
    master: object, follower: object, include: object, exclude: object
) -> list[tuple[str, str]]:
    """Cross-field problems of a link as ``(field, message)``."""
    problems = []
    if isinstance(master, str) and master == follower:
        problems.append(("follower", "`follower` must differ from `master`"))
    if isinstance(include, list) and isinstance(exclude, list):
        overlap = {str(s).upper() for s in include} & {str(s).upper() for s in exclude}
        if overlap:
            problems.append(
                (
                    "symbols_exclude",
                    f"`symbols_exclude` repeats symbols of `symbols_include`: {sorted(overlap)}",
                )
            )
    return problems
