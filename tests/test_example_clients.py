"""The example clients in docs/examples/ against a live secured stack, and float times refused."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import wait_until
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from engine.runtime.natsauth import Role
from engine.runtime.stack import LocalStack
from schemas import codec, subjects
from schemas.export import MESSAGES
from schemas.links import CopyLink, Multiplier
from schemas.rejections import RejectionReason
from schemas.streams import (
    DECISIONS_STREAM,
    EXECUTION_REPORTS_STREAM,
    FOLLOWER_ORDERS_STREAM,
    MASTER_EVENTS_STREAM,
    REJECTIONS_STREAM,
)

#: JSON on the wire (the terminal bridge): not something a NATS client sees.
BRIDGE_FAMILIES = {"bridge_terminal_frame", "bridge_connector_frame"}

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "docs" / "examples" / "node"
PYTHON_CLIENT = ROOT / "docs" / "examples" / "python" / "client.py"

CONNECTOR = "platform-node"
MASTER = "platform-master"
FOLLOWER = "platform-follower"
LINK = "platform-x2"

#: Streams the audit reads, and the KV buckets that hold contract messages.
AUDITED_STREAMS = (
    MASTER_EVENTS_STREAM,
    FOLLOWER_ORDERS_STREAM,
    EXECUTION_REPORTS_STREAM,
    DECISIONS_STREAM,
    REJECTIONS_STREAM,
)
AUDITED_BUCKETS = (
    subjects.KV_ACCOUNTS,
    subjects.KV_SYMBOLS,
    subjects.KV_LINKS,
    subjects.KV_CONTROL,
    subjects.KV_FX,
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: CI must run the Node.js example client")
        pytest.skip(f"{name} not installed (Node.js 18+ runs docs/examples/node)")
    return path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``node``, with the example's locked dependencies installed by ``npm ci``."""
    node, npm = _tool("node"), _tool("npm")
    cache = tmp_path_factory.mktemp("npm-cache")
    env = {**os.environ, "npm_config_cache": str(cache), "npm_config_update_notifier": "false"}
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return node


async def _run(
    argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 120.0
) -> tuple[int, str, str]:
    """Run a client without blocking the event loop the stack's own clients live on."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _summary(out: str) -> dict[str, Any]:
    """The client's last line: its counts as JSON."""
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"the client printed no summary:\n{out}"
    summary = json.loads(lines[-1])
    assert isinstance(summary, dict)
    return summary


