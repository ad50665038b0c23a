"""``tradecopy up``: the long-running embedded default."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CONFIG = """
[nats]
port = 0
http_port = -1
[replicator]
metrics_port = -1
partitions = 4
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
    config = tmp_path / "up.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "up", "--config", str(config)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while not any(line.startswith("Ctrl-C stops") for line in lines):
        assert time.monotonic() < deadline, lines
        line = proc.stdout.readline()
        assert line, f"up exited early: {lines}"
        lines.append(line.strip())
    text = "\n".join(lines)
    assert "NATS (JetStream)   nats://127.0.0.1:" in text
    assert "replicator up-1" in text
    assert "paper venue        m (master), f (follower); prices: replay" in text
    assert "links              1 (1 new, 0 updated)" in text
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    # State lives under the user's state directory and survives for the next start.
    assert (tmp_path / "state" / "tradecopy" / "paper" / "paper.state").exists()
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
