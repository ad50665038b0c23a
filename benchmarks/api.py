"""API benchmark: a follower's positions at a fixed request rate through ``tradecopy api run``,
next to a bare aiohttp handler under the same load in the same run; and SSE decision latency.

Real servers: PostgreSQL (``--database-url``, ``TRADECOPY_DATABASE_URL``, else the embedded
server in a temporary directory; a scratch database of its own, dropped afterwards), a private
nats-server, the API in its own process with generated secrets. Seeded through the API's and
the ledger's own stores: a tenant, a master and a follower account, a follower API key, and the
follower's ledger facts (``--open`` copies still open, ``--closed`` closed, an account state
after each).

- **Read**: a second process sends ``GET /v1/accounts/{follower}/positions`` (the follower's API
  key) open-loop at ``--rps`` for ``--seconds``: request *i* leaves at *start + i / rps* whether
  or not earlier ones came back, and its latency runs from that scheduled moment to the last
  byte of the answer, so queueing counts. A warm-up second first, not counted. Errors (any
  answer but 200, any failure) are counted.
- **Floor**: the same load against a bare aiohttp handler answering a fixed JSON body, in a
  process of its own.
- **SSE**: ``GET /v1/stream`` open as the follower; a decision published to
  ``schemas.subjects.decisions(follower, link)`` (JetStream), timed until its
  ``event: decision`` arrives, one at a time, ``--sse-samples`` times.

    python -m benchmarks.api [--rps 500] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
from aiohttp import web

from engine.api.auth import Caller, Role, issue_access_token
from engine.api.config import ApiConfig, ApiSecrets
from engine.api.service import local_secrets, spawn_api, wait_for_api
from engine.api.store import migrate as migrate_api
from engine.api.store import register_local_tenant
from engine.api.stream import decision_latencies
from engine.ledger import store as ledger_store
from engine.ledger.records import Kind, rows_of
from engine.runtime.eventloop import run_async
from engine.runtime.natsserver import free_port
from engine.runtime.postgres import start_database
from engine.runtime.processes import stop_process
from engine.runtime.stack import LocalStack
from schemas import codec
from schemas.account import AccountState
from schemas.common import Side
from schemas.orders import FollowerClose, FollowerOpen
from schemas.reports import OrderFilled

MASTER, FOLLOWER, LINK = "bench-master", "bench-follower", "bench-link"
BUDGET_P99_MS = 10.0
BUDGET_SSE_P50_MS = 5.0
_WARMUP_S = 1.0


def follower_facts(open_copies: int, closed_copies: int) -> list[tuple[Kind, object]]:
    """The follower's ledger facts: copies opened (and some closed), balances in between."""
    facts: list[tuple[Kind, object]] = []
    ts = time.time_ns() - 86_400 * 10**9
    balance = 10_000.0
    facts.append((Kind.ACCOUNT_STATE, AccountState(account=FOLLOWER, ts_ns=ts, currency="USD",
                                                   balance=balance, equity=balance)))  # fmt: skip
    for n in range(open_copies + closed_copies):
        ts += 60 * 10**9
        side = Side.BUY if n % 2 else Side.SELL
        order = FollowerOpen(
            order_id=f"o{n}", link_id=LINK, follower=FOLLOWER, master=MASTER,
            master_event_id=f"e{n}", symbol="EURUSD", ts_ns=ts, master_position_id=f"mp{n}",
            side=side, volume=0.1,
        )  # fmt: skip
        fill = OrderFilled(
            order_id=f"o{n}", link_id=LINK, follower=FOLLOWER, ts_ns=ts + 1000, symbol="EURUSD",
            position_id=f"fp{n}", side=side, volume=0.1, price=1.1,
        )  # fmt: skip
        facts += [(Kind.FOLLOWER_ORDER, order), (Kind.EXECUTION_REPORT, fill)]
        if n < closed_copies:
            profit = 12.5 if n % 3 else -7.25
            close = FollowerClose(
                order_id=f"c{n}", link_id=LINK, follower=FOLLOWER, master=MASTER,
                master_event_id=f"x{n}", symbol="EURUSD", ts_ns=ts + 30 * 10**9,
                master_position_id=f"mp{n}",
            )  # fmt: skip
            done = OrderFilled(
                order_id=f"c{n}", link_id=LINK, follower=FOLLOWER, ts_ns=ts + 30 * 10**9 + 1000,
                symbol="EURUSD", position_id=f"fp{n}", side=side, volume=0.1, price=1.1,
                profit=profit,
            )  # fmt: skip
            balance += profit
            state = AccountState(account=FOLLOWER, ts_ns=ts + 31 * 10**9, currency="USD",
                                 balance=balance, equity=balance)  # fmt: skip
            facts += [(Kind.FOLLOWER_ORDER, close), (Kind.EXECUTION_REPORT, done),
                      (Kind.ACCOUNT_STATE, state)]  # fmt: skip
    return facts


