"""NATS security: every role its own nkey user, allowed only the subjects it owns.

Against a real nats-server from the wheel with the config the local stack generates: every
forbidden publish is refused by the server (its error reaches the client, and the message
never reaches the stream or a subscriber with full rights), anonymous and unknown clients are
turned away, and a full copy (paper master → replicator → paper follower) runs with every
process on its own user without a single violation in the server's log.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from conftest import wait_until

from connectors.contract import ConnectorRuntime
from connectors.paper.connector import PaperConnector, PaperTerminal
from connectors.paper.prices import bar_to_ticks, load_bars
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.natsauth import (
    ENV_CREDS,
    ENV_SEED,
    ENV_USER,
    NatsCredentials,
    NatsCredentialsError,
    NatsUser,
    Role,
    connector_durable,
    connector_permissions,
    permissions_for,
    role_permission_variables,
    subject_matches,
    write_seed_file,
)
from engine.runtime.natsconn import connect
from engine.runtime.stack import LocalStack
from schemas import codec, subjects
from schemas.common import Side
from schemas.control import EmergencyStop, StopScope
from schemas.links import CopyLink
from schemas.orders import FollowerOpen
from schemas.reports import OrderFilled
from schemas.streams import (
    EXECUTION_REPORTS_STREAM,
    FOLLOWER_ORDERS_STREAM,
    MASTER_EVENTS_STREAM,
    SIGNALS_STREAM,
)

# farm-a serves master m-a and follower f-a; farm-b serves follower f-b.
FARM_A, FARM_B = "farm-a", "farm-b"


def order(follower: str, order_id: str = "forged-1:link") -> bytes:
    return codec.encode(
        FollowerOpen(
            order_id=order_id,
            link_id="link",
            follower=follower,
            master="m-a",
            master_event_id="forged-1",
            symbol="XAUUSD",
            ts_ns=time.time_ns(),
            master_position_id="1",
            side=Side.BUY,
            volume=1.0,
            master_price=2000.0,
            master_volume=1.0,
        )
    )


class Client:
    """A client of one user that records every asynchronous error the server sends it."""

    def __init__(self, nc: Any, errors: list[Exception]) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=1.0)
        self.errors = errors

    def refusals(self) -> list[str]:
        # nats-py lowercases the server's message, subject included.
        return [str(e).lower() for e in self.errors if "permissions violation" in str(e).lower()]

    def was_refused(self, action: str, subject: str) -> bool:
        return any(f'{action} to "{subject.lower()}"' in r for r in self.refusals())

    async def refused(self, subject: str, payload: bytes = b"x") -> None:
        """Publish on ``subject`` and wait for the server's refusal naming it."""
        await self.nc.publish(subject, payload)
        await self.nc.flush()
        await wait_until(
            lambda: self.was_refused("publish", subject),
            f"the server to refuse a publish to {subject}",
            timeout=5,
        )


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    local = LocalStack(tmp_path / "nats", partitions=4, name="perm")
    local.server.log_file = tmp_path / "nats.log"
    await local.add_connector(FARM_A, masters=["m-a"], followers=["f-a"])
    await local.add_connector(FARM_B, followers=["f-b"])
    await local.start()
    try:
        yield local
    finally:
        await local.stop()


async def client_of(stack: LocalStack, user: NatsUser | None) -> Client:
    assert user is not None
    errors: list[Exception] = []

    async def record(exc: Exception) -> None:
        errors.append(exc)

    nc = await connect(
        stack.url, f"test-{user.name}", credentials=user.credentials, error_cb=record
    )
    stack._clients.append(nc)  # closed by the stack
    return Client(nc, errors)


async def stream_last_seq(stack: LocalStack, stream: str) -> int:
    return int((await stack.js.stream_info(stream)).state.last_seq)


# ------------------------------------------------------------ connectors: only their own


async def test_a_connector_cannot_order_for_another_follower(stack: LocalStack) -> None:
    farm_a = await client_of(stack, stack.connector_user(FARM_A))
    before = await stream_last_seq(stack, FOLLOWER_ORDERS_STREAM)
    await farm_a.refused(subjects.follower_orders("f-b"), order("f-b"))
    await farm_a.refused(subjects.connector_orders(FARM_B), order("f-b"))
    assert await stream_last_seq(stack, FOLLOWER_ORDERS_STREAM) == before


