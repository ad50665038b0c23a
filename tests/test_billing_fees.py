"""Fee modules as properties: splits sum, no fee at or below the mark, flows move it, re-runs."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.billing.facts import (
    CashFlow,
    CashFlowKind,
    ClosedVolume,
    CopiedTrade,
    EquitySample,
    lots_from_wire,
)
from engine.billing.fees import (
    BillingPeriod,
    FeeModule,
    PayPerTradeAllowance,
    SubscriptionPlan,
    change_plan,
    count_copied_trades,
    idempotency_key,
    period_bounds,
    period_id,
    platform_fee,
    volume_fee,
)
from engine.billing.hwm import (
    HighWaterMark,
    fold_cash_flows,
    performance_fee,
    settle_window,
    start_mark,
)
from engine.billing.windows import window_ending_at
from engine.core.money import InexactMoneyError

WEEK = window_ending_at(date(2026, 11, 27))
NEXT_WEEK = window_ending_at(date(2026, 12, 4))
HOUR_NS = 3600 * 10**9
FOLLOWER = "f-1"

amounts = st.integers(0, 10**12)
rates = st.decimals(min_value=0, max_value=1, places=4)


def utc(text: str) -> int:
    moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


def sample(equity: int, ts_ns: int) -> EquitySample:
    return EquitySample(follower=FOLLOWER, equity_minor=equity, ts_ns=ts_ns)


def flow(signed: int, ts_ns: int) -> CashFlow:
    kind = CashFlowKind.DEPOSIT if signed > 0 else CashFlowKind.WITHDRAWAL
    return CashFlow(follower=FOLLOWER, kind=kind, amount_minor=abs(signed), ts_ns=ts_ns)


# --- platform fee --------------------------------------------------------------------------


@given(total=amounts, percent=st.decimals(min_value=0, max_value=100, places=3))
def test_the_platform_fee_and_the_provider_part_always_sum_to_the_total(
    total: int, percent: Decimal
) -> None:
    split = platform_fee(total, percent)
    assert split.application_fee_minor + split.provider_minor == total
    assert 0 <= split.application_fee_minor <= total
    # Rounded down: never more than the promised percentage, never a whole unit less.
    exact_fee = Decimal(total) * percent / 100
    assert exact_fee - 1 < split.application_fee_minor <= exact_fee


def test_the_platform_fee_rounds_down_on_odd_cents() -> None:
    assert platform_fee(999, "12.5").application_fee_minor == 124  # 124.875
    assert platform_fee(1, "10").application_fee_minor == 0
    with pytest.raises(ValueError):
        platform_fee(1000, "100.01")
    with pytest.raises(InexactMoneyError):
        platform_fee(1000, 12.5)  # type: ignore[arg-type]


# --- performance fee and the high-water mark ----------------------------------------------


@given(mark=st.integers(-(10**12), 10**12), below=st.integers(0, 10**12), rate=rates)
def test_no_performance_fee_when_equity_is_at_or_below_the_mark(
    mark: int, below: int, rate: Decimal
) -> None:
    assert performance_fee(mark, mark - below, rate) == 0


@given(start=amounts, path=st.lists(st.integers(-(10**9), 10**9), min_size=1, max_size=12))
def test_recovering_a_loss_is_never_charged(start: int, path: list[int]) -> None:
    # Equity that never climbs above where copying started earns the provider nothing,
    # however it moves week by week.
    state = start_mark(sample(start, WEEK.start_ns))
    friday = date(2026, 11, 27)
    for week, move in enumerate(path):
        window = window_ending_at(friday + timedelta(days=7 * week))
        equity = start - abs(move)
        charge = settle_window(
            state,
            window=window,
            equity=sample(equity, window.end_ns - 1),
            cash_flows=(),
            rate="0.30",
        )
        assert charge.fee_minor == 0
        assert charge.state.mark_minor == start
        state = charge.state


@given(
    start=amounts,
    flows=st.lists(st.integers(-(10**9), 10**9).filter(bool), max_size=10),
    profit=st.integers(-(10**9), 10**9),
    rate=rates,
)
def test_deposits_and_withdrawals_move_the_mark_and_are_never_charged(
    start: int, flows: list[int], profit: int, rate: Decimal
) -> None:
    state = start_mark(sample(start, WEEK.start_ns))
    cash = [flow(amount, WEEK.start_ns + (i + 1) * HOUR_NS) for i, amount in enumerate(flows)]
    moved = fold_cash_flows(state, cash, WEEK.end_ns - 1)
    assert moved.mark_minor == start + sum(flows)
    # Equity is start + the cash moved + the trading result: only the result is charged.
    equity = sample(start + sum(flows) + profit, WEEK.end_ns - 1)
    charge = settle_window(state, window=WEEK, equity=equity, cash_flows=cash, rate=rate)
    assert charge.fee_minor == performance_fee(start, start + profit, rate)
    assert charge.profit_minor == profit


@given(
    start=amounts,
    equity=amounts,
    rate=rates,
    flows=st.lists(st.integers(-(10**9), 10**9).filter(bool), max_size=5),
)
def test_re_running_a_settled_window_changes_nothing(
    start: int, equity: int, rate: Decimal, flows: list[int]
) -> None:
    state = start_mark(sample(start, WEEK.start_ns))
    cash = [flow(amount, WEEK.start_ns + (i + 1) * HOUR_NS) for i, amount in enumerate(flows)]
    closing = sample(equity, WEEK.end_ns - 1)
    first = settle_window(state, window=WEEK, equity=closing, cash_flows=cash, rate=rate)
    again = settle_window(first.state, window=WEEK, equity=closing, cash_flows=cash, rate=rate)
    assert again.already_settled and again.fee_minor == 0 and again.state == first.state
    # A job that crashed before storing the state re-runs from the old state: same fee, and
    # the same idempotency key makes the payment gateway refuse the second charge.
    replay = settle_window(state, window=WEEK, equity=closing, cash_flows=cash, rate=rate)
    assert replay == first
    # Folding the same cash flows again does not move the mark twice.
    assert fold_cash_flows(first.state, cash, WEEK.end_ns - 1).mark_minor == first.state.mark_minor


@given(start=amounts, gain=st.integers(1, 10**9), rate=rates)
def test_the_mark_moves_up_only_when_a_fee_is_charged(start: int, gain: int, rate: Decimal) -> None:
    state = start_mark(sample(start, WEEK.start_ns))
    charge = settle_window(
        state, window=WEEK, equity=sample(start + gain, WEEK.end_ns - 1), cash_flows=(), rate=rate
    )
    if charge.fee_minor > 0:
        assert charge.state.mark_minor == start + gain
    else:
        assert charge.state.mark_minor == start
    # The next week at the same equity charges nothing: charged profit is behind the mark, and
    # a profit too small to round to a unit is still too small.
    following = settle_window(
        charge.state,
        window=NEXT_WEEK,
        equity=sample(start + gain, NEXT_WEEK.end_ns - 1),
        cash_flows=(),
        rate=rate,
    )
    assert following.fee_minor == 0


def test_a_withdrawal_after_the_closing_sample_waits_for_the_next_window() -> None:
    # The sample is the equity before the withdrawal: folding the withdrawal into this week's
    # mark would charge a fee on the withdrawn money.
    state = start_mark(sample(10_000_00, WEEK.start_ns))
    withdrawal = flow(-5_000_00, WEEK.end_ns - HOUR_NS)
    charge = settle_window(
        state,
        window=WEEK,
        equity=sample(10_000_00, WEEK.end_ns - 2 * HOUR_NS),
        cash_flows=[withdrawal],
        rate="0.20",
    )
    assert charge.fee_minor == 0 and charge.state.mark_minor == 10_000_00
    following = settle_window(
        charge.state,
        window=NEXT_WEEK,
        equity=sample(5_000_00, NEXT_WEEK.end_ns - 1),
        cash_flows=[withdrawal],
        rate="0.20",
    )
    assert following.fee_minor == 0 and following.state.mark_minor == 5_000_00


def test_the_mark_is_kept_across_a_pause_with_no_samples() -> None:
    # Copying paused for three weeks: no window was settled, the mark is where it was.
    state = start_mark(sample(10_000_00, WEEK.start_ns))
    later = window_ending_at(date(2026, 12, 18))
    charge = settle_window(
        state,
        window=later,
        equity=sample(10_100_00, later.end_ns - 1),
        cash_flows=(),
        rate="0.20",
    )
    assert charge.fee_minor == 20_00


def test_settling_refuses_inconsistent_inputs_and_floats() -> None:
    state = start_mark(sample(1000, WEEK.start_ns))
    with pytest.raises(ValueError, match="before the window's end"):
        settle_window(
            state, window=WEEK, equity=sample(1000, WEEK.end_ns), cash_flows=(), rate="0.2"
        )
    with pytest.raises(ValueError, match="between 0 and 1"):
        settle_window(
            state, window=WEEK, equity=sample(1000, WEEK.end_ns - 1), cash_flows=(), rate="20"
        )
    with pytest.raises(InexactMoneyError):
        performance_fee(0, 1000, 0.2)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        flow(0, WEEK.start_ns)
    other = HighWaterMark(follower="f-2", mark_minor=0, flows_through_ns=WEEK.start_ns)
    with pytest.raises(ValueError):
        fold_cash_flows(other, [flow(5, WEEK.start_ns + 1)], WEEK.end_ns)


# --- pay-per-trade -------------------------------------------------------------------------


def copy(order_id: str, opened_ns: int, *, manual: bool = False) -> CopiedTrade:
    return CopiedTrade(
        order_id=order_id, follower=FOLLOWER, link="l-1", opened_ns=opened_ns, manual=manual
    )


copies = st.lists(
    st.tuples(st.sampled_from([f"o{i}" for i in range(30)]), st.integers(0, 5), st.booleans()),
    max_size=40,
)


@given(bought=st.integers(0, 20), batches=st.lists(copies, max_size=4))
def test_an_allowance_counts_each_copy_once_and_never_a_manual_trade(
    bought: int, batches: list[list[tuple[str, int, bool]]]
) -> None:
    allowance = PayPerTradeAllowance(follower=FOLLOWER, purchase_id="p-1", trades_bought=bought)
    manual_ids = {oid for batch in batches for oid, _, manual in batch if manual}
    stops = []
    for batch in batches:
        trades = [copy(oid, ts, manual=manual) for oid, ts, manual in batch]
        use = count_copied_trades(allowance, trades)
        again = count_copied_trades(use.allowance, trades)
        assert again.newly_counted == () and again.newly_over == ()
        assert again.allowance == use.allowance  # a re-run changes nothing
        allowance = use.allowance
        stops.append(use.stop_links)
    counted = allowance.counted + allowance.over_allowance
    assert len(counted) == len(set(counted))
    assert len(allowance.counted) <= bought
    copied_ids = {oid for batch in batches for oid, _, manual in batch if not manual}
    assert set(counted) == copied_ids
    assert not set(counted) & (manual_ids - copied_ids)
    assert allowance.over_allowance == () or allowance.remaining == 0
    if stops:
        assert stops[-1] == (allowance.remaining == 0)


def test_the_order_that_uses_the_last_trade_is_named_whatever_the_arrival_order() -> None:
    allowance = PayPerTradeAllowance(
        follower=FOLLOWER, purchase_id="p-1", trades_bought=2, counted=("o1",)
    )
    fan_out = [copy("o4", 7), copy("o3", 7), copy("o2", 6)]
    for batch in (fan_out, list(reversed(fan_out))):
        use = count_copied_trades(allowance, batch)
        assert use.newly_counted == ("o2",)
        assert use.exhausted_by == "o2"
        assert use.newly_over == ("o3", "o4")
        assert use.stop_links


# --- volume fee ----------------------------------------------------------------------------


def close(order_id: str, lots: str, ts_ns: int, *, manual: bool = False) -> ClosedVolume:
    return ClosedVolume(
        order_id=order_id,
        follower=FOLLOWER,
        link="l-1",
        lots=Decimal(lots),
        closed_ns=ts_ns,
        manual=manual,
    )


@given(
    lots=st.lists(st.decimals(min_value=0, max_value=100, places=2), max_size=20),
    rate=st.decimals(min_value=0, max_value=10_000, places=2),
)
def test_partial_closes_cost_what_one_close_of_their_sum_costs(
    lots: list[Decimal], rate: Decimal
) -> None:
    parts = [close(f"o{i}", str(v), WEEK.start_ns + i) for i, v in enumerate(lots)]
    whole = [close("one", str(sum(lots, Decimal(0))), WEEK.start_ns)]
    split_fee = volume_fee(parts, follower=FOLLOWER, window=WEEK, rate_per_lot_minor=rate)
    one_fee = volume_fee(whole, follower=FOLLOWER, window=WEEK, rate_per_lot_minor=rate)
    assert split_fee.fee_minor == one_fee.fee_minor
    assert split_fee.lots == sum(lots, Decimal(0))
    # Redelivered closes (the same order ids again) change nothing.
    twice = volume_fee(parts + parts, follower=FOLLOWER, window=WEEK, rate_per_lot_minor=rate)
    assert twice == split_fee


def test_only_copied_volume_closed_inside_the_window_is_charged() -> None:
    closes = [
        close("in", "1.00", WEEK.start_ns),
        close("manual", "5.00", WEEK.start_ns + HOUR_NS, manual=True),
        close("at-end", "2.00", WEEK.end_ns),  # the weekend gap
        close("before", "3.00", WEEK.start_ns - 1),
    ]
    charge = volume_fee(closes, follower=FOLLOWER, window=WEEK, rate_per_lot_minor="250")
    assert (charge.lots, charge.fee_minor, charge.order_ids) == (Decimal("1.00"), 250, ("in",))


def test_wire_volumes_become_the_lots_the_venue_sent() -> None:
    assert lots_from_wire(0.1) == Decimal("0.1")
    assert lots_from_wire(0.07) * 3 == Decimal("0.21")
    with pytest.raises(InexactMoneyError):
        volume_fee(
            [close("o", "1", WEEK.start_ns)], follower=FOLLOWER, window=WEEK, rate_per_lot_minor=2.5
        )  # type: ignore[arg-type]


# --- subscription --------------------------------------------------------------------------


@given(
    anchor=st.integers(utc("2026-01-01T00:00"), utc("2027-12-31T00:00")),
    offset=st.integers(0, 3 * 366 * 24 * HOUR_NS),
    period=st.sampled_from(list(BillingPeriod)),
)
def test_a_subscription_period_contains_the_instant_and_starts_a_whole_period_after_the_anchor(
    anchor: int, offset: int, period: BillingPeriod
) -> None:
    start, end = period_bounds(anchor, period, anchor + offset)
    assert start <= anchor + offset < end
    assert period_bounds(anchor, period, start) == (start, end)
    assert period_bounds(anchor, period, end)[0] == end


@given(
    old_price=amounts,
    new_price=amounts,
    old_period=st.sampled_from(list(BillingPeriod)),
    new_period=st.sampled_from(list(BillingPeriod)),
    at=st.integers(0, 366 * 24 * HOUR_NS),
)
def test_a_plan_change_credits_at_most_the_old_price_and_charges_at_most_the_new_one(
    old_price: int, new_price: int, old_period: BillingPeriod, new_period: BillingPeriod, at: int
) -> None:
    anchor = utc("2026-01-31T10:00")
    old = SubscriptionPlan(plan_id="a", price_minor=old_price, period=old_period)
    new = SubscriptionPlan(plan_id="b", price_minor=new_price, period=new_period)
    change = change_plan(old, new, anchor_ns=anchor, at_ns=anchor + at)
    assert 0 <= change.credit_minor <= old_price
    assert 0 <= change.charge_minor <= new_price
    assert change.net_minor == change.charge_minor - change.credit_minor
    assert change.period_start_ns <= anchor + at < change.period_end_ns
    if old_period is new_period:
        # The period runs on from the same anchor; a change to the same plan costs nothing.
        assert change.anchor_ns == anchor
        assert (change.period_start_ns, change.period_end_ns) == period_bounds(
            anchor, old_period, anchor + at
        )
        same = change_plan(old, old, anchor_ns=anchor, at_ns=anchor + at)
        assert same.net_minor == 0


def test_proration_is_by_the_second_and_a_started_second_counts_as_used() -> None:
    # April has 2,592,000 seconds: at one cent a second the credit counts the seconds left.
    old = SubscriptionPlan(plan_id="a", price_minor=2_592_000, period=BillingPeriod.MONTHLY)
    new = SubscriptionPlan(plan_id="b", price_minor=0, period=BillingPeriod.MONTHLY)
    anchor = utc("2026-04-01T00:00")
    on_the_second = change_plan(old, new, anchor_ns=anchor, at_ns=utc("2026-04-11T00:00"))
    assert on_the_second.credit_minor == 20 * 86_400
    half_a_second_later = utc("2026-04-11T00:00") + 500_000_000
    assert change_plan(old, new, anchor_ns=anchor, at_ns=half_a_second_later).credit_minor == (
        20 * 86_400 - 1
    )


def test_a_subscription_anchored_on_the_31st_renews_on_the_last_day_of_short_months() -> None:
    anchor = utc("2026-01-31T10:00")
    assert period_bounds(anchor, BillingPeriod.MONTHLY, utc("2026-02-15T00:00")) == (
        anchor,
        utc("2026-02-28T10:00"),
    )
    assert period_bounds(anchor, BillingPeriod.MONTHLY, utc("2026-03-01T00:00")) == (
        utc("2026-02-28T10:00"),
        utc("2026-03-31T10:00"),
    )


# --- idempotency keys ----------------------------------------------------------------------

key_parts = st.text(min_size=1, max_size=12)


@given(
    a=st.tuples(st.sampled_from(list(FeeModule)), key_parts, key_parts, key_parts),
    b=st.tuples(st.sampled_from(list(FeeModule)), key_parts, key_parts, key_parts),
)
def test_idempotency_keys_are_deterministic_and_distinct_per_charge(
    a: tuple[FeeModule, str, str, str], b: tuple[FeeModule, str, str, str]
) -> None:
    assert idempotency_key(*a) == idempotency_key(*a)
    assert (idempotency_key(*a) == idempotency_key(*b)) == (a == b)


def test_a_subscription_charge_is_keyed_by_its_period_so_a_renewal_gets_a_new_key() -> None:
    anchor = utc("2026-01-31T10:00")
    first = period_bounds(anchor, BillingPeriod.MONTHLY, utc("2026-02-10T00:00"))
    second = period_bounds(anchor, BillingPeriod.MONTHLY, utc("2026-03-10T00:00"))
    keys = [
        idempotency_key(FeeModule.SUBSCRIPTION, "f-1", "gold", period_id(start))
        for start, _ in (first, second, first)
    ]
    assert keys[0] == "subscription:f-1:gold:20260131T100000Z"
    assert keys[0] == keys[2] != keys[1]


def test_an_idempotency_key_reads_module_follower_plan_window() -> None:
    key = idempotency_key(FeeModule.PERFORMANCE, "f-1", "gold", WEEK.window_id)
    assert key == "performance:f-1:gold:2026-W48"
    assert idempotency_key(FeeModule.VOLUME, "a:b", "c", "w") != idempotency_key(
        FeeModule.VOLUME, "a", "b:c", "w"
    )
    with pytest.raises(ValueError):
        idempotency_key(FeeModule.VOLUME, "", "c", "w")
