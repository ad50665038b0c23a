"""``tradecopy up``: the long-running embedded default."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONFIG = """
[nats]
port = 0
http_port = -1
[replicator]
metrics_port = -1
partitions = 4
[api]
port = 0
[paper]
speed = 600
[[paper.accounts]]
id = "m"
role = "master"
[[paper.accounts]]
id = "f"
role = "follower"
[[links]]
link_id = "mf"
master = "m"
follower = "f"
"""


def test_up_starts_everything_says_where_and_stops_cleanly(tmp_path: Path) -> None:
    proc, lines = _start_up(tmp_path)
    text = "\n".join(lines)
    assert "NATS (JetStream)   nats://127.0.0.1:" in text
    assert "replicator up-1" in text
    assert "paper venue        m (master), f (follower); prices: replay" in text
    assert "links              1 (1 new, 0 updated)" in text
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    # State lives under the user's state directory and survives for the next start.
    # (the paper state is a snapshot and its journal: whichever the run wrote)
    assert list((tmp_path / "state" / "tradecopy" / "paper").glob("paper.state*"))
    assert (tmp_path / "state" / "tradecopy" / "nats" / "jetstream").exists()


def test_up_refuses_a_taken_port_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "up.toml"
        config.write_text(CONFIG.replace("port = 0", f"port = {port}", 1))
        done = subprocess.run(
            [sys.executable, "-m", "engine.cli", "up", "--config", str(config)],
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"port {port}" in done.stderr and "already in use" in done.stderr


def _start_up(
    tmp_path: Path, *args: str, log: Path | None = None, config_text: str = CONFIG
) -> tuple[subprocess.Popen[str], list[str]]:
    """``tradecopy up`` on CONFIG, until it says Ctrl-C works; its stdout lines so far."""
    config = tmp_path / "up.toml"
    config.write_text(config_text)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "PYTHONUNBUFFERED": "1"}
    with contextlib.ExitStack() as files:
        stderr = subprocess.DEVNULL if log is None else files.enter_context(log.open("w"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "up", "--config", str(config), *args],
            env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while not any(line.startswith("Ctrl-C stops") for line in lines):
        assert time.monotonic() < deadline, lines
        line = proc.stdout.readline()
        assert line, f"up exited early: {lines}"
        lines.append(line.strip())
    return proc, lines


def test_up_secures_nats_and_gives_the_operator_a_login(tmp_path: Path) -> None:
    """Only the users up made get in; the operator's login (printed) works for the CLI."""
    proc, lines = _start_up(tmp_path)
    try:
        url = next(line.split()[2] for line in lines if line.startswith("NATS (JetStream)"))
        login = next(line for line in lines if line.startswith("operator login"))
        exports = dict(item.split("=", 1) for item in login.split("export ", 1)[1].split())
        seed_file = Path(exports["TRADECOPY_NATS_CREDS"])
        assert exports["TRADECOPY_NATS_USER"] == "operator"
        assert seed_file.stat().st_mode & 0o077 == 0
        conf = tmp_path / "state" / "tradecopy" / "nats" / "nats-server.conf"
        assert conf.stat().st_mode & 0o077 == 0
        assert seed_file.read_text().strip() not in conf.read_text()  # public keys only

        bare = {k: v for k, v in os.environ.items() if not k.startswith("TRADECOPY_NATS_")}
        stop = [sys.executable, "-m", "engine.cli", "stop", "set", "global", "--nats-url", url]
        refused = subprocess.run(stop, env=bare, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2
        assert "TRADECOPY_NATS_SEED" in refused.stderr
        done = subprocess.run(
            stop, env={**bare, **exports}, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert "emergency stop global: ACTIVE" in done.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_up_nats_port_overrides_the_config_and_the_printed_login_drives_the_cli(
    tmp_path: Path,
) -> None:
    """The config's port is taken; --nats-port puts NATS elsewhere, and the operator's exports
    (URL and credentials) are all the CLI needs: no --nats-url anywhere."""
    with socket.socket() as busy, socket.socket() as probe:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        taken = CONFIG.replace("port = 0", f"port = {busy.getsockname()[1]}", 1)
        proc, lines = _start_up(tmp_path, "--nats-port", str(port), config_text=taken)
    try:
        assert f"NATS (JetStream)   nats://127.0.0.1:{port}   store" in "\n".join(lines)
        login = next(line for line in lines if line.startswith("operator login"))
        exports = dict(item.split("=", 1) for item in login.split("export ", 1)[1].split())
        assert exports["TRADECOPY_NATS_URL"] == f"nats://127.0.0.1:{port}"
        bare = {k: v for k, v in os.environ.items() if not k.startswith("TRADECOPY_NATS_")}
        cli = [sys.executable, "-m", "engine.cli"]
        listed = subprocess.run([*cli, "links", "list"], env={**bare, **exports},
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        assert (
            listed.stderr.splitlines()[0] == f"tradecopy: NATS nats://127.0.0.1:{port} as operator"
        )
        assert listed.stdout.splitlines()[1].split()[:4] == ["mf", "m", "→", "f"]
        # Without the URL: refused by name, never a guess at 4222.
        refused = subprocess.run([*cli, "links", "list"], env=bare, capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
        assert refused.returncode == 2
        assert "TRADECOPY_NATS_URL" in refused.stderr and "4222" not in refused.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_the_shipped_config_loads_secured_and_checks_the_sync_interval(tmp_path: Path) -> None:
    from engine.core.errors import TradecopyError
    from engine.up import DEFAULT_CONFIG, load_config

    shipped = load_config(DEFAULT_CONFIG)
    assert shipped.nats.secure is True and shipped.nats.host == "127.0.0.1"
    config = tmp_path / "up.toml"
    config.write_text('[nats]\nsync_interval = "always"\n')
    assert load_config(config).nats.sync_interval == "always"
    config.write_text('[nats]\nsync_interval = "sometimes"\n')
    with pytest.raises(TradecopyError, match="sync_interval"):
        load_config(config)


def _children(pid: int) -> dict[int, str]:
    """Child pid → command line (Linux /proc)."""
    found: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                found[int(child)] = cmdline.decode(errors="replace")
    return found


def _child(pid: int, marker: str, timeout: float = 30.0, not_pid: int = 0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child, cmdline in _children(pid).items():
            if marker in cmdline and child != not_pid:
                return child
        time.sleep(0.1)
    raise AssertionError(f"no child running {marker!r}: {_children(pid)}")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_up_brings_back_a_dead_nats_server_and_replicator_and_says_so_once(
    tmp_path: Path,
) -> None:
    log_file = tmp_path / "up.log"
    proc, lines = _start_up(tmp_path, "--log-level", "info", log=log_file)
    try:
        url = next(line.split()[2] for line in lines if line.startswith("NATS (JetStream)"))
        port = int(url.rsplit(":", 1)[1])
        nats_pid = _child(proc.pid, "nats-server")
        replicator_pid = _child(proc.pid, "replicator run")

        os.kill(nats_pid, signal.SIGKILL)
        new_nats = _child(proc.pid, "nats-server", not_pid=nats_pid)
        deadline = time.monotonic() + 30
        while True:  # back on the same port: every client finds it where it was
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "nats-server did not come back on its port"
            time.sleep(0.1)

        os.kill(replicator_pid, signal.SIGKILL)
        _child(proc.pid, "replicator run", not_pid=replicator_pid)
        time.sleep(2.0)  # a few supervision rounds: nothing is said twice
        assert proc.poll() is None, "up gave up"
        assert new_nats != nats_pid
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    text = log_file.read_text()
    for event in ("nats_server_exited", "nats_server_restarted", "replicator_exited",
                  "replicator_restarted"):  # fmt: skip
        assert text.count(event) == 1, (event, text[-3000:])
    assert "Traceback" not in text
    assert code == 0


def test_up_runs_the_ledger_on_embedded_postgres_and_history_reads_it(tmp_path: Path) -> None:
    """`up` starts PostgreSQL under the state directory and a ledger; `history` and `stats`
    (no URL given) find that same server while `up` runs, and Ctrl-C stops it."""
    proc, lines = _start_up(tmp_path)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("TRADECOPY_DATABASE_URL", None)
    data = tmp_path / "state" / "tradecopy" / "postgres" / "data"
    try:
        text = "\n".join(lines)
        assert "PostgreSQL         embedded, data under" in text
        assert "ledger up-1" in text
        history = [sys.executable, "-m", "engine.cli", "history", "--account", "f"]
        deadline = time.monotonic() + 60
        while True:  # the follower's account state reaches the ledger within a second or two
            done = subprocess.run(history, env=env, capture_output=True, text=True, timeout=60)
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("account f (USD)")
        assert "open positions: 0" in done.stdout
        stats = subprocess.run(
            [sys.executable, "-m", "engine.cli", "stats", "--account", "f", "--json"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert stats.returncode == 0, stats.stderr
        assert '"trades":0' in stats.stdout and '"currency":"USD"' in stats.stdout
        unknown = subprocess.run(
            [*history[:-1], "nobody"], env=env, capture_output=True, text=True, timeout=60
        )
        assert unknown.returncode == 2
        assert "the ledger holds nothing for account 'nobody'" in unknown.stderr
        assert (data / "postmaster.pid").exists()  # the CLI adopted up's server, left it up
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert not (data / "postmaster.pid").exists()  # stopped with the stack


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_up_serves_the_api_and_its_printed_curl_shows_a_followers_positions(
    tmp_path: Path,
) -> None:
    """`up` starts `tradecopy api run` over the ledger's database with the paper accounts
    registered under their venue ids; the printed curl (the follower's key from a 0600 file)
    answers that follower's positions, and a dead API is brought back."""
    proc, lines = _start_up(tmp_path)
    try:
        api_line = next(line for line in lines if line.startswith("API "))
        base = api_line.split()[1]
        assert base.startswith("http://127.0.0.1:")
        curl = next(line for line in lines if line.startswith("f key")).split(" ", 2)[2].strip()
        assert curl.startswith('curl -s -H "X-API-Key: $(cat ') and curl.endswith(
            f"{base}/v1/accounts/f/positions"
        )
        key_file = Path(curl.split("$(cat ", 1)[1].split(")", 1)[0])
        assert key_file.parent == tmp_path / "state" / "tradecopy" / "api"
        assert key_file.stat().st_mode & 0o077 == 0
        done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"items": [], "next_cursor": None}
        # the follower's key reaches its own account only
        master = curl.replace("/accounts/f/", "/accounts/m/")
        refused = subprocess.run(["bash", "-c", master], capture_output=True, text=True,
                                 timeout=30)  # fmt: skip
        assert json.loads(refused.stdout)["status"] == 404
        equity = curl.replace("/positions", "/equity")
        deadline = time.monotonic() + 60
        while True:  # the paper venue's account states reach the ledger within seconds
            answer = subprocess.run(["bash", "-c", equity], capture_output=True, text=True,
                                    timeout=30)  # fmt: skip
            items = json.loads(answer.stdout)["items"]
            if items or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert items and items[0]["currency"] == "USD" and items[0]["balance"] == 1_000_000

        api_pid = _child(proc.pid, "api run")
        os.kill(api_pid, signal.SIGKILL)
        _child(proc.pid, "api run", not_pid=api_pid)
        deadline = time.monotonic() + 30
        while True:  # back on the same port, same key
            done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True,
                                  timeout=30)  # fmt: skip
            if done.stdout.startswith("{") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert json.loads(done.stdout)["items"] == []
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
