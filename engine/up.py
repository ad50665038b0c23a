"""``tradecopy up``: NATS, replicators and paper accounts on this machine, until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import msgspec
import structlog

from connectors.paper.config import PaperVenueConfig
from engine.core.errors import TradecopyError
from engine.runtime.files import load_toml
from engine.runtime.natsauth import ENV_CREDS, ENV_USER
from engine.runtime.natsconn import ENV_NATS_URL

log = structlog.get_logger("tradecopy.up")

DEFAULT_CONFIG = Path(__file__).with_name("up.toml")
#: Where the CLI finds the NATS URL when no --nats-url is given (up prints it to export).


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class NatsSection(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 4222
    http_port: Annotated[int, msgspec.Meta(ge=-1, le=65535)] = 8222
    store_dir: str | None = None
    secure: bool = True
    """One nkey user per role, made at each start; false leaves NATS open to anyone local."""
    sync_interval: Annotated[str, msgspec.Meta(pattern=r"^(|always|[1-9][0-9]*(ms|s|m|h))$")] = ""
    """JetStream fsync: "always" (before every ack) or a duration; "" keeps the server's 2m."""


class ReplicatorSection(_Section):
    instances: Annotated[int, msgspec.Meta(ge=1, le=32)] = 1
    partitions: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    metrics_port: Annotated[int, msgspec.Meta(ge=-1, le=65535)] = 9464


class LedgerSection(_Section):
    database_url: str | None = None
    """PostgreSQL; unset: ``TRADECOPY_DATABASE_URL``, else the embedded server under the state
    directory (started with the stack, data kept across restarts)."""
    instances: Annotated[int, msgspec.Meta(ge=0, le=8)] = 1
    """Ledger processes sharing the work (0: no ledger, no PostgreSQL)."""
    metrics_port: Annotated[int, msgspec.Meta(ge=-1, le=65535)] = 9465
    """First instance's /metrics and /healthz; the next ones count up (-1: none)."""


class ApiSection(_Section):
    port: Annotated[int, msgspec.Meta(ge=-1, le=65535)] = 8470
    """The platform API on 127.0.0.1 (0 picks a free port, -1: no API). It needs the ledger's
    PostgreSQL: without a ledger there is no API either."""


class PaperAccount(_Section):
    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}(?!\n)$")]
    role: Annotated[str, msgspec.Meta(pattern=r"^(master|follower)$")]
    currency: str = "USD"
    balance: Annotated[float, msgspec.Meta(gt=0)] = 10_000.0
    leverage: Annotated[int, msgspec.Meta(ge=1)] = 100


class PaperSection(_Section):
    connector_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}(?!\n)$")] = "paper"
    speed: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    start_bar: Annotated[int, msgspec.Meta(ge=0)] = 0
    loop: bool = True
    prices: Annotated[str, msgspec.Meta(pattern=r"^(replay|nats)$")] = "replay"
    """replay: the shipped real XAUUSD bars; nats: quotes a live source publishes on
    tc.v1.quotes.<symbol> (e.g. ``tradecopy quotes publish``)."""
    state_dir: str | None = None
    metrics_port: Annotated[int, msgspec.Meta(ge=-1, le=65535)] = 0
    """The paper connector's /metrics and /healthz on 127.0.0.1 (0 picks a free port, -1
    disables); up prints where."""
    accounts: list[PaperAccount] = []
    venue: PaperVenueConfig = msgspec.field(default_factory=PaperVenueConfig)
    """Symbols, their specs, broker suffixes and aliases (the shipped defaults cover majors,
    JPY crosses, metals, oil and the main indices; a list here replaces them)."""


class UpConfig(_Section):
    nats: NatsSection = NatsSection()
    replicator: ReplicatorSection = ReplicatorSection()
    ledger: LedgerSection = LedgerSection()
    api: ApiSection = ApiSection()
    paper: PaperSection = PaperSection()
    links: list[dict[str, Any]] = []