async def store_facts(database_url: str, facts: list[tuple[Kind, object]]) -> None:
    """Through the ledger's own store, as its consumers write them."""
    batch: dict[Kind, list[Any]] = {}
    for seq, (kind, fact) in enumerate(facts, 1):
        batch.setdefault(kind, []).extend(rows_of(kind, "tc.v1.bench", codec.encode(fact), seq))
    conn = await ledger_store.connect(database_url)
    try:
        await ledger_store.insert_batch(conn, batch, "default")
    finally:
        await conn.close()


# ------------------------------------------------------------------ the load (own process)


async def generate_load(
    url: str, headers: dict[str, str], rps: float, seconds: float
) -> dict[str, Any]:
    """Open-loop GETs of ``url`` at ``rps`` for ``seconds`` (after a warm-up second): each
    latency from the request's scheduled moment to its last byte."""
    latencies: list[float] = []
    errors: list[str] = []

    async def one(http: aiohttp.ClientSession, due: float, record: bool) -> None:
        try:
            async with http.get(url, headers=headers) as response:
                await response.read()
                ok = response.status == 200
                if not ok and record:
                    errors.append(str(response.status))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            ok = False
            if record:
                errors.append(type(exc).__name__)
        if ok and record:
            latencies.append(time.perf_counter() - due)

    async def run(http: aiohttp.ClientSession, duration: float, record: bool) -> float:
        count = max(1, round(rps * duration))
        # perf_counter, not loop.time(): uvloop's clock moves in whole milliseconds
        start = time.perf_counter() + 0.01
        tasks = []
        for i in range(count):
            due = start + i / rps
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(http, due, record)))
        await asyncio.gather(*tasks)
        return time.perf_counter() - start

    connector = aiohttp.TCPConnector(limit=512, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await run(http, min(_WARMUP_S, seconds), record=False)
        elapsed = await run(http, seconds, record=True)
    return {
        "sent": max(1, round(rps * seconds)),
        "ok": len(latencies),
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:5],
        "elapsed_s": elapsed,
        "latencies_ms": [round(s * 1e3, 4) for s in latencies],
    }


