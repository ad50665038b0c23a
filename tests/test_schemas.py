"""The wire contract: JSON Schema export, msgpack round trips, evolution rules, subjects."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from engine.core.strategy_versions import uploaded_version
from engine.runtime.links import load_links
from schemas import codec, subjects
from schemas.account import AccountState, FxRate, SymbolSpec, TradeMode
from schemas.common import OrderType, Side, Trace
from schemas.control import EmergencyStop, StopScope
from schemas.decisions import CopyDecision, DecisionOutcome, DecisionRule
from schemas.export import (
    JSON_DIR,
    JSON_WIRE,
    MESSAGES,
    export_schemas,
    normalize_schema,
    render_schema,
    render_schemas,
    stale_schemas,
)
from schemas.links import (
    BalanceRatio,
    CopyLink,
    Direction,
    EquityRatio,
    FixedLot,
    FreeMarginRatio,
    Multiplier,
    ProtectionAction,
    RiskAmount,
    RiskPercent,
    Sizing,
    SymbolMapping,
    TradingHours,
)
from schemas.market import Quote
from schemas.master import (
    MasterEvent,
    PendingOrderCancelled,
    PendingOrderModified,
    PendingOrderPlaced,
    PendingOrderTriggered,
    PositionClosed,
    PositionClosedBy,
    PositionModified,
    PositionOpened,
    PositionReduced,
)
from schemas.orders import (
    DeviationPolicy,
    FollowerClose,
    FollowerCloseAll,
    FollowerCloseBy,
    FollowerModify,
    FollowerOpen,
    FollowerOrder,
    FollowerOrderBatch,
    FollowerPendingCancel,
    FollowerPendingModify,
    FollowerPendingPlace,
)
from schemas.rejections import MasterEventRejected, RejectionReason
from schemas.reports import (
    ExecutionReport,
    OrderDone,
    OrderFilled,
    OrderPartiallyFilled,
    OrderRejected,
    OrderUnknown,
)
from schemas.signals import (
    FailureKind,
    Signal,
    SignalAction,
    StrategyDeployment,
    StrategyRunFailed,
    StrategySignal,
    Timeframe,
    deployment_decoder,
    failure_decoder,
    signal_decoder,
)
from schemas.streams import DECISIONS_STREAM, REJECTIONS_STREAM, all_streams

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
EXAMPLE_LINKS = EXAMPLES / "links.toml"
T0 = 1_763_700_000_000_000_000  # 2025-11-21, UTC ns

# --------------------------------------------------------------------------------------------
# One realistic instance of every message
# --------------------------------------------------------------------------------------------

TRACE = Trace(terminal_ns=T0, connector_ns=T0 + 180_000, replicator_in_ns=T0 + 450_000)
MASTER = {"master": "alpari-1001", "symbol": "XAUUSD.a", "trace": TRACE}

MASTER_EVENTS: list[Any] = [
    PositionOpened(
        event_id="alpari-1001:deal:9001",
        ts_ns=T0,
        position_id="5001",
        side=Side.BUY,
        volume=0.5,
        price=2650.35,
        sl=2640.0,
        tp=2680.0,
        magic=2024,
        comment="breakout",
        **MASTER,
    ),
    PositionModified(
        event_id="alpari-1001:mod:9002",
        ts_ns=T0 + 1,
        position_id="5001",
        side=Side.BUY,
        sl=2645.0,
        tp=None,
        magic=2024,
        **MASTER,
    ),
    PositionReduced(
        event_id="alpari-1001:deal:9003",
        ts_ns=T0 + 2,
        position_id="5001",
        side=Side.BUY,
        volume_before=0.5,
        volume_after=0.2,
        price=2660.1,
        magic=2024,
        new_position_id="5002",
        **MASTER,
    ),
    PositionClosed(
        event_id="alpari-1001:deal:9004",
        ts_ns=T0 + 3,
        position_id="5002",
        side=Side.BUY,
        volume=0.2,
        price=2670.0,
        magic=2024,
        reason="tp",
        **MASTER,
    ),
    PositionClosedBy(
        event_id="alpari-1001:deal:9005",
        ts_ns=T0 + 4,
        position_id="5003",
        opposite_position_id="5004",
        side=Side.SELL,
        volume=0.1,
        **MASTER,
    ),
    PendingOrderPlaced(
        event_id="alpari-1001:order:9006",
        ts_ns=T0 + 5,
        order_id="7001",
        order_type=OrderType.BUY_LIMIT,
        volume=1.0,
        price=2600.0,
        sl=2590.0,
        tp=2700.0,
        expiration_ns=T0 + 86_400 * 10**9,
        magic=7,
        comment="dip",
        **MASTER,
    ),
    PendingOrderModified(
        event_id="alpari-1001:order:9007",
        ts_ns=T0 + 6,
        order_id="7001",
        order_type=OrderType.BUY_LIMIT,
        price=2605.0,
        sl=2595.0,
        tp=None,
        magic=7,
        **MASTER,
    ),
    PendingOrderCancelled(
        event_id="alpari-1001:order:9008",
        ts_ns=T0 + 7,
        order_id="7002",
        order_type=OrderType.SELL_STOP,
        magic=7,
        **MASTER,
    ),
    PendingOrderTriggered(
        event_id="alpari-1001:deal:9009",
        ts_ns=T0 + 8,
        order_id="7001",
        order_type=OrderType.BUY_LIMIT,
        position_id="5005",
        side=Side.BUY,
        volume=1.0,
        price=2605.0,
        sl=2595.0,
        tp=2700.0,
        magic=7,
        **MASTER,
    ),
]

ORDER = {
    "link_id": "gold-x2",
    "follower": "icm-2002",
    "master": "alpari-1001",
    "symbol": "GOLD",
    "trace": Trace(terminal_ns=T0, replicator_out_ns=T0 + 600_000),
}

FOLLOWER_ORDERS: list[Any] = [
    FollowerOpen(
        order_id="alpari-1001:deal:9001:gold-x2",
        master_event_id="alpari-1001:deal:9001",
        ts_ns=T0 + 10,
        master_position_id="5001",
        side=Side.BUY,
        volume=1.0,
        sl=2640.0,
        tp=2680.0,
        magic=20020,
        comment="breakout",
        master_price=2650.35,
        master_volume=0.5,
        master_order_id=None,
        max_price_deviation=0.5,
        deviation_policy=DeviationPolicy.WAIT,
        deviation_wait_ms=1500,
        expires_ns=T0 + 2_000_000_000,
        **ORDER,
    ),
    FollowerModify(
        order_id="alpari-1001:mod:9002:gold-x2",
        master_event_id="alpari-1001:mod:9002",
        ts_ns=T0 + 11,
        master_position_id="5001",
        sl=2645.0,
        tp=None,
        **ORDER,
    ),
    FollowerClose(
        order_id="alpari-1001:deal:9003:gold-x2",
        master_event_id="alpari-1001:deal:9003",
        ts_ns=T0 + 12,
        master_position_id="5001",
        ratio=0.6,
        master_price=2660.1,
        new_master_position_id="5002",
        **ORDER,
    ),
    FollowerCloseBy(
        order_id="alpari-1001:deal:9005:gold-x2",
        master_event_id="alpari-1001:deal:9005",
        ts_ns=T0 + 13,
        master_position_id="5003",
        master_opposite_position_id="5004",
        **ORDER,
    ),
    FollowerCloseAll(
        order_id="protection:gold-x2:1",
        master_event_id="",
        ts_ns=T0 + 14,
        reason="max drawdown 20% reached",
        **ORDER,
    ),
    FollowerPendingPlace(
        order_id="alpari-1001:order:9006:gold-x2",
        master_event_id="alpari-1001:order:9006",
        ts_ns=T0 + 15,
        master_order_id="7001",
        order_type=OrderType.BUY_LIMIT,
        volume=2.0,
        price=2600.0,
        sl=2590.0,
        tp=2700.0,
        expiration_ns=T0 + 86_400 * 10**9,
        magic=20020,
        comment="dip",
        master_volume=1.0,
        **ORDER,
    ),
    FollowerPendingModify(
        order_id="alpari-1001:order:9007:gold-x2",
        master_event_id="alpari-1001:order:9007",
        ts_ns=T0 + 16,
        master_order_id="7001",
        price=2605.0,
        sl=2595.0,
        tp=None,
        expiration_ns=0,
        **ORDER,
    ),
    FollowerPendingCancel(
        order_id="alpari-1001:order:9008:gold-x2",
        master_event_id="alpari-1001:order:9008",
        ts_ns=T0 + 17,
        master_order_id="7002",
        **ORDER,
    ),
]

REPORT = {"link_id": "gold-x2", "follower": "icm-2002", "trace": Trace(report_ns=T0 + 9_000_000)}

EXECUTION_REPORTS: list[Any] = [
    OrderFilled(
        order_id="alpari-1001:deal:9001:gold-x2",
        ts_ns=T0 + 20,
        symbol="GOLD",
        position_id="88001",
        side=Side.BUY,
        volume=1.0,
        price=2650.55,
        master_price=2650.35,
        slippage=0.2,
        **REPORT,
    ),
    OrderPartiallyFilled(
        order_id="alpari-1001:deal:9001:gold-x2",
        ts_ns=T0 + 21,
        symbol="GOLD",
        position_id="88001",
        side=Side.BUY,
        volume_requested=1.0,
        volume_filled=0.4,
        price=2650.6,
        master_price=2650.35,
        slippage=0.25,
        **REPORT,
    ),
    OrderDone(
        order_id="alpari-1001:deal:9001:gold-x2",
        ts_ns=T0 + 24,
        detail="SL/TP modified",
        position_ids=["88001"],
        **REPORT,
    ),
    OrderRejected(
        order_id="alpari-1001:deal:9001:gold-x2",
        ts_ns=T0 + 22,
        code=10019,
        reason="TRADE_RETCODE_NO_MONEY",
        **REPORT,
    ),
    OrderUnknown(
        order_id="alpari-1001:deal:9001:gold-x2",
        ts_ns=T0 + 23,
        reason="terminal did not answer within 5 s",
        **REPORT,
    ),
]

COPY_LINK = CopyLink(
    link_id="gold-x2",
    master="alpari-1001",
    follower="icm-2002",
    sizing=RiskAmount(amount=250.0, currency="EUR"),
    max_lot=1.0,
    symbols_include=["XAUUSD.a"],
    symbol_mapping=SymbolMapping(pairs={"XAUUSD.a": "GOLD"}, strip_suffix=".a", add_suffix=".m"),
    direction=Direction.BUY_ONLY,
    magic_include=[2024],
    magic_exclude=[666],
    trading_hours=TradingHours(start="22:00", end="06:00", timezone="UTC", days=[7, 1, 2, 3, 4]),
    reverse=True,
    magic=20020,
    max_open_positions=5,
    max_signal_age_ms=2000,
    max_price_deviation=0.5,
    deviation_policy=DeviationPolicy.WAIT,
    deviation_wait_ms=1500,
    daily_trade_limit=20,
    equity_stop=2500.0,
    max_drawdown_percent=20.0,
    daily_loss_percent=5.0,
    protection_action=ProtectionAction.CLOSE_ALL,
)

OTHERS: list[Any] = [
    MasterEventRejected(
        rejection_id="rejected:4711",
        master="alpari-1001",
        subject="tc.v1.master.alpari-1001.events",
        reason=RejectionReason.VOLUME_ABOVE_SYMBOL_MAX,
        message="volume 1e+300 is above the master's XAUUSD maximum 100",
        ts_ns=T0 + 37,
        event_id="alpari-1001:deal:9001",
        event_type="position_opened",
        stream_seq=4711,
        numbers={"volume": 1e300, "volume_max": 100.0, "symbol": "XAUUSD"},
    ),
    CopyDecision(
        decision_id="alpari-1001:deal:9001:gold-x2:max_lot",
        link_id="gold-x2",
        master="alpari-1001",
        follower="icm-2002",
        outcome=DecisionOutcome.REDUCED,
        rule=DecisionRule.MAX_LOT,
        message="volume 2 capped at the link's max lot 1",
        ts_ns=T0 + 30,
        master_event_id="alpari-1001:deal:9001",
        numbers={"volume": 2.0, "max_lot": 1.0, "symbol": "GOLD", "sl": None},
    ),
    AccountState(
        account="icm-2002",
        ts_ns=T0 + 31,
        currency="EUR",
        balance=10_000.0,
        equity=9_850.5,
        margin=1_200.0,
        free_margin=8_650.5,
        leverage=500,
        open_positions=3,
        connector="mt5-eu-1",
    ),
    SymbolSpec(
        account="icm-2002",
        symbol="GOLD",
        ts_ns=T0 + 32,
        contract_size=100.0,
        tick_size=0.01,
        tick_value=0.93,
        digits=2,
        volume_min=0.01,
        volume_max=50.0,
        volume_step=0.01,
        trade_mode=TradeMode.LONG_ONLY,
    ),
    FxRate(base="EUR", quote="USD", rate=1.0842, ts_ns=T0 + 33),
    Quote(symbol="XAUUSD", bid=5010.5, ask=5010.69, ts_ns=T0 + 36),
    EmergencyStop(
        scope=StopScope.ACCOUNT,
        target="icm-2002",
        active=True,
        reason="margin call",
        ts_ns=T0 + 34,
    ),
    COPY_LINK,
    FollowerOrderBatch(
        batch_id="alpari-1001:deal:9001:mt5-eu-1",
        connector="mt5-eu-1",
        master="alpari-1001",
        master_event_id="alpari-1001:deal:9001",
        ts_ns=T0 + 35,
        orders=FOLLOWER_ORDERS,
    ),
]

STRATEGY_VERSION = uploaded_version(
    source="def strategy(candles, params):\n    return None\n",
    parameters={"fast": 10, "label": "x", "ratio": 0.5, "on": True, "off": None},
    author="provider-7",
    created_ns=T0 + 40,
)
SIGNAL_MESSAGES: list[Any] = [
    StrategySignal(
        version_id=STRATEGY_VERSION.version_id,
        symbol="XAUUSD",
        timeframe=Timeframe.M15,
        candle_close_ns=T0 + 41,
        signal=Signal(action=SignalAction.BUY, sl=5000.5, tp=None, comment="cross"),
        price=5010.5,
        worker="signals-1",
        emitted_ns=T0 + 42,
    ),
    StrategyRunFailed(
        version_id=STRATEGY_VERSION.version_id,
        symbol="XAUUSD",
        timeframe=Timeframe.H1,
        candle_close_ns=T0 + 43,
        kind=FailureKind.TIMEOUT,
        message="over 5s of wall-clock time",
        worker="signals-1",
        failed_ns=T0 + 44,
    ),
    StrategyDeployment(
        version=STRATEGY_VERSION,
        symbol="XAUUSD.a",
        timeframe=Timeframe.D1,
        history=200,
        volume=0.5,
        master="paper-master-1",
    ),
]
#: Families without a ``ts_ns``: their times are the candle's and the run's.
SIGNAL_FAMILIES = {"strategy_signal", "strategy_run_failed", "strategy_deployment"}

ALL_MESSAGES: list[Any] = (
    MASTER_EVENTS + FOLLOWER_ORDERS + EXECUTION_REPORTS + OTHERS + SIGNAL_MESSAGES
)

DECODERS: dict[str, Any] = {
    "master_event": codec.master_event_decoder,
    "follower_order": codec.follower_order_decoder,
    "follower_order_batch": codec.follower_order_batch_decoder,
    "execution_report": codec.execution_report_decoder,
    "copy_decision": codec.decision_decoder,
    "master_event_rejected": codec.rejection_decoder,
    "account_state": codec.account_state_decoder,
    "symbol_spec": codec.symbol_spec_decoder,
    "fx_rate": codec.fx_rate_decoder,
    "quote": codec.quote_decoder,
    "emergency_stop": codec.emergency_stop_decoder,
    "copy_link": codec.copy_link_decoder,
    "strategy_signal": signal_decoder,
    "strategy_run_failed": failure_decoder,
    # JSON on the wire (the deployments bucket); the schema tests see it as msgpack decodes it.
    "strategy_deployment": msgspec.msgpack.Decoder(StrategyDeployment),
}
#: JSON on the wire (the terminal bridge), covered by tests/test_bridge_protocol.py.
BRIDGE_FAMILIES = {"bridge_terminal_frame", "bridge_connector_frame"}


def _family(message: Any) -> str:
    """The MESSAGES stem whose type ``message`` belongs to."""
    for stem, tp in MESSAGES.items():
        members = get_args(tp) or (tp,)
        if type(message) in members:
            return stem
    raise AssertionError(f"{type(message).__name__} is in no message family")


def _id(message: Any) -> str:
    return type(message).__name__


#: Configurations refuse unknown fields (a misspelt setting is an error, not a default).
WIRE_MESSAGES = [m for m in ALL_MESSAGES if not isinstance(m, CopyLink | StrategyDeployment)]


def test_the_fixtures_cover_every_variant_of_every_family() -> None:
    assert set(DECODERS) == set(MESSAGES) - BRIDGE_FAMILIES
    assert {type(m) for m in MASTER_EVENTS} == set(get_args(MasterEvent))
    assert {type(m) for m in FOLLOWER_ORDERS} == set(get_args(FollowerOrder))
    assert {type(m) for m in EXECUTION_REPORTS} == set(get_args(ExecutionReport))
    assert {_family(m) for m in ALL_MESSAGES} == set(MESSAGES) - BRIDGE_FAMILIES


# --------------------------------------------------------------------------------------------
# JSON Schema export
# --------------------------------------------------------------------------------------------


def test_checked_in_json_schema_is_not_stale() -> None:
    assert stale_schemas() == [], "run `tradecopy schema export` and commit schemas/json/"


def test_checked_in_directory_holds_exactly_the_exported_files() -> None:
    assert {p.name for p in JSON_DIR.glob("*.json")} == {f"{stem}.json" for stem in MESSAGES}


def test_a_modified_or_missing_copy_is_reported_stale(tmp_path: Path) -> None:
    copy = tmp_path / "json"
    shutil.copytree(JSON_DIR, copy)
    assert stale_schemas(copy) == []

    path = copy / "copy_link.json"
    schema = json.loads(path.read_text())
    schema["title"] = "edited by hand"
    path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    (copy / "fx_rate.json").unlink()
    # Whitespace counts too: the files must be exactly what the exporter writes.
    (copy / "symbol_spec.json").write_text((copy / "symbol_spec.json").read_text() + "\n")

    assert sorted(stale_schemas(copy)) == ["copy_link.json", "fx_rate.json", "symbol_spec.json"]


def test_export_writes_one_valid_file_per_message(tmp_path: Path) -> None:
    target = tmp_path / "out" / "nested"
    written = export_schemas(target)

    assert sorted(p.name for p in written) == sorted(f"{stem}.json" for stem in MESSAGES)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in written)
    for stem in MESSAGES:
        schema = json.loads((target / f"{stem}.json").read_text())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"].endswith(f"/{stem}.json")
        assert schema["$id"].startswith("tradecopy/v")
        assert schema["title"] == stem
    assert stale_schemas(target) == []
    # Deterministic: exporting twice gives the same text.
    assert render_schemas() == render_schemas()
    export_schemas(target)
    assert stale_schemas(target) == []


def test_copy_link_schema_lists_every_sizing_mode() -> None:
    schema = json.loads((JSON_DIR / "copy_link.json").read_text())
    defs = schema["$defs"]
    sizing = defs["CopyLink"]["properties"]["sizing"]
    modes = {cls.__struct_config__.tag: cls.__name__ for cls in get_args(Sizing)}
    assert len(modes) == 7

    assert sizing["discriminator"] == {"propertyName": "mode"}
    assert sizing["type"] == "object"
    assert sorted(ref["$ref"] for ref in sizing["oneOf"]) == sorted(
        f"#/$defs/{name}" for name in modes.values()
    )
    for mode, name in modes.items():
        assert defs[name]["properties"]["mode"] == {"const": mode}
        assert "mode" in defs[name]["required"]
        assert defs[name]["additionalProperties"] is False
    assert sizing["default"] == {"mode": "multiplier", "factor": 1.0}
    assert defs["CopyLink"]["additionalProperties"] is False


def _unions(schema: Any) -> list[dict[str, Any]]:
    """Every subschema of ``schema`` that holds a ``discriminator``."""
    if isinstance(schema, list):
        return [u for sub in schema for u in _unions(sub)]
    if not isinstance(schema, dict):
        return []
    found = [schema] if "discriminator" in schema else []
    return found + [u for value in schema.values() for u in _unions(value)]


def test_tagged_unions_in_the_schema_use_their_tag_field() -> None:
    for stem, tag_field, union in (
        ("master_event", "type", MasterEvent),
        ("follower_order", "type", FollowerOrder),
        ("execution_report", "status", ExecutionReport),
    ):
        schema = json.loads((JSON_DIR / f"{stem}.json").read_text())
        assert schema["discriminator"] == {"propertyName": tag_field}
        variants = [schema["$defs"][ref["$ref"].split("/")[-1]] for ref in schema["oneOf"]]
        tags = {v["properties"][tag_field]["const"] for v in variants}
        assert tags == {cls.__struct_config__.tag for cls in get_args(union)}


@pytest.mark.parametrize("stem", sorted(MESSAGES))
def test_every_union_has_the_shape_strict_validators_accept(stem: str) -> None:
    # ajv (discriminator: true) accepts oneOf + discriminator.propertyName, no mapping, no
    # anyOf, with every variant holding the tag as a const in properties and required.
    schema = json.loads((JSON_DIR / f"{stem}.json").read_text())
    for union in _unions(schema):
        tag = union["discriminator"]["propertyName"]
        assert union["discriminator"] == {"propertyName": tag}
        assert "anyOf" not in union
        assert union["type"] == "object"
        for ref in union["oneOf"]:
            assert set(ref) == {"$ref"}
            variant = schema["$defs"][ref["$ref"].removeprefix("#/$defs/")]
            assert set(variant["properties"][tag]) == {"const"}
            assert tag in variant["required"]


@pytest.mark.parametrize("stem", sorted(MESSAGES))
def test_every_schema_is_a_valid_draft_2020_12_schema(stem: str) -> None:
    schema = json.loads((JSON_DIR / f"{stem}.json").read_text())
    Draft202012Validator.check_schema(schema)


def _integer_properties(schema: Any) -> list[tuple[str, dict[str, Any]]]:
    """(name, property schema) of every integer (or nullable / array of integer) property."""
    out = []
    for definition in schema.get("$defs", {}).values():
        for name, prop in definition.get("properties", {}).items():
            options = [prop, prop.get("items", {}), *prop.get("anyOf", [])]
            if any(option.get("type") == "integer" for option in options):
                out.append((name, prop))
    return out


@pytest.mark.parametrize("stem", sorted(MESSAGES))
def test_every_integer_field_is_documented_as_int64_on_the_wire(stem: str) -> None:
    schema = json.loads((JSON_DIR / f"{stem}.json").read_text())
    integers = _integer_properties(schema)
    for name, prop in integers:
        assert "int64 on the wire" in prop["description"], (stem, name)
        if name.endswith("_ns"):
            assert "BigInt" in prop["description"], (stem, name)
            if stem not in JSON_WIRE:
                assert "useBigInt64" in prop["description"], (stem, name)
    if stem not in BRIDGE_FAMILIES | SIGNAL_FAMILIES and stem != "copy_link":
        assert any(name == "ts_ns" for name, _ in integers), stem


# --------------------------------------------------------------------------------------------
# Validating wire messages with the exported JSON Schema
# --------------------------------------------------------------------------------------------


def _example_contract() -> Any:
    """docs/examples/python/contract.py: the recipe schemas/README.md gives Python consumers."""
    path = EXAMPLES / "python" / "contract.py"
    spec = importlib.util.spec_from_file_location("example_contract", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: Draft 2020-12 whose ``oneOf`` honours ``discriminator`` as ajv does (plain jsonschema gives
#: one opaque "not valid under any of the given schemas" error for a bad union member).
ContractValidator = _example_contract().ContractValidator


def _schema_validator(stem: str) -> Any:
    return ContractValidator(json.loads((JSON_DIR / f"{stem}.json").read_text()))


def _as_on_the_wire(message: Any) -> Any:
    """The message as any msgpack decoder sees it: plain maps, lists, ints, floats, strings."""
    return msgspec.msgpack.decode(codec.encode(message))


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=_id)
def test_every_encoded_message_validates_against_its_json_schema(message: Any) -> None:
    validator = _schema_validator(_family(message))
    errors = list(validator.iter_errors(_as_on_the_wire(message)))
    assert errors == []
    # Draft 2020-12 as it is, without the discriminator recipe, agrees.
    plain = Draft202012Validator(validator.schema)
    assert list(plain.iter_errors(_as_on_the_wire(message))) == []


def _required_without_default(message: Any) -> list[str]:
    defaults = _defaults(type(message))
    tag = type(message).__struct_config__.tag_field
    return [
        f.encode_name
        for f in msgspec.structs.fields(type(message))
        if f.encode_name not in defaults and f.encode_name != tag
    ]


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=_id)
def test_a_message_missing_a_required_field_gets_one_error_naming_it(message: Any) -> None:
    validator = _schema_validator(_family(message))
    for field in _required_without_default(message):
        data = _as_on_the_wire(message)
        del data[field]
        errors = list(validator.iter_errors(data))
        assert len(errors) == 1, (field, [e.message for e in errors])
        assert errors[0].message == f"{field!r} is a required property"


@pytest.mark.parametrize("message", MASTER_EVENTS + FOLLOWER_ORDERS + EXECUTION_REPORTS, ids=_id)
def test_a_union_member_with_an_unknown_tag_gets_one_error(message: Any) -> None:
    validator = _schema_validator(_family(message))
    data = _as_on_the_wire(message)
    tag = type(message).__struct_config__.tag_field
    data[tag] = "position_teleported"
    [error] = validator.iter_errors(data)
    assert "position_teleported" in error.message
    del data[tag]
    [error] = validator.iter_errors(data)
    assert tag in error.message


def test_a_float_ns_time_is_refused_by_the_decoder_naming_the_field_as_int64() -> None:
    # JSON Schema's integer admits 1.0, and a msgpack decoder in JavaScript returns the same
    # Number for 1.0 and 1: the decoder, which sees the msgpack type, is what refuses it.
    data = _as_on_the_wire(MASTER_EVENTS[0])
    data["ts_ns"] = float(data["ts_ns"])
    assert list(_schema_validator("master_event").iter_errors(data)) == []
    with pytest.raises(msgspec.ValidationError) as info:
        codec.master_event_decoder.decode(msgspec.msgpack.encode(data))
    assert "`$.ts_ns`" in str(info.value)
    assert "int64 on the wire" in str(info.value)
    assert "nanosecond" in str(info.value)
    # Another integer field says int64 too, without the part about times.
    data = _as_on_the_wire(MASTER_EVENTS[0])
    data["magic"] = 7.0
    with pytest.raises(msgspec.ValidationError, match=r"`\$\.magic` \(int64 on the wire"):
        codec.master_event_decoder.decode(msgspec.msgpack.encode(data))


def test_a_float64_cannot_carry_a_nanosecond_time_exactly() -> None:
    # Why integer-valued floats are not accepted for *_ns: around 2025 neighbouring float64
    # values are 256 ns apart, so the time a producer meant is lost before it is sent.
    assert float(T0 + 1) == float(T0)
    assert int(float(T0 + 100)) != T0 + 100


def test_indented_and_dedented_descriptions_normalise_to_the_same_text() -> None:
    # Docstring descriptions as msgspec < 0.23 renders them under Python <= 3.12: the source
    # indentation kept after the first line, blank edge lines and whitespace-only lines kept.
    indented = {
        "description": "A batch.\n\n    Sent as one message.\n        Nested line.\n    ",
        "$defs": {
            "Fill": {
                "description": "A fill.\n    \n    The price is in the symbol's units.\n",
                "properties": {"price": {"type": "number", "description": "  Price.  "}},
            },
            "Order": {"anyOf": [{"description": "\n    One.\n    Two.\n    "}]},
        },
        "items": {"description": "An item.\n\n    Of the batch."},
    }
    # The same docstrings as msgspec 0.23 or Python 3.13 renders them: already dedented.
    dedented = {
        "description": "A batch.\n\nSent as one message.\n    Nested line.",
        "$defs": {
            "Fill": {
                "description": "A fill.\n\nThe price is in the symbol's units.",
                "properties": {"price": {"type": "number", "description": "Price."}},
            },
            "Order": {"anyOf": [{"description": "One.\nTwo."}]},
        },
        "items": {"description": "An item.\n\nOf the batch."},
    }
    assert indented != dedented
    assert normalize_schema(indented) == normalize_schema(dedented) == dedented
    assert normalize_schema(normalize_schema(indented)) == dedented


def test_normalisation_leaves_data_and_property_names_alone() -> None:
    schema = {
        "properties": {
            "description": {"type": "string", "description": "  The note.  "},
            "default": {"type": "object", "description": "\n    Nested.\n"},
        },
        "required": ["description"],
        "default": {"description": "  kept as is  "},
        "examples": [{"description": "  kept  "}],
        "enum": ["  kept  "],
    }
    assert normalize_schema(schema) == {
        "properties": {
            "description": {"type": "string", "description": "The note."},
            "default": {"type": "object", "description": "Nested."},
        },
        "required": ["description"],
        "default": {"description": "  kept as is  "},
        "examples": [{"description": "  kept  "}],
        "enum": ["  kept  "],
    }


def test_null_is_the_last_option_of_any_of_whatever_msgspec_rendered_it() -> None:
    # msgspec before 0.22 lists None where the union declares it, later versions always last.
    ref = {"$ref": "#/$defs/TradingHours"}
    tagged = {"anyOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}], "discriminator": {}}
    old = {"anyOf": [{"type": "null"}, ref], "items": {"anyOf": [{"type": "null"}, tagged]}}
    new = {"anyOf": [ref, {"type": "null"}], "items": {"anyOf": [tagged, {"type": "null"}]}}
    assert normalize_schema(old) == normalize_schema(new) == new
    # The other options keep their order: for a tagged union it is the declaration order.
    mixed = {"anyOf": [{"type": "integer"}, {"type": "null"}, {"type": "string"}, tagged]}
    assert normalize_schema(mixed)["anyOf"] == [
        {"type": "integer"},
        {"type": "string"},
        tagged,
        {"type": "null"},
    ]


def _fill_with_indented_docstring() -> type[msgspec.Struct]:
    class Fill(msgspec.Struct, frozen=True):
        """A fill of a follower order.

        The price is in the symbol's price units;
            this line is indented further on purpose.
        """

        price: float

    return Fill


def _fill_with_dedented_docstring() -> type[msgspec.Struct]:
    class Fill(msgspec.Struct, frozen=True):
        # What Python 3.13 stores for the docstring above.
        __doc__ = (
            "A fill of a follower order.\n\nThe price is in the symbol's price units;\n"
            "    this line is indented further on purpose.\n"
        )

        price: float

    return Fill


def test_an_indented_docstring_renders_like_a_dedented_one() -> None:
    indented, dedented = _fill_with_indented_docstring(), _fill_with_dedented_docstring()
    if sys.version_info < (3, 13):
        # Python 3.13 dedents docstrings when it compiles them; before it they really differ.
        assert indented.__doc__ != dedented.__doc__
    assert render_schema("fill", indented) == render_schema("fill", dedented)
    assert json.loads(render_schema("fill", indented))["$defs"]["Fill"]["description"] == (
        "A fill of a follower order.\n\nThe price is in the symbol's price units;\n"
        "    this line is indented further on purpose."
    )


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=_id)
def test_every_message_round_trips_through_its_decoder(message: Any) -> None:
    decoder = DECODERS[_family(message)]
    decoded = decoder.decode(codec.encode(message))
    assert decoded == message
    assert type(decoded) is type(message)


def test_every_example_link_round_trips() -> None:
    for link in load_links(EXAMPLE_LINKS):
        assert codec.copy_link_decoder.decode(codec.encode(link)) == link


@pytest.mark.parametrize(
    "sizing",
    [
        FixedLot(lots=0.1),
        Multiplier(factor=2.0),
        BalanceRatio(factor=0.5),
        EquityRatio(),
        FreeMarginRatio(factor=1.5),
        RiskPercent(percent=1.0),
        RiskAmount(amount=250.0),
        RiskAmount(amount=250.0, currency="EUR"),
    ],
    ids=repr,
)
def test_every_sizing_mode_round_trips_inside_a_link(sizing: Any) -> None:
    link = msgspec.structs.replace(COPY_LINK, sizing=sizing)
    decoded = codec.copy_link_decoder.decode(codec.encode(link))
    assert decoded == link
    assert type(decoded.sizing) is type(sizing)


# --------------------------------------------------------------------------------------------
# Evolution rules
# --------------------------------------------------------------------------------------------


def _builtins(message: Any) -> dict[str, Any]:
    data = msgspec.to_builtins(message)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("message", WIRE_MESSAGES, ids=_id)
def test_wire_decoders_ignore_unknown_fields(message: Any) -> None:
    """Forward compatibility: a newer producer's extra field does not break an old consumer."""
    data = _builtins(message)
    data["added_in_a_later_version"] = {"nested": [1, 2.5, "x"], "flag": True}
    data["zz_other"] = None
    decoded = DECODERS[_family(message)].decode(msgspec.msgpack.encode(data))
    assert decoded == message


