"""``run_api`` as a process: refuses to start without its secrets, serves, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import msgspec
from conftest import wait_until
from test_api_support import PASSWORD, b64

from engine.api.config import ApiConfig
from engine.api.store import create_operator, migrate
from engine.runtime.natsserver import free_port

_RUN = (
    "import asyncio, sys, msgspec\n"
    "from engine.api.config import ApiConfig\n"
    "from engine.api.service import run_api\n"
    "asyncio.run(run_api(msgspec.json.decode(sys.argv[1], type=ApiConfig)))\n"
)


def _spawn(config: ApiConfig, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _RUN, msgspec.json.encode(config).decode()],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADECOPY_API_")}
    env.update(extra)
    return env


async def test_refuses_to_start_without_secrets(database_url: str, nats_server: Any) -> None:
    config = ApiConfig(database_url=database_url, nats_url=nats_server.url, port=0,
                       metrics_port=None)  # fmt: skip
    proc = _spawn(config, _env())
    out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode != 0
    assert b"TRADECOPY_API_JWT_SECRET" in out and b"TRADECOPY_API_MASTER_KEY" in out


async def test_serves_logins_and_stops_on_sigterm(database_url: str, nats_server: Any) -> None:
    await migrate(database_url)
    await create_operator(database_url, "ops@example.com", PASSWORD)
    port = free_port("127.0.0.1")
    config = ApiConfig(database_url=database_url, nats_url=nats_server.url, port=port,
                       metrics_port=None)  # fmt: skip
    env = _env(TRADECOPY_API_JWT_SECRET="s" * 40, TRADECOPY_API_MASTER_KEY=b64(bytes(32)))
    proc = _spawn(config, env)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def answers() -> bool:
                try:
                    async with session.get(f"{base}/v1/openapi.json") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return proc.poll() is not None  # died: stop waiting, fail below

            await wait_until(answers, "the API to answer", timeout=30)
            assert proc.poll() is None
            async with session.post(
                f"{base}/v1/auth/login",
                json={"identifier": "ops@example.com", "password": PASSWORD},
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["token_type"] == "Bearer"
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, out.decode(errors="replace")
        assert PASSWORD.encode() not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _module(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "api", *args],
        env=env,
        capture_output=True,
        timeout=120,
    )


async def test_command_line_creates_an_operator_and_rotates_the_key(database_url: str) -> None:
    await migrate(database_url)
    env = _env(TRADECOPY_API_OPERATOR_PASSWORD=PASSWORD)
    done = await asyncio.to_thread(
        _module, ["create-operator", "--email", "root@example.com", "--database-url", database_url],
        env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"root@example.com" in done.stdout and PASSWORD.encode() not in done.stdout
    again = await asyncio.to_thread(
        _module, ["create-operator", "--email", "root@example.com", "--database-url", database_url],
        env,
    )  # fmt: skip
    assert again.returncode == 2 and b"already exists" in again.stderr, again.stderr
    keys = _env(
        TRADECOPY_API_OLD_MASTER_KEY=b64(bytes(32)), TRADECOPY_API_MASTER_KEY=b64(b"n" * 32)
    )
    rotated = await asyncio.to_thread(
        _module, ["rotate-key", "--old-key-id", "k1", "--new-key-id", "k2",
                  "--database-url", database_url], keys,
    )  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    assert b"re-encrypted 0 account credential(s) from k1 to k2" in rotated.stdout
    bad = await asyncio.to_thread(
        _module, ["rotate-key", "--old-key-id", "k1", "--new-key-id", "k2",
                  "--database-url", database_url], _env(),
    )  # fmt: skip
    assert (bad.returncode == 2 and b"base64" in bad.stderr) or b"32 bytes" in bad.stderr


def test_command_line_refuses_to_serve_without_secrets() -> None:
    done = _module(
        ["run", "--port", "0", "--metrics-port", "-1", "--nats-url", "nats://127.0.0.1:9"], _env()
    )
    assert done.returncode == 2
    assert b"TRADECOPY_API_JWT_SECRET" in done.stderr
