"""Monitoring covers every moving part: each metric a Grafana panel or an alert rule uses is
exposed by a running service, every configured terminal and link has its series before
anything happens to it, and ``/healthz`` turns 503, saying why, once NATS (or, for the
ledger, PostgreSQL) is gone.

The services run for real: ``tradecopy up`` (NATS, a replicator and the paper connector, each
with its own ``/metrics``), ``tradecopy bridge run`` serving a paper terminal over the bridge
protocol (CURVE), the MT5 connector over the paper MetaTrader5 api (in this process: the
package exists only on Windows, so only its series for its own account count), and a ledger
process (``tradecopy ledger run``) on the same NATS and a PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import zmq
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_deploy_files import promql_metric_names

from connectors.bridge.paper_terminal import PaperBridgeTerminal
from connectors.paper.venue import PaperVenue
from engine.ledger import store
from engine.ledger.records import DROP_REASONS, Kind
from engine.runtime.postgres import ENV_DATABASE_URL

ROOT = Path(__file__).resolve().parents[1]
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
DASHBOARDS_DIR = ROOT / "deploy" / "grafana" / "dashboards"
#: Made by Prometheus itself for every target, not by a service.
PROMETHEUS_SERIES = {"up"}
SECRET_ENV = "TRADECOPY_BRIDGE_SECRET_KEY"
TOKEN = "a-token-from-the-secret-store"

UP_CONFIG = """
[nats]
port = 0
http_port = -1
secure = false
[replicator]
metrics_port = {replicator_port}
partitions = 4
[paper]
connector_id = "paper-1"
metrics_port = 0
speed = 600
[[paper.accounts]]
id = "pm"
role = "master"
[[paper.accounts]]
id = "pf"
role = "follower"
[[links]]
link_id = "pm-pf"
master = "pm"
follower = "pf"
[ledger]
instances = 0
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def _scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    status, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200, text
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


async def _health(port: int) -> tuple[int, dict[str, Any]]:
    status, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz")
    return status, json.loads(text)