def test_unknown_fields_inside_nested_wire_structs_are_ignored() -> None:
    batch = OTHERS[-1]
    data = _builtins(batch)
    for order in data["orders"]:
        order["future"] = 1
        order["trace"]["future_hop_ns"] = T0
    assert codec.follower_order_batch_decoder.decode(msgspec.msgpack.encode(data)) == batch


def test_copy_link_rejects_unknown_fields_naming_them() -> None:
    data = _builtins(COPY_LINK)
    data["colour"] = "blue"
    with pytest.raises(msgspec.ValidationError, match="`colour`"):
        codec.copy_link_decoder.decode(msgspec.msgpack.encode(data))

    data = _builtins(COPY_LINK)
    data["trading_hours"]["tz"] = "UTC"
    with pytest.raises(msgspec.ValidationError, match=r"`tz`.*trading_hours"):
        codec.copy_link_decoder.decode(msgspec.msgpack.encode(data))

    data = _builtins(COPY_LINK)
    data["sizing"]["leverage"] = 10
    with pytest.raises(msgspec.ValidationError, match=r"`leverage`.*sizing"):
        codec.copy_link_decoder.decode(msgspec.msgpack.encode(data))


def _defaults(tp: type) -> dict[str, Any]:
    out = {}
    for field in msgspec.structs.fields(tp):
        if field.default is not msgspec.NODEFAULT:
            out[field.encode_name] = field.default
        elif field.default_factory is not msgspec.NODEFAULT:
            out[field.encode_name] = field.default_factory()
    return out


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=_id)
def test_messages_without_defaulted_fields_still_decode(message: Any) -> None:
    """Backward compatibility: an old producer that never heard of a defaulted field."""
    defaults = _defaults(type(message))
    data = {k: v for k, v in _builtins(message).items() if k not in defaults}
    decoded = DECODERS[_family(message)].decode(msgspec.msgpack.encode(data))
    assert type(decoded) is type(message)
    for name in msgspec.structs.fields(type(message)):
        value = getattr(decoded, name.name)
        if name.encode_name in defaults:
            assert value == defaults[name.encode_name], name.name
        else:
            assert value == getattr(message, name.name), name.name


