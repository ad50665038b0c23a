"""The operator's read side (``engine.runtime.operator``) and a day at the console: a real
stack (secured NATS, a replicator process, paper accounts), driven only through the CLI with
``$TRADECOPY_NATS_URL`` and the operator's credentials in the environment."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from connectors.paper.connector import PaperConnector, PaperTerminal
from connectors.paper.prices import PriceReplay, load_bars
from engine.cli import ENV_NATS_URL, main
from engine.runtime.natsauth import CREDENTIAL_VARIABLES, Role
from engine.runtime.operator import (
    DecisionFilter,
    describe_sizing,
    recent_decisions,
)
from engine.runtime.stack import LocalStack
from schemas.common import Side
from schemas.decisions import DecisionRule
from schemas.links import FixedLot, Multiplier, RiskAmount, RiskPercent

MASTER = "ops-master"
COPIER = "ops-copier"
GOLD_SHY = "ops-fx-only"
CONNECTOR = "ops-paper"

LINKS = f"""\
    [[links]]
    link_id = "copy-all"
    master = "{MASTER}"
    follower = "{COPIER}"
    sizing = {{ mode = "multiplier", factor = 2.0 }}

    [[links]]
    link_id = "fx-only"
    master = "{MASTER}"
    follower = "{GOLD_SHY}"
    symbols_include = ["EURUSD"]
