"""The hand-worked fee scenarios of engine/billing/README.md, read from its table and run."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from engine.billing.facts import (
    CashFlow,
    CashFlowKind,
    ClosedVolume,
    CopiedTrade,
    EquitySample,
)
from engine.billing.fees import (
    BillingPeriod,
    PayPerTradeAllowance,
    SubscriptionPlan,
    change_plan,
    count_copied_trades,
    platform_fee,
    volume_fee,
)
from engine.billing.hwm import settle_window, start_mark
from engine.billing.windows import window_ending_at
from engine.core.money import exact, exponent, to_minor

README = Path(__file__).parent.parent / "engine" / "billing" / "README.md"
HOUR_NS = 3600 * 10**9
FIRST_FRIDAY = date(2026, 3, 27)  # the week before the spring clock change, on purpose
FOLLOWER = "f-1"


class Scenario:
    def __init__(self, cells: list[str]) -> None:
        self.number, self.name, self.module, self.currency = cells[0], cells[1], cells[2], cells[3]
        self.inputs = cells[4].strip("`")
        self.expected = _pairs(cells[6].strip("`"))

    def __repr__(self) -> str:
        return f"{self.number} {self.name}"


def _pairs(text: str) -> dict[str, str]:
    """``key value; key value`` → {key: value}."""
    pairs = {}
    for part in text.split(";"):
        key, _, value = part.strip().partition(" ")
        pairs[key] = value.strip()
    return pairs


def _scenarios() -> list[Scenario]:
    section = README.read_text().split("## Hand-worked scenarios", 1)[1]
    rows = [line for line in section.splitlines() if re.match(r"^\| \d+ \|", line)]
    return [Scenario([c.strip() for c in row.strip("|").split(" | ")]) for row in rows]


SCENARIOS = _scenarios()


def _ids(text: str) -> tuple[str, ...]:
    return () if text == "-" else tuple(x.strip() for x in text.split(","))


def _minor(amount: str, currency: str) -> int:
    minor = to_minor(amount, currency)
    # A table amount with more decimals than the currency has would be rounded silently.
    assert Decimal(minor).scaleb(-exponent(currency)) == exact(amount), amount
    return minor


def _utc(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


def test_the_readme_table_has_the_scenarios_the_issue_asks_for() -> None:
    assert len(SCENARIOS) >= 12
    assert [int(s.number) for s in SCENARIOS] == list(range(1, len(SCENARIOS) + 1))
    modules = {s.module for s in SCENARIOS}
    assert modules == {"performance", "pay_per_trade", "volume", "platform", "subscription"}
    assert "JPY" in {s.currency for s in SCENARIOS}


def run_performance(scenario: Scenario) -> dict[str, str]:
    currency = scenario.currency
    events = [e.strip().split(" ") for e in scenario.inputs.split(";")]
    assert events[0][0] == "rate" and events[1][0] == "start"
    rate = events[0][1]
    week = 0
    window = window_ending_at(FIRST_FRIDAY)
    state = start_mark(
        EquitySample(
            follower=FOLLOWER, equity_minor=_minor(events[1][1], currency), ts_ns=window.start_ns
        )
    )
    hour = 0
    flows: list[CashFlow] = []
    closing: EquitySample | None = None
    fees = []
    for event in events[2:]:
        hour += 1
        ts = window.start_ns + hour * HOUR_NS
        assert ts < window.end_ns
        match event:
            case ["deposit" | "withdraw" as kind, amount]:
                flow_kind = CashFlowKind.DEPOSIT if kind == "deposit" else CashFlowKind.WITHDRAWAL
                flows.append(
                    CashFlow(
                        follower=FOLLOWER,
                        kind=flow_kind,
                        amount_minor=_minor(amount, currency),
                        ts_ns=ts,
                    )
                )
            case ["equity", amount]:
                closing = EquitySample(
                    follower=FOLLOWER, equity_minor=_minor(amount, currency), ts_ns=ts
                )
            case ["charge"]:
                assert closing is not None, "a charge needs an equity sample before it"
                charge = settle_window(
                    state, window=window, equity=closing, cash_flows=flows, rate=rate
                )
                fees.append(str(charge.fee_minor))
                state = charge.state
                week += 1
                window = window_ending_at(FIRST_FRIDAY + timedelta(days=7 * week))
                hour = 0
            case _:
                raise AssertionError(f"unknown performance event {event}")
    return {"fees": ", ".join(fees), "mark": str(state.mark_minor)}


def run_pay_per_trade(scenario: Scenario) -> dict[str, str]:
    inputs = _pairs(scenario.inputs)
    allowance = PayPerTradeAllowance(
        follower=FOLLOWER,
        purchase_id="p-1",
        trades_bought=int(inputs["bought"]),
        counted=_ids(inputs["counted"]),
    )
    start = window_ending_at(FIRST_FRIDAY).start_ns
    trades = []
    for copy in _ids(inputs["copies"]):
        manual = copy.startswith("manual ")
        order_id, _, hour = copy.removeprefix("manual ").partition("@")
        trades.append(
            CopiedTrade(
                order_id=order_id,
                follower=FOLLOWER,
                link="l-1",
                opened_ns=start + int(hour) * HOUR_NS,
                manual=manual,
            )
        )
    use = count_copied_trades(allowance, trades)
    return {
        "counted": ", ".join(use.newly_counted) or "-",
        "exhausted_by": use.exhausted_by or "-",
        "over": ", ".join(use.newly_over) or "-",
        "stop": "yes" if use.stop_links else "no",
    }


def run_volume(scenario: Scenario) -> dict[str, str]:
    inputs = _pairs(scenario.inputs)
    window = window_ending_at(FIRST_FRIDAY)
    closes = []
    for i, close in enumerate(_ids(inputs["closes"])):
        kind, _, lots = close.rpartition(" ")
        closes.append(
            ClosedVolume(
                order_id=f"c{i}",
                follower=FOLLOWER,
                link="l-1",
                lots=Decimal(lots),
                closed_ns=window.end_ns if kind == "gap" else window.start_ns + i * HOUR_NS,
                manual=kind == "manual",
            )
        )
    rate_minor = exact(inputs["rate"]).scaleb(exponent(scenario.currency))
    charge = volume_fee(closes, follower=FOLLOWER, window=window, rate_per_lot_minor=rate_minor)
    return {"lots": str(charge.lots), "fee": str(charge.fee_minor)}


def run_platform(scenario: Scenario) -> dict[str, str]:
    inputs = _pairs(scenario.inputs)
    split = platform_fee(_minor(inputs["total"], scenario.currency), inputs["platform"])
    return {"fee": str(split.application_fee_minor), "provider": str(split.provider_minor)}


def run_subscription(scenario: Scenario) -> dict[str, str]:
    inputs = _pairs(scenario.inputs)

    def plan(text: str, plan_id: str) -> SubscriptionPlan:
        price, period = text.split(" ")
        return SubscriptionPlan(
            plan_id=plan_id,
            price_minor=_minor(price, scenario.currency),
            period=BillingPeriod(period),
        )

    change = change_plan(
        plan(inputs["old"], "old"),
        plan(inputs["new"], "new"),
        anchor_ns=_utc(inputs["anchor"]),
        at_ns=_utc(inputs["change"]),
    )
    end = datetime.fromtimestamp(change.period_end_ns // 10**9, tz=UTC)
    return {
        "credit": str(change.credit_minor),
        "charge": str(change.charge_minor),
        "net": str(change.net_minor),
        "period_end": end.strftime("%Y-%m-%dT%H:%MZ"),
    }


RUNNERS = {
    "performance": run_performance,
    "pay_per_trade": run_pay_per_trade,
    "volume": run_volume,
    "platform": run_platform,
    "subscription": run_subscription,
}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=repr)
def test_a_hand_worked_scenario_gives_the_amounts_worked_by_hand(scenario: Scenario) -> None:
    result = RUNNERS[scenario.module](scenario)
    assert {key: result[key] for key in scenario.expected} == scenario.expected