# --------------------------------------------------------------------------------------------
# Tagged unions and hostile input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decoder", "message", "tag_field"),
    [
        (codec.master_event_decoder, MASTER_EVENTS[0], "type"),
        (codec.follower_order_decoder, FOLLOWER_ORDERS[0], "type"),
        (codec.execution_report_decoder, EXECUTION_REPORTS[0], "status"),
    ],
    ids=["master_event", "follower_order", "execution_report"],
)
@pytest.mark.parametrize("tag", ["position_teleported", "", "POSITION_OPENED", 3, None])
def test_an_unknown_tag_is_a_validation_error(
    decoder: msgspec.msgpack.Decoder[Any], message: Any, tag_field: str, tag: Any
) -> None:
    data = _builtins(message)
    data[tag_field] = tag
    with pytest.raises(msgspec.ValidationError) as info:
        decoder.decode(msgspec.msgpack.encode(data))
    assert tag_field in str(info.value)


def test_a_missing_tag_is_a_validation_error() -> None:
    data = _builtins(MASTER_EVENTS[0])
    del data["type"]
    with pytest.raises(msgspec.ValidationError, match="`type`"):
        codec.master_event_decoder.decode(msgspec.msgpack.encode(data))


def test_a_tag_of_another_family_is_rejected() -> None:
    data = _builtins(FOLLOWER_ORDERS[0])  # "type": "open" is not a master event
    with pytest.raises(msgspec.ValidationError):
        codec.master_event_decoder.decode(msgspec.msgpack.encode(data))


