"""Lot sizing: every sizing mode, step rounding, clamps, below-min handling, partial closes."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.core.volume import close_ratio, partial_close_volume, round_down_to_step
from engine.replicator.sizing import (
    RuleNote,
    SizedVolume,
    fit_to_symbol,
    raw_volume,
    size_follower_volume,
)
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

MASTER = "master-1"
FOLLOWER = "follower-1"


def make_link(**kwargs: object) -> CopyLink:
    return CopyLink(link_id="L1", master=MASTER, follower=FOLLOWER, **kwargs)  # type: ignore[arg-type]


def account(
    account_id: str,
    *,
    currency: str = "USD",
    balance: float = 10_000.0,
    equity: float | None = None,
    free_margin: float | None = None,
) -> AccountState:
    return AccountState(
        account=account_id,
        ts_ns=0,
        currency=currency,
        balance=balance,
        equity=balance if equity is None else equity,
        free_margin=balance if free_margin is None else free_margin,
    )


def spec(
    *,
    symbol: str = "EURUSD",
    tick_size: float = 0.00001,
    tick_value: float = 1.0,
    volume_min: float = 0.01,
    volume_max: float = 100.0,
    volume_step: float = 0.01,
) -> SymbolSpec:
    return SymbolSpec(
        account=FOLLOWER,
        symbol=symbol,
        contract_size=100_000.0,
        tick_size=tick_size,
        tick_value=tick_value,
        digits=5,
        volume_min=volume_min,
        volume_max=volume_max,
        volume_step=volume_step,
    )


XAUUSD = spec(symbol="XAUUSD", tick_size=0.01, tick_value=1.0)


def size(
    link: CopyLink,
    *,
    master_volume: float = 1.0,
    sl_distance: float | None = None,
    master_state: AccountState | None = None,
    follower_state: AccountState | None = None,
    symbol: SymbolSpec | None = None,
    fx_rates: dict[str, float] | None = None,
) -> SizedVolume:
    return size_follower_volume(
        link,
        master_volume=master_volume,
        sl_distance=sl_distance,
        master_state=master_state,
        follower_state=follower_state or account(FOLLOWER),
        spec=symbol or spec(),
        fx_rates=fx_rates or {},
    )


def rules_of(notes: list[RuleNote]) -> list[DecisionRule]:
    return [note.rule for note in notes]


# --- sizing modes ---------------------------------------------------------------------------


def test_fixed_lot_ignores_master_volume() -> None:
    sized = size(make_link(sizing=FixedLot(lots=0.25)), master_volume=7.0)
    assert sized.volume == 0.25
    assert sized.skip is None
    assert sized.reductions == ()


def test_multiplier_scales_master_volume() -> None:
    sized = size(make_link(sizing=Multiplier(factor=2.5)), master_volume=0.4)
    assert sized.volume == pytest.approx(1.0)
    assert sized.skip is None


def test_default_sizing_is_one_to_one_multiplier() -> None:
    assert size(make_link(), master_volume=0.37).volume == pytest.approx(0.37)


def test_balance_ratio_same_currency() -> None:
    sized = size(
        make_link(sizing=BalanceRatio()),
        master_volume=1.0,
        master_state=account(MASTER, balance=100_000.0),
        follower_state=account(FOLLOWER, balance=5_000.0),
    )
    assert sized.volume == pytest.approx(0.05)


def test_balance_ratio_applies_factor() -> None:
    sized = size(
        make_link(sizing=BalanceRatio(factor=3.0)),
        master_volume=1.0,
        master_state=account(MASTER, balance=100_000.0),
        follower_state=account(FOLLOWER, balance=5_000.0),
    )
    assert sized.volume == pytest.approx(0.15)


def test_equity_ratio_uses_equity_not_balance() -> None:
    sized = size(
        make_link(sizing=EquityRatio()),
        master_volume=2.0,
        master_state=account(MASTER, balance=1_000_000.0, equity=20_000.0),
        follower_state=account(FOLLOWER, balance=1.0, equity=1_000.0),
    )
    assert sized.volume == pytest.approx(0.1)


def test_free_margin_ratio_uses_free_margin() -> None:
    sized = size(
        make_link(sizing=FreeMarginRatio()),
        master_volume=1.0,
        master_state=account(MASTER, balance=50_000.0, free_margin=10_000.0),
        follower_state=account(FOLLOWER, balance=50_000.0, free_margin=2_500.0),
    )
    assert sized.volume == pytest.approx(0.25)


@pytest.mark.parametrize(
    "sizing", [BalanceRatio(), EquityRatio(), FreeMarginRatio()], ids=lambda s: type(s).__name__
)
def test_ratio_modes_convert_eur_follower_into_usd_master_currency(sizing: object) -> None:
    # 10,000 EUR at EURUSD 1.10 is 11,000 USD against the master's 10,000 USD: ratio 1.1.
    sized = size(
        make_link(sizing=sizing),
        master_volume=1.0,
        master_state=account(MASTER, currency="USD", balance=10_000.0),
        follower_state=account(FOLLOWER, currency="EUR", balance=10_000.0),
        fx_rates={"EURUSD": 1.10},
    )
    assert sized.skip is None
    assert sized.volume == pytest.approx(1.1)


def test_ratio_mode_converts_through_inverse_rate() -> None:
    # Only USDEUR is known (0.8): 10,000 EUR = 12,500 USD.
    sized = size(
        make_link(sizing=BalanceRatio()),
        master_volume=1.0,
        master_state=account(MASTER, currency="USD", balance=10_000.0),
        follower_state=account(FOLLOWER, currency="EUR", balance=10_000.0),
        fx_rates={"USDEUR": 0.8},
    )
    assert sized.volume == pytest.approx(1.25)


def test_ratio_mode_without_fx_rate_skips_with_no_fx_rate() -> None:
    sized = size(
        make_link(sizing=BalanceRatio()),
        master_state=account(MASTER, currency="USD"),
        follower_state=account(FOLLOWER, currency="EUR"),
        fx_rates={"GBPJPY": 190.0},
    )
    assert sized.volume == 0.0
    assert sized.skip is not None
    assert sized.skip.rule is DecisionRule.NO_FX_RATE


def test_ratio_mode_without_master_state_skips_with_no_account_state() -> None:
    sized = size(make_link(sizing=EquityRatio()), master_state=None)
    assert sized.volume == 0.0
    assert sized.skip is not None
    assert sized.skip.rule is DecisionRule.NO_ACCOUNT_STATE


@pytest.mark.parametrize("master_balance", [0.0, -100.0, math.nan, math.inf])
def test_master_balance_zero_or_invalid_skips_with_zero_divisor(master_balance: float) -> None:
    sized = size(
        make_link(sizing=BalanceRatio()),
        master_state=account(MASTER, balance=master_balance),
    )
    assert sized.volume == 0.0
    assert sized.skip is not None
    assert sized.skip.rule is DecisionRule.ZERO_DIVISOR


def test_ratio_mode_with_negative_follower_equity_skips_below_min() -> None:
    sized = size(
        make_link(sizing=EquityRatio(), below_min=BelowMin.FORCE_MIN),
        master_state=account(MASTER, balance=10_000.0),
        follower_state=account(FOLLOWER, balance=10.0, equity=-50.0),
    )
    assert sized.volume == 0.0
    assert sized.skip is not None
    assert sized.skip.rule is DecisionRule.BELOW_MIN_VOLUME


def test_risk_percent_hand_computed_xauusd() -> None:
    # 1 % of 10,000 = 100 USD; 10.00 / 0.01 ticks * 1.0 USD = 1,000 USD per lot -> 0.1 lots.
    sized = size(
        make_link(sizing=RiskPercent(percent=1.0)),
        sl_distance=10.0,
        follower_state=account(FOLLOWER, equity=10_000.0),
        symbol=XAUUSD,
    )
    assert sized.skip is None
    assert sized.volume == pytest.approx(0.1)


def test_risk_percent_raw_volume_is_unrounded() -> None:
    raw = raw_volume(
        make_link(sizing=RiskPercent(percent=2.0)),
        master_volume=1.0,
        sl_distance=3.0,
        master_state=None,
        follower_state=account(FOLLOWER, equity=10_000.0),
        spec=XAUUSD,
        fx_rates={},
    )
    # 200 USD / (3.00 / 0.01 * 1.0) = 200 / 300
    assert isinstance(raw, float)
    assert raw == pytest.approx(2.0 / 3.0)


def test_risk_percent_result_rounds_down_to_step() -> None:
    sized = size(
        make_link(sizing=RiskPercent(percent=2.0)),
        sl_distance=3.0,
        follower_state=account(FOLLOWER, equity=10_000.0),
        symbol=XAUUSD,
    )
    assert sized.volume == 0.66


def test_risk_percent_without_stop_loss_skips_with_no_stop_loss() -> None:
    sized = size(make_link(sizing=RiskPercent(percent=1.0)), sl_distance=None, symbol=XAUUSD)
    assert sized.volume == 0.0
    assert sized.skip is not None
    assert sized.skip.rule is DecisionRule.NO_STOP_LOSS


def test_risk_sizing_with_stop_at_open_price_skips_with_zero_divisor() -> None:
    sized = size(make_link(sizing=RiskPercent(percent=1.0)), sl_distance=0.0, symbol=XAUUSD)
    assert sized.volume == 0.0
    assert sized.skip is not None
    assert sized.skip.rule is DecisionRule.ZERO_DIVISOR


@pytest.mark.parametrize(
    ("sl_distance", "tick_size", "tick_value"),
    [(5e-324, 1.0, 0.5), (5e-324, 10.0, 1.0), (1e308, 1e-5, 1e10)],
)
def test_a_stop_whose_risk_per_lot_underflows_or_overflows_skips_instead_of_failing(
    sl_distance: float, tick_size: float, tick_value: float
) -> None:
    symbol = spec(tick_size=tick_size, tick_value=tick_value)
    sized = size(make_link(sizing=RiskPercent(percent=1.0)), sl_distance=sl_distance,
                 symbol=symbol)  # fmt: skip
    assert sized.volume == 0.0
    assert sized.skip is not None
    assert sized.skip.rule is DecisionRule.ZERO_DIVISOR


def test_risk_amount_in_follower_currency() -> None:
    # 50 USD / (5.00 / 0.01 * 1.0) = 0.1 lots.
    sized = size(make_link(sizing=RiskAmount(amount=50.0)), sl_distance=5.0, symbol=XAUUSD)
    assert sized.volume == pytest.approx(0.1)


def test_risk_amount_in_other_currency_is_converted() -> None:
    # 100 EUR at EURUSD 1.2 = 120 USD; 120 / (4.00 / 0.01 * 1.0) = 0.3 lots.
    sized = size(
        make_link(sizing=RiskAmount(amount=100.0, currency="EUR")),
        sl_distance=4.0,
        follower_state=account(FOLLOWER, currency="USD"),
        symbol=XAUUSD,
        fx_rates={"EURUSD": 1.2},
    )
    assert sized.volume == pytest.approx(0.3)


def test_risk_amount_in_unconvertible_currency_skips_with_no_fx_rate() -> None:
    sized = size(
        make_link(sizing=RiskAmount(amount=100.0, currency="CHF")),
        sl_distance=4.0,
        symbol=XAUUSD,
    )
    assert sized.volume == 0.0
    assert sized.skip is not None
    assert sized.skip.rule is DecisionRule.NO_FX_RATE


def test_risk_amount_without_stop_loss_skips_with_no_stop_loss() -> None:
    sized = size(make_link(sizing=RiskAmount(amount=100.0)), sl_distance=None, symbol=XAUUSD)
    assert sized.skip is not None
    assert sized.skip.rule is DecisionRule.NO_STOP_LOSS


# --- rounding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("volume", "step", "expected"),
    [
        (0.07, 0.01, 0.07),
        (0.0699, 0.01, 0.06),
        (0.29, 0.01, 0.29),
        (1.0, 0.01, 1.0),
        (0.123456, 0.001, 0.123),
        (0.79, 0.1, 0.7),
        (0.3, 0.1, 0.3),
        (2.99, 1.0, 2.0),
        (3.0, 1.0, 3.0),
        (0.5, 1.0, 0.0),
        (0.0, 0.01, 0.0),
        (-1.0, 0.01, 0.0),
        (math.inf, 0.01, 0.0),
        (math.nan, 0.01, 0.0),
        (1.0, 0.0, 0.0),
    ],
)
def test_round_down_to_step(volume: float, step: float, expected: float) -> None:
    assert round_down_to_step(volume, step) == expected


def test_round_down_to_step_never_raises_for_huge_finite_volume() -> None:
    result = round_down_to_step(1e308, 0.001)
    assert math.isfinite(result)
    assert result <= 1e308


# --- clamps and below-min -------------------------------------------------------------------


def test_volume_above_symbol_max_is_clamped_with_max_volume_note() -> None:
    sized = size(make_link(), master_volume=250.0, symbol=spec(volume_max=100.0))
    assert sized.volume == 100.0
    assert sized.skip is None
    assert rules_of(sized.reductions) == [DecisionRule.MAX_VOLUME]


def test_volume_above_link_max_lot_is_clamped_with_max_lot_note() -> None:
    sized = size(make_link(max_lot=0.5), master_volume=2.0)
    assert sized.volume == 0.5
    assert rules_of(sized.reductions) == [DecisionRule.MAX_LOT]


def test_max_lot_off_step_is_rounded_down_to_step() -> None:
    sized = size(make_link(max_lot=0.555), master_volume=2.0)
    assert sized.volume == 0.55
    assert rules_of(sized.reductions) == [DecisionRule.MAX_LOT]


def test_max_lot_above_symbol_max_falls_back_to_symbol_max() -> None:
    sized = size(make_link(max_lot=500.0), master_volume=300.0, symbol=spec(volume_max=100.0))
    assert sized.volume == 100.0
    assert rules_of(sized.reductions) == [DecisionRule.MAX_VOLUME]


def test_volume_under_all_caps_has_no_reduction() -> None:
    sized = size(make_link(max_lot=5.0), master_volume=1.0)
    assert sized.volume == 1.0
    assert sized.reductions == ()


def test_below_min_skips_by_default() -> None:
    sized = size(make_link(), master_volume=0.004)
    assert sized.volume == 0.0
    assert sized.skip is not None
    assert sized.skip.rule is DecisionRule.BELOW_MIN_VOLUME
    assert sized.skip.numbers["volume_min"] == 0.01


def test_below_min_with_force_min_returns_min_and_note() -> None:
    sized = size(make_link(below_min=BelowMin.FORCE_MIN), master_volume=0.004)
    assert sized.volume == 0.01
    assert sized.skip is None
    assert rules_of(sized.reductions) == [DecisionRule.FORCED_MIN_VOLUME]


def test_force_min_uses_min_on_step_grid() -> None:
    sized = size(
        make_link(below_min=BelowMin.FORCE_MIN),
        master_volume=0.01,
        symbol=spec(volume_min=0.15, volume_step=0.1),
    )
    assert sized.volume == 0.2


def test_force_min_does_not_force_zero_volume() -> None:
    sized = size(make_link(sizing=Multiplier(), below_min=BelowMin.FORCE_MIN), master_volume=0.0)
    assert sized.volume == 0.0
    assert sized.skip is not None
    assert sized.skip.rule is DecisionRule.BELOW_MIN_VOLUME


def test_max_lot_below_symbol_min_skips_with_max_lot_even_with_force_min() -> None:
    sized = size(
        make_link(max_lot=0.05, below_min=BelowMin.FORCE_MIN),
        master_volume=1.0,
        symbol=spec(volume_min=0.1, volume_step=0.1),
    )
    assert sized.volume == 0.0
    assert sized.skip is not None
    assert sized.skip.rule is DecisionRule.MAX_LOT


@pytest.mark.parametrize("volume", [math.nan, math.inf, -math.inf, -0.5])
def test_fit_to_symbol_rejects_non_finite_or_negative_volume(volume: float) -> None:
    sized = fit_to_symbol(make_link(below_min=BelowMin.FORCE_MIN), volume, spec())
    assert sized.volume == 0.0
    assert sized.skip is not None


# --- properties -----------------------------------------------------------------------------

STEPS = (0.001, 0.01, 0.1, 1.0)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
EDGY_FLOAT = st.one_of(
    st.floats(1e-3, 1e6),
    ANY_FLOAT,
    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e300, -1.0, 1.0, 10_000.0]),
)


def on_grid(volume: float, step: float) -> bool:
    """``volume`` is a whole number of steps, up to float noise (relative for huge counts)."""
    steps = volume / step
    return abs(steps - round(steps)) < 1e-6 + abs(steps) * 1e-15


def _decimals(step: float) -> int:
    return {0.001: 3, 0.01: 2, 0.1: 1, 1.0: 0}[step]


@st.composite
def symbol_specs(draw: st.DrawFn) -> SymbolSpec:
    step = draw(st.sampled_from(STEPS))
    min_steps = draw(st.integers(1, 100))
    max_steps = draw(st.integers(min_steps, 1_000_000))
    d = _decimals(step)
    return spec(
        tick_size=draw(st.sampled_from([0.00001, 0.001, 0.01, 0.25, 1.0])),
        tick_value=draw(st.floats(0.01, 100.0)),
        volume_step=step,
        volume_min=round(min_steps * step, d),
        volume_max=round(max_steps * step, d),
    )


@st.composite
def sizings(draw: st.DrawFn) -> object:
    factor = st.floats(1e-6, 1e6)
    return draw(
        st.one_of(
            st.builds(FixedLot, lots=st.floats(1e-9, 1e9)),
            st.builds(Multiplier, factor=factor),
            st.builds(BalanceRatio, factor=factor),
            st.builds(EquityRatio, factor=factor),
            st.builds(FreeMarginRatio, factor=factor),
            st.builds(RiskPercent, percent=st.floats(1e-6, 100.0)),
            st.builds(
                RiskAmount,
                amount=st.floats(1e-6, 1e9),
                currency=st.sampled_from([None, "EUR", "USD", "JPY"]),
            ),
        )
    )


def _state(account_id: str, currency: str, values: tuple[float, float, float]) -> AccountState:
    balance, equity, free_margin = values
    return AccountState(
        account=account_id,
        ts_ns=0,
        currency=currency,
        balance=balance,
        equity=equity,
        free_margin=free_margin,
    )


@settings(max_examples=300, deadline=None)
@given(
    sizing=sizings(),
    max_lot=st.one_of(st.none(), st.floats(1e-6, 1e7)),
    below_min=st.sampled_from(list(BelowMin)),
    symbol=symbol_specs(),
    master_volume=EDGY_FLOAT,
    sl_distance=st.one_of(st.none(), EDGY_FLOAT),
    master_values=st.tuples(EDGY_FLOAT, EDGY_FLOAT, EDGY_FLOAT),
    follower_values=st.tuples(EDGY_FLOAT, EDGY_FLOAT, EDGY_FLOAT),
    master_currency=st.sampled_from(["USD", "EUR", "JPY"]),
    follower_currency=st.sampled_from(["USD", "EUR", "JPY"]),
    with_master_state=st.booleans(),
    fx_rates=st.dictionaries(st.sampled_from(["EURUSD", "USDJPY", "EURJPY"]), EDGY_FLOAT),
)
def test_sized_volume_is_zero_with_note_or_valid_on_grid(
    sizing: object,
    max_lot: float | None,
    below_min: BelowMin,
    symbol: SymbolSpec,
    master_volume: float,
    sl_distance: float | None,
    master_values: tuple[float, float, float],
    follower_values: tuple[float, float, float],
    master_currency: str,
    follower_currency: str,
    with_master_state: bool,
    fx_rates: dict[str, float],
) -> None:
    link = make_link(sizing=sizing, max_lot=max_lot, below_min=below_min)
    sized = size_follower_volume(
        link,
        master_volume=master_volume,
        sl_distance=sl_distance,
        master_state=(
            _state(MASTER, master_currency, master_values) if with_master_state else None
        ),
        follower_state=_state(FOLLOWER, follower_currency, follower_values),
        spec=symbol,
        fx_rates=fx_rates,
    )
    volume = sized.volume
    assert math.isfinite(volume)
    if volume == 0.0:
        assert sized.skip is not None
        return
    assert sized.skip is None
    assert on_grid(volume, symbol.volume_step)
    assert volume >= symbol.volume_min
    assert volume <= symbol.volume_max
    if max_lot is not None and max_lot >= symbol.volume_min:
        assert volume <= max_lot


@settings(max_examples=300, deadline=None)
@given(volume=EDGY_FLOAT, symbol=symbol_specs(), below_min=st.sampled_from(list(BelowMin)))
def test_fit_to_symbol_never_raises_and_stays_in_bounds(
    volume: float, symbol: SymbolSpec, below_min: BelowMin
) -> None:
    sized = fit_to_symbol(make_link(below_min=below_min), volume, symbol)
    assert math.isfinite(sized.volume)
    assert (sized.volume == 0.0) == (sized.skip is not None)
    if sized.volume:
        assert symbol.volume_min <= sized.volume <= symbol.volume_max
        if below_min is BelowMin.SKIP:
            assert sized.volume <= volume + 1e-9


@settings(max_examples=300, deadline=None)
@given(
    volume=st.floats(0.0, 1e7, allow_nan=False),
    step=st.sampled_from(STEPS),
)
def test_round_down_to_step_is_on_grid_and_not_above(volume: float, step: float) -> None:
    rounded = round_down_to_step(volume, step)
    assert rounded >= 0.0
    assert rounded <= volume + step * 1e-6
    assert volume - rounded < step + step * 1e-6
    assert on_grid(rounded, step)


@settings(max_examples=300, deadline=None)
@given(
    held_fraction=st.floats(0.0, 1.0),
    ratio=st.one_of(FINITE, st.sampled_from([0.0, 1.0, 0.5, 1e-12, 1 - 1e-12])),
    symbol=symbol_specs(),
)
def test_partial_close_volume_never_exceeds_held_and_is_on_step_or_all(
    held_fraction: float, ratio: float, symbol: SymbolSpec
) -> None:
    # A held position is a tradeable volume: on the grid, between the symbol's min and max.
    step = symbol.volume_step
    min_steps = round(symbol.volume_min / step)
    max_steps = round(symbol.volume_max / step)
    held_steps = min_steps + round(held_fraction * (max_steps - min_steps))
    held = round(held_steps * step, _decimals(step))
    volume = partial_close_volume(held, ratio, symbol)
    assert math.isfinite(volume)
    assert 0.0 <= volume <= held
    assert on_grid(volume, step) or volume == held
    if volume != held:
        # What stays open must still be a tradeable position.
        assert held - volume >= symbol.volume_min - 1e-9


@settings(max_examples=300, deadline=None)
@given(held=ANY_FLOAT, ratio=ANY_FLOAT, symbol=symbol_specs())
def test_partial_close_volume_never_negative_nor_above_held_for_any_floats(
    held: float, ratio: float, symbol: SymbolSpec
) -> None:
    assume(not math.isfinite(held) or abs(held) < 1e12)  # huge volumes have their own test above
    volume = partial_close_volume(held, ratio, symbol)
    assert volume >= 0.0
    if held > 0:
        assert volume <= held
    else:
        assert volume == 0.0


def test_partial_close_volume_examples() -> None:
    s = spec(volume_min=0.01, volume_step=0.01)
    assert partial_close_volume(1.0, 0.6, s) == 0.6
    assert partial_close_volume(0.33, 0.5, s) == 0.16
    assert partial_close_volume(1.0, 1.0, s) == 1.0
    assert partial_close_volume(1.0, 0.0, s) == 0.0
    # Leaving 0.005 would be below the minimum: the whole position is closed.
    assert partial_close_volume(0.1, 0.95, spec(volume_min=0.02, volume_step=0.01)) == 0.1


@settings(max_examples=300, deadline=None)
@given(before=FINITE, after=FINITE)
def test_close_ratio_always_within_unit_interval(before: float, after: float) -> None:
    ratio = close_ratio(before, after)
    assert 0.0 <= ratio <= 1.0


@pytest.mark.parametrize(
    ("before", "after"), [(1.0, math.nan), (math.inf, 1.0), (math.inf, math.inf)]
)
def test_close_ratio_within_unit_interval_for_non_finite_volumes(
    before: float, after: float
) -> None:
    ratio = close_ratio(before, after)
    assert 0.0 <= ratio <= 1.0


def test_close_ratio_examples() -> None:
    assert close_ratio(1.0, 0.4) == pytest.approx(0.6)
    assert close_ratio(1.0, 0.0) == 1.0
    assert close_ratio(1.0, 1.0) == 0.0
    assert close_ratio(1.0, 2.0) == 0.0
    assert close_ratio(0.0, 0.0) == 1.0