async def _serving(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the process answers /healthz with 200."""

    async def healthy() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")
        try:
            return (await _health(port))[0] == 200
        except OSError:
            return False

    await wait_until(healthy, f"/healthz 200 on {port}", timeout=30,
                     details=lambda: log.read_text(errors="replace")[-3000:])  # fmt: skip


async def _answering(port: int) -> None:
    """Until something answers /healthz on ``port`` (whatever it says)."""

    async def answers() -> bool:
        try:
            await _health(port)
        except OSError:
            return False
        return True

    await wait_until(answers, f"/healthz on {port}", timeout=30)


def used_metric_names() -> set[str]:
    """Every metric the alert rules and the dashboards (nested rows included) select."""
    import yaml

    exprs = [
        rule["expr"]
        for path in sorted(RULES_DIR.glob("*.yml"))
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
    ]
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            for inner in [panel, *panel.get("panels", [])]:
                exprs += [t["expr"] for t in inner.get("targets", [])]
    assert exprs
    return {name for expr in exprs for name in promql_metric_names(expr)}


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            _terminate(proc)


def _start_up(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> dict[str, str]:
    """``tradecopy up`` until it says Ctrl-C works; its banner lines by their first words."""
    config = tmp_path / "up.toml"
    config.write_text(UP_CONFIG.format(replicator_port=_port()), encoding="utf-8")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "up", "--config", str(config)],
        env=env, stdout=subprocess.PIPE, stderr=(tmp_path / "up.log").open("wb"),
    )  # fmt: skip
    processes.append(proc)
    assert proc.stdout is not None
    banner: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            break
        banner[line[:18].strip()] = line[18:].strip()
        if "Ctrl-C stops everything" in line:
            return banner
    raise AssertionError(f"up never came up: {(tmp_path / 'up.log').read_text()}")


def _bridge_config(tmp_path: Path, zmq_port: int, server_public: str,
                   keys: dict[str, str]) -> Path:  # fmt: skip
    """Two terminals: ``acc-f`` will connect, ``acc-m`` never does."""
    config = tmp_path / "bridge.toml"
    terminals = "".join(
        f'[[terminals]]\naccount = "{account}"\nrole = "{role}"\ntoken_env = "TOKEN"\n'
        f'curve_public_key = "{keys[account]}"\n'
        for account, role in (("acc-m", "master"), ("acc-f", "follower"))
    )
    config.write_text(
        f'connector_id = "farm-1"\nendpoint = "tcp://127.0.0.1:{zmq_port}"\n'
        f'public_key = "{server_public}"\nheartbeat_ms = 200\n{terminals}',
        encoding="utf-8",
    )
    return config


def _pair() -> tuple[str, str]:
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def _start_bridge(tmp_path: Path, nats_url: str, processes: list[subprocess.Popen[bytes]],
                  ) -> tuple[int, int, dict[str, tuple[str, str]]]:  # fmt: skip
    """``tradecopy bridge run`` on ``nats_url``: (ZeroMQ port, ops port, key pairs)."""
    zmq_port, ops_port = _port(), _port()
    pairs = {name: _pair() for name in ("server", "acc-m", "acc-f")}
    config = _bridge_config(tmp_path, zmq_port, pairs["server"][0],
                            {a: pairs[a][0] for a in ("acc-m", "acc-f")})  # fmt: skip
    log = tmp_path / "bridge.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "bridge", "run", "--config", str(config),
         "--nats-url", nats_url, "--metrics-port", str(ops_port),
         "--state", str(tmp_path / "bridge.state")],
        env={**os.environ, "TOKEN": TOKEN, SECRET_ENV: pairs["server"][1]},
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip
    processes.append(proc)
    return zmq_port, ops_port, pairs


async def _paper_terminal(zmq_port: int, pairs: dict[str, tuple[str, str]]) -> Any:
    venue = PaperVenue()
    venue.open_account("acc-f", "USD", 10_000.0)
    terminal = PaperBridgeTerminal(
        f"tcp://127.0.0.1:{zmq_port}", "acc-f", TOKEN, venue, server_key=pairs["server"][0],
        public_key=pairs["acc-f"][0], secret_key=pairs["acc-f"][1], heartbeat_ms=200,
    )  # fmt: skip
    await terminal.start()
    return terminal


async def _mt5_connector(nats_url: str) -> tuple[Any, Any]:
    """The MT5 connector over the paper MetaTrader5 api, with its ops endpoint: (connector,
    ops server). Its metrics share this process's registry."""
    from connectors.mt5.config import Mt5Config
    from connectors.mt5.connector import Mt5Connector, Mt5Terminal
    from connectors.mt5.paper import PaperMt5Api, PaperMt5Server
    from connectors.service import mt5_health
    from engine.runtime.http import OpsServer

    venue = PaperVenue()
    venue.open_account("mt5-f", "USD", 10_000.0, 100)
    server = PaperMt5Server(venue)
    server.quote("XAUUSD", 2000.0, 2000.5)
    config = Mt5Config(connector_id="mt5-1", account_id="mt5-f", role="follower", login=7,
                       poll_ms=20)  # fmt: skip
    terminal = Mt5Terminal.open(config, PaperMt5Api(server, "mt5-f", 7))
    nc = await nats.connect(nats_url)
    connector = Mt5Connector(nc, terminal)
    await connector.start()
    ops = OpsServer("127.0.0.1", 0, lambda: mt5_health(connector, "mt5-f"))  # as mt5 run does
    await ops.start()
    return connector, ops


async def _ledger(nats_url: str, database_url: str, tmp_path: Path,
                  processes: list[subprocess.Popen[bytes]]) -> int:  # fmt: skip
    """A ledger process on ``nats_url`` storing into ``database_url`` (migrated here), healthy;
    its ops port."""
    await store.migrate(database_url)
    port, log = _port(), tmp_path / "ledger.log"
    processes.append(subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "ledger", "run", "--nats-url", nats_url, "--instance",
         "monitoring", "--metrics-port", str(port), "--log-level", "info"],
        env={**os.environ, ENV_DATABASE_URL: database_url},
        stdout=subprocess.DEVNULL, stderr=log.open("ab"),
    ))  # fmt: skip
    await _serving(port, processes[-1], log)
    return port


def _value(samples: list[tuple[str, dict[str, str], float]], name: str,
           **labels: str) -> float | None:  # fmt: skip
    for sample_name, sample_labels, value in samples:
        if sample_name == name and labels.items() <= sample_labels.items():
            return value
    return None