async def test_a_connector_cannot_order_for_its_own_follower(stack: LocalStack) -> None:
    """Orders come only from the replicator, never from a connector, even for its accounts."""
    farm_a = await client_of(stack, stack.connector_user(FARM_A))
    before = await stream_last_seq(stack, FOLLOWER_ORDERS_STREAM)
    await farm_a.refused(subjects.follower_orders("f-a"), order("f-a"))
    await farm_a.refused(subjects.connector_orders(FARM_A), order("f-a"))
    # Through JetStream the refusal shows as no acknowledgement at all.
    with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
        await farm_a.js.publish(subjects.follower_orders("f-a"), order("f-a", "forged-2:link"))
    assert await stream_last_seq(stack, FOLLOWER_ORDERS_STREAM) == before


@pytest.mark.parametrize(
    "bucket", [subjects.KV_LINKS, subjects.KV_CONTROL, subjects.KV_LINK_STATE, subjects.KV_FX]
)
async def test_a_connector_cannot_write_the_controls_of_copying(
    stack: LocalStack, bucket: str
) -> None:
    farm_a = await client_of(stack, stack.connector_user(FARM_A))
    stop = EmergencyStop(scope=StopScope.GLOBAL, target="", active=False, reason="forged",
                         ts_ns=time.time_ns())  # fmt: skip
    before = await stream_last_seq(stack, f"KV_{bucket}")
    await farm_a.refused(f"$KV.{bucket}.global", codec.encode(stop))
    kv = await farm_a.js.key_value(bucket)  # opening (stream info) is allowed, writing is not
    with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
        await kv.put("global", codec.encode(stop))
    assert await stream_last_seq(stack, f"KV_{bucket}") == before


async def test_a_connector_cannot_speak_for_another_account(stack: LocalStack) -> None:
    farm_b = await client_of(stack, stack.connector_user(FARM_B))
    events_before = await stream_last_seq(stack, MASTER_EVENTS_STREAM)
    reports_before = await stream_last_seq(stack, EXECUTION_REPORTS_STREAM)
    await farm_b.refused(subjects.master_events("m-a"))  # another connector's master
    await farm_b.refused(subjects.master_events("f-b"))  # its follower is no master
    await farm_b.refused(subjects.execution_reports("f-a"))
    await farm_b.refused(f"$KV.{subjects.KV_ACCOUNTS}.f-a")
    await farm_b.refused(f"$KV.{subjects.KV_SYMBOLS}.f-a.XAUUSD")
    await farm_b.refused(subjects.quotes("XAUUSD"))  # other paper venues trade on quotes
    assert await stream_last_seq(stack, MASTER_EVENTS_STREAM) == events_before
    assert await stream_last_seq(stack, EXECUTION_REPORTS_STREAM) == reports_before


