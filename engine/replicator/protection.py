"""Account protection: equity stop, max drawdown, daily loss, and the price-deviation check."""

from __future__ import annotations

import msgspec

from engine.core.calendar import trading_day
from engine.replicator.notes import RuleNote
from engine.replicator.state import LinkState
from schemas.account import AccountState
from schemas.decisions import DecisionRule
from schemas.links import CopyLink


def has_equity_protection(link: CopyLink) -> bool:
    return (
        link.equity_stop is not None
        or link.max_drawdown_percent is not None
        or link.daily_loss_percent is not None
    )


def check_equity(
    link: CopyLink, account: AccountState, state: LinkState, today: str
) -> RuleNote | None:
    """The first protection the follower's equity breaches, if any."""
    equity = account.equity
    if link.equity_stop is not None and equity <= link.equity_stop:
        return RuleNote(
            DecisionRule.EQUITY_STOP,
            f"equity {equity:.2f} {account.currency} is at or below the stop "
            f"{link.equity_stop:.2f}",
            {"equity": equity, "equity_stop": link.equity_stop},
        )
    peak = max(state.peak_equity or equity, equity)
    if link.max_drawdown_percent is not None and peak > 0:
        drawdown = (peak - equity) / peak * 100.0
        if drawdown >= link.max_drawdown_percent:
            return RuleNote(
                DecisionRule.MAX_DRAWDOWN,
                f"drawdown {drawdown:.2f}% from peak equity {peak:.2f} reached the limit "
                f"{link.max_drawdown_percent:g}%",
                {"equity": equity, "peak_equity": peak, "limit_percent": link.max_drawdown_percent},
            )
    start = state.day_start_equity if state.day == today else None
    if link.daily_loss_percent is not None and start is not None and start > 0:
        loss = (start - equity) / start * 100.0
        if loss >= link.daily_loss_percent:
            return RuleNote(
                DecisionRule.DAILY_LOSS,
                f"today's loss {loss:.2f}% from {start:.2f} reached the limit "
                f"{link.daily_loss_percent:g}%",
                {
                    "equity": equity,
                    "day_start_equity": start,
                    "limit_percent": link.daily_loss_percent,
                },
            )
    return None


def track_equity(
    link: CopyLink, account: AccountState, state: LinkState, now_ns: int
) -> tuple[LinkState, RuleNote | None]:
    """Fold one follower account update into the link state; pause on a breach.

    Returns the new state (equal to ``state`` when nothing changed) and the trigger that
    paused the link, if this update paused it.
    """
    today = trading_day(now_ns)
    new = msgspec.structs.replace(state)
    if new.day != today:
        new.day = today
        new.opened = []
        new.day_start_equity = account.equity
    elif new.day_start_equity is None:
        new.day_start_equity = account.equity
    if new.peak_equity is None or account.equity > new.peak_equity:
        new.peak_equity = account.equity
    trigger = None
    if not new.is_paused(today):
        trigger = check_equity(link, account, new, today)
        if trigger is not None:
            new.paused = True
            new.paused_rule = trigger.rule.value
            new.paused_ns = now_ns
            new.paused_day = today if trigger.rule is DecisionRule.DAILY_LOSS else ""
            new.close_all_pending = link.protection_action.value == "close_all"
    return new, trigger