async def test_every_metric_a_panel_or_an_alert_uses_is_exposed_by_a_running_service(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], database_url: str
) -> None:
    banner = _start_up(tmp_path, processes)
    nats_url = banner["NATS (JetStream)"].split()[0]
    replicator_port = int(banner["replicator up-1"].split("http://127.0.0.1:")[1].split("/")[0])
    paper_port = int(banner["paper connector"].split("http://127.0.0.1:")[1].split("/")[0])
    assert banner["NATS login"] == f"export TRADECOPY_NATS_URL={nats_url}"
    await _answering(replicator_port)  # up spawns it: the banner may come first
    zmq_port, bridge_port, pairs = _start_bridge(tmp_path, nats_url, processes)
    await _serving(bridge_port, processes[-1], tmp_path / "bridge.log")
    ledger_port = await _ledger(nats_url, database_url, tmp_path, processes)
    terminal = await _paper_terminal(zmq_port, pairs)
    connector, ops = await _mt5_connector(nats_url)
    try:

        async def follower_in_session() -> bool:
            samples = await _scrape(bridge_port)
            return _value(samples, "tradecopy_bridge_terminal_connected", account="acc-f") == 1

        await wait_until(follower_in_session, "the paper terminal's session with the bridge")
        status, paper_health = await _health(paper_port)
        assert status == 200 and paper_health["connector"] == "paper-1"
        scraped = {
            "replicator": await _scrape(replicator_port),
            "paper connector": await _scrape(paper_port),
            "bridge connector": await _scrape(bridge_port),
            "ledger": await _scrape(ledger_port),
        }
        # The MT5 connector shares this process's registry: only its own series count.
        mt5 = [
            s for s in await _scrape(ops.port)
            if s[1].get("account") == "mt5-f" or s[1].get("connector") == "mt5-1"
        ]  # fmt: skip
        scraped["mt5 connector"] = mt5
        exposed = {name for samples in scraped.values() for name, _, _ in samples}
        used = used_metric_names()
        assert {"tradecopy_connector_order_seconds_bucket", "up",
                "tradecopy_ledger_lag_seconds_bucket"} <= used  # fmt: skip
        missing = used - exposed - PROMETHEUS_SERIES
        assert not missing, f"used by panels or alerts, exposed by no service: {sorted(missing)}"

        # Before anything happened: a terminal that never connected, the links, the reasons.
        bridge = scraped["bridge connector"]
        assert _value(bridge, "tradecopy_bridge_terminal_connected", account="acc-m") == 0
        for account, connected in (("acc-m", 0), ("acc-f", 1)):
            value = _value(bridge, "tradecopy_connector_terminal_connected",
                           connector="farm-1", account=account)  # fmt: skip
            assert value == connected, account
        assert _value(bridge, "tradecopy_bridge_sequence_gaps_total", account="acc-m") == 0
        assert _value(bridge, "tradecopy_bridge_bad_frames_total", reason="malformed") == 0
        assert _value(bridge, "tradecopy_connector_nats_connected", connector="farm-1") == 1
        paper = scraped["paper connector"]
        for account in ("pm", "pf"):
            value = _value(paper, "tradecopy_connector_terminal_connected",
                           connector="paper-1", account=account)  # fmt: skip
            assert value == 1, account
        assert _value(paper, "tradecopy_connector_orders_total", connector="paper-1",
                      outcome="rejected") == 0  # fmt: skip
        replicator = scraped["replicator"]
        for outcome in ("skipped", "reduced", "paused", "closed_all"):
            value = _value(replicator, "tradecopy_replicator_link_decisions_total",
                           link="pm-pf", follower="pf", outcome=outcome)  # fmt: skip
            assert value == 0, outcome
        assert _value(replicator, "tradecopy_replicator_bad_messages_total",
                      reason="master_event") == 0  # fmt: skip
        assert _value(mt5, "tradecopy_terminal_connected", account="mt5-f") == 1
        ledger = scraped["ledger"]
        for kind in Kind:
            for reason in DROP_REASONS:
                value = _value(ledger, "tradecopy_ledger_bad_messages_total",
                               kind=kind.value, reason=reason)  # fmt: skip
                assert value == 0, (kind, reason)
            assert _value(ledger, "tradecopy_ledger_write_failures_total", kind=kind.value) == 0
        assert _value(ledger, "tradecopy_ledger_database_up") == 1
    finally:
        await terminal.stop()
        await ops.stop()
        await connector.stop()
        await connector.runtime.nc.close()