def test_invalid_values_are_validation_errors() -> None:
    data = _builtins(MASTER_EVENTS[0])
    data["volume"] = -1.0
    with pytest.raises(msgspec.ValidationError, match=r"\$\.volume"):
        codec.master_event_decoder.decode(msgspec.msgpack.encode(data))
    data = _builtins(MASTER_EVENTS[0])
    data["master"] = "alpari.1001"
    with pytest.raises(msgspec.ValidationError, match=r"\$\.master"):
        codec.master_event_decoder.decode(msgspec.msgpack.encode(data))


def test_a_time_zone_directory_in_a_stored_link_is_a_validation_error() -> None:
    data = _builtins(COPY_LINK)
    data["trading_hours"]["timezone"] = "America"
    with pytest.raises(msgspec.ValidationError):
        codec.copy_link_decoder.decode(msgspec.msgpack.encode(data))


@pytest.mark.parametrize("field", ["type", "comment", "symbol"])
def test_invalid_utf8_in_a_master_event_is_rejected_as_undecodable(field: str) -> None:
    data = _builtins(MASTER_EVENTS[0])
    data[field] = "@@@@"
    payload = msgspec.msgpack.encode(data)
    assert payload.count(b"\xa4@@@@") == 1
    payload = payload.replace(b"\xa4@@@@", b"\xa4\x80\x80\x80\x80")  # a str, not UTF-8
    # msgspec raises UnicodeDecodeError here, not DecodeError; the replicator catches both.
    with pytest.raises((msgspec.DecodeError, UnicodeDecodeError)):
        codec.master_event_decoder.decode(payload)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=256))
