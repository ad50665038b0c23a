"""Copy decisions: why a copy was skipped, reduced or a link paused."""

from __future__ import annotations

import enum

import msgspec

from schemas.common import AccountId


class DecisionOutcome(enum.StrEnum):
    SKIPPED = "skipped"
    REDUCED = "reduced"
    PAUSED = "paused"
    CLOSED_ALL = "closed_all"


class DecisionRule(enum.StrEnum):
    LINK_DISABLED = "link_disabled"
    EMERGENCY_STOP = "emergency_stop"
    LINK_PAUSED = "link_paused"
    SYMBOL_NOT_INCLUDED = "symbol_not_included"
    SYMBOL_EXCLUDED = "symbol_excluded"
    DIRECTION = "direction"
    MAGIC = "magic"
    PENDING_NOT_COPIED = "pending_not_copied"
    TRADING_HOURS = "trading_hours"
    SIGNAL_AGE = "signal_age"
    MAX_OPEN_POSITIONS = "max_open_positions"
    DAILY_TRADE_LIMIT = "daily_trade_limit"
    NO_ACCOUNT_STATE = "no_account_state"
    NO_SYMBOL_SPEC = "no_symbol_spec"
    TRADE_MODE = "trade_mode"
    NO_FX_RATE = "no_fx_rate"
    NO_STOP_LOSS = "no_stop_loss"
    ZERO_DIVISOR = "zero_divisor"
    BELOW_MIN_VOLUME = "below_min_volume"
    FORCED_MIN_VOLUME = "forced_min_volume"
    MAX_LOT = "max_lot"
    MAX_VOLUME = "max_volume"
    SL_TP_MODIFICATIONS_OFF = "sl_tp_modifications_off"
    PARTIAL_CLOSES_OFF = "partial_closes_off"
    EQUITY_STOP = "equity_stop"
    MAX_DRAWDOWN = "max_drawdown"
    DAILY_LOSS = "daily_loss"
    INTERNAL_ERROR = "internal_error"


class CopyDecision(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    decision_id: str
    """Deterministic from master event id, link and rule, so republishing deduplicates."""
    link_id: str
    master: AccountId
    follower: AccountId
    outcome: DecisionOutcome
    rule: DecisionRule
    message: str
    """The reason in words, for people."""
    ts_ns: int
    master_event_id: str = ""
    numbers: dict[str, float | str | None] = {}
    """The inputs the rule saw, e.g. ``{"volume": 0.004, "volume_min": 0.01}``."""