"""


def test_sizing_is_described_in_a_few_words() -> None:
    assert describe_sizing(Multiplier(factor=2.0)) == "multiplier ×2"
    assert describe_sizing(FixedLot(lots=0.1)) == "fixed_lot 0.1"
    assert describe_sizing(RiskPercent(percent=1.5)) == "risk_percent 1.5 %"
    assert describe_sizing(RiskAmount(amount=250.0, currency="EUR")) == "risk_amount 250 EUR"


def test_a_decision_filter_narrows_the_subject_and_checks_the_rest() -> None:
    assert DecisionFilter().subject == "tc.v1.decision.*.*"
    assert DecisionFilter(follower="f-1").subject == "tc.v1.decision.f-1.*"
    assert DecisionFilter(link="l-1").subject == "tc.v1.decision.*.l-1"


@pytest.fixture
async def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalStack]:
    """A secured stack on a free port with the operator's login in the environment."""
    local = LocalStack(tmp_path / "nats", partitions=4, name="ops-day")
    await local.add_connector(CONNECTOR, masters=[MASTER], followers=[COPIER, GOLD_SHY])
    await local.start()
    try:
        for name in CREDENTIAL_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        operator = local.user(Role.OPERATOR)
        assert operator is not None
        for name, value in {**operator.credentials.env(), ENV_NATS_URL: local.url}.items():
            monkeypatch.setenv(name, value)
        yield local
    finally:
        await local.stop()


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``tradecopy ARGV`` in-process (off the test's loop): exit code, stdout, stderr."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def _start_paper(stack: LocalStack, tmp_path: Path) -> PaperConnector:
    rows = [(MASTER, "USD", 10_000.0, 100, "master")]
    rows += [(f, "USD", 10_000.0, 100, "follower") for f in (COPIER, GOLD_SHY)]
    terminal = PaperTerminal.open(tmp_path / "paper.state", rows)
    replay = PriceReplay(load_bars(), start=420, speed=600, stamp_wall_clock=True,
                         steps_per_leg=3)  # fmt: skip
    venue_nc = await stack.connect("ops-paper-venue", stack.connector_user(CONNECTOR))
    connector = PaperConnector(venue_nc, CONNECTOR, terminal, replay)
    await connector.start()
    await wait_until(lambda: connector.quotes > 0, "prices on the paper venue", timeout=30)
    return connector


async def _buy_gold(connector: PaperConnector) -> str:
    venue = connector.terminal.venue
    result = await connector.trade(lambda _: venue.market_order(MASTER, "XAUUSD", Side.BUY, 0.1))
    assert result.ok, result.reason
    return result.position_id or ""


async def test_an_operators_day_at_the_console(
    stack: LocalStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    links_file = tmp_path / "links.toml"
    links_file.write_text(textwrap.dedent(LINKS), encoding="utf-8")

    # Morning: load the links and look at them.
    code, out, err = await _cli(capsys, "links", "apply", str(links_file))
    assert code == 0, err
    assert f"tradecopy: NATS {stack.url} as operator" in err
    assert "created: copy-all, fx-only" in out
    code, out, err = await _cli(capsys, "links", "list")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert f"{MASTER} → {COPIER}" in rows["copy-all"] and "multiplier ×2" in rows["copy-all"]
    assert rows["fx-only"].endswith("copying")

    stack.spawn_replicators(instance="ops")
    await stack.wait_for_replicator()
    connector = await _start_paper(stack, tmp_path)
    try:
        await _buy_gold(connector)
        venue = connector.terminal.venue
        await wait_until(lambda: venue.positions(COPIER), "the copier's copy", timeout=30)

        # "Why was this trade skipped?" — in words, with the numbers.
        async def skipped() -> list[str]:
            code, out, _ = await _cli(capsys, "decisions", "--follower", GOLD_SHY)
            return out.splitlines() if code == 0 else []

        await wait_until(skipped, "the fx-only follower's decision")
        [line] = await skipped()
        assert "skipped" in line and "symbol_not_included" in line
        assert f"fx-only ({MASTER} → {GOLD_SHY}): XAUUSD is not in the include list" in line
        code, out, _ = await _cli(capsys, "decisions", "--follower", COPIER)
        assert code == 0 and out == ""  # the copier copied: nothing to explain
        code, out, _ = await _cli(capsys, "decisions", "--json", "--rule", "symbol_not_included")
        [decision] = [json.loads(x) for x in out.splitlines()]
        assert decision["follower"] == GOLD_SHY and decision["link_id"] == "fx-only"
        assert decision["master_event_id"]

        # Status: streams, every partition's consumer bound and drained, the connector alive.
        async def drained() -> dict[str, Any] | None:
            code, out, _ = await _cli(capsys, "status", "--json")
            status = json.loads(out) if code == 0 else None
            if status is None:
                return None
            busy = [c for c in status["consumers"] if c["num_pending"] or c["ack_pending"]]
            return None if busy else status

        await wait_until(drained, "every consumer to catch up")
        status = await drained()
        assert status is not None
        replicators = status["replicators"]
        assert replicators["alive"] is True
        assert replicators["partitions"] == replicators["bound_partitions"] == 4
        consumers = {c["name"]: c for c in status["consumers"]}
        assert {f"replicator-p{p}" for p in range(4)} | {f"connector-{CONNECTOR}"} <= set(consumers)
        assert consumers[f"connector-{CONNECTOR}"]["push_bound"] is True
        [paper] = status["connectors"]
        assert paper["connector"] == CONNECTOR and paper["alive"] is True
        assert sorted(paper["accounts"]) == sorted([MASTER, COPIER, GOLD_SHY])
        code, out, _ = await _cli(capsys, "status")
        assert code == 0
        lines = out.splitlines()
        assert lines[lines.index("replicators") + 2].split()[:2] == ["alive", "4/4"]
        lag = next(line for line in lines if "replicator-p0" in line).split()
        assert lag[:6] == ["TC_MASTER_EVENTS", "replicator-p0", "0", "0", "0", "yes"]

        # Trouble at the copier's broker: stop the account, see it, see its effect, clear it.
        code, out, err = await _cli(capsys, "stop", "set", "account", "nobody", "--reason", "x")
        assert code == 2 and f"known accounts: {COPIER}, {GOLD_SHY}, {MASTER} (--force" in err
        code, out, _ = await _cli(
            capsys, "stop", "set", "account", COPIER, "--reason", "margin call"
        )
        assert (code, out.strip()) == (0, f"emergency stop account.{COPIER}: ACTIVE")
        code, out, _ = await _cli(capsys, "stop", "list")
        [stop_row] = out.splitlines()[1:]
        assert stop_row.split()[:3] == ["account", COPIER, "ACTIVE"]
        assert stop_row.endswith("margin call")
        code, out, _ = await _cli(capsys, "links", "list")
        assert f"STOPPED (account.{COPIER})" in out

        await _buy_gold(connector)

        async def stopped() -> list[str]:
            code, out, _ = await _cli(capsys, "decisions", "--follower", COPIER, "--rule",
                                      DecisionRule.EMERGENCY_STOP.value)  # fmt: skip
            return out.splitlines() if code == 0 else []

        await wait_until(stopped, "the stop's decision for the copier")
        assert "emergency stop (account) is active: margin call" in (await stopped())[0]
        assert len(venue.positions(COPIER)) == 1  # the second buy was not copied

        code, out, _ = await _cli(capsys, "stop", "clear", "account", COPIER, "--reason", "ok")
        assert (code, out.strip()) == (0, f"emergency stop account.{COPIER}: cleared")
        code, out, _ = await _cli(capsys, "stop", "list")
        assert out.strip() == "no emergency stop in force"
        code, out, _ = await _cli(capsys, "links", "list")
        assert "STOPPED" not in out

        # The operator's module, used directly: the same answer the CLI printed.
        recent, last_seq = await recent_decisions(stack.js, DecisionFilter(follower=GOLD_SHY), 5)
        assert [d.rule for d in recent] == [DecisionRule.SYMBOL_NOT_INCLUDED] * len(recent)
        assert last_seq >= len(recent) >= 1
    finally:
        await connector.stop()