def test_random_bytes_only_raise_decode_errors(payload: bytes) -> None:
    for decoder in DECODERS.values():
        # ValidationError is a DecodeError; msgspec reports bad UTF-8 as UnicodeDecodeError
        # (see test_invalid_utf8_in_a_master_event_is_rejected_as_undecodable).
        with contextlib.suppress(msgspec.DecodeError, UnicodeDecodeError):
            decoder.decode(payload)


_KEYS = sorted(
    {
        f.encode_name
        for tp in MESSAGES.values()
        for cls in (get_args(tp) or (tp,))
        for f in msgspec.structs.fields(cls)
    }
    | {"type", "status", "mode"}
)
_TAGS = sorted(
    {
        cls.__struct_config__.tag
        for tp in [MasterEvent, FollowerOrder, ExecutionReport, Sizing]
        for cls in get_args(tp)
    }
)
_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from([*_TAGS, "buy", "sell", "UTC", "08:00", "EUR", "acc-1"])
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), children, max_size=8)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(value=st.dictionaries(st.sampled_from(_KEYS), _msgpack_values, max_size=14))
def test_random_well_formed_msgpack_only_raises_validation_errors(value: dict[str, Any]) -> None:
    payload = msgspec.msgpack.encode(value)
    for decoder in DECODERS.values():
        with contextlib.suppress(msgspec.ValidationError):
            decoder.decode(payload)