def _port_taken(host: str, port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def _write_logins(stack: Any, directory: Path) -> dict[str, Path]:
    """The operator's and the quotes publisher's seeds, for the CLI on this machine (0600 in
    the state dir, new at every start: the previous ones stop working)."""
    from engine.runtime.natsauth import Role, write_seed_file

    logins: dict[str, Path] = {}
    for role in (Role.OPERATOR, Role.QUOTES):
        user = stack.user(role)
        if user is not None:
            logins[role.value] = write_seed_file(directory / f"{role.value}.nk", user.seed)
    return logins


def load_config(path: Path) -> UpConfig:
    return load_toml(path, UpConfig)


async def run_up(config_path: Path, *, nats_port: int | None = None) -> None:
    """Run the stack until Ctrl-C. ``nats_port`` overrides the config's [nats] port (0 picks
    a free one)."""
    from connectors.paper.connector import PaperConnector, PaperTerminal
    from connectors.paper.prices import PriceReplay, load_bars
    from connectors.paper.quotes import NatsQuotes
    from engine.api.service import LocalApi, spawn_api, start_local_api
    from engine.core.errors import LinkFileError
    from engine.ledger.service import spawn_ledger
    from engine.ledger.store import migrate
    from engine.runtime.http import OpsServer
    from engine.runtime.links import validate_link
    from engine.runtime.natsauth import Role
    from engine.runtime.natsserver import default_state_dir, free_port
    from engine.runtime.postgres import EmbeddedPostgres, start_database
    from engine.runtime.processes import stop_process
    from engine.runtime.stack import LocalStack
    from engine.runtime.supervisor import Backoff, StackSupervisor

    config = load_config(config_path)
    if nats_port is not None:
        if not 0 <= nats_port <= 65535:
            raise TradecopyError(f"NATS port {nats_port} is not a port (0 to 65535)")
        config = msgspec.structs.replace(
            config, nats=msgspec.structs.replace(config.nats, port=nats_port)
        )
    links, errors = [], []
    for index, raw in enumerate(config.links):
        link, link_errors = validate_link(raw, index)
        errors += link_errors
        if link is not None:
            links.append(link)
    if errors:
        raise LinkFileError(str(config_path), errors)

    if config.nats.port and _port_taken(config.nats.host, config.nats.port):
        raise TradecopyError(
            f"port {config.nats.port} on {config.nats.host} is already in use (another NATS?). "
            f"Stop it, or run with --config FILE whose [nats] port is free (0 picks one)."
        )
    api_port = config.api.port if config.ledger.instances else -1
    if api_port > 0 and _port_taken("127.0.0.1", api_port):
        raise TradecopyError(
            f"port {api_port} on 127.0.0.1 is already in use (another API?). Stop it, or run "
            "with --config FILE whose [api] port is free (0 picks one, -1: no API)."
        )
    state = default_state_dir()
    store = Path(config.nats.store_dir) if config.nats.store_dir else state / "nats"
    store.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(
        store, host=config.nats.host, port=config.nats.port,
        http_port=None if config.nats.http_port < 0 else config.nats.http_port,
        partitions=config.replicator.partitions, name="tradecopy-up",
        secure=config.nats.secure, sync_interval=config.nats.sync_interval or None,
    )  # fmt: skip
    paper = config.paper
    if paper.accounts:
        # The paper venue is a connector like any other: its user may touch only its accounts.
        await stack.add_connector(
            paper.connector_id,
            masters=[a.id for a in paper.accounts if a.role == "master"],
            followers=[a.id for a in paper.accounts if a.role == "follower"],
        )
    # Handlers first: "Ctrl-C stops everything" is printed only once Ctrl-C does.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stack.start()
    connector = None
    paper_ops: OpsServer | None = None
    postgres: EmbeddedPostgres | None = None
    ledgers: list[Any] = []
    api: LocalApi | None = None
    try:
        result = await stack.apply_links(links)
        database_url = None
        if config.ledger.instances:
            # PostgreSQL (configured, or embedded under the state directory) and the ledger,
            # which stores every event, order, report, decision and account state.
            database_url, postgres = await start_database(
                config.ledger.database_url, root=state / "postgres"
            )
            await migrate(database_url)
            ledger_port = config.ledger.metrics_port
            for i in range(config.ledger.instances):
                ledgers.append(spawn_ledger(
                    stack.url, database_url, instance=f"up-{i + 1}",
                    metrics_port=ledger_port + i if ledger_port > 0 else ledger_port,
                    env=stack.child_env(stack.user(Role.LEDGER)), quiet=False,
                ))  # fmt: skip
        if database_url is not None and api_port >= 0:
            # The platform API over the same database and NATS: the paper accounts registered
            # under their venue ids, an API key per follower in the state directory.
            api = await start_local_api(
                stack.url, database_url, state / "api", port=api_port or free_port(),
                masters=[a.id for a in paper.accounts if a.role == "master"],
                followers=[a.id for a in paper.accounts if a.role == "follower"],
                env=stack.child_env(stack.user(Role.API)), quiet=False,
            )  # fmt: skip
        metrics_port = config.replicator.metrics_port
        replicators = stack.spawn_replicators(
            config.replicator.instances, instance="up", metrics_port=metrics_port, quiet=False
        )
        if paper.accounts:
            paper_dir = Path(paper.state_dir) if paper.state_dir else state / "paper"
            rows = [(a.id, a.currency, a.balance, a.leverage, a.role) for a in paper.accounts]
            terminal = PaperTerminal.open(
                paper_dir / f"{paper.connector_id}.state", rows,
                paper.venue.symbol_configs(), names=paper.venue.names(),
            )  # fmt: skip
            venue_nc = await stack.connect(
                f"tradecopy-up-{paper.connector_id}", stack.connector_user(paper.connector_id)
            )
            feed: PriceReplay | NatsQuotes
            if paper.prices == "nats":
                feed = NatsQuotes(venue_nc, list(terminal.venue.symbols))
            else:
                feed = PriceReplay(
                    load_bars(), start=paper.start_bar, speed=paper.speed, loop=paper.loop,
                    stamp_wall_clock=True, steps_per_leg=3,
                )  # fmt: skip
            connector = PaperConnector(venue_nc, paper.connector_id, terminal, feed)
            await connector.start()
            if paper.metrics_port >= 0:
                ops = OpsServer("127.0.0.1", paper.metrics_port, connector.runtime.health)
                try:
                    await ops.start()
                except OSError as exc:
                    raise TradecopyError(
                        f"the paper connector's metrics port {paper.metrics_port} on 127.0.0.1 "
                        f"cannot be used ({exc.strerror}). Set [paper] metrics_port to a free "
                        "port (0 picks one, -1 disables)."
                    ) from exc
                paper_ops = ops
        print(f"NATS (JetStream)   {stack.url}   store {store}", flush=True)
        if stack.server.http_port:
            print(f"NATS monitoring    http://{config.nats.host}:{stack.server.http_port}/",
                  flush=True)  # fmt: skip
        logins = _write_logins(stack, state / "credentials")
        url = f"{ENV_NATS_URL}={stack.url}"
        for role, path in logins.items():
            print(f"{role + ' login':<18} export {url} {ENV_USER}={role} {ENV_CREDS}={path}",
                  flush=True)  # fmt: skip
        if not logins:
            print(f"{'NATS login':<18} export {url}", flush=True)
        for i, proc in enumerate(replicators):
            where = (f"http://127.0.0.1:{metrics_port + i}/metrics, /healthz"
                     if metrics_port > 0 else "no metrics")  # fmt: skip
            print(f"replicator up-{i + 1}    pid {proc.pid}   {where}", flush=True)
        if database_url is not None:
            where = "embedded, data under " + str(state / "postgres") if postgres else "configured"
            print(f"PostgreSQL         {where} (tradecopy history/stats read it)", flush=True)
        ledger_port = config.ledger.metrics_port
        for i, proc in enumerate(ledgers):
            where = (f"http://127.0.0.1:{ledger_port + i}/metrics, /healthz"
                     if ledger_port > 0 else "no metrics")  # fmt: skip
            print(f"ledger up-{i + 1}        pid {proc.pid}   {where}", flush=True)
        if api is not None:
            print(f"API                {api.url}   pid {api.proc.pid}   (tradecopy api)",
                  flush=True)  # fmt: skip
            for account, path in api.key_files.items():
                print(f"{account + ' key':<18} curl -s -H \"X-API-Key: $(cat {path})\" "
                      f"{api.url}/v1/accounts/{account}/positions", flush=True)  # fmt: skip
        if connector is not None:
            roles = ", ".join(f"{a.id} ({a.role})" for a in config.paper.accounts)
            print(f"paper venue        {roles}; prices: {config.paper.prices}", flush=True)
            where = ("no metrics" if paper_ops is None
                     else f"http://127.0.0.1:{paper_ops.port}/metrics, /healthz")  # fmt: skip
            print(f"paper connector    {paper.connector_id}   {where}", flush=True)
        print(
            f"links              {len(links)} ({len(result.created)} new, "
            f"{len(result.updated)} updated)\nCtrl-C stops everything.",
            flush=True,
        )
        # NATS and the replicators are brought back when they die (with backoff, a log line per
        # change); Ctrl-C is the only way out.
        supervisor = StackSupervisor(stack)
        ledger_backoff = [Backoff(up_since=time.monotonic()) for _ in ledgers]
        api_backoff = Backoff(up_since=time.monotonic())
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            await supervisor.check()
            now = time.monotonic()
            for i, proc in enumerate(ledgers):
                ledger_backoff[i].check_stable(now)
                if proc.poll() is not None and ledger_backoff[i].due(now):
                    # Restarted like the replicators: at once, then with a doubling delay.
                    log.warning("ledger_exited", instance=f"up-{i + 1}", code=proc.returncode)
                    ledger_backoff[i].failed(now)
                    ledger_backoff[i].started(now)
                    ledgers[i] = spawn_ledger(
                        stack.url, str(database_url), instance=f"up-{i + 1}",
                        metrics_port=ledger_port + i if ledger_port > 0 else ledger_port,
                        env=stack.child_env(stack.user(Role.LEDGER)), quiet=False,
                    )  # fmt: skip
            if api is not None:
                api_backoff.check_stable(now)
                if api.proc.poll() is not None and api_backoff.due(now):
                    log.warning("api_exited", code=api.proc.returncode)
                    api_backoff.failed(now)
                    api_backoff.started(now)
                    port = int(api.url.rsplit(":", 1)[1])
                    api = dataclasses.replace(api, proc=spawn_api(
                        stack.url, str(database_url), api.secrets, port=port,
                        env=stack.child_env(stack.user(Role.API)), quiet=False,
                    ))  # fmt: skip
    finally:
        print("stopping…", flush=True)
        if paper_ops is not None:
            await paper_ops.stop()
        if connector is not None:
            await connector.stop()
        if api is not None:
            stop_process(api.proc)
        for proc in ledgers:
            stop_process(proc)
        await stack.stop()
        if postgres is not None:
            await postgres.stop()
