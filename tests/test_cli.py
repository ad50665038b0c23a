"""The ``tradecopy`` command line, run in-process (NATS commands against a private server)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import nats.js.errors
import pytest
from nats.js import JetStreamContext

from engine.cli import main
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
    for command in ("schema", "links", "stop", "replicator", "nats", "bench"):
        assert command in out, command


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["links", "--help"], ["validate", "apply"]),
        (["schema", "export", "--help"], ["--dir", "--check"]),
        (["links", "apply", "--help"], ["--nats-url", "--prune"]),
        (["stop", "--help"], ["set", "clear", "global", "account", "link", "--reason"]),
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
    argv = ["stop", "set", "account", "acc-1", "--reason", "x", "--nats-url", url]
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


def test_stop_with_an_unknown_scope_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["stop", "set", "planet", "earth", "--nats-url", NO_NATS])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["acc 1", "acc.1"])
async def test_stop_rejects_a_target_that_is_not_an_id(
    target: str, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["stop", "set", "account", target, "--nats-url", nats_server.url]
    assert await _run(argv) == 2


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