def load_in_process(
    url: str, headers: dict[str, str], rps: float, seconds: float
) -> dict[str, Any]:
    """``generate_load`` in a second process (the harness's own loop stays out of the way)."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.api", "--load", url, "--rps", str(rps),
         "--seconds", str(seconds), "--header", json.dumps(headers)],
        capture_output=True, text=True, timeout=seconds + 120,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- the floor (own process)

FLOOR_BODY = b'{"items":[],"next_cursor":null}'


async def serve_floor(port: int) -> None:
    """A bare aiohttp handler answering a fixed JSON body, until killed."""

    async def answer(_: web.Request) -> web.Response:
        return web.Response(body=FLOOR_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_get("/floor", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def spawn_floor(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.api", "--floor", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:g} s")
            await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------ the run


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _access_token(database_url: str, secrets: ApiSecrets) -> str:
    """The follower's access token, as its login would issue it (the dashboards' way in)."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('tradecopy.tenant', '*', true)")
            row = await conn.fetchrow(
                "SELECT u.user_id, u.tenant_id FROM api_accounts a"
                " JOIN api_users u ON u.user_id = a.owner_user_id WHERE a.account_id = $1",
                FOLLOWER,
            )
    finally:
        await conn.close()
    config = ApiConfig()
    caller = Caller(user_id=row["user_id"], role=Role.FOLLOWER, tenant_id=row["tenant_id"])
    return issue_access_token(caller, secret=secrets.jwt_secret, issuer=config.issuer,
                              audience=config.audience, ttl_s=config.access_ttl_s)  # fmt: skip


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def run_api_bench(
    rps: float = 500.0,
    seconds: float = 10.0,
    database_url: str | None = None,
    open_copies: int = 10,
    closed_copies: int = 40,
    sse_samples: int = 200,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tc-bench-api-") as tmp:
        server_url, embedded = await start_database(database_url, root=Path(tmp) / "postgres")
        scratch = f"tc_bench_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(server_url)
        await admin.execute(f'CREATE DATABASE "{scratch}"')
        await admin.close()
        db_url = _with_database(server_url, scratch)
        stack = LocalStack(Path(tmp) / "nats", name="bench-api", secure=False)
        api: subprocess.Popen[bytes] | None = None
        floor: subprocess.Popen[bytes] | None = None
        try:
            await stack.start()
            await ledger_store.migrate(db_url)
            await migrate_api(db_url)
            secrets = local_secrets()
            keys = await register_local_tenant(
                db_url, secrets.master_key, tenant_id="bench", masters=[MASTER],
                followers=[FOLLOWER],
            )  # fmt: skip
            facts = follower_facts(open_copies, closed_copies)
            await store_facts(db_url, facts)
            port, floor_port = free_port(), free_port()
            api = spawn_api(stack.url, db_url, secrets, port=port)
            floor = spawn_floor(floor_port)
            base = f"http://127.0.0.1:{port}"
            await wait_for_api(base, api)
            await _wait_http(f"http://127.0.0.1:{floor_port}/floor", floor)
            key_headers = {"X-API-Key": keys[FOLLOWER]}
            headers = {"Authorization": f"Bearer {await _access_token(db_url, secrets)}"}
            positions_url = f"{base}/v1/accounts/{FOLLOWER}/positions"
            async with (
                aiohttp.ClientSession() as http,
                http.get(positions_url, headers=headers) as response,
            ):
                body = await response.json()
                if response.status != 200 or len(body["items"]) != open_copies:
                    raise RuntimeError(f"positions answered {response.status}: {body}")
            read = load_in_process(positions_url, headers, rps, seconds)
            by_key = load_in_process(positions_url, key_headers, rps, seconds)
            bare = load_in_process(f"http://127.0.0.1:{floor_port}/floor", {}, rps, seconds)
            sse: list[float] = []
            if sse_samples:
                async with aiohttp.ClientSession() as http:
                    sse = await decision_latencies(
                        http, f"{base}/v1/stream", headers, stack.js, FOLLOWER, LINK, sse_samples
                    )
        finally:
            for proc in (api, floor):
                if proc is not None:
                    stop_process(proc)
            await stack.stop()
            admin = await asyncpg.connect(server_url)
            await admin.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
            await admin.close()
            if embedded is not None:
                await embedded.stop()
    lat, floor_lat = read["latencies_ms"], bare["latencies_ms"]
    p50, p99 = percentile(lat, 0.50), percentile(lat, 0.99)
    floor_p50, floor_p99 = percentile(floor_lat, 0.50), percentile(floor_lat, 0.99)
    return {
        "rps": round(read["ok"] / max(read["elapsed_s"], 1e-9), 1),
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "floor_p50_ms": round(floor_p50, 3),
        "floor_p99_ms": round(floor_p99, 3),
        "sse_p50_ms": round(percentile(sse, 0.50) * 1e3, 3) if sse else None,
        "target_rps": rps,
        "seconds": seconds,
        "requests": read["sent"],
        "errors": read["errors"],
        "error_kinds": read["error_kinds"],
        "floor_rps": round(bare["ok"] / max(bare["elapsed_s"], 1e-9), 1),
        "floor_errors": bare["errors"],
        "max_ms": round(percentile(lat, 1.0), 3),
        "key_p50_ms": round(percentile(by_key["latencies_ms"], 0.50), 3),
        "key_p99_ms": round(percentile(by_key["latencies_ms"], 0.99), 3),
        "key_errors": by_key["errors"],
        "sse_p99_ms": round(percentile(sse, 0.99) * 1e3, 3) if sse else None,
        "sse_samples": len(sse),
        "ledger_facts": len(facts),
        "open_copies": open_copies,
    }


def render(r: dict[str, Any]) -> str:
    ratio50 = r["p50_ms"] / r["floor_p50_ms"] if r["floor_p50_ms"] else float("nan")
    ratio99 = r["p99_ms"] / r["floor_p99_ms"] if r["floor_p99_ms"] else float("nan")
    sse = "not measured" if r["sse_p50_ms"] is None else (
        f"p50 {r['sse_p50_ms']:.2f} ms, p99 {r['sse_p99_ms']:.2f} ms ({r['sse_samples']} decisions)"
    )  # fmt: skip
    return "\n".join(
        [
            f"api: GET /v1/accounts/{{follower}}/positions (bearer token; {r['open_copies']} open "
            f"copies folded from {r['ledger_facts']} ledger facts), open loop at "
            f"{r['target_rps']:g} req/s for {r['seconds']:g} s from a second process",
            f"  api     {r['rps']:>8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 "
            f"{r['p99_ms']:7.2f} ms  max {r['max_ms']:.2f} ms  errors {r['errors']} of "
            f"{r['requests']}",
            f"  API key            p50 {r['key_p50_ms']:7.2f} ms  p99 {r['key_p99_ms']:7.2f} ms"
            f"  errors {r['key_errors']} (the same load with X-API-Key: one more transaction)",
            f"  floor   {r['floor_rps']:>8.1f} req/s  p50 {r['floor_p50_ms']:7.2f} ms  p99 "
            f"{r['floor_p99_ms']:7.2f} ms  (bare aiohttp handler, same load; errors "
            f"{r['floor_errors']})",
            f"  ratio   p50 {ratio50:.1f}x  p99 {ratio99:.1f}x the floor",
            f"  SSE: decision published → event: decision received: {sse}",
            f"  budget: read p99 <= {BUDGET_P99_MS:g} ms at 500 req/s; SSE p50 <= "
            f"{BUDGET_SSE_P50_MS:g} ms",
        ]
    )


JSON_KEYS = ("rps", "p50_ms", "p99_ms", "floor_p50_ms", "floor_p99_ms", "sse_p50_ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rps", type=float, default=500.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per target")
    parser.add_argument("--open", type=int, default=10, help="open copies of the follower")
    parser.add_argument("--closed", type=int, default=40, help="closed copies of the follower")
    parser.add_argument("--sse-samples", type=int, default=200, help="decisions timed over SSE")
    parser.add_argument(
        "--database-url", default=None,
        help="a server to create a scratch database on (default: TRADECOPY_DATABASE_URL, "
        "else embedded PostgreSQL)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    # the two child processes of a run
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--header", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor is not None:
        run_async(serve_floor(args.floor))
        return 0
    if args.rps <= 0 or args.seconds <= 0 or args.open < 0 or args.closed < 0:
        parser.error("--rps and --seconds must be positive, --open and --closed not negative")
    if args.load is not None:
        result = run_async(generate_load(args.load, json.loads(args.header), args.rps,
                                         args.seconds))  # fmt: skip
        print(json.dumps(result))
        return 0
    result = run_async(
        run_api_bench(
            args.rps, args.seconds, args.database_url, args.open, args.closed, args.sse_samples
        )
    )
    print(render(result))
    if args.json:
        print(json.dumps({key: result[key] for key in JSON_KEYS}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