async def test_a_connector_cannot_take_over_another_connectors_orders(
    stack: LocalStack,
) -> None:
    farm_a = await client_of(stack, stack.connector_user(FARM_A))
    stream = FOLLOWER_ORDERS_STREAM
    other = connector_durable(FARM_B)
    await farm_a.refused(f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{other}")
    await farm_a.refused(f"$JS.API.CONSUMER.DELETE.{stream}.{other}")
    await farm_a.refused(f"$JS.ACK.{stream}.{other}.1.1.1.1.0")
    # Nor listen where the replicators are handed master events, or in another's inbox.
    for subject in ("tc.v1.deliver.replicator.p0", "_INBOX_connector-farm-b.x"):
        await farm_a.nc.subscribe(subject)
        await farm_a.nc.flush()
        await wait_until(
            lambda s=subject: farm_a.was_refused("subscription", s),
            f"the server to refuse a subscription to {subject}",
            timeout=5,
        )


async def test_the_connector_durable_is_the_one_the_runtime_uses() -> None:
    runtime = SimpleNamespace(connector_id="farm-x")
    assert ConnectorRuntime.durable.fget(runtime) == connector_durable("farm-x")  # type: ignore[attr-defined]


# ------------------------------------------------------------- strangers are turned away


async def test_an_anonymous_client_is_refused_with_the_variables_named(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (ENV_SEED, ENV_CREDS, ENV_USER):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(NatsCredentialsError) as refused:
        await asyncio.wait_for(connect(stack.url, "anonymous"), 10)
    assert ENV_SEED in str(refused.value) and ENV_CREDS in str(refused.value)
    # A bare nats-py client gets the server's authorization error too.
    with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
        await nats.connect(stack.url, allow_reconnect=False, error_cb=_ignore)


async def test_an_unknown_key_is_refused(stack: LocalStack) -> None:
    stranger = NatsUser.generate(Role.OPERATOR)  # a valid key the server never heard of
    with pytest.raises(NatsCredentialsError, match="refused user 'operator'"):
        await asyncio.wait_for(connect(stack.url, "stranger", credentials=stranger.credentials), 10)


async def _ignore(_: Exception) -> None:
    return None


# ------------------------------------------------------------------------- other roles


async def test_the_quotes_user_publishes_quotes_and_nothing_else(stack: LocalStack) -> None:
    quotes = await client_of(stack, stack.user(Role.QUOTES))
    seen: list[str] = []

    async def on_quote(msg: Any) -> None:
        seen.append(msg.subject)

    await stack.nc.subscribe(subjects.QUOTES, cb=on_quote)
    await stack.nc.flush()
    await quotes.nc.publish(subjects.quotes("XAUUSD"), b"q")
    await quotes.nc.flush()  # the server has it before we wait (no flusher timing under load)
    await wait_until(lambda: seen == [subjects.quotes("XAUUSD")], "the quote to arrive")
    events_before = await stream_last_seq(stack, MASTER_EVENTS_STREAM)
    for subject in (
        subjects.master_events("m-a"),
        subjects.follower_orders("f-a"),
        subjects.execution_reports("f-a"),
        f"$KV.{subjects.KV_LINKS}.x",
        "$JS.API.STREAM.INFO.TC_MASTER_EVENTS",
    ):
        await quotes.refused(subject)
    assert await stream_last_seq(stack, MASTER_EVENTS_STREAM) == events_before


async def test_the_operator_controls_but_cannot_trade(stack: LocalStack) -> None:
    operator = await client_of(stack, stack.user(Role.OPERATOR))
    # Allowed: links and emergency stops.
    stop = EmergencyStop(scope=StopScope.ACCOUNT, target="f-a", active=True, reason="test",
                         ts_ns=time.time_ns())  # fmt: skip
    await (await operator.js.key_value(subjects.KV_CONTROL)).put(stop.key, codec.encode(stop))
    link = CopyLink(link_id="op-link", master="m-a", follower="f-a")
    await (await operator.js.key_value(subjects.KV_LINKS)).put(link.link_id, codec.encode(link))
    # Refused: anything a connector or the replicator says.
    orders_before = await stream_last_seq(stack, FOLLOWER_ORDERS_STREAM)
    await operator.refused(subjects.master_events("m-a"))
    await operator.refused(subjects.follower_orders("f-a"), order("f-a"))
    await operator.refused(subjects.decisions("f-a", "op-link"))
    await operator.refused(subjects.execution_reports("f-a"))
    await operator.refused("$JS.API.STREAM.DELETE.TC_FOLLOWER_ORDERS")
    assert await stream_last_seq(stack, FOLLOWER_ORDERS_STREAM) == orders_before
    assert not [e for e in operator.errors if "$KV" in str(e)]


async def test_billing_switches_links_and_nothing_else(stack: LocalStack) -> None:
    """Enforcement is close-only: it may read a link and set ``enabled``, never stop
    everything (an emergency stop freezes closes too) nor trade."""
    operator = await client_of(stack, stack.user(Role.OPERATOR))
    link = CopyLink(link_id="bill-link", master="m-a", follower="f-a")
    await (await operator.js.key_value(subjects.KV_LINKS)).put(link.link_id, codec.encode(link))
    billing = await client_of(stack, stack.user(Role.BILLING))
    links = await billing.js.key_value(subjects.KV_LINKS)
    entry = await links.get(link.link_id)
    paused = msgspec.structs.replace(link, enabled=False)
    await links.update(link.link_id, codec.encode(paused), last=entry.revision)
    assert codec.copy_link_decoder.decode((await links.get(link.link_id)).value).enabled is False
    await billing.refused(f"$KV.{subjects.KV_CONTROL}.global")
    await billing.refused(f"$KV.{subjects.KV_LINK_STATE}.bill-link")
    await billing.refused(subjects.follower_orders("f-a"), order("f-a"))
    await billing.refused(subjects.master_events("m-a"))
    assert not [e for e in billing.errors if f"$KV.{subjects.KV_LINKS}" in str(e)]


async def test_the_replicator_cannot_forge_master_events_or_links(stack: LocalStack) -> None:
    replicator = await client_of(stack, stack.user(Role.REPLICATOR))
    await replicator.refused(subjects.master_events("m-a"))
    await replicator.refused(f"$KV.{subjects.KV_LINKS}.x")
    await replicator.refused(f"$KV.{subjects.KV_CONTROL}.global")
    await replicator.refused(f"$KV.{subjects.KV_ACCOUNTS}.f-a")


async def test_the_admin_manages_streams_but_touches_no_message(stack: LocalStack) -> None:
    admin = await client_of(stack, stack.user(Role.ADMIN))
    info = await admin.js.stream_info(MASTER_EVENTS_STREAM)
    assert info.config.name == MASTER_EVENTS_STREAM
    await admin.refused(subjects.master_events("m-a"))
    await admin.refused(f"$KV.{subjects.KV_LINKS}.x")
    await admin.refused("$JS.API.STREAM.DELETE.TC_MASTER_EVENTS")


async def test_a_connector_added_to_a_running_server_gets_in(stack: LocalStack) -> None:
    if sys.platform == "win32":
        pytest.skip("a running nats-server reloads its users on SIGHUP (POSIX)")
    user = await stack.add_connector("late", followers=["f-late"])
    late = await client_of(stack, user)
    await late.refused(subjects.execution_reports("f-a"))
    await late.nc.publish(subjects.execution_reports("f-late"), b"r")
    await late.nc.flush()
    await asyncio.sleep(0.2)  # a refusal would be back by now
    assert not late.was_refused("publish", subjects.execution_reports("f-late"))
    assert len(late.refusals()) == 1


# -------------------------------------------------------------- the allowed path, end to end


async def test_a_full_copy_runs_with_every_process_as_its_own_user(
    stack: LocalStack, tmp_path: Path
) -> None:
    """Paper master (farm-a) → replicator process (replicator) → paper follower (farm-b), the
    links by the operator: every order fills, and the server logged no violation at all."""
    await stack.apply_links([CopyLink(link_id="copy-b", master="m-a", follower="f-b")])
    stack.spawn_replicators(instance="perm")
    master_t = PaperTerminal.open(tmp_path / "m.state", [("m-a", "USD", 1e5, 100, "master")])
    follower_t = PaperTerminal.open(tmp_path / "f.state", [("f-b", "USD", 1e5, 100, "follower")])
    nc_a = await stack.connect("farm-a", stack.connector_user(FARM_A))
    nc_b = await stack.connect("farm-b", stack.connector_user(FARM_B))
    master = PaperConnector(nc_a, FARM_A, master_t, None)
    follower = PaperConnector(nc_b, FARM_B, follower_t, None)
    fills: dict[str, OrderFilled] = {}

    async def on_report(msg: Any) -> None:
        report = codec.execution_report_decoder.decode(msg.data)
        if isinstance(report, OrderFilled):
            fills[report.order_id] = report

    await stack.js.subscribe(subjects.EXECUTION_REPORTS, stream=EXECUTION_REPORTS_STREAM,
                             cb=on_report, ordered_consumer=True)  # fmt: skip
    await master.start()
    await follower.start()
    try:
        await stack.wait_for_replicator()
        quotes = [q for bar in load_bars()[:20] for q in bar_to_ticks(bar, "XAUUSD")]
        for i in range(4):
            quote = msgspec.structs.replace(quotes[i], ts_ns=time.time_ns())
            master_t.on_quote(quote)
            follower_t.on_quote(quote)
            if i % 2 == 0:
                await master.trade(lambda v: v.market_order("m-a", "XAUUSD", Side.BUY, 0.1))
            else:
                await master.trade(
                    lambda v: v.close_position("m-a", v.positions("m-a")[0].position_id)
                )
            await wait_until(lambda n=i + 1: len(fills) >= n, f"fill {i + 1}", timeout=20)
        assert follower_t.venue.positions("f-b") == []
    finally:
        await master.stop()
        await follower.stop()
    log_file = stack.server.log_file
    assert log_file is not None
    violations = [line for line in log_file.read_text().splitlines() if "Violation" in line]
    assert violations == []


# ----------------------------------------------------------- the permission sets, offline


def test_subject_wildcards_match_as_nats_does() -> None:
    assert subject_matches("tc.v1.master.*.events", "tc.v1.master.m1.events")
    assert not subject_matches("tc.v1.master.*.events", "tc.v1.master.m1.x.events")
    assert subject_matches("$KV.tc_symbols.a.>", "$KV.tc_symbols.a.XAUUSD")
    assert not subject_matches("$KV.tc_symbols.a.>", "$KV.tc_symbols.a")
    assert not subject_matches("$KV.tc_accounts.a", "$KV.tc_accounts.ab")


def test_a_connector_owns_exactly_its_accounts() -> None:
    perms = connector_permissions("farm", masters=["m1"], followers=["f1"])
    assert perms.may_publish(subjects.master_events("m1"))
    assert perms.may_publish(subjects.execution_reports("f1"))
    assert perms.may_publish(subjects.execution_reports("m1"))  # its manual orders' reports
    assert perms.may_publish(f"$KV.{subjects.KV_ACCOUNTS}.m1")
    assert perms.may_publish(f"$KV.{subjects.KV_SYMBOLS}.{subjects.symbol_key('f1', 'X.y')}")
    for forbidden in (
        subjects.master_events("f1"),
        subjects.master_events("m2"),
        subjects.execution_reports("m2"),
        subjects.follower_orders("f1"),
        subjects.connector_orders("farm"),
        subjects.decisions("f1", "l"),
        f"$KV.{subjects.KV_ACCOUNTS}.f2",
        f"$KV.{subjects.KV_LINKS}.l",
        "$JS.API.STREAM.CREATE.TC_FOLLOWER_ORDERS",
        "$JS.API.CONSUMER.DURABLE.CREATE.TC_FOLLOWER_ORDERS.connector-other",
    ):
        assert not perms.may_publish(forbidden), forbidden
    assert perms.may_subscribe("_INBOX_connector-farm.abc")
    assert perms.may_subscribe("tc.v1.master.m1.rejections")
    assert not perms.may_subscribe("tc.v1.master.m2.rejections")
    assert not perms.may_subscribe("_INBOX.abc")
    with pytest.raises(NatsCredentialsError):
        connector_permissions("farm", masters=["m.*"])


def test_only_the_replicator_publishes_orders_and_decisions() -> None:
    order_subjects = (subjects.follower_orders("f"), subjects.connector_orders("c"),
                      subjects.decisions("f", "l"))  # fmt: skip
    for role in (Role.ADMIN, Role.OPERATOR, Role.QUOTES, Role.LEDGER):
        assert not any(permissions_for(role).may_publish(s) for s in order_subjects), role
    assert all(permissions_for(Role.REPLICATOR).may_publish(s) for s in order_subjects)
    assert permissions_for(Role.REPLICATOR).may_publish("tc.v1.master.m.rejections")
    assert not permissions_for(Role.REPLICATOR).may_publish(subjects.master_events("m"))


def test_the_api_publishes_manual_orders_to_follower_subjects_only() -> None:
    api, operator = permissions_for(Role.API), permissions_for(Role.OPERATOR)
    assert api.may_publish(subjects.follower_orders("any-follower"))
    for subject in (subjects.connector_orders("c"), subjects.decisions("f", "l"),
                    subjects.execution_reports("f"), subjects.master_events("m"),
                    "tc.v1.follower.f.orders.x", "tc.v1.follower.orders"):  # fmt: skip
        assert not api.may_publish(subject), subject
    # Exactly the operator's rights and the follower orders subject, nothing more.
    # ... and the strategy deployments bucket (the deployment routes put and delete there).
    assert set(api.publish) - set(operator.publish) == {
        subjects.FOLLOWER_ORDERS,
        f"$KV.{subjects.KV_SIGNAL_DEPLOYMENTS}.>",
    }
    assert api.subscribe == tuple(s.replace("operator", "api") for s in operator.subscribe)


async def test_the_api_user_places_manual_orders_and_nothing_a_service_says(
    stack: LocalStack,
) -> None:
    api = await client_of(stack, stack.user(Role.API))
    before = await stream_last_seq(stack, FOLLOWER_ORDERS_STREAM)
    await api.js.publish(subjects.follower_orders("f-a"), order("f-a", "manual-1"),
                         headers={"Nats-Msg-Id": "manual-1"})  # fmt: skip
    assert await stream_last_seq(stack, FOLLOWER_ORDERS_STREAM) == before + 1
    await api.refused(subjects.connector_orders(FARM_A))
    await api.refused(subjects.decisions("f-a", "l"))
    await api.refused(subjects.execution_reports("f-a"))
    await api.refused(subjects.master_events("m-a"))
    assert await stream_last_seq(stack, FOLLOWER_ORDERS_STREAM) == before + 1


def test_every_role_has_its_variable_in_the_rendered_block() -> None:
    block = role_permission_variables()
    for role in (Role.ADMIN, Role.REPLICATOR, Role.OPERATOR, Role.API, Role.QUOTES, Role.SIGNALS):
        assert f"TC_{role.value.upper()}_PERMISSIONS = {{" in block


def test_credentials_from_the_environment_say_what_is_missing(tmp_path: Path) -> None:
    assert NatsCredentials.from_env({}) is None
    user = NatsUser.generate(Role.REPLICATOR)
    with pytest.raises(NatsCredentialsError, match=ENV_USER):
        NatsCredentials.from_env({ENV_SEED: user.seed})
    with pytest.raises(NatsCredentialsError, match=ENV_SEED):
        NatsCredentials.from_env({ENV_SEED: "SUnot-a-seed", ENV_USER: "replicator"})
    with pytest.raises(NatsCredentialsError, match=ENV_CREDS):
        NatsCredentials.from_env({ENV_CREDS: str(tmp_path / "missing.nk"), ENV_USER: "x"})
    creds = NatsCredentials.from_env({ENV_SEED: user.seed, ENV_USER: "replicator"})
    assert creds is not None and creds.inbox_prefix == "_INBOX_replicator"
    path = write_seed_file(tmp_path / "keys" / "replicator.nk", user.seed)
    assert os.stat(path).st_mode & 0o077 == 0
    from_file = NatsCredentials.from_env({ENV_CREDS: str(path), ENV_USER: "replicator"})
    assert from_file is not None and from_file.connect_options()["nkeys_seed"] == str(path)


async def test_a_stack_over_tls_hands_its_children_the_ca(tmp_path: Path) -> None:
    """Secured and encrypted: the replicator process finds the CA in its environment."""
    from test_natsserver import _openssl_certs

    from engine.runtime.natsserver import NatsTls

    certs = _openssl_certs(tmp_path)
    if certs is None:
        pytest.skip("the openssl tool is not installed")
    cert, key, ca = certs
    local = LocalStack(tmp_path / "nats", partitions=2, tls=NatsTls(cert=cert, key=key, ca=ca))
    await local.start()
    try:
        local.spawn_replicators(instance="tls")
        await local.wait_for_replicator()
        with pytest.raises((nats.errors.Error, OSError)):  # no TLS: no entry at all
            await nats.connect(local.url, allow_reconnect=False, error_cb=_ignore)
    finally:
        await local.stop()


# ------------------------------------------------------------ signals: strategy runs, drive

SIGNAL_VERSION = "sv-0123456789abcdef01234567"
DRIVE_CONSUMER = "signals-drive-0123456789abcdef"


def test_the_signals_role_publishes_runs_and_manual_orders_only() -> None:
    signals = permissions_for(Role.SIGNALS)
    for subject in (subjects.strategy_signals(SIGNAL_VERSION),
                    subjects.strategy_failures(SIGNAL_VERSION),
                    subjects.follower_orders("paper-master"),
                    f"$KV.{subjects.KV_SIGNAL_CLAIMS}.run",
                    f"$JS.API.CONSUMER.MSG.NEXT.TC_SIGNALS.{DRIVE_CONSUMER}"):  # fmt: skip
        assert signals.may_publish(subject), subject
    for subject in (subjects.master_events("m"), subjects.connector_orders("c"),
                    subjects.decisions("f", "l"), subjects.execution_reports("f"),
                    subjects.quotes("XAUUSD"), "tc.v1.master.m.rejections",
                    f"$KV.{subjects.KV_SIGNAL_DEPLOYMENTS}.x", f"$KV.{subjects.KV_LINKS}.x",
                    f"$KV.{subjects.KV_CONTROL}.global", f"$KV.{subjects.KV_SYMBOLS}.a.X",
                    "$JS.API.STREAM.UPDATE.KV_tc_signal_claims",
                    "$JS.API.CONSUMER.DURABLE.CREATE.TC_MASTER_EVENTS.x",
                    "tc.v1.signal.sv-x.signals.extra"):  # fmt: skip
        assert not signals.may_publish(subject), subject
    assert signals.subscribe == (subjects.QUOTES, "_INBOX_signals.>")


async def test_the_signals_user_runs_strategies_and_drives_masters_but_forges_nothing(
    stack: LocalStack,
) -> None:
    signals = await client_of(stack, stack.user(Role.SIGNALS))
    # What `tradecopy signals run` does first: look the streams and buckets up.
    await ensure_streams(signals.js, None)
    buckets = await ensure_buckets(signals.js)

    # Quotes in.
    quotes = await client_of(stack, stack.user(Role.QUOTES))
    sub = await signals.nc.subscribe(subjects.QUOTES)
    await signals.nc.flush()
    await quotes.nc.publish(subjects.quotes("XAUUSD"), b"quote")
    assert (await sub.next_msg(timeout=5)).data == b"quote"

    # Signals and failures out, stored.
    before = await stream_last_seq(stack, SIGNALS_STREAM)
    for subject in (subjects.strategy_signals(SIGNAL_VERSION),
                    subjects.strategy_failures(SIGNAL_VERSION)):  # fmt: skip
        await signals.js.publish(subject, b"run", headers={"Nats-Msg-Id": subject})
    assert await stream_last_seq(stack, SIGNALS_STREAM) == before + 2

    # Claims: create, read, compare-and-set.
    claims = buckets[subjects.KV_SIGNAL_CLAIMS]
    revision = await claims.create("run-1", b"running")
    await claims.update("run-1", b"done", last=revision)
    assert (await claims.get("run-1")).value == b"done"

    # Deployments: the API puts and deletes, the worker watches and reads.
    api = await client_of(stack, stack.user(Role.API))
    api_deployments = await api.js.key_value(subjects.KV_SIGNAL_DEPLOYMENTS)
    key = subjects.deployment_key(SIGNAL_VERSION, "XAUUSD", "1m")
    watcher = await buckets[subjects.KV_SIGNAL_DEPLOYMENTS].watchall()
    assert await watcher.updates(timeout=5) is None  # empty so far
    await api_deployments.put(key, b"{}")
    assert (await watcher.updates(timeout=5)).key == key
    assert (await buckets[subjects.KV_SIGNAL_DEPLOYMENTS].get(key)).value == b"{}"
    await api_deployments.delete(key)
    assert (await watcher.updates(timeout=5)).operation == "DEL"
    await watcher.stop()

    # Symbols: read (a get the server answers).
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await buckets[subjects.KV_SYMBOLS].get("m-a.XAUUSD")

    # The drive: its durable consumer on the signals, pulled and acknowledged.
    drive = await signals.js.pull_subscribe(
        subjects.strategy_signals(SIGNAL_VERSION),
        durable=DRIVE_CONSUMER,
        stream=SIGNALS_STREAM,
    )
    [message] = await drive.fetch(1, timeout=5)
    assert message.data == b"run"
    await message.ack_sync()

    # ... and its manual orders on a paper master, as the API sends them.
    orders_before = await stream_last_seq(stack, FOLLOWER_ORDERS_STREAM)
    await signals.js.publish(subjects.follower_orders("m-a"), order("m-a", "manual-sig-1"),
                             headers={"Nats-Msg-Id": "manual-sig-1"})  # fmt: skip
    assert await stream_last_seq(stack, FOLLOWER_ORDERS_STREAM) == orders_before + 1
    assert signals.refusals() == []

    refused = [subjects.master_events("m-a"), f"$KV.{subjects.KV_LINKS}.x",
               f"$KV.{subjects.KV_CONTROL}.global", f"$KV.{subjects.KV_SIGNAL_DEPLOYMENTS}.x",
               subjects.connector_orders(FARM_A), subjects.execution_reports("f-a"),
               subjects.decisions("f-a", "l")]  # fmt: skip
    events_before = await stream_last_seq(stack, MASTER_EVENTS_STREAM)
    for subject in refused:
        await signals.refused(subject)
    assert await stream_last_seq(stack, MASTER_EVENTS_STREAM) == events_before
    assert len(signals.refusals()) == len(refused)
