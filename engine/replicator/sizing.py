"""Lot sizing: every sizing mode, rounding to the follower's step, clamps and partial closes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engine.core.volume import STEP_EPSILON, decimals, min_on_step
from engine.replicator.fx import conversion_rate
from engine.replicator.notes import RuleNote
from schemas.account import AccountState, SymbolSpec
from schemas.decisions import DecisionRule
from schemas.links import (
    BalanceRatio,
    BelowMin,
    CopyLink,
    EquityRatio,
    FixedLot,
    FreeMarginRatio,
    Multiplier,
    RiskAmount,
    RiskPercent,
)


@dataclass(slots=True)
class SizedVolume:
    volume: float
    """0.0 when the copy is skipped (then ``skip`` is set)."""
    skip: RuleNote | None = None
    reductions: Sequence[RuleNote] = ()


def raw_volume(
    link: CopyLink,
    *,
    master_volume: float,
    sl_distance: float | None,
    master_state: AccountState | None,
    follower_state: AccountState,
    spec: SymbolSpec,
    fx_rates: Mapping[str, float],
) -> float | RuleNote:
    """The unrounded follower volume the link's sizing mode asks for, or why there is none."""
    sizing = link.sizing
    if isinstance(sizing, FixedLot):
        return sizing.lots
    if isinstance(sizing, Multiplier):
        return master_volume * sizing.factor
    if isinstance(sizing, BalanceRatio | EquityRatio | FreeMarginRatio):
        if master_state is None:
            return RuleNote(
                DecisionRule.NO_ACCOUNT_STATE,
                f"no account state for master {link.master}",
                {"account": link.master},
            )
        if isinstance(sizing, BalanceRatio):
            what, f_value, m_value = "balance", follower_state.balance, master_state.balance
        elif isinstance(sizing, EquityRatio):
            what, f_value, m_value = "equity", follower_state.equity, master_state.equity
        else:
            what, f_value, m_value = (
                "free_margin",
                follower_state.free_margin,
                master_state.free_margin,
            )
        rate = conversion_rate(fx_rates, follower_state.currency, master_state.currency)
        if rate is None:
            return _no_rate(follower_state.currency, master_state.currency)
        if not m_value > 0 or not math.isfinite(m_value):
            return RuleNote(
                DecisionRule.ZERO_DIVISOR,
                f"master {what} is {m_value}, cannot size a {what} ratio",
                {f"master_{what}": m_value},
            )
        return master_volume * max(f_value, 0.0) * rate / m_value * sizing.factor
    if isinstance(sizing, RiskPercent | RiskAmount):
        if sl_distance is None:
            return RuleNote(
                DecisionRule.NO_STOP_LOSS,
                "risk sizing needs a stop loss and the master set none",
                {},
            )
        if not sl_distance > 0:
            return RuleNote(
                DecisionRule.ZERO_DIVISOR,
                "stop loss sits at the open price: risk per lot is zero",
                {"sl_distance": sl_distance},
            )
        loss_per_lot = sl_distance / spec.tick_size * spec.tick_value
        if not (loss_per_lot > 0 and math.isfinite(loss_per_lot)):
            # A stop a few ulps from the open underflows to 0 (or a huge one overflows).
            return RuleNote(
                DecisionRule.ZERO_DIVISOR,
                f"risk per lot is {loss_per_lot:g}: the stop loss cannot size a risk",
                {"sl_distance": sl_distance, "loss_per_lot": loss_per_lot},
            )
        if isinstance(sizing, RiskPercent):
            risk_money = max(follower_state.equity, 0.0) * sizing.percent / 100.0
        else:
            currency = sizing.currency or follower_state.currency
            rate = conversion_rate(fx_rates, currency, follower_state.currency)
            if rate is None:
                return _no_rate(currency, follower_state.currency)
            risk_money = sizing.amount * rate
        return risk_money / loss_per_lot
    raise TypeError(f"unknown sizing mode {type(sizing).__name__}")  # pragma: no cover


def _no_rate(base: str, quote: str) -> RuleNote:
    return RuleNote(
        DecisionRule.NO_FX_RATE,
        f"no exchange rate {base}/{quote} to convert between the accounts",
        {"base": base, "quote": quote},
    )


def fit_to_symbol(link: CopyLink, volume: float, spec: SymbolSpec) -> SizedVolume:
    """Round down to the step, clamp to the symbol's max and the link's cap, handle below-min."""
    step = spec.volume_step
    if not math.isfinite(volume) or volume < 0:
        return SizedVolume(
            0.0,
            RuleNote(DecisionRule.ZERO_DIVISOR, "sizing gave no finite volume", {"volume": volume}),
        )
    reductions: list[RuleNote] = []  # usually stays empty: no allocation is shared
    link_caps = link.max_lot is not None and link.max_lot < spec.volume_max
    cap = link.max_lot if link_caps else spec.volume_max
    if volume > cap:
        if link_caps:
            note = RuleNote(
                DecisionRule.MAX_LOT,
                f"volume {volume:.4g} capped at the link's max lot {link.max_lot:g}",
                {"volume": volume, "max_lot": link.max_lot},
            )
        else:
            note = RuleNote(
                DecisionRule.MAX_VOLUME,
                f"volume {volume:.4g} capped at the symbol's max {spec.volume_max:g}",
                {"volume": volume, "volume_max": spec.volume_max},
            )
        reductions.append(note)
        volume_in_cap = cap
    else:
        volume_in_cap = volume
    # Rounding down is monotonic, so rounding the capped volume also keeps it under the cap.
    # (Inline round_down_to_step: volume_in_cap is finite and ≤ the symbol's max here.)
    sized = (
        round(math.floor(volume_in_cap / step + STEP_EPSILON) * step, decimals(step))
        if volume_in_cap > 0
        else 0.0
    )
    if sized >= spec.volume_min:
        return SizedVolume(sized, None, reductions or ())
    numbers: dict[str, float | str | None] = {
        "volume": volume,
        "volume_min": spec.volume_min,
        "volume_step": step,
    }
    forced = min_on_step(spec)
    if forced > cap:
        return SizedVolume(
            0.0,
            RuleNote(
                DecisionRule.MAX_LOT,
                f"the link's max lot {link.max_lot} is below the symbol's minimum "
                f"{spec.volume_min:g}",
                numbers | {"max_lot": link.max_lot},
            ),
        )
    if link.below_min is BelowMin.FORCE_MIN and volume > 0:
        reductions.append(
            RuleNote(
                DecisionRule.FORCED_MIN_VOLUME,
                f"volume {volume:.4g} is below the minimum, raised to {forced:g}",
                numbers,
            )
        )
        return SizedVolume(forced, None, reductions)
    return SizedVolume(
        0.0,
        RuleNote(
            DecisionRule.BELOW_MIN_VOLUME,
            f"volume {volume:.4g} is below the symbol's minimum {spec.volume_min:g}",
            numbers,
        ),
    )


def size_follower_volume(
    link: CopyLink,
    *,
    master_volume: float,
    sl_distance: float | None,
    master_state: AccountState | None,
    follower_state: AccountState,
    spec: SymbolSpec,
    fx_rates: Mapping[str, float],
) -> SizedVolume:
    """The follower's volume for a master open of ``master_volume`` lots."""
    raw = raw_volume(
        link,
        master_volume=master_volume,
        sl_distance=sl_distance,
        master_state=master_state,
        follower_state=follower_state,
        spec=spec,
        fx_rates=fx_rates,
    )
    if isinstance(raw, RuleNote):
        return SizedVolume(0.0, raw)
    return fit_to_symbol(link, raw, spec)
