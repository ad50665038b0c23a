"""The ``tradecopy`` command line, run in-process (NATS commands against a private server)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from conftest import wait_until
from nats.js import JetStreamContext

from engine.cli import ENV_NATS_URL, main
from engine.core.errors import LinkFileError
from engine.runtime.links import load_links
from engine.runtime.natsserver import EmbeddedNats
from schemas import codec, subjects
from schemas.control import EmergencyStop, StopScope
from schemas.export import JSON_DIR, MESSAGES

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "links.toml"
# Commands that must fail before touching NATS get a URL where nothing listens.
NO_NATS = "nats://127.0.0.1:1"

BAD_LINKS = """\
    [[links]]
    link_id = "a"
    master = "alpari 1001"
    follower = "icm-2002"
    colour = "blue"
    sizing = { mode = "martingale" }

    [[links]]
    link_id = "b"
    master = "alpari-1001"
    sizing = { mode = "multiplier", factor = 0.0 }
    trading_hours = { start = "25:00", end = "10:00" }
"""


async def _run(argv: Sequence[str]) -> int:
    """main() runs its own (uv)loop: call it off the test's loop, in a worker thread."""
    return await asyncio.to_thread(main, list(argv))


def _write(tmp_path: Path, text: str, name: str = "links.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------


def test_top_level_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tradecopy")
    for command in ("schema", "links", "stop", "decisions", "status", "replicator", "nats"):
        assert command in out, command


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["links", "--help"], ["validate", "apply"]),
        (["schema", "export", "--help"], ["--dir", "--check"]),
        (["links", "apply", "--help"], ["--nats-url", "--prune"]),
        (["stop", "--help"], ["set", "clear", "list"]),
        (["stop", "set", "--help"], ["global", "account", "link", "--reason", "--force"]),
        (["decisions", "--help"], ["--follower", "--link", "--rule", "--master", "--follow"]),
        (["status", "--help"], ["--watch", "--json", "TRADECOPY_NATS_URL"]),
        (["up", "--help"], ["--nats-port", "--log-level"]),
    ],
)
def test_sub_command_help(
    argv: list[str], words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out, word


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: tradecopy" in capsys.readouterr().err


def test_the_module_runs_as_a_program() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "links", "validate", str(EXAMPLE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "link(s) valid" in proc.stdout


# --------------------------------------------------------------------------------------------
# schema export
# --------------------------------------------------------------------------------------------


def test_schema_check_passes_on_the_repository(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "export", "--check"]) == 0
    captured = capsys.readouterr()
    assert "up to date" in captured.out
    assert str(JSON_DIR) in captured.out
    assert captured.err == ""


def test_schema_export_writes_every_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "json"
    assert main(["schema", "export", "--dir", str(target)]) == 0
    printed = capsys.readouterr().out.split()
    expected = sorted(f"{stem}.json" for stem in MESSAGES)
    assert sorted(p.name for p in target.iterdir()) == expected
    assert sorted(Path(p).name for p in printed) == expected
    for name in expected:
        assert (target / name).read_text() == (JSON_DIR / name).read_text()

    assert main(["schema", "export", "--check", "--dir", str(target)]) == 0


def test_schema_check_on_an_empty_directory_names_every_stale_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema", "export", "--check", "--dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"stale JSON Schema in {tmp_path}" in captured.err
    for stem in MESSAGES:
        assert f"{stem}.json" in captured.err
    assert "tradecopy schema export" in captured.err
    assert list(tmp_path.iterdir()) == []  # --check never writes


def test_schema_check_names_only_the_edited_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema", "export", "--dir", str(tmp_path)]) == 0
    path = tmp_path / "fx_rate.json"
    path.write_text(path.read_text().replace('"rate"', '"rates"'))
    capsys.readouterr()
    assert main(["schema", "export", "--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "fx_rate.json" in err
    assert "copy_link.json" not in err


# --------------------------------------------------------------------------------------------
# links validate
# --------------------------------------------------------------------------------------------


def test_validate_a_good_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["links", "validate", str(EXAMPLE)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"{EXAMPLE}: {len(load_links(EXAMPLE))} link(s) valid"
    assert captured.err == ""


def test_validate_a_bad_file_prints_every_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, BAD_LINKS)
    with pytest.raises(LinkFileError) as info:
        load_links(path)
    expected = [str(e) for e in info.value.errors]
    assert len(expected) == 6

    assert main(["links", "validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{path}: 6 invalid field(s)" in captured.err
    for error in expected:
        assert f"  - {error}" in captured.err.splitlines(), error
    for where in (
        "links[0] (a).master",
        "links[0] (a).colour",
        "links[0] (a).sizing.mode",
        "links[1] (b).follower",
        "links[1] (b).sizing.factor",
        "links[1] (b).trading_hours",
    ):
        assert where in captured.err


def test_validate_invalid_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, '[[links]\nlink_id = "a"\n')
    assert main(["links", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "file: not valid TOML" in err


def test_validate_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.toml"
    assert main(["links", "validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"{path}: no such file"
    assert captured.out == ""


def test_validate_reports_a_time_zone_that_is_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path,
        """\
        [[links]]
        link_id = "a"
        master = "m-1"
        follower = "f-1"
        trading_hours = { start = "08:00", end = "10:00", timezone = "America" }
        """,
    )
    assert main(["links", "validate", str(path)]) == 2
    assert "links[0] (a).trading_hours" in capsys.readouterr().err


def test_apply_with_a_bad_file_exits_2_without_touching_nats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, BAD_LINKS)
    assert main(["links", "apply", str(path), "--nats-url", NO_NATS]) == 2
    assert "6 invalid field(s)" in capsys.readouterr().err
    assert main(["links", "apply", str(tmp_path / "nope.toml"), "--nats-url", NO_NATS]) == 2
    assert "no such file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# links apply / stop against a real nats-server
# --------------------------------------------------------------------------------------------


async def _links_in_kv(js: JetStreamContext) -> dict[str, object]:
    kv = await js.key_value(subjects.KV_LINKS)
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return {}
    return {k: codec.copy_link_decoder.decode((await kv.get(k)).value) for k in keys}


async def test_links_apply_writes_the_links_to_kv(
    nats_server: EmbeddedNats,
    js: JetStreamContext,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    links = load_links(EXAMPLE)
    ids = [link.link_id for link in links]
    url = nats_server.url

    assert await _run(["links", "apply", str(EXAMPLE), "--nats-url", url]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [f"  created: {', '.join(ids)}"]
    assert await _links_in_kv(js) == {link.link_id: link for link in links}

    assert await _run(["links", "apply", str(EXAMPLE), "--nats-url", url]) == 0
    assert capsys.readouterr().out.splitlines() == [f"unchanged: {', '.join(ids)}"]

    # Edit one link, drop the others, prune.
    text = EXAMPLE.read_text(encoding="utf-8")
    edited = text.replace('link_id = "fx-fixed"', 'link_id = "fx-fixed-2"')
    smaller = _write(tmp_path, edited, "edited.toml")
    assert await _run(["links", "apply", str(smaller), "--nats-url", url, "--prune"]) == 0
    out = capsys.readouterr().out
    assert "  created: fx-fixed-2" in out
    assert "  removed: fx-fixed" in out
    stored = await _links_in_kv(js)
    assert set(stored) == (set(ids) - {"fx-fixed"}) | {"fx-fixed-2"}


async def test_links_apply_without_prune_keeps_other_links(
    nats_server: EmbeddedNats,
    js: JetStreamContext,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = nats_server.url
    assert await _run(["links", "apply", str(EXAMPLE), "--nats-url", url]) == 0
    one = _write(
        tmp_path,
        """\
        [[links]]
        link_id = "gold-x2"
        master = "alpari-1001"
        follower = "icm-2002"
        sizing = { mode = "fixed_lot", lots = 0.01 }
        """,
    )
    capsys.readouterr()
    assert await _run(["links", "apply", str(one), "--nats-url", url]) == 0
    assert capsys.readouterr().out.splitlines() == ["  updated: gold-x2"]
    stored = await _links_in_kv(js)
    assert len(stored) == len(load_links(EXAMPLE))
    assert stored["gold-x2"] == load_links(one)[0]


async def _control(js: JetStreamContext, key: str) -> EmergencyStop:
    kv = await js.key_value(subjects.KV_CONTROL)
    return codec.emergency_stop_decoder.decode((await kv.get(key)).value)


async def test_stop_set_and_clear_an_account(
    nats_server: EmbeddedNats, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    url = nats_server.url
    argv = ["stop", "set", "account", "acc-1", "--reason", "x", "--nats-url", url, "--force"]
    assert await _run(argv) == 0
    assert capsys.readouterr().out.strip() == "emergency stop account.acc-1: ACTIVE"
    stop = await _control(js, "account.acc-1")
    assert stop.scope is StopScope.ACCOUNT
    assert stop.target == "acc-1"
    assert stop.active is True
    assert stop.reason == "x"
    assert stop.ts_ns > 0

    argv = ["stop", "clear", "account", "acc-1", "--reason", "resolved", "--nats-url", url]
    assert await _run(argv) == 0
    assert capsys.readouterr().out.strip() == "emergency stop account.acc-1: cleared"
    cleared = await _control(js, "account.acc-1")
    assert cleared.active is False
    assert cleared.reason == "resolved"
    assert cleared.ts_ns >= stop.ts_ns


async def test_stop_global_and_link(
    nats_server: EmbeddedNats, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    url = nats_server.url
    assert await _run(["stop", "set", "global", "--reason", "news", "--nats-url", url]) == 0
    assert await _run(["links", "apply", str(EXAMPLE), "--nats-url", url]) == 0
    assert await _run(["stop", "set", "link", "gold-x2", "--nats-url", url]) == 0
    out = capsys.readouterr().out
    assert "emergency stop global: ACTIVE" in out
    assert "emergency stop link.gold-x2: ACTIVE" in out

    glob = await _control(js, "global")
    assert (glob.scope, glob.target, glob.active, glob.reason) == (
        StopScope.GLOBAL,
        "",
        True,
        "news",
    )
    link = await _control(js, "link.gold-x2")
    assert (link.scope, link.target, link.active, link.reason) == (
        StopScope.LINK,
        "gold-x2",
        True,
        "",
    )


@pytest.mark.parametrize("scope", ["account", "link"])
@pytest.mark.parametrize("action", ["set", "clear"])
def test_stop_without_target_exits_2(
    scope: str, action: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stop", action, scope, "--reason", "x", "--nats-url", NO_NATS]) == 2
    captured = capsys.readouterr()
    assert f"an emergency stop for a {scope} needs its id" in captured.err
    assert captured.out == ""


def test_the_global_stop_takes_no_id(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stop", "set", "global", "everything", "--nats-url", NO_NATS]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "the global emergency stop takes no id"
    assert captured.out == ""


def test_stop_with_an_unknown_scope_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["stop", "set", "planet", "earth", "--nats-url", NO_NATS])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["acc 1", "acc.1"])
async def test_stop_rejects_a_target_that_is_not_an_id(
    target: str, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["stop", "set", "account", target, "--nats-url", nats_server.url, "--force"]
    assert await _run(argv) == 2
    assert "is not a valid account id" in capsys.readouterr().err


# --- links resume ---------------------------------------------------------------------------


async def test_resume_lifts_a_protection_pause_and_resets_the_peak(
    nats_server: EmbeddedNats, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.replicator.state import LinkState, link_state_decoder, link_state_encoder
    from engine.runtime.jetstream import ensure_buckets

    kv = (await ensure_buckets(js))[subjects.KV_LINK_STATE]
    paused = LinkState(
        day="2026-11-21", opened=["p1"], peak_equity=12_000.0, paused=True,
        paused_rule="max_drawdown", paused_ns=1, close_all_pending=True,
    )  # fmt: skip
    await kv.put("gold-x2", link_state_encoder.encode(paused))

    assert await _run(["links", "resume", "gold-x2", "--nats-url", nats_server.url]) == 0
    assert "gold-x2: resumed" in capsys.readouterr().out
    state = link_state_decoder.decode((await kv.get("gold-x2")).value)
    assert not state.paused
    assert state.paused_rule == ""
    assert not state.close_all_pending
    assert state.peak_equity is None
    assert state.opened == ["p1"]  # the day's trade count is not forgiven

    assert await _run(["links", "resume", "gold-x2", "--nats-url", nats_server.url]) == 0
    assert "gold-x2: not paused" in capsys.readouterr().out
    assert await _run(["links", "resume", "never-seen", "--nats-url", nats_server.url]) == 0
    assert "never-seen: not paused" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# NATS: users, permissions, bootstrap; ops endpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["replicator", "run"],
        ["bridge", "run", "--config", "x.toml"],
        ["mt5", "run", "--config", "x.toml"],
    ],
)
def test_ops_endpoints_listen_on_loopback_unless_told(argv: list[str]) -> None:
    from engine.cli import build_parser

    assert build_parser().parse_args(argv).metrics_host == "127.0.0.1"
    opened = build_parser().parse_args([*argv, "--metrics-host", "0.0.0.0"])
    assert opened.metrics_host == "0.0.0.0"


def test_nats_permissions_prints_every_role_and_a_connector_entry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from engine.runtime.natsauth import role_permission_variables

    assert main(["nats", "permissions"]) == 0
    assert capsys.readouterr().out == role_permission_variables()
    argv = ["nats", "permissions", "--connector", "farm-1", "--masters", "m1",
            "--followers", "f1,f2", "--nkey", "UABC"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    entry = json.loads(out.split("\n", 1)[1])
    assert entry["nkey"] == "UABC"
    allowed = entry["permissions"]["publish"]["allow"]
    assert "tc.v1.master.m1.events" in allowed and "tc.v1.follower.f2.reports" in allowed
    assert not any(s.endswith(".orders") for s in allowed)
    assert main(["nats", "permissions", "--connector", "farm-1", "--masters", "m.1"]) == 2


def test_nats_nkey_writes_the_seed_0600_and_prints_the_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.runtime.natsauth import public_key

    seed_file = tmp_path / "replicator.nk"
    assert main(["nats", "nkey", "--seed-file", str(seed_file)]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("U") and key == public_key(seed_file.read_text())
    assert seed_file.stat().st_mode & 0o077 == 0
    assert main(["nats", "nkey", "--seed-file", str(seed_file)]) == 2  # never overwritten
    assert public_key(seed_file.read_text()) == key


async def test_nats_bootstrap_creates_streams_and_refuses_replicas_without_a_cluster(
    nats_server: EmbeddedNats, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    url = nats_server.url
    assert await _run(["nats", "bootstrap", "--nats-url", url, "--replicas", "1"]) == 0
    assert "streams and buckets ready" in capsys.readouterr().out
    info = await js.stream_info("TC_FOLLOWER_ORDERS")
    assert info.config.num_replicas == 1
    assert await _run(["nats", "bootstrap", "--nats-url", url, "--replicas", "3"]) == 2
    assert "needs a JetStream cluster" in capsys.readouterr().err


async def test_an_operator_command_without_credentials_names_the_variables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.runtime.natsauth import NatsUser, Role

    for name in ("TRADECOPY_NATS_SEED", "TRADECOPY_NATS_CREDS", "TRADECOPY_NATS_USER"):
        monkeypatch.delenv(name, raising=False)
    admin = NatsUser.generate(Role.ADMIN)
    server = EmbeddedNats(store_dir=tmp_path / "secured", users=[admin])
    await server.start()
    try:
        argv = ["stop", "set", "global", "--nats-url", server.url]
        assert await _run(argv) == 2
        assert "TRADECOPY_NATS_SEED" in capsys.readouterr().err
    finally:
        await server.stop()


# --------------------------------------------------------------------------------------------
# bridge keys; bench state
# --------------------------------------------------------------------------------------------


def _curve_handshake(server_secret: str, server_public: str, public: str, secret: str) -> bytes:
    """One message from a CURVE client to a CURVE server made with these keys (or timeout)."""
    import zmq

    ctx = zmq.Context()
    try:
        server = ctx.socket(zmq.ROUTER)
        server.setsockopt(zmq.LINGER, 0)
        server.setsockopt(zmq.CURVE_SERVER, 1)
        server.setsockopt(zmq.CURVE_SECRETKEY, server_secret.encode())
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.setsockopt(zmq.CURVE_SERVERKEY, server_public.encode())
        client.setsockopt(zmq.CURVE_PUBLICKEY, public.encode())
        client.setsockopt(zmq.CURVE_SECRETKEY, secret.encode())
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"over curve")
        assert server.poll(5000), "no message through the CURVE handshake"
        return bytes(server.recv_multipart()[-1])
    finally:
        ctx.destroy(linger=0)


def test_bridge_keys_prints_a_working_pair_and_where_each_half_goes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import tomllib

    import zmq

    assert main(["bridge", "keys", "--json"]) == 0
    connector = json.loads(capsys.readouterr().out)
    assert main(["bridge", "keys"]) == 0
    out = capsys.readouterr().out
    terminal = tomllib.loads("\n".join(out.splitlines()[:2]))  # TOML-ready lines
    for pair in (connector, terminal):
        assert zmq.curve_public(pair["secret_key"].encode()).decode() == pair["public_key"]
    assert connector["public_key"] != terminal["public_key"]
    for where in ("TRADECOPY_BRIDGE_SECRET_KEY", "InpServerKey", "curve_public_key",
                  "InpPublicKey", "InpSecretKey"):  # fmt: skip
        assert where in out
    received = _curve_handshake(connector["secret_key"], connector["public_key"],
                                terminal["public_key"], terminal["secret_key"])  # fmt: skip
    assert received == b"over curve"
    # --secret-file: the secret goes into a new 0600 file, never to stdout.
    key_file = tmp_path / "farm-1.key"
    assert main(["bridge", "keys", "--json", "--secret-file", str(key_file)]) == 0
    printed = capsys.readouterr().out
    written = json.loads(printed)
    assert written["secret_key"] is None and written["secret_file"] == str(key_file)
    assert key_file.stat().st_mode & 0o077 == 0
    secret = key_file.read_text().strip()
    assert zmq.curve_public(secret.encode()).decode() == written["public_key"]
    assert secret not in printed
    assert main(["bridge", "keys", "--secret-file", str(key_file)]) == 2  # never overwritten
    assert key_file.read_text().strip() == secret


def test_bench_state_forwards_to_the_connector_state_benchmark(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import benchmarks.connector_state

    seen: list[list[str]] = []
    monkeypatch.setattr(benchmarks.connector_state, "main", lambda argv: seen.append(argv) or 0)
    assert main(["bench", "state", "--orders", "500", "--json"]) == 0
    assert main(["bench", "state", "--no-fsync", "--batch", "3"]) == 0
    assert seen == [
        ["--orders", "500", "--batch", "10", "--fsync", "--json"],
        ["--orders", "100000", "--batch", "3", "--no-fsync"],
    ]


def test_bench_api_forwards_rate_seconds_and_json_to_the_api_benchmark(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import benchmarks.api

    seen: list[list[str]] = []
    monkeypatch.setattr(benchmarks.api, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.delenv("TRADECOPY_DATABASE_URL", raising=False)
    assert main(["bench", "api", "--json", "--seconds", "3", "--rps", "250"]) == 0
    assert main(["bench", "api"]) == 0
    assert seen == [
        ["--rps", "250.0", "--seconds", "3.0", "--sse-samples", "200", "--json"],
        ["--rps", "500.0", "--seconds", "10.0", "--sse-samples", "200"],
    ]


# --------------------------------------------------------------------------------------------
# Help on everything; argument errors, never tracebacks
# --------------------------------------------------------------------------------------------


def _actions(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.Action]]:
    """Every action of the parser tree, named by its command path; sub-commands as theirs."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {choice.dest: choice for choice in action._choices_actions}
            for name, sub in action.choices.items():
                where = " ".join((*path, name))
                # A sub-command added without help is not listed at all: report it as missing.
                yield where, listed.get(name, argparse.Action([], name, help=None))
                yield from _actions(sub, (*path, name))
        else:
            yield " ".join(path) or "tradecopy", action


def test_every_option_and_subcommand_has_help() -> None:
    from engine.cli import build_parser

    seen = list(_actions(build_parser()))
    missing = [
        f"{where}: {'/'.join(action.option_strings) or action.dest}"
        for where, action in seen
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []
    commands = {where for where, _ in seen}
    for command in ("links list", "stop list", "decisions", "status", "up", "stop set"):
        assert command in commands, command


@pytest.mark.parametrize(
    "argv",
    [
        ["replicator", "run", "--log-level", "verbose"],
        ["up", "--log-level", "verbose"],
        ["bridge", "run", "--config", "x.toml", "--log-level", "verbose"],
        ["up", "--nats-port", "70000"],
        ["up", "--nats-port", "four"],
        ["decisions", "--rule", "no_such_rule"],
        ["decisions", "--last", "-1"],
        ["decisions", "--follower", "f.1"],
        ["decisions", "--link", "a b"],
        ["status", "--watch", "0"],
    ],
)
def test_a_bad_argument_is_a_usage_error_not_a_traceback(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: tradecopy {argv[0]}" in err
    assert "error: argument" in err
    assert "Traceback" not in err


def test_log_level_verbose_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["replicator", "run", "--log-level", "verbose"])
    err = capsys.readouterr().err
    assert "invalid choice: 'verbose'" in err
    for level in ("debug", "info", "warning", "error"):
        assert f"'{level}'" in err


# --------------------------------------------------------------------------------------------
# Which NATS: --nats-url or $TRADECOPY_NATS_URL, never a silent default
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["stop", "set", "global"],
        ["stop", "list"],
        ["links", "list"],
        ["links", "apply", str(EXAMPLE)],
        ["links", "resume", "gold-x2"],
        ["decisions"],
        ["status"],
        ["nats", "bootstrap"],
        ["replicator", "run"],
        ["quotes", "publish"],
    ],
)
def test_a_nats_command_without_url_or_variable_refuses_naming_both(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_NATS_URL, raising=False)
    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < 2.0  # refused before any connection attempt
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "--nats-url" in lines[0] and ENV_NATS_URL in lines[0]
    assert "4222" not in captured.err


async def test_the_nats_url_comes_from_the_environment_and_is_said(
    nats_server: EmbeddedNats,
    js: JetStreamContext,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_NATS_URL, nats_server.url)
    assert await _run(["stop", "set", "global", "--reason", "env"]) == 0
    captured = capsys.readouterr()
    assert f"tradecopy: NATS {nats_server.url}" in captured.err
    assert "emergency stop global: ACTIVE" in captured.out
    assert (await _control(js, "global")).reason == "env"
    # --nats-url wins over the variable.
    monkeypatch.setenv(ENV_NATS_URL, f"nats://127.0.0.1:{_free_port()}")
    assert await _run(["stop", "clear", "global", "--nats-url", nats_server.url]) == 0
    assert f"tradecopy: NATS {nats_server.url}" in capsys.readouterr().err
    assert (await _control(js, "global")).active is False


# --------------------------------------------------------------------------------------------
# One-shot commands fail fast when NATS is away
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


ONE_SHOT = [
    ["stop", "set", "global"],
    ["stop", "clear", "link", "gold-x2"],
    ["stop", "list"],
    ["links", "list"],
    ["links", "apply", str(EXAMPLE)],
    ["links", "resume", "gold-x2"],
    ["decisions", "--follower", "icm-2002"],
    ["status"],
    ["nats", "bootstrap"],
]


@pytest.mark.parametrize("argv", ONE_SHOT, ids=[" ".join(a[:2]) for a in ONE_SHOT])
def test_a_one_shot_command_fails_fast_and_in_one_line_when_nats_is_down(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"nats://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    assert main([*argv, "--nats-url", url]) == 2
    assert time.monotonic() - started < 5.0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"tradecopy: NATS {url}",
        f"cannot reach NATS at {url}: connection refused (is a nats-server running there?)",
    ]


def test_stop_against_a_dead_port_exits_within_5_s_without_a_traceback() -> None:
    """The program as an operator runs it: no retry loop, no reconnect spam, one error line."""
    url = f"nats://127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADECOPY_NATS_")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "stop", "set", "global", "--nats-url", url],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT,
    )  # fmt: skip
    assert time.monotonic() - started < 5.0
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"tradecopy: NATS {url}",
        f"cannot reach NATS at {url}: connection refused (is a nats-server running there?)",
    ]


def test_a_server_that_accepts_but_never_speaks_times_out_within_5_s(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        assert main(["links", "list", "--nats-url", url]) == 2
        assert time.monotonic() - started < 5.0
    err = capsys.readouterr().err
    assert f"cannot reach NATS at {url}: no answer" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# stop: known targets only (unless --force); stop list
# --------------------------------------------------------------------------------------------


async def _put_account_state(
    js: JetStreamContext, account: str, ts_ns: int, **extra: object
) -> None:
    from engine.runtime.jetstream import ensure_buckets
    from schemas.account import AccountState

    kv = (await ensure_buckets(js))[subjects.KV_ACCOUNTS]
    state = AccountState(account=account, ts_ns=ts_ns, currency="USD", balance=1_000.0,
                         equity=1_000.0, **extra)  # type: ignore[arg-type]  # fmt: skip
    await kv.put(account, codec.encode(state))


async def test_stop_set_refuses_an_unknown_link_or_account_and_says_what_is_known(
    nats_server: EmbeddedNats, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    url = nats_server.url
    assert await _run(["links", "apply", str(EXAMPLE), "--nats-url", url]) == 0
    link_ids = sorted(link.link_id for link in load_links(EXAMPLE))
    capsys.readouterr()

    assert await _run(["stop", "set", "link", "no-such-link", "--nats-url", url]) == 2
    captured = capsys.readouterr()
    assert "ACTIVE" not in captured.out
    error = captured.err.strip().splitlines()[-1]
    assert error == (
        f"unknown link 'no-such-link'; known links: {', '.join(link_ids)} "
        "(--force sets the stop anyway)"
    )
    kv = await js.key_value(subjects.KV_CONTROL)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("link.no-such-link")

    assert await _run(["stop", "set", "account", "nobody-9", "--nats-url", url]) == 2
    err = capsys.readouterr().err
    assert "unknown account 'nobody-9'; known accounts: alpari-1001," in err
    assert "icm-2002" in err

    # A master or follower named by a link is known; so is an account with a state.
    assert await _run(["stop", "set", "account", "icm-2002", "--nats-url", url]) == 0
    await _put_account_state(js, "solo-5", 1)
    assert await _run(["stop", "set", "account", "solo-5", "--nats-url", url]) == 0
    assert await _run(["stop", "set", "link", "gold-x2", "--nats-url", url]) == 0
    # --force: for a link about to be applied.
    assert await _run(["stop", "set", "link", "next-link", "--force", "--nats-url", url]) == 0
    out = capsys.readouterr().out
    for key in ("account.icm-2002", "account.solo-5", "link.gold-x2", "link.next-link"):
        assert f"emergency stop {key}: ACTIVE" in out
    assert (await _control(js, "link.next-link")).active is True


async def test_stop_list_shows_every_stop_in_force_with_when_and_why(
    nats_server: EmbeddedNats, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    url = nats_server.url
    assert await _run(["stop", "list", "--nats-url", url]) == 0
    assert capsys.readouterr().out.strip() == "no emergency stop in force"
    assert await _run(["links", "apply", str(EXAMPLE), "--nats-url", url]) == 0
    for argv in (
        ["stop", "set", "global", "--reason", "NFP release"],
        ["stop", "set", "account", "icm-2002", "--reason", "margin call"],
        ["stop", "set", "link", "fx-fixed"],
        ["stop", "clear", "link", "fx-fixed"],
    ):
        assert await _run([*argv, "--nats-url", url]) == 0
    capsys.readouterr()

    assert await _run(["stop", "list", "--nats-url", url]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["SCOPE", "TARGET", "STATE", "SINCE", "REASON"]
    assert len(lines) == 3
    account, glob = lines[1], lines[2]  # by key: account.icm-2002, global
    assert account.split()[:3] == ["account", "icm-2002", "ACTIVE"]
    assert account.endswith("margin call") and " UTC (" in account and "s ago)" in account
    assert glob.split()[:3] == ["global", "-", "ACTIVE"] and glob.endswith("NFP release")

    assert await _run(["stop", "list", "--all", "--json", "--nats-url", url]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["scope"], r["target"], r["active"]) for r in rows] == [
        ("account", "icm-2002", True), ("global", "", True), ("link", "fx-fixed", False),
    ]  # fmt: skip
    assert all(r["ts_ns"] > 0 for r in rows)


# --------------------------------------------------------------------------------------------
# links list
# --------------------------------------------------------------------------------------------


async def test_links_list_shows_each_link_its_sizing_and_whether_it_copies(
    nats_server: EmbeddedNats, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.replicator.state import LinkState, link_state_encoder
    from engine.runtime.jetstream import ensure_buckets

    url = nats_server.url
    assert await _run(["links", "list", "--nats-url", url]) == 0
    assert "no links" in capsys.readouterr().out
    assert await _run(["links", "apply", str(EXAMPLE), "--nats-url", url]) == 0
    state_kv = (await ensure_buckets(js))[subjects.KV_LINK_STATE]
    await state_kv.put(
        "fx-fixed", link_state_encoder.encode(LinkState(paused=True, paused_rule="max_drawdown"))
    )
    assert await _run(["stop", "set", "link", "gold-x2", "--nats-url", url]) == 0
    capsys.readouterr()

    assert await _run(["links", "list", "--nats-url", url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["LINK", "MASTER", "→", "FOLLOWER", "SIZING", "STATE"]
    rows = {line.split()[0]: line for line in out[1:]}
    assert set(rows) == {link.link_id for link in load_links(EXAMPLE)}
    assert "alpari-1001 → icm-2002" in rows["gold-x2"]
    assert "multiplier ×2" in rows["gold-x2"] and rows["gold-x2"].endswith("STOPPED (link.gold-x2)")
    assert "fixed_lot 0.1" in rows["fx-fixed"] and rows["fx-fixed"].endswith(
        "paused (max_drawdown)"
    )
    assert rows["risk-250eur"].endswith("disabled")  # enabled = false in the file
    others = set(rows) - {"gold-x2", "fx-fixed", "risk-250eur"}
    assert others and all(rows[i].endswith("copying") for i in others)

    assert await _run(["links", "list", "--json", "--nats-url", url]) == 0
    listed = {r["link_id"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert listed["gold-x2"]["stopped_by"] == ["link.gold-x2"]
    assert listed["fx-fixed"]["paused_by"] == "max_drawdown"
    assert listed["fx-fixed"]["state"] == "paused (max_drawdown)"
    assert listed["gold-x2"]["master"] == "alpari-1001"


# --------------------------------------------------------------------------------------------
# decisions
# --------------------------------------------------------------------------------------------


def _decision(n: int, follower: str, link: str, rule: str, master: str = "m-1") -> Any:
    from schemas.decisions import CopyDecision, DecisionOutcome, DecisionRule

    return CopyDecision(
        decision_id=f"d-{n}", link_id=link, master=master, follower=follower,
        outcome=DecisionOutcome.SKIPPED, rule=DecisionRule(rule),
        message=f"decision {n}: {rule.replace('_', ' ')}", ts_ns=1_700_000_000_000_000_000 + n,
        numbers={"volume": 0.004, "volume_min": 0.01} if rule == "below_min_volume" else {},
    )  # fmt: skip


async def _publish_decisions(js: JetStreamContext, decisions: Sequence[Any]) -> None:
    from engine.runtime.jetstream import ensure_streams

    await ensure_streams(js)
    for d in decisions:
        await js.publish(subjects.decisions(d.follower, d.link_id), codec.encode(d))


async def test_decisions_shows_the_last_ones_filtered_with_the_reason_in_words(
    nats_server: EmbeddedNats, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    url = nats_server.url
    decisions = [
        _decision(1, "f-1", "l-1", "symbol_not_included"),
        _decision(2, "f-2", "l-2", "below_min_volume", master="m-2"),
        _decision(3, "f-1", "l-1", "daily_trade_limit"),
        _decision(4, "f-1", "l-3", "below_min_volume"),
        _decision(5, "f-2", "l-2", "direction", master="m-2"),
    ]
    await _publish_decisions(js, decisions)

    def shown(argv: list[str]) -> list[str]:
        assert main([*argv, "--nats-url", url]) == 0
        return [line.split(": ", 1)[1].split("  [")[0]
                for line in capsys.readouterr().out.splitlines()]  # fmt: skip

    everything = await asyncio.to_thread(shown, ["decisions"])
    assert everything == [d.message for d in decisions]
    assert await asyncio.to_thread(shown, ["decisions", "--last", "2"]) == [
        "decision 4: below min volume", "decision 5: direction",
    ]  # fmt: skip
    assert await asyncio.to_thread(shown, ["decisions", "--follower", "f-1"]) == [
        "decision 1: symbol not included", "decision 3: daily trade limit",
        "decision 4: below min volume",
    ]  # fmt: skip
    assert await asyncio.to_thread(shown, ["decisions", "--follower", "f-1", "--link", "l-3"]) == [
        "decision 4: below min volume"
    ]
    assert await asyncio.to_thread(shown, ["decisions", "--rule", "below_min_volume"]) == [
        "decision 2: below min volume", "decision 4: below min volume",
    ]  # fmt: skip
    assert await asyncio.to_thread(shown, ["decisions", "--master", "m-2", "--last", "1"]) == [
        "decision 5: direction"
    ]
    assert await _run(["decisions", "--follower", "nobody", "--nats-url", url]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no copy decision matches" in captured.err

    # The line: when, outcome, rule, link (master → follower), the words, the numbers.
    assert await _run(["decisions", "--link", "l-2", "--last", "1", "--rule",
                       "below_min_volume", "--nats-url", url]) == 0  # fmt: skip
    line = capsys.readouterr().out.strip()
    assert line.startswith("2023-11-14 22:13:20.000 UTC  skipped    below_min_volume")
    assert "l-2 (m-2 → f-2): decision 2: below min volume  [volume=0.004, volume_min=0.01]" in line

    assert await _run(["decisions", "--json", "--follower", "f-2", "--nats-url", url]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["decision_id"] for r in rows] == ["d-2", "d-5"]
    assert rows[0]["numbers"] == {"volume": 0.004, "volume_min": 0.01}
    assert rows[0]["rule"] == "below_min_volume" and rows[0]["outcome"] == "skipped"


async def test_decisions_last_reaches_back_past_many_newer_ones(
    nats_server: EmbeddedNats, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reading window grows backwards until it has enough matches."""
    old = [_decision(i, "rare", "l-r", "magic") for i in range(3)]
    noise = [_decision(10 + i, "busy", "l-b", "direction") for i in range(700)]
    await _publish_decisions(js, [*old, *noise])
    argv = ["decisions", "--follower", "rare", "--last", "2", "--json", "--nats-url"]
    assert await _run([*argv, nats_server.url]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["decision_id"] for r in rows] == ["d-1", "d-2"]


async def test_decisions_follow_prints_new_decisions_as_they_are_stored(
    nats_server: EmbeddedNats, js: JetStreamContext
) -> None:
    await _publish_decisions(js, [_decision(1, "f-1", "l-1", "magic")])
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADECOPY_NATS_")}
    env |= {ENV_NATS_URL: nats_server.url, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "decisions", "--follow", "--follower", "f-1",
         "--last", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = await asyncio.to_thread(proc.stdout.readline)
        assert "decision 1: magic" in first
        said = await asyncio.to_thread(proc.stderr.readline)
        assert said.strip() == f"tradecopy: NATS {nats_server.url}"
        following = await asyncio.to_thread(proc.stderr.readline)
        assert following.startswith("following decisions after stream sequence 1")
        await _publish_decisions(js, [_decision(2, "f-2", "l-2", "direction"),
                                      _decision(3, "f-1", "l-1", "daily_trade_limit")])  # fmt: skip
        new = await asyncio.to_thread(proc.stdout.readline)
        assert "decision 3: daily trade limit" in new  # decision 2 is another follower's
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_decisions_follow_count_stops_after_that_many(
    nats_server: EmbeddedNats, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    await _publish_decisions(js, [_decision(i, "f-1", "l-1", "magic") for i in range(1, 4)])
    # --last 0: nothing from before; the follow starts after the newest stored decision.
    task = asyncio.create_task(
        _run(["decisions", "--last", "0", "--follow", "--count", "2", "--json",
              "--nats-url", nats_server.url])
    )  # fmt: skip
    await wait_until(lambda: "following decisions" in capsys.readouterr().err or task.done(),
                     "the follow to start")  # fmt: skip
    await _publish_decisions(js, [_decision(i, "f-1", "l-1", "magic") for i in range(4, 7)])
    assert await asyncio.wait_for(task, 30) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["decision_id"] for r in rows] == ["d-4", "d-5"]


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------


async def test_status_shows_streams_consumers_lag_and_silent_connectors(
    nats_server: EmbeddedNats, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig

    from schemas.account import TerminalStatus
    from schemas.streams import FOLLOWER_ORDERS_STREAM

    url = nats_server.url
    await _publish_decisions(js, [_decision(1, "f-1", "l-1", "magic")])
    # A connector's durable order consumer with two orders waiting, nobody bound.
    await js.add_consumer(FOLLOWER_ORDERS_STREAM, ConsumerConfig(
        durable_name="connector-farm-1", deliver_subject="_INBOX.farm-1",
        ack_policy=AckPolicy.EXPLICIT,
    ))  # fmt: skip
    for n in range(2):
        await js.publish(
            subjects.follower_orders("f-1"), b"order", headers={"Nats-Msg-Id": f"o{n}"}
        )
    now = time.time_ns()
    terminal = TerminalStatus(connected=True, synchronised=False)
    await _put_account_state(js, "f-1", now, connector="farm-1", terminal=terminal)
    await _put_account_state(js, "m-9", now - 3_600 * 10**9, connector="farm-9")

    assert await _run(["status", "--nats-url", url]) == 0
    captured = capsys.readouterr()
    assert f"tradecopy: NATS {url}" in captured.err
    out = captured.out
    sections = {"streams", "consumers and lag", "replicators", "connectors", "accounts"}
    assert sections <= {line.strip() for line in out.splitlines()}
    lines = out.splitlines()
    decisions = next(line for line in lines if line.strip().startswith("TC_DECISIONS"))
    assert decisions.split()[1] == "1"  # messages
    consumer = next(line for line in lines if "connector-farm-1" in line)
    assert consumer.split()[:6] == ["TC_FOLLOWER_ORDERS", "connector-farm-1", "2", "0", "0", "NO"]
    replicators = lines[lines.index("replicators") + 2].split()
    assert replicators[:2] == ["DOWN", "0/0"]
    farm1 = next(line for line in lines if line.strip().startswith("farm-1"))
    assert farm1.split()[1] == "alive" and farm1.rstrip().endswith("NO")
    farm9 = next(line for line in lines if line.strip().startswith("farm-9"))
    assert farm9.split()[1:3] == ["SILENT", "1.0h"]
    account = next(line for line in lines if line.strip().startswith("f-1 "))
    assert "connected, NOT synchronised" in account

    assert await _run(["status", "--json", "--nats-url", url]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {s["name"] for s in status["streams"]} >= {"TC_MASTER_EVENTS", "TC_DECISIONS"}
    [farm] = [c for c in status["consumers"] if c["name"] == "connector-farm-1"]
    assert (farm["num_pending"], farm["push_bound"]) == (2, False)
    connectors = {c["connector"]: c for c in status["connectors"]}
    assert connectors["farm-1"]["alive"] is True and connectors["farm-9"]["alive"] is False
    assert connectors["farm-1"]["order_consumer_bound"] is False
    accounts = {a["account"]: a for a in status["accounts"]}
    assert accounts["f-1"]["terminal"]["synchronised"] is False
    assert status["replicators"]["alive"] is False


async def test_status_watch_refreshes_until_ctrl_c(
    nats_server: EmbeddedNats, js: JetStreamContext
) -> None:
    from engine.runtime.jetstream import ensure_streams

    await ensure_streams(js)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADECOPY_NATS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "status", "--watch", "0.2", "--json",
         "--nats-url", nats_server.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = json.loads(await asyncio.to_thread(proc.stdout.readline))
        await _publish_decisions(js, [_decision(1, "f-1", "l-1", "magic")])

        def decisions_seen(snapshot: dict[str, Any]) -> int:
            return next(s["messages"] for s in snapshot["streams"] if s["name"] == "TC_DECISIONS")

        assert decisions_seen(first) in (0, 1)
        deadline = time.monotonic() + 20
        while True:
            snapshot = json.loads(await asyncio.to_thread(proc.stdout.readline))
            if decisions_seen(snapshot) == 1 and snapshot["ts_ns"] > first["ts_ns"]:
                break
            assert time.monotonic() < deadline, snapshot
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_every_command_the_readme_shows_parses() -> None:
    """The README's command lines are real: each one parses (nothing is run)."""
    import re
    import shlex

    from engine.cli import build_parser

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
    commands = [
        line.split("  #")[0].strip()
        for block in blocks
        for line in block.splitlines()
        if line.startswith("tradecopy ")
    ]
    assert len(commands) > 20
    for spoken in ("links list", "stop list", "decisions --follower", "status --watch",
                   "up --nats-port"):  # fmt: skip
        assert any(c.startswith(f"tradecopy {spoken}") for c in commands), spoken
    parser = build_parser()
    for command in commands:
        argv = [a.replace("…", "x") for a in shlex.split(command)[1:]]
        assert callable(parser.parse_args(argv).func), command