async def test_healthz_answers_503_with_a_reason_once_nats_is_gone(
    nats_server: Any, tmp_path: Path, processes: list[subprocess.Popen[bytes]], database_url: str
) -> None:
    """The replicator, the bridge connector (with a terminal in session), the paper connector
    as ``tradecopy up`` serves it, the MT5 connector as ``tradecopy mt5 run`` serves it (over
    the paper MetaTrader5 api) and a ledger, each under a nats-server that is then killed."""
    from connectors.paper.connector import PaperConnector, PaperTerminal
    from connectors.paper.prices import PriceReplay, load_bars
    from engine.runtime.http import OpsServer
    from engine.runtime.jetstream import ensure_buckets, ensure_streams

    replicator_port = _port()
    log = tmp_path / "replicator.log"
    processes.append(subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "replicator", "run", "--nats-url", nats_server.url,
         "--metrics-port", str(replicator_port), "--partitions", "4"],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    ))  # fmt: skip
    await _serving(replicator_port, processes[-1], log)
    zmq_port, bridge_port, pairs = _start_bridge(tmp_path, nats_server.url, processes)
    await _serving(bridge_port, processes[-1], tmp_path / "bridge.log")
    terminal = await _paper_terminal(zmq_port, pairs)
    rows = [("pm", "USD", 10_000.0, 100, "master"), ("pf", "USD", 10_000.0, 100, "follower")]
    paper_terminal = PaperTerminal.open(tmp_path / "paper.state", rows)
    nc = await nats.connect(nats_server.url)
    feed = PriceReplay(load_bars(), speed=600, stamp_wall_clock=True, steps_per_leg=3)
    paper = PaperConnector(nc, "paper-1", paper_terminal, feed)
    await paper.start()
    ops = OpsServer("127.0.0.1", 0, paper.runtime.health)  # as engine/up.py serves it
    await ops.start()
    mt5, mt5_ops = await _mt5_connector(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, 4)
    await ensure_buckets(js)
    ledger_port = await _ledger(nats_server.url, database_url, tmp_path, processes)
    ports = {"replicator": replicator_port, "bridge": bridge_port, "paper": ops.port,
             "mt5": mt5_ops.port, "ledger": ledger_port}  # fmt: skip
    try:
        for name, port in ports.items():
            status, body = await _health(port)
            assert status == 200 and body["ok"] is True and not body["reason"], (name, body)

        nats_server.kill()

        for name, port in ports.items():

            async def unhealthy(port: int = port) -> bool:
                return (await _health(port))[0] == 503

            await wait_until(unhealthy, f"{name} /healthz 503 without NATS")
            status, body = await _health(port)
            assert body["ok"] is False and "NATS is not connected" in body["reason"], (name, body)
        # The bridge's terminal is still in session: it is NATS that makes it unhealthy.
        body = (await _health(bridge_port))[1]
        assert body["terminals"]["acc-f"]["connected"] is True
    finally:
        await terminal.stop()
        await ops.stop()
        await mt5_ops.stop()
        await paper.stop()
        await mt5.stop()
        for client in (nc, mt5.runtime.nc):
            with contextlib.suppress(Exception):  # the server is gone: nothing to flush to
                await client.close()