async def _stored(js: JetStreamContext, stream: str) -> list[Any]:
    """Every message ``stream`` holds, read with an ordered consumer."""
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return []
    sub = await js.subscribe(
        ">", stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    out = []
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            out.append(msg)
            if msg.metadata.sequence.stream >= info.state.last_seq:
                return out
    finally:
        await sub.unsubscribe()


@pytest.fixture
async def copy_stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    """A secured stack with one replicator, one link, and the platform's connector user."""
    stack = LocalStack(tmp_path / "nats", name="tc-example-clients")
    await stack.add_connector(CONNECTOR, masters=[MASTER], followers=[FOLLOWER])
    await stack.start()
    try:
        stack.spawn_replicators(1, instance="examples")
        await stack.wait_for_replicator()
        link = CopyLink(
            link_id=LINK, master=MASTER, follower=FOLLOWER, sizing=Multiplier(factor=2.0)
        )
        await stack.apply_links([link])
        yield stack
    finally:
        await stack.stop()


def _connector_env(stack: LocalStack) -> dict[str, str]:
    user = stack.connector_user(CONNECTOR)
    assert user is not None
    return stack.child_env(user)


# --------------------------------------------------------------------------------------------
# A float nanosecond time is refused, visibly
# --------------------------------------------------------------------------------------------


async def test_a_float_ts_ns_is_rejected_on_the_rejections_subject_naming_the_field_as_int64(
    copy_stack: LocalStack,
) -> None:
    stack = copy_stack
    producer = await stack.connect("float-producer", stack.connector_user(CONNECTOR))
    event = {
        "type": "position_opened",
        "event_id": f"{MASTER}:deal:float",
        "master": MASTER,
        "symbol": "XAUUSD",
        "ts_ns": time.time() * 1e9,  # what a JavaScript Number gives: a float64
        "position_id": "1",
        "side": "buy",
        "volume": 0.1,
        "price": 2650.0,
    }
    payload = msgspec.msgpack.encode(event)
    assert payload[payload.index(b"ts_ns") + 5] == 0xCB  # a msgpack float64 on the wire
    ack = await producer.jetstream().publish(
        subjects.master_events(MASTER), payload, headers={"Nats-Msg-Id": event["event_id"]}
    )

    found: list[Any] = []

    async def answered() -> bool:
        found[:] = [
            codec.rejection_decoder.decode(m.data)
            for m in await _stored(stack.js, REJECTIONS_STREAM)
        ]
        return bool(found)

    await wait_until(answered, "the rejection of the float ts_ns event")
    [rejection] = found
    assert rejection.reason is RejectionReason.INVALID_PAYLOAD
    assert rejection.stream_seq == ack.seq
    assert rejection.subject == subjects.master_events(MASTER)
    assert "`$.ts_ns`" in rejection.message
    assert "int64" in rejection.message
    # The same event with an integer time is copied: the float was the only fault.
    event = {**event, "event_id": f"{MASTER}:deal:int", "ts_ns": time.time_ns()}
    await producer.jetstream().publish(
        subjects.master_events(MASTER),
        msgspec.msgpack.encode(event),
        headers={"Nats-Msg-Id": event["event_id"]},
    )
    await wait_until(
        lambda: _has_decision_or_order(stack.js, event["event_id"]),
        "the integer-time event to be copied or decided on",
    )
    assert len(await _stored(stack.js, REJECTIONS_STREAM)) == 1


async def _has_decision_or_order(js: JetStreamContext, event_id: str) -> bool:
    # Without account state the replicator skips the copy with a decision: either way the
    # event was accepted, which is what the contrast needs.
    for stream in (FOLLOWER_ORDERS_STREAM, DECISIONS_STREAM):
        for m in await _stored(js, stream):
            if event_id.encode() in m.data:
                return True
    return False


# --------------------------------------------------------------------------------------------
# The Node.js client
# --------------------------------------------------------------------------------------------


async def test_node_client_publishes_master_events_and_sees_its_follower_orders(
    node: str, copy_stack: LocalStack
) -> None:
    stack = copy_stack
    argv = [node, "client.mjs", "copy", "--url", stack.url, "--connector", CONNECTOR]
    argv += ["--master", MASTER, "--follower", FOLLOWER, "--link", LINK]
    rc, out, err = await _run(argv, _connector_env(stack), NODE_DIR)
    assert rc == 0, f"node client failed ({rc}):\n{out}\n{err}"
    summary = _summary(out)
    print(json.dumps(summary))

    assert summary["invalid"] == 0
    # every exported family: the client loads the whole of schemas/json
    assert summary["schemas"] == len(list((ROOT / "schemas" / "json").glob("*.json")))
    # One field missing from a master event: one error, naming it.
    assert len(summary["missing_field_errors"]) == 1
    assert "price" in summary["missing_field_errors"][0]
    # The open and the close, each copied to the one follower.
    assert summary["orders_seen"] == 2
    assert "`$.ts_ns`" in summary["float_ts_rejection"]
    assert "int64" in summary["float_ts_rejection"]
    # 4 KV puts and 2 master events validated before publishing; 2 orders and 1 rejection
    # validated on receipt.
    assert summary["by_family"] == {
        "account_state": 2,
        "symbol_spec": 2,
        "master_event": 2,
        "follower_order": 2,
        "master_event_rejected": 1,
    }
    assert summary["validated"] == 9

    # What the engine stored agrees with what the client saw.
    orders = [
        codec.follower_order_decoder.decode(m.data)
        for m in await _stored(stack.js, FOLLOWER_ORDERS_STREAM)
    ]
    assert [(type(o).__name__, o.follower, o.link_id) for o in orders] == [
        ("FollowerOpen", FOLLOWER, LINK),
        ("FollowerClose", FOLLOWER, LINK),
    ]
    assert orders[0].volume == pytest.approx(0.2)  # the master's 0.1 lots, multiplied by 2
    [rejection] = [
        codec.rejection_decoder.decode(m.data) for m in await _stored(stack.js, REJECTIONS_STREAM)
    ]
    assert rejection.reason is RejectionReason.INVALID_PAYLOAD
    assert rejection.message == summary["float_ts_rejection"]


async def test_python_client_publishes_master_events_and_sees_its_follower_orders(
    copy_stack: LocalStack,
) -> None:
    stack = copy_stack
    argv = [sys.executable, str(PYTHON_CLIENT), "copy", "--url", stack.url]
    argv += ["--connector", CONNECTOR, "--master", MASTER, "--follower", FOLLOWER, "--link", LINK]
    rc, out, err = await _run(argv, _connector_env(stack), PYTHON_CLIENT.parent)
    assert rc == 0, f"python client failed ({rc}):\n{out}\n{err}"
    summary = _summary(out)
    print(json.dumps(summary))
    assert summary["invalid"] == 0
    assert summary["orders_seen"] == 2
    assert summary["by_family"] == {
        "account_state": 2,
        "symbol_spec": 2,
        "master_event": 2,
        "follower_order": 2,
        "master_event_rejected": 1,
    }
    assert "`$.ts_ns`" in summary["float_ts_rejection"]
    assert "int64" in summary["float_ts_rejection"]


async def _demo_run(tmp_path: Path, stack: LocalStack, followers: int) -> None:
    """What ``tradecopy demo`` does, on ``stack``: a paper venue as the connector of a master
    and its followers, one link each, and the demo's scripted trader through every step."""
    from connectors.paper.connector import PaperConnector, PaperTerminal
    from connectors.paper.model import XAUUSD
    from connectors.paper.prices import PriceReplay, load_bars
    from engine.demo import CONNECTOR as DEMO_CONNECTOR
    from engine.demo import KINDS, START_BAR, SUFFIXED, ScriptedTrader, follower_id
    from engine.demo import MASTER as DEMO_MASTER

    ids = [follower_id(i) for i in range(followers)]
    links = [
        msgspec.structs.replace(
            CopyLink(link_id=f"link-{f}", master=DEMO_MASTER, follower=f),
            **KINDS[i % len(KINDS)].link,
        )
        for i, f in enumerate(ids)
    ]
    await stack.apply_links(links)
    accounts = [(DEMO_MASTER, "USD", 10_000.0, 100, "master")]
    accounts += [
        (f, "USD", KINDS[i % len(KINDS)].balance, 100, "follower") for i, f in enumerate(ids)
    ]
    suffixed = msgspec.structs.replace(XAUUSD, symbol=SUFFIXED)
    terminal = PaperTerminal.open(
        tmp_path / "paper.state", accounts, (XAUUSD, suffixed), {"XAUUSD": [SUFFIXED]}
    )
    replay = PriceReplay(
        load_bars(), start=START_BAR, speed=600.0, stamp_wall_clock=True, steps_per_leg=3
    )
    venue_nc = await stack.connect("demo-venue", stack.connector_user(DEMO_CONNECTOR))
    connector = PaperConnector(venue_nc, DEMO_CONNECTOR, terminal, replay)
    await connector.start()
    try:
        await wait_until(lambda: connector.quotes > 0, "paper prices", timeout=30)
        trader = ScriptedTrader(connector, lambda line: None)
        for step in trader.steps():
            await step()
            await asyncio.sleep(0.05)

        async def every_order_reported() -> bool:
            orders = (await stack.js.stream_info(FOLLOWER_ORDERS_STREAM)).state.messages
            reports = (await stack.js.stream_info(EXECUTION_REPORTS_STREAM)).state.messages
            return orders > 0 and reports >= orders

        await wait_until(every_order_reported, "a report for every follower order", timeout=30)
    finally:
        await connector.stop()


async def _contract_messages(stack: LocalStack) -> dict[str, int]:
    """How many contract messages each audited stream holds (KV: values, not deletes)."""
    out = {}
    for stream in AUDITED_STREAMS:
        out[stream] = (await stack.js.stream_info(stream)).state.messages
    for bucket in AUDITED_BUCKETS:
        stored = await _stored(stack.js, f"KV_{bucket}")
        out[f"KV_{bucket}"] = sum(
            bool(m.data) and (m.headers or {}).get("KV-Operation") not in ("DEL", "PURGE")
            for m in stored
        )
    return out


async def test_every_message_of_a_paper_demo_run_validates_in_the_node_client(
    node: str, tmp_path: Path
) -> None:
    from engine.demo import CONNECTOR as DEMO_CONNECTOR
    from engine.demo import MASTER as DEMO_MASTER
    from engine.demo import follower_id

    followers = 7
    stack = LocalStack(tmp_path / "nats", name="tc-demo-audit")
    await stack.add_connector(
        DEMO_CONNECTOR, masters=[DEMO_MASTER], followers=[follower_id(i) for i in range(followers)]
    )
    await stack.start()
    try:
        stack.spawn_replicators(1, instance="demo-audit")
        await stack.wait_for_replicator()
        await _demo_run(tmp_path, stack, followers)
        expected = await _contract_messages(stack)

        # The API role reads every stream; it is what a platform backend audits with.
        env = stack.child_env(stack.user(Role.API))
        node_run = await _run([node, "client.mjs", "audit", "--url", stack.url], env, NODE_DIR)
        python_argv = [sys.executable, str(PYTHON_CLIENT), "audit", "--url", stack.url]
        python_run = await _run(python_argv, env, PYTHON_CLIENT.parent)
    finally:
        await stack.stop()
    for client, (rc, out, err) in (("node", node_run), ("python", python_run)):
        assert rc == 0, f"{client} client failed ({rc}):\n{out}\n{err}"
        summary = _summary(out)
        print(client, json.dumps(summary))
        assert summary["invalid"] == 0, client
        assert summary["per_stream"] == expected, client
        assert summary["validated"] == sum(expected.values()), client
        # The run made every kind of message a demo makes.
        for family in (
            "master_event",
            "follower_order",
            "execution_report",
            "copy_decision",
            "account_state",
            "symbol_spec",
            "copy_link",
        ):
            assert summary["by_family"].get(family, 0) > 0, (client, family)


def _check_cases() -> tuple[bytes, int, int]:
    """Every sample message of tests/test_schemas.py as it travels, and each without each of
    its required fields: (msgpack cases, valid ones, ones missing a field)."""
    from test_schemas import ALL_MESSAGES, _family, _required_without_default

    cases: list[dict[str, Any]] = []
    for message in ALL_MESSAGES:
        family = _family(message)
        wire = msgspec.msgpack.decode(codec.encode(message))
        cases.append({"family": family, "missing": None, "payload": codec.encode(message)})
        for field in _required_without_default(message):
            data = {k: v for k, v in wire.items() if k != field}
            cases.append(
                {"family": family, "missing": field, "payload": msgspec.msgpack.encode(data)}
            )
    valid = sum(c["missing"] is None for c in cases)
    return msgspec.msgpack.encode(cases), valid, len(cases) - valid


async def test_node_client_validates_every_message_type_and_names_a_missing_field(
    node: str, tmp_path: Path
) -> None:
    payload, valid, missing = _check_cases()
    cases = tmp_path / "cases.msgpack"
    cases.write_bytes(payload)
    rc, out, err = await _run([node, "client.mjs", "check", str(cases)], dict(os.environ), NODE_DIR)
    assert rc == 0, f"node client failed ({rc}):\n{out}\n{err}"
    summary = _summary(out)
    assert summary["invalid"] == 0
    assert summary["validated"] == valid
    assert summary["missing_field_cases"] == missing > 100
    assert set(summary["by_family"]) == set(MESSAGES) - BRIDGE_FAMILIES