# --------------------------------------------------------------------------------------------
# Subjects and KV keys
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z0-9_=-]*")


@settings(max_examples=500)
@given(
    text=st.text()
    | st.text(alphabet=st.sampled_from(list(". =_-*>/\\\t\nAbz09éß€日本🙂")), max_size=20)
)
def test_key_tokens_round_trip_and_are_safe(text: str) -> None:
    token = subjects.encode_key_token(text)
    assert _TOKEN.fullmatch(token), token
    assert subjects.decode_key_token(token) == text


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("EURUSD", "EURUSD"),
        ("usdjpy.", "usdjpy=2E"),
        ("US 30", "US=2030"),
        ("a=b", "a=3Db"),
        ("€", "=E2=82=AC"),
        ("", ""),
    ],
)
def test_key_token_examples(text: str, token: str) -> None:
    assert subjects.encode_key_token(text) == token
    assert subjects.decode_key_token(token) == text


def test_symbol_key_has_no_trailing_dot() -> None:
    key = subjects.symbol_key("acc", "usdjpy.")
    assert key == "acc.usdjpy=2E"
    assert not key.endswith(".")
    assert key.count(".") == 1


def test_subjects_are_under_the_versioned_prefix() -> None:
    assert subjects.PREFIX == "tc.v1"
    assert subjects.master_events("alpari-1001") == "tc.v1.master.alpari-1001.events"
    assert subjects.follower_orders("icm-2002") == "tc.v1.follower.icm-2002.orders"
    assert subjects.execution_reports("icm-2002") == "tc.v1.follower.icm-2002.reports"
    assert subjects.connector_orders("mt5-eu-1") == "tc.v1.connector.mt5-eu-1.orders"
    assert subjects.decisions("icm-2002", "gold-x2") == "tc.v1.decision.icm-2002.gold-x2"
    assert subjects.master_partition_filter(3) == "tc.v1.mp.3.*"
    assert subjects.master_rejections("alpari-1001") == "tc.v1.master.alpari-1001.rejections"
    assert EmergencyStop(scope=StopScope.ACCOUNT, target="acc-1").key == "account.acc-1"
    assert EmergencyStop(scope=StopScope.LINK, target="gold-x2").key == "link.gold-x2"
    assert EmergencyStop(scope=StopScope.GLOBAL).key == "global"