async def test_the_ledger_healthz_answers_503_while_postgresql_is_stopped_and_200_once_back(
    nats_server: Any, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """A PostgreSQL of this test's own, stopped under a running ledger and started again on
    the same port: the ledger says so on /healthz and on its gauge, then recovers by itself."""
    from engine.runtime.jetstream import ensure_buckets, ensure_streams
    from engine.runtime.postgres import EmbeddedPostgres

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, 4)
        await ensure_buckets(js)
    finally:
        await nc.close()
    server = EmbeddedPostgres(root=tmp_path / "postgres")
    await server.start()
    try:
        port = await _ledger(nats_server.url, server.url, tmp_path, processes)
        status, body = await _health(port)
        assert status == 200 and body["database_ok"] is True, body
        await server.stop()

        async def unhealthy() -> bool:
            return (await _health(port))[0] == 503

        await wait_until(unhealthy, "ledger /healthz 503 without PostgreSQL", timeout=30)
        body = (await _health(port))[1]
        assert body["ok"] is False and "PostgreSQL does not answer" in body["reason"], body
        assert body["nats_connected"] is True
        assert _value(await _scrape(port), "tradecopy_ledger_database_up") == 0

        again = EmbeddedPostgres(root=tmp_path / "postgres", port=server.port)
        await again.start()
        try:

            async def healthy() -> bool:
                return (await _health(port))[0] == 200

            await wait_until(healthy, "ledger /healthz 200 with PostgreSQL back", timeout=30)
            assert _value(await _scrape(port), "tradecopy_ledger_database_up") == 1
        finally:
            await again.stop()
    finally:
        await server.stop()


async def test_up_serves_nats_on_the_port_it_is_given_over_the_config_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``run_up(config, nats_port=…)`` (``tradecopy up --nats-port``): the config's port is
    taken here, so only the override can start; the login lines carry the URL to export."""
    from engine.up import run_up

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = tmp_path / "up.toml"
        config.write_text(
            f"[nats]\nport = {busy.getsockname()[1]}\nhttp_port = -1\n"
            "[replicator]\nmetrics_port = -1\npartitions = 4\n",
            encoding="utf-8",
        )
        port = _port()
        up = asyncio.create_task(run_up(config, nats_port=port))
        printed: list[str] = []

        def started() -> bool:
            assert not up.done() or up.result() is None
            printed.append(capsys.readouterr().out)
            return "Ctrl-C stops everything" in "".join(printed)

        try:
            await wait_until(started, "up's banner", timeout=60)
        finally:
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await up
    out = "".join(printed)
    url = f"nats://127.0.0.1:{port}"
    assert f"NATS (JetStream)   {url}" in out
    logins = [line for line in out.splitlines() if line.startswith("operator login")]
    assert logins and f"export TRADECOPY_NATS_URL={url} " in logins[0]


def _link_decisions(counters: Any) -> dict[tuple[str, str, str], float]:
    """The counters' exposition, read by Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(counters.exposition().decode()):
        assert (family.name, family.type) == ("tradecopy_replicator_link_decisions", "counter")
        for sample in family.samples:
            assert sample.name == "tradecopy_replicator_link_decisions_total"
            labels = sample.labels
            values[labels["link"], labels["follower"], labels["outcome"]] = sample.value
    return values


def test_each_known_link_has_its_decision_series_from_the_start_and_a_gone_one_none() -> None:
    from engine.replicator.metrics import LinkDecisionCounters
    from schemas.decisions import DecisionOutcome

    counters = LinkDecisionCounters()
    assert counters.exposition() == b""
    counters.sync([("mon-a", "fa"), ("mon-b", "fb")])
    assert _link_decisions(counters) == {
        (link, f, o.value): 0 for link, f in (("mon-a", "fa"), ("mon-b", "fb"))
        for o in DecisionOutcome
    }  # fmt: skip
    counters.count("mon-a", "fa", DecisionOutcome.SKIPPED)
    counters.count("mon-a", "fa", DecisionOutcome.SKIPPED)
    counters.count("mon-b", "fb", DecisionOutcome.PAUSED)
    values = _link_decisions(counters)
    assert values["mon-a", "fa", "skipped"] == 2 and values["mon-b", "fb", "paused"] == 1
    assert sum(values.values()) == 3
    # A link deleted, another moved to a new follower: no series is left behind.
    counters.sync([("mon-a", "fa2")])
    assert _link_decisions(counters) == {("mon-a", "fa2", o.value): 0 for o in DecisionOutcome}
    counters.clear()
    assert counters.exposition() == b""


def test_link_decision_series_escape_what_the_format_cannot_hold_raw() -> None:
    from engine.replicator.metrics import LinkDecisionCounters
    from schemas.decisions import DecisionOutcome

    counters = LinkDecisionCounters()
    odd = 'a"b\\c\nd'
    counters.count(odd, 'f"1', DecisionOutcome.REDUCED)
    assert _link_decisions(counters)[odd, 'f"1', "reduced"] == 1
