"""The ledger's statistics read model: the folds of ``engine.core.performance``."""

from __future__ import annotations

from engine.core.performance import (
    MONTHS_SHOWN,
    TRADING_DAYS_PER_YEAR,
    AccountStats,
    ClosedTrade,
    EquitySample,
    StatsAccumulator,
    account_stats,
    closed_trades,
    compute_stats,
    link_stats,
    max_drawdown,
    sharpe,
)

__all__ = [
    "MONTHS_SHOWN", "TRADING_DAYS_PER_YEAR", "AccountStats", "ClosedTrade", "EquitySample",
    "StatsAccumulator", "account_stats", "closed_trades", "compute_stats", "link_stats",
    "max_drawdown", "sharpe",
]  # fmt: skip