def test_rejections_are_outside_the_master_event_stream_and_have_their_own() -> None:
    # A producer's events and the replicator's answers to them must never mix: a rejection
    # on an events subject would be taken for an event (and rejected in turn).
    rejections = subjects.master_rejections("alpari-1001")
    assert not _matches(subjects.MASTER_EVENTS_IN, rejections)
    assert _matches(subjects.MASTER_REJECTIONS, rejections)
    streams = {s.name: s for s in all_streams()}
    [owner] = [s for s in streams.values() if any(_matches(p, rejections) for p in s.subjects)]
    assert owner.name == REJECTIONS_STREAM
    assert owner.max_age == streams[DECISIONS_STREAM].max_age  # kept like decisions
    assert owner.duplicate_window == streams[DECISIONS_STREAM].duplicate_window


@pytest.mark.parametrize(
    ("subject", "master"),
    [
        ("tc.v1.mp.3.alpari-1001", "alpari-1001"),
        ("tc.v1.master.alpari-1001.events", "alpari-1001"),
        ("tc.v1.mp.12.a_b-c", "a_b-c"),
    ],
)
def test_the_master_a_subject_names(subject: str, master: str) -> None:
    assert subjects.master_from_subject(subject) == master


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` the rest."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def test_a_deployment_round_trips_as_json_the_way_the_deployments_bucket_holds_it() -> None:
    deployment = SIGNAL_MESSAGES[-1]
    assert deployment_decoder.decode(msgspec.json.encode(deployment)) == deployment
    # Empty master: signals only.
    data = msgspec.to_builtins(deployment)
    del data["master"]
    assert deployment_decoder.decode(msgspec.json.encode(data)).master == ""


@pytest.mark.parametrize("master", ["has space", "a.b", "x" * 65, "acc\n", "tc.*"])
def test_a_deployment_refuses_a_master_that_is_not_an_account_id(master: str) -> None:
    data = msgspec.to_builtins(SIGNAL_MESSAGES[-1])
    data["master"] = master
    with pytest.raises(msgspec.ValidationError, match=r"\$\.master"):
        deployment_decoder.decode(msgspec.json.encode(data))


def test_a_deployment_key_is_one_kv_key_per_version_symbol_and_timeframe() -> None:
    key = subjects.deployment_key("sv-0123456789abcdef01234567", "usdjpy.", Timeframe.M15)
    assert key == "sv-0123456789abcdef01234567.usdjpy=2E.15m"
    assert re.fullmatch(r"[A-Za-z0-9_=.-]+", key)
    assert subjects.deployment_key("sv-0123456789abcdef01234567", "usdjpy", "15m") != key
