"""The ``tradecopy`` command line: wiring and presentation (what it reads from NATS lives in
``engine.runtime.operator``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from engine.core.errors import TradecopyError
from engine.runtime.eventloop import run_async
from engine.runtime.files import write_new_secret
from engine.runtime.natsauth import ENV_USER
from engine.runtime.natsconn import ENV_NATS_URL

__all__ = ["ENV_NATS_URL", "build_parser", "main"]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: Ops endpoints (/metrics, /healthz) are for this machine unless told otherwise.
DEFAULT_METRICS_HOST = "127.0.0.1"
SYNC_HELP = (
    "JetStream fsync settings to measure, comma-separated: default (the server's 2 min), "
    "always (every write before its ack), or a duration such as 1s"
)
JSON_HELP = "JSON instead of the table (one object per line where rows stream)"

T = TypeVar("T")
ENV_API_OPERATOR_PASSWORD = "TRADECOPY_API_OPERATOR_PASSWORD"
ENV_API_OLD_MASTER_KEY = "TRADECOPY_API_OLD_MASTER_KEY"


class CommandFailed(TradecopyError):
    """A command cannot go on: its one-line message goes to stderr, exit code 2."""


# ------------------------------------------------------------------------ NATS plumbing


def _add_nats_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats-url",
        default=None,
        help=f"NATS server to talk to (default: ${ENV_NATS_URL}; one of the two is required)",
    )


def _nats_url(args: argparse.Namespace) -> str:
    """``--nats-url``, else ``$TRADECOPY_NATS_URL``; never a guess (4222 may be anyone's)."""
    url = args.nats_url or os.environ.get(ENV_NATS_URL, "").strip()
    if not url:
        raise CommandFailed(
            f"no NATS server given: pass --nats-url URL or set ${ENV_NATS_URL} "
            f"(`tradecopy up` prints the export line)"
        )
    return str(url)


def _say_server(url: str) -> None:
    """Every one-shot command says on stderr which server (and as whom) it talks to."""
    user = os.environ.get(ENV_USER)
    print(f"tradecopy: NATS {url}" + (f" as {user}" if user else ""), file=sys.stderr)


def _one_shot(
    args: argparse.Namespace,
    work: Callable[[Any], Awaitable[T]],
    name: str = "tradecopy-cli",
) -> T:
    """Connect once (fail fast, no reconnect), run ``work(nc)``, close. An unreachable server,
    refused credentials or a request NATS does not answer raise ``CommandFailed``."""
    import nats.errors
    import nats.js.errors

    from engine.runtime.natsconn import connect_once

    url = _nats_url(args)
    _say_server(url)

    async def run() -> T:
        nc = await connect_once(url, name)
        try:
            return await work(nc)
        finally:
            await nc.close()

    try:
        return run_async(run())  # type: ignore[no-any-return]
    except TradecopyError as exc:
        raise CommandFailed(str(exc)) from None
    except (nats.errors.TimeoutError, TimeoutError):
        raise CommandFailed(
            f"NATS at {url} did not answer in time (is this user allowed the request?)"
        ) from None
    except (nats.js.errors.Error, nats.errors.Error, OSError) as exc:
        raise CommandFailed(f"NATS at {url}: {exc or type(exc).__name__}") from None


# ------------------------------------------------------------------------ presentation


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain aligned columns: readable, and greppable line by line."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _clock(ts_ns: int, *, ms: bool = False) -> str:
    moment = datetime.fromtimestamp(ts_ns / 1e9, UTC)
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{moment.microsecond // 1000:03d} UTC" if ms else f"{text} UTC"


def _ago(ts_ns: int | None, now_ns: int) -> str:
    if not ts_ns:
        return "never"
    seconds = max(0.0, (now_ns - ts_ns) / 1e9)
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86_400:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86_400:.1f}d ago"


def _print_json(value: object) -> None:
    import msgspec

    print(msgspec.json.encode(value).decode())


def _cmd_schema_export(args: argparse.Namespace) -> int:
    from schemas.export import JSON_DIR, export_schemas, stale_schemas

    directory = Path(args.dir) if args.dir else JSON_DIR
    if args.check:
        stale = stale_schemas(directory)
        if stale:
            print(f"stale JSON Schema in {directory}: {', '.join(stale)}", file=sys.stderr)
            print("run `tradecopy schema export` and commit the result", file=sys.stderr)
            return 1
        print(f"JSON Schema in {directory} is up to date")
        return 0
    for path in export_schemas(directory):
        print(path)
    return 0


def _load_links_or_report(path: str) -> list[Any] | None:
    from engine.core.errors import LinkFileError
    from engine.runtime.links import load_links

    try:
        return load_links(Path(path))
    except FileNotFoundError:
        print(f"{path}: no such file", file=sys.stderr)
    except LinkFileError as exc:
        print(str(exc), file=sys.stderr)
    return None


def _cmd_links_validate(args: argparse.Namespace) -> int:
    links = _load_links_or_report(args.file)
    if links is None:
        return 2
    print(f"{args.file}: {len(links)} link(s) valid")
    return 0


def _cmd_links_apply(args: argparse.Namespace) -> int:
    links = _load_links_or_report(args.file)
    if links is None:
        return 2

    async def apply(nc: Any) -> Any:
        from engine.runtime.jetstream import ensure_buckets
        from engine.runtime.links import apply_links
        from schemas import subjects

        buckets = await ensure_buckets(nc.jetstream())
        return await apply_links(buckets[subjects.KV_LINKS], links, prune=args.prune)

    result = _one_shot(args, apply)
    for label, ids in (
        ("created", result.created),
        ("updated", result.updated),
        ("unchanged", result.unchanged),
        ("removed", result.removed),
    ):
        if ids:
            print(f"{label:>9}: {', '.join(ids)}")
    return 0


def _paused_by(raw: bytes) -> str | None:
    """The protection rule a link's replicator state says paused it today, or None."""
    from engine.core.calendar import trading_day
    from engine.replicator.state import link_state_decoder

    state = link_state_decoder.decode(raw)
    if not state.is_paused(trading_day(time.time_ns())):
        return None
    return state.paused_rule or "paused"


def _cmd_links_list(args: argparse.Namespace) -> int:
    from engine.runtime.operator import link_views

    views = _one_shot(args, lambda nc: link_views(nc.jetstream(), _paused_by))
    if args.json:
        for view in views:
            _print_json({**_builtins(view), "state": view.state})
        return 0
    if not views:
        print("no links (tradecopy links apply FILE adds them)")
        return 0
    rows = [(v.link_id, f"{v.master} → {v.follower}", v.sizing, v.state) for v in views]
    print(_table(("LINK", "MASTER → FOLLOWER", "SIZING", "STATE"), rows))
    return 0


def _builtins(value: object) -> Any:
    import msgspec

    return msgspec.to_builtins(value)


def _cmd_stop(args: argparse.Namespace) -> int:
    from schemas import codec, subjects
    from schemas.common import is_account_id
    from schemas.control import EmergencyStop, StopScope

    scope = StopScope(args.scope)
    if scope is not StopScope.GLOBAL and not args.target:
        print(f"an emergency stop for a {scope.value} needs its id", file=sys.stderr)
        return 2
    if scope is StopScope.GLOBAL and args.target:
        print("the global emergency stop takes no id", file=sys.stderr)
        return 2
    if args.target and not is_account_id(args.target):
        print(
            f"{args.target!r} is not a valid {scope.value} id (letters, digits, _ and -)",
            file=sys.stderr,
        )
        return 2
    stop = EmergencyStop(
        scope=scope,
        target=args.target or "",
        active=args.stop_command == "set",
        reason=args.reason,
        ts_ns=time.time_ns(),
    )

    async def write(nc: Any) -> None:
        from engine.runtime.jetstream import ensure_buckets
        from engine.runtime.operator import check_stop_target

        js = nc.jetstream()
        if stop.active and not args.force:
            await check_stop_target(js, scope, stop.target)
        buckets = await ensure_buckets(js)
        await buckets[subjects.KV_CONTROL].put(stop.key, codec.encode(stop))

    _one_shot(args, write)
    state = "ACTIVE" if stop.active else "cleared"
    print(f"emergency stop {stop.key}: {state}")
    return 0


def _cmd_stop_list(args: argparse.Namespace) -> int:
    from engine.runtime.operator import read_stops

    stops = _one_shot(args, lambda nc: read_stops(nc.jetstream(), active_only=not args.all))
    if args.json:
        for stop in stops:
            _print_json(stop)
        return 0
    if not stops:
        print("no emergency stop in force" if not args.all else "no emergency stop recorded")
        return 0
    now = time.time_ns()
    rows = [
        (
            s.scope.value,
            s.target or "-",
            "ACTIVE" if s.active else "cleared",
            f"{_clock(s.ts_ns)} ({_ago(s.ts_ns, now)})" if s.ts_ns else "-",
            s.reason or "-",
        )
        for s in stops
    ]
    print(_table(("SCOPE", "TARGET", "STATE", "SINCE", "REASON"), rows))
    return 0


def _cmd_links_resume(args: argparse.Namespace) -> int:
    async def resume(nc: Any) -> bool:
        from engine.replicator.control import resume_link
        from engine.runtime.jetstream import ensure_buckets
        from schemas import subjects

        buckets = await ensure_buckets(nc.jetstream())
        return await resume_link(buckets[subjects.KV_LINK_STATE], args.link_id)

    resumed = _one_shot(args, resume)
    print(f"link {args.link_id}: {'resumed' if resumed else 'not paused'}")
    return 0


# ------------------------------------------------------------------------ decisions


def _decision_line(decision: Any) -> str:
    """One decision in one line: when, what, which rule, where, why in words, the numbers."""
    numbers = ", ".join(f"{k}={_number(v)}" for k, v in sorted(decision.numbers.items()))
    when, outcome, rule = _clock(decision.ts_ns, ms=True), decision.outcome, decision.rule
    line = (
        f"{when}  {outcome.value:<10} {rule.value:<22} "
        f"{decision.link_id} ({decision.master} → {decision.follower}): {decision.message}"
    )
    return f"{line}  [{numbers}]" if numbers else line


def _number(value: object) -> str:
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _decision_filter(args: argparse.Namespace) -> Any:
    from engine.runtime.operator import DecisionFilter

    return DecisionFilter(
        follower=args.follower, link=args.link, rule=args.rule, master=args.master
    )


def _show_decision(decision: Any, as_json: bool) -> None:
    if as_json:
        _print_json(decision)
    else:
        print(_decision_line(decision), flush=True)


def _cmd_decisions(args: argparse.Namespace) -> int:
    import contextlib

    from engine.runtime.operator import follow_decisions, recent_decisions

    flt = _decision_filter(args)

    async def query(nc: Any) -> None:
        js = nc.jetstream()
        recent, last_seq = await recent_decisions(js, flt, args.last)
        for decision in recent:
            _show_decision(decision, args.json)
        if not args.follow:
            if not recent and not args.json:
                print("no copy decision matches", file=sys.stderr)
            return
        print(f"following decisions after stream sequence {last_seq}; Ctrl-C stops",
              file=sys.stderr, flush=True)  # fmt: skip
        async with _until_interrupted() as stopped:
            shown = 0
            followed = _until(follow_decisions(js, flt, last_seq), stopped)
            async with contextlib.aclosing(followed):
                async for decision in followed:
                    _show_decision(decision, args.json)
                    shown += 1
                    if args.count and shown >= args.count:
                        break

    _one_shot(args, query)
    return 0


class _Interrupted:
    """Ctrl-C (SIGINT) or SIGTERM ends a follow or a watch normally: exit code 0."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._signals: list[int] = []

    async def __aenter__(self) -> asyncio.Event:
        import contextlib
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.event.set)
                self._signals.append(sig)
        return self.event

    async def __aexit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)


def _until_interrupted() -> _Interrupted:
    return _Interrupted()


async def _until(stream: Any, stopped: asyncio.Event) -> Any:
    """The items of an async iterator until ``stopped`` is set (then the iterator is closed)."""
    import contextlib

    iterator = stream.__aiter__()
    waiter = asyncio.ensure_future(stopped.wait())
    try:
        while True:
            step = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({step, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
                return
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        waiter.cancel()
        await iterator.aclose()


# ------------------------------------------------------------------------ status


def _status_sections(status: Any) -> list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]]:
    """The status snapshot as titled tables, for the plain and the live view alike."""
    now = status.ts_ns
    streams = [
        (s.name, f"{s.messages:,}", f"{s.bytes:,}", str(s.last_seq), str(s.consumers))
        for s in status.streams
    ]
    consumers = [
        (
            c.stream,
            c.name,
            f"{c.num_pending:,}",
            f"{c.ack_pending:,}",
            f"{c.redelivered:,}",
            "-" if c.push_bound is None else ("yes" if c.push_bound else "NO"),
            _ago(c.last_active_ns, now),
        )
        for c in status.consumers
    ]
    r = status.replicators
    replicators = [
        (
            "alive" if r.alive else "DOWN",
            f"{r.bound_partitions}/{r.partitions}",
            f"{r.pending:,}",
            f"{r.ack_pending:,}",
            _ago(r.last_active_ns, now),
        )
    ]
    connectors = [
        (
            c.connector,
            "alive" if c.alive else "SILENT",
            _ago(c.last_heartbeat_ns, now),
            ", ".join(c.accounts),
            "-" if c.order_consumer_bound is None else ("yes" if c.order_consumer_bound else "NO"),
        )
        for c in status.connectors
    ]
    accounts = [
        (
            a.account,
            a.connector or "-",
            _ago(a.ts_ns, now),
            _terminal(a.terminal),
            f"{a.balance:,.2f} {a.currency}",
            f"{a.equity:,.2f}",
            str(a.open_positions),
        )
        for a in status.accounts
    ]
    return [
        ("streams", ("STREAM", "MESSAGES", "BYTES", "LAST SEQ", "CONSUMERS"), streams),
        ("consumers and lag",
         ("STREAM", "CONSUMER", "PENDING", "ACK PENDING", "REDELIVERED", "BOUND", "LAST ACTIVE"),
         consumers),
        ("replicators", ("STATE", "PARTITIONS BOUND", "PENDING", "ACK PENDING", "LAST ACTIVE"),
         replicators),
        ("connectors", ("CONNECTOR", "STATE", "LAST HEARTBEAT", "ACCOUNTS", "ORDERS BOUND"),
         connectors),
        ("accounts",
         ("ACCOUNT", "CONNECTOR", "HEARTBEAT", "TERMINAL", "BALANCE", "EQUITY", "POSITIONS"),
         accounts),
    ]  # fmt: skip


def _terminal(terminal: Any) -> str:
    if terminal is None:
        return "-"
    if not terminal.connected:
        return "DISCONNECTED" + (f": {terminal.reason}" if terminal.reason else "")
    if not terminal.synchronised:
        return "connected, NOT synchronised"
    if not terminal.trade_allowed:
        return "connected, trading NOT allowed"
    return "connected, synchronised"


def _status_text(status: Any) -> str:
    parts = [f"NATS {status.url} at {_clock(status.ts_ns)}"]
    for title, headers, rows in _status_sections(status):
        body = _table(headers, rows) if rows else "(none)"
        parts.append(f"\n{title}\n" + "\n".join(f"  {line}" for line in body.splitlines()))
    return "\n".join(parts)


def _status_renderable(status: Any) -> Any:
    from rich.console import Group
    from rich.table import Table

    tables: list[Any] = []
    for title, headers, rows in _status_sections(status):
        table = Table(*headers, title=title, title_justify="left", expand=False)
        for row in rows:
            table.add_row(*row)
        tables.append(table)
    return Group(f"NATS {status.url} at {_clock(status.ts_ns)}", *tables)


def _cmd_status(args: argparse.Namespace) -> int:
    from engine.runtime.operator import stack_status

    url = _nats_url(args)

    async def snapshot(nc: Any) -> Any:
        return await stack_status(nc.jetstream(), url, args.stale_after)

    if args.watch is None:
        status = _one_shot(args, snapshot)
        if args.json:
            _print_json(status)
        else:
            print(_status_text(status))
        return 0

    async def watch(nc: Any) -> None:
        import contextlib

        live = None
        if sys.stdout.isatty() and not args.json:
            from rich.live import Live

            live = Live(auto_refresh=False)
            live.start()
        try:
            async with _until_interrupted() as stopped:
                while not stopped.is_set():
                    status = await snapshot(nc)
                    if live is not None:
                        live.update(_status_renderable(status), refresh=True)
                    elif args.json:
                        _print_json(status)
                    else:
                        print(_status_text(status) + "\n", flush=True)
                    sys.stdout.flush()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopped.wait(), args.watch)
        finally:
            if live is not None:
                live.stop()

    _one_shot(args, watch)
    return 0


ENV_REPLICATOR_SHARD = "TRADECOPY_REPLICATOR_SHARD"
ENV_REPLICATOR_SHARDS = "TRADECOPY_REPLICATOR_SHARDS"
_MAX_SHARDS = 1024  # ReplicatorConfig.shards' bound


def _shard_number(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{what} must be a whole number, not {text!r}")
    return int(text)


def parse_shard(shard: str | None, shards: str | None, env: Mapping[str, str]) -> tuple[int, int]:
    """The link shard ``(i, n)`` a replicator plans, from ``--shard`` / ``--shards`` or else
    $TRADECOPY_REPLICATOR_SHARD / $TRADECOPY_REPLICATOR_SHARDS (neither: ``0/1``, every link).

    ``i/n`` names both, and ``i`` must be below ``n``. A bare index ``i`` is a StatefulSet pod's
    ordinal: ``n`` comes from ``--shards`` or the environment, and the pod plans shard
    ``i % n``, so ``k·n`` pods run ``k`` instances of every shard. Without ``n`` a bare index
    is ``i/1``. Raises ValueError saying what is wrong.
    """
    text = shard if shard is not None else env.get(ENV_REPLICATOR_SHARD)
    count = shards if shards is not None else env.get(ENV_REPLICATOR_SHARDS)
    if text is None:
        if count is not None:
            raise ValueError(f"a shard count ({count!r}) but no shard index: set --shard too")
        return 0, 1
    if not text:
        # What a StatefulSet pod sees when its pod-index label is missing (before 1.28):
        # taking that for shard 0 would leave the other shards without an instance.
        raise ValueError(
            f"the shard is empty (${ENV_REPLICATOR_SHARD} from the pod-index label needs"
            " Kubernetes 1.28+); want i/n (e.g. 0/2) or an index with --shards"
        )
    index_text, slash, n_text = text.partition("/")
    i = _shard_number(index_text, "the shard index")
    n = None if count is None else _shard_number(count, "the number of shards")
    if slash:
        named = _shard_number(n_text, "the number of shards")
        if n is not None and n != named:
            raise ValueError(f"{text!r} names {named} shards, but the shard count is {n}")
        n = named
    if n is not None and not 1 <= n <= _MAX_SHARDS:
        raise ValueError(f"the number of shards must be 1 to {_MAX_SHARDS}, not {n}")
    if n is not None and not slash:
        return i % n, n  # a pod ordinal
    n = n or 1
    if i >= n:
        raise ValueError(f"shard {i} does not exist among {n} shards (want i/n with i < n)")
    return i, n


def _cmd_replicator_run(args: argparse.Namespace) -> int:
    from engine.replicator.config import ReplicatorConfig
    from engine.replicator.service import run_replicator
    from engine.runtime.logging import configure_logging

    configure_logging(args.log_level, json=not args.console_logs)
    options: dict[str, Any] = {
        "nats_url": _nats_url(args),
        "partitions": args.partitions,
        "ack_wait_s": args.ack_wait,
        "metrics_port": None if args.metrics_port < 0 else args.metrics_port,
        "metrics_host": args.metrics_host,
        "memory_storage": args.memory_storage,
        "batch_by_connector": args.batch_by_connector,
        "planner": args.planner,
    }
    if args.instance:
        options["instance"] = args.instance
    try:
        options["shard"], options["shards"] = parse_shard(args.shard, args.shards, os.environ)
        config = ReplicatorConfig(**options)
    except ValueError as exc:
        print(f"--shard: {exc}", file=sys.stderr)
        return 2
    if args.replicas is not None:
        from engine.runtime.jetstream import ENV_REPLICAS, check_replicas

        # ensure_streams/ensure_buckets read it for whatever this instance creates.
        os.environ[ENV_REPLICAS] = str(check_replicas(args.replicas))
    run_async(run_replicator(config))
    return 0


def _cmd_signals_run(args: argparse.Namespace) -> int:
    import msgspec

    from engine.runtime.logging import configure_logging
    from engine.runtime.postgres import configured_database_url
    from engine.signals.config import load_config
    from engine.signals.driving import DriveConfig
    from engine.signals.service import run_signals

    configure_logging(args.log_level, json=not args.console_logs)
    try:
        config = load_config(args.config)
    except (OSError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    if args.nats_url or os.environ.get(ENV_NATS_URL, "").strip() or not config.nats_url:
        config = msgspec.structs.replace(config, nats_url=_nats_url(args))
    try:
        drive = msgspec.convert({"max_signal_age_s": args.max_signal_age}, DriveConfig)
    except msgspec.ValidationError as exc:
        print(f"--max-signal-age: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # Without a database the worker runs alone: the drive reads positions from the ledger.
        await run_signals(
            config, stop, database_url=configured_database_url(args.database_url), drive=drive
        )

    run_async(run())
    return 0


def _cmd_nats_run(args: argparse.Namespace) -> int:
    from engine.core.errors import TradecopyError
    from engine.runtime.natsserver import EmbeddedNats, NatsTls, default_state_dir

    store = Path(args.store_dir) if args.store_dir else default_state_dir() / "nats"
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            print("--tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        tls = NatsTls(
            cert=Path(args.tls_cert), key=Path(args.tls_key),
            ca=Path(args.tls_ca) if args.tls_ca else None, verify=args.tls_verify,
        )  # fmt: skip

    async def serve() -> None:
        import signal

        server = EmbeddedNats(
            store_dir=store, host=args.host, port=args.port, http_port=args.http_port,
            tls=tls, sync_interval=args.sync_interval,
        )  # fmt: skip
        await server.start()
        print(f"nats-server (JetStream) listening on {server.url}, store {store}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop()

    try:
        run_async(serve())
    except TradecopyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def _cmd_nats_bootstrap(args: argparse.Namespace) -> int:
    """Create or update the contract's streams and buckets: the admin's job in a deploy."""

    async def bootstrap(nc: Any) -> None:
        from engine.runtime.jetstream import ensure_buckets, ensure_streams

        js = nc.jetstream()
        await ensure_streams(js, args.partitions, replicas=args.replicas)
        await ensure_buckets(js, replicas=args.replicas)

    _one_shot(args, bootstrap, "tradecopy-bootstrap")
    replicas = args.replicas if args.replicas is not None else "as configured"
    print(f"streams and buckets ready ({args.partitions} partitions, replicas {replicas})")
    return 0


def _cmd_nats_permissions(args: argparse.Namespace) -> int:
    from engine.core.errors import TradecopyError
    from engine.runtime.natsauth import (
        connector_permissions,
        replace_role_permissions,
        role_permission_variables,
    )

    if args.write:
        try:
            for name in args.write:
                path = Path(name)
                path.write_text(replace_role_permissions(path.read_text(encoding="utf-8")))
                print(f"{path}: role permissions written")
        except (OSError, TradecopyError) as exc:
            print(str(exc), file=sys.stderr)
            return 2
        return 0
    if not args.connector:
        print(role_permission_variables(), end="")
        return 0
    try:
        permissions = connector_permissions(
            args.connector, _csv(args.masters), _csv(args.followers)
        )
    except TradecopyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    entry = {"nkey": args.nkey or "<public key of the connector's nkey>",
             "permissions": permissions.to_config()}  # fmt: skip
    print(f"# connector-{args.connector}: add to authorization.users")
    print(json.dumps(entry, indent=2))
    return 0


def _cmd_nats_nkey(args: argparse.Namespace) -> int:
    """A new user nkey: the public key on stdout, the seed into a 0600 file (never argv)."""
    from engine.runtime.natsauth import new_seed, public_key

    seed = new_seed()
    path = Path(args.seed_file)
    try:
        write_new_secret(path, seed + "\n")
    except FileExistsError:
        print(f"{path} exists; refusing to overwrite a key", file=sys.stderr)
        return 2
    print(public_key(seed))
    return 0


def _cmd_nats_public_key(args: argparse.Namespace) -> int:
    from engine.core.errors import TradecopyError
    from engine.runtime.natsauth import public_key

    try:
        print(public_key(Path(args.seed_file).read_text(encoding="utf-8")))
    except (OSError, TradecopyError) as exc:
        print(f"{args.seed_file}: {exc}", file=sys.stderr)
        return 2
    return 0


def _csv(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _cmd_bench_fanout(args: argparse.Namespace) -> int:
    from benchmarks.fanout import main as fanout_main

    forwarded = ["--events", str(args.events), "--followers", args.followers]
    forwarded += ["--modes", args.modes, "--sync", args.sync, "--instances", args.instances]
    if args.json:
        forwarded.append("--json")
    return fanout_main(forwarded)


def _cmd_up(args: argparse.Namespace) -> int:
    from engine.core.errors import TradecopyError
    from engine.runtime.logging import configure_logging
    from engine.up import DEFAULT_CONFIG, run_up

    configure_logging(args.log_level, json=False)
    config = Path(args.config) if args.config else DEFAULT_CONFIG
    try:
        if args.nats_port is None:
            run_async(run_up(config))
        else:
            run_async(run_up(config, nats_port=args.nats_port))
    except TradecopyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import main as demo_main
    from engine.runtime.logging import configure_logging

    configure_logging("warning", json=False)
    return demo_main(args.seconds, args.followers, args.speed, args.json, args.database_url,
                     args.source)  # fmt: skip


def _cmd_backtest(args: argparse.Namespace) -> int:
    from engine.backtest import main as backtest_main
    from engine.runtime.logging import configure_logging

    configure_logging("warning", json=False)
    return backtest_main(
        args.strategy,
        args.bars,
        timeframe=args.timeframe,
        params=args.params,
        volume=args.volume,
        sandbox=args.sandbox,
        json=args.json,
    )


def _cmd_bench_e2e(args: argparse.Namespace) -> int:
    from benchmarks.e2e import main as e2e_main

    forwarded = ["--trades", str(args.trades), "--gaps-ms", args.gaps_ms, "--sync", args.sync]
    if args.json:
        forwarded.append("--json")
    return e2e_main(forwarded)


def _cmd_quotes_publish(args: argparse.Namespace) -> int:
    url = _nats_url(args)

    async def publish() -> int:
        from connectors.paper.prices import PriceReplay, load_bars
        from connectors.paper.quotes import publish_quotes
        from engine.runtime.natsconn import connect
        from schemas import subjects

        # The quotes user may publish quotes and nothing else.
        nc = await connect(url, "tradecopy-quotes")
        replay = PriceReplay(load_bars(), start=args.start_bar, speed=args.speed, loop=True,
                             stamp_wall_clock=True, steps_per_leg=3)  # fmt: skip
        print(f"publishing XAUUSD quotes on {subjects.quotes('XAUUSD')}; Ctrl-C stops", flush=True)
        try:
            sent = await publish_quotes(nc, replay, args.count)
        finally:
            await nc.close()
        print(f"{sent} quotes published")
        return 0

    from engine.core.errors import TradecopyError

    try:
        return int(run_async(publish()))
    except KeyboardInterrupt:
        return 0
    except TradecopyError as exc:
        print(str(exc), file=sys.stderr)
        return 2


def _cmd_bench_bridge(args: argparse.Namespace) -> int:
    from benchmarks.bridge import main as bridge_main

    forwarded = ["--trades", str(args.trades), "--gap-ms", str(args.gap_ms)]
    if args.plaintext:
        forwarded.append("--plaintext")
    if args.json:
        forwarded.append("--json")
    return bridge_main(forwarded)


def _cmd_bench_state(args: argparse.Namespace) -> int:
    from benchmarks.connector_state import main as state_main

    forwarded = ["--orders", str(args.orders), "--batch", str(args.batch)]
    forwarded.append("--fsync" if args.fsync else "--no-fsync")
    if args.json:
        forwarded.append("--json")
    return state_main(forwarded)


def _cmd_bench_ledger(args: argparse.Namespace) -> int:
    from benchmarks.ledger import main as ledger_main

    forwarded = ["--messages", str(args.messages), "--rate", str(args.rate),
                 "--batch", str(args.batch), "--writers", str(args.writers)]  # fmt: skip
    if args.database_url:
        forwarded += ["--database-url", args.database_url]
    if args.json:
        forwarded.append("--json")
    return ledger_main(forwarded)


def _cmd_bench_api(args: argparse.Namespace) -> int:
    from benchmarks.api import main as api_main

    forwarded = ["--rps", str(args.rps), "--seconds", str(args.seconds),
                 "--sse-samples", str(args.sse_samples)]  # fmt: skip
    if args.database_url:
        forwarded += ["--database-url", args.database_url]
    if args.json:
        forwarded.append("--json")
    return api_main(forwarded)


def _cmd_bridge_keys(args: argparse.Namespace) -> int:
    """A new CURVE key pair (Z85) for the bridge, and where each half goes."""
    import zmq

    from connectors.bridge.config import DEFAULT_SECRET_KEY_ENV

    public, secret = (key.decode("ascii") for key in zmq.curve_keypair())
    secret_file = None
    if args.secret_file:
        secret_file = Path(args.secret_file)
        try:
            write_new_secret(secret_file, secret + "\n")
        except FileExistsError:
            print(f"{secret_file} exists; refusing to overwrite a key", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"{secret_file}: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps({"public_key": public,
                          "secret_key": None if secret_file else secret,
                          "secret_file": str(secret_file) if secret_file else None}))  # fmt: skip
        return 0
    # Quoted as TOML strings; Z85 has no quote or backslash, but $ # ! need quotes in a shell.
    print(f'public_key = "{public}"')
    if secret_file is None:
        print(f'secret_key = "{secret}"')
    else:
        print(f"# the secret key is in {secret_file} (0600)")
    print(
        "\nMake one pair for each connector and one for each terminal. Where each half goes:\n"
        f"  connector secret  -> ${DEFAULT_SECRET_KEY_ENV} of `tradecopy bridge run`, in single\n"
        "                       quotes (or a 0600 file named by secret_key_file); never the\n"
        "                       TOML, never git\n"
        "  connector public  -> public_key in the connector's TOML, and every EA's InpServerKey\n"
        "  terminal public   -> curve_public_key of its [[terminals]] entry, and the EA's\n"
        "                       InpPublicKey\n"
        "  terminal secret   -> the EA's InpSecretKey only"
    )
    return 0


def _cmd_bridge_run(args: argparse.Namespace) -> int:
    from connectors.service import run_bridge
    from engine.core.errors import TradecopyError
    from engine.runtime.logging import configure_logging

    configure_logging(args.log_level, json=not args.console_logs)
    try:
        run_async(run_bridge(Path(args.config), _nats_url(args), args.metrics_port,
                             Path(args.state) if args.state else None,
                             args.metrics_host))  # fmt: skip
    except TradecopyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def _cmd_mt5_run(args: argparse.Namespace) -> int:
    from connectors.service import run_mt5
    from engine.core.errors import TradecopyError
    from engine.runtime.logging import configure_logging

    configure_logging(args.log_level, json=not args.console_logs)
    try:
        run_async(run_mt5(Path(args.config), _nats_url(args), args.metrics_port, args.metrics_host))
    except TradecopyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0 to 65535; 0 picks a free one)")
    return port


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} seconds: must be more than 0")
    return value


def _id(text: str) -> str:
    """An account or link id: one NATS subject token (letters, digits, _ and -)."""
    from schemas.common import is_account_id

    if not is_account_id(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an id (letters, digits, _ and -)")
    return text


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        choices=LOG_LEVELS,
        help=f"log threshold (default {default})",
    )


def _add_json(parser: argparse.ArgumentParser, helptext: str = JSON_HELP) -> None:
    parser.add_argument("--json", action="store_true", help=helptext)


def _add_schema_commands(commands: Any) -> None:
    schema = commands.add_parser("schema", help="the wire contract").add_subparsers(
        dest="schema_command", required=True
    )
    export = schema.add_parser("export", help="write JSON Schema for every message")
    export.add_argument("--dir", help="target directory (default: schemas/json)")
    export.add_argument("--check", action="store_true", help="fail if checked-in files are stale")
    export.set_defaults(func=_cmd_schema_export)


def _add_links_commands(commands: Any) -> None:
    links = commands.add_parser(
        "links", help="copy links: check, apply, list, resume"
    ).add_subparsers(dest="links_command", required=True)
    validate = links.add_parser("validate", help="check a link file, report every invalid field")
    validate.add_argument("file", help="the link file (TOML, [[links]] tables)")
    validate.set_defaults(func=_cmd_links_validate)
    apply = links.add_parser("apply", help="load links from a TOML file into NATS")
    apply.add_argument("file", help="the link file (TOML, [[links]] tables)")
    _add_nats_url(apply)
    apply.add_argument("--prune", action="store_true", help="delete links not in the file")
    apply.set_defaults(func=_cmd_links_apply)
    listing = links.add_parser(
        "list", help="every link: master → follower, sizing, and whether it copies now"
    )
    _add_nats_url(listing)
    _add_json(listing, "one JSON object per link")
    listing.set_defaults(func=_cmd_links_list)
    resume = links.add_parser("resume", help="resume a link paused by a protection")
    resume.add_argument("link_id", help="the link's id")
    _add_nats_url(resume)
    resume.set_defaults(func=_cmd_links_resume)


def _add_stop_commands(commands: Any) -> None:
    stop = commands.add_parser(
        "stop", help="emergency stops (global, per account, per link): set, clear, list"
    ).add_subparsers(dest="stop_command", required=True)
    for action, helptext in (
        ("set", "freeze copying in a scope: no opens, modifies or closes"),
        ("clear", "lift an emergency stop"),
    ):
        cmd = stop.add_parser(action, help=helptext)
        cmd.add_argument(
            "scope", choices=["global", "account", "link"], help="what the stop covers"
        )
        cmd.add_argument(
            "target", nargs="?", help="follower account id or link id (none for global)"
        )
        cmd.add_argument("--reason", default="", help="why, for whoever reads `stop list`")
        if action == "set":
            cmd.add_argument(
                "--force",
                action="store_true",
                help="set it even for a link or account NATS does not know (yet)",
            )
        _add_nats_url(cmd)
        cmd.set_defaults(func=_cmd_stop, force=False)
    listing = stop.add_parser("list", help="every emergency stop in force, since when and why")
    listing.add_argument("--all", action="store_true", help="cleared stops too")
    _add_nats_url(listing)
    _add_json(listing, "one JSON object per stop")
    listing.set_defaults(func=_cmd_stop_list)


def _add_read_commands(commands: Any) -> None:
    from schemas.decisions import DecisionRule

    decisions = commands.add_parser(
        "decisions",
        help="why copies were skipped, reduced or paused: the last ones, or follow them live",
    )
    decisions.add_argument("--follower", type=_id, help="only this follower account")
    decisions.add_argument("--link", type=_id, help="only this link")
    decisions.add_argument("--master", type=_id, help="only this master account")
    decisions.add_argument(
        "--rule", choices=[r.value for r in DecisionRule], metavar="RULE",
        help="only this rule (e.g. symbol_not_included, below_min_volume, daily_trade_limit)",
    )  # fmt: skip
    decisions.add_argument(
        "--last", type=_positive_int, default=20, help="how many recent decisions (default 20)"
    )
    decisions.add_argument(
        "--follow", action="store_true", help="then print new decisions as they come, until Ctrl-C"
    )
    decisions.add_argument(
        "--count", type=_positive_int, default=0,
        help="with --follow: stop after this many new decisions (default: until Ctrl-C)",
    )  # fmt: skip
    _add_nats_url(decisions)
    _add_json(decisions, "one JSON object per decision (JSON Lines)")
    decisions.set_defaults(func=_cmd_decisions)

    status = commands.add_parser(
        "status",
        help="streams, consumer lag per partition, replicators and connectors alive",
    )
    status.add_argument(
        "--watch", nargs="?", type=_seconds, const=2.0, default=None, metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )  # fmt: skip
    status.add_argument(
        "--stale-after", type=_seconds, default=10.0, metavar="SECONDS",
        help="an account state older than this means its connector is silent (default 10)",
    )  # fmt: skip
    _add_nats_url(status)
    _add_json(status, "one JSON object (per refresh with --watch)")
    status.set_defaults(func=_cmd_status)


def _add_service_commands(commands: Any) -> None:
    replicator = commands.add_parser("replicator", help="the replicator service").add_subparsers(
        dest="replicator_command", required=True
    )
    run = replicator.add_parser("run", help="run one replicator instance (run several to scale)")
    _add_nats_url(run)
    run.add_argument("--instance", help="instance name in logs and health (default: hostname)")
    run.add_argument(
        "--partitions", type=int, default=16, help="partitions of the master-event stream"
    )
    run.add_argument("--ack-wait", type=float, default=5.0, help="failover time, seconds")
    run.add_argument(
        "--metrics-host", default=DEFAULT_METRICS_HOST, help="0.0.0.0 to serve other machines"
    )
    run.add_argument("--metrics-port", type=int, default=9464, help="-1 disables /metrics")
    run.add_argument(
        "--replicas", type=int, default=None,
        help="replicas of the streams and buckets this instance creates "
        "(default: $TRADECOPY_NATS_REPLICAS or 1)",
    )  # fmt: skip
    run.add_argument(
        "--memory-storage", action="store_true", help="streams it creates in memory, not on disk"
    )
    run.add_argument(
        "--batch-by-connector",
        action="store_true",
        help="one order batch per connector and master event",
    )
    run.add_argument(
        "--shard", default=None,
        help="link shard i/n this instance plans: links with crc32(link_id) %% n == i, through "
        "consumers of their own; a bare index i (a pod ordinal) takes n from --shards and plans "
        "i %% n (default: $TRADECOPY_REPLICATOR_SHARD or 0/1, every link)",
    )  # fmt: skip
    run.add_argument(
        "--shards", default=None, metavar="N",
        help="link shards in all, for a bare --shard index (default: $TRADECOPY_REPLICATOR_SHARDS)",
    )  # fmt: skip
    run.add_argument(
        "--planner", choices=("fan_out", "reference"), default="fan_out",
        help="fan_out: one pass over links compiled per master symbol; reference: link by link",
    )  # fmt: skip
    _add_log_level(run, "info")
    run.add_argument("--console-logs", action="store_true", help="human-readable logs")
    run.set_defaults(func=_cmd_replicator_run)

    signals = commands.add_parser(
        "signals", help="signal sources: strategies run once per closed candle"
    ).add_subparsers(dest="signals_command", required=True)
    worker = signals.add_parser(
        "run",
        help="run one strategy worker and the drive of the strategies' masters (run several: "
        "each candle still runs once)",
    )
    worker.add_argument("--config", required=True, help="the worker's JSON file")
    worker.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL with the ledger's views, where the drive reads the masters' positions "
        "(default: $TRADECOPY_DATABASE_URL; neither: the worker runs without the drive)",
    )
    worker.add_argument(
        "--max-signal-age",
        type=float,
        default=300.0,
        help="seconds after which the drive skips a signal instead of trading it (default 300)",
    )
    _add_nats_url(worker)
    _add_log_level(worker, "info")
    worker.add_argument("--console-logs", action="store_true", help="human-readable logs")
    worker.set_defaults(func=_cmd_signals_run)

    backtest = commands.add_parser(
        "backtest", help="a strategy over bar files through the live candle path and paper venue"
    )
    backtest.add_argument(
        "strategy", help="a shipped strategy (sma_cross, rsi_reversal) or a version's JSON file"
    )
    backtest.add_argument(
        "--bars", default=None, help="an MT5 one-minute bar export (default: the shipped bars)"
    )
    backtest.add_argument(
        "--timeframe",
        default="15m",
        choices=["1m", "5m", "15m", "1h", "4h", "1d"],
        help="the candles the strategy runs on (default 15m)",
    )
    backtest.add_argument(
        "--params", default=None, help="a shipped strategy's parameters, e.g. '{\"fast\": 5}'"
    )
    backtest.add_argument("--volume", type=float, default=0.1, help="lots a trade (default 0.1)")
    backtest.add_argument(
        "--sandbox", action="store_true", help="run every candle in the worker's sandbox"
    )
    backtest.add_argument("--json", action="store_true", help="one JSON line instead of the report")
    backtest.set_defaults(func=_cmd_backtest)

    for name, helptext, func in (
        ("bridge", "bridge-EA connector: one ZeroMQ ROUTER for many terminals", _cmd_bridge_run),
        ("mt5", "MetaTrader5-package connector (Windows)", _cmd_mt5_run),
    ):
        group = commands.add_parser(name, help=helptext).add_subparsers(
            dest=f"{name}_command", required=True
        )
        runner = group.add_parser("run", help=f"run the {name} connector until Ctrl-C")
        runner.add_argument("--config", required=True, help="TOML file")
        _add_nats_url(runner)
        runner.add_argument("--metrics-port", type=int, default=9465, help="-1 disables")
        runner.add_argument(
            "--metrics-host", default=DEFAULT_METRICS_HOST, help="0.0.0.0 to serve other machines"
        )
        _add_log_level(runner, "info")
        runner.add_argument("--console-logs", action="store_true", help="human-readable logs")
        if name == "bridge":
            runner.add_argument("--state", help="state file (mirror, copies, outbox)")
        runner.set_defaults(func=func)
        if name == "bridge":
            keys = group.add_parser(
                "keys", help="make a CURVE key pair (connector or terminal) and say where it goes"
            )
            keys.add_argument(
                "--secret-file", help="write the secret key here (created 0600), not to stdout"
            )
            _add_json(keys, "one JSON object")
            keys.set_defaults(func=_cmd_bridge_keys)

    quotes = commands.add_parser("quotes", help="price sources").add_subparsers(
        dest="quotes_command", required=True
    )
    publish = quotes.add_parser(
        "publish", help="publish the shipped real XAUUSD bars as live quotes on NATS"
    )
    _add_nats_url(publish)
    publish.add_argument("--speed", type=float, default=60.0, help="bars per minute")
    publish.add_argument("--start-bar", type=int, default=0, help="first bar of the replay")
    publish.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    publish.set_defaults(func=_cmd_quotes_publish)


def _add_nats_commands(commands: Any) -> None:
    nats_cmd = commands.add_parser(
        "nats", help="embedded nats-server, users, bootstrap"
    ).add_subparsers(dest="nats_command", required=True)
    nats_run = nats_cmd.add_parser("run", help="run nats-server with JetStream from the wheel")
    nats_run.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    nats_run.add_argument("--port", type=_port, default=4222, help="client port (default 4222)")
    nats_run.add_argument(
        "--http-port", type=_port, default=None, help="monitoring port (default: none)"
    )
    nats_run.add_argument(
        "--store-dir", help="JetStream store (default: ~/.local/state/tradecopy/nats)"
    )
    nats_run.add_argument(
        "--sync-interval", help="JetStream fsync: 'always' or a duration (server default 2m)"
    )
    nats_run.add_argument("--tls-cert", help="server certificate (PEM)")
    nats_run.add_argument("--tls-key", help="its private key (PEM)")
    nats_run.add_argument("--tls-ca", help="CA for client certificates")
    nats_run.add_argument("--tls-verify", action="store_true", help="require client certificates")
    nats_run.set_defaults(func=_cmd_nats_run)
    boot = nats_cmd.add_parser(
        "bootstrap", help="create or update the streams and buckets (as the admin user)"
    )
    _add_nats_url(boot)
    boot.add_argument(
        "--partitions", type=int, default=16, help="partitions of the master-event stream"
    )
    boot.add_argument(
        "--replicas", type=int, default=None,
        help="replicas of every stream and bucket, existing ones changed to it (cluster: 3; "
        "default: $TRADECOPY_NATS_REPLICAS or 1 for new ones, existing ones unchanged)",
    )  # fmt: skip
    boot.set_defaults(func=_cmd_nats_bootstrap)
    perms = nats_cmd.add_parser(
        "permissions", help="print the roles' NATS permissions (or one connector's user entry)"
    )
    perms.add_argument("--connector", help="a connector id: print its user entry")
    perms.add_argument("--masters", help="its master accounts, comma-separated")
    perms.add_argument("--followers", help="its follower accounts, comma-separated")
    perms.add_argument("--nkey", help="its public key (U…)")
    perms.add_argument(
        "--write", nargs="+", metavar="FILE", help="replace the role block in these configs"
    )
    perms.set_defaults(func=_cmd_nats_permissions)
    nkey = nats_cmd.add_parser("nkey", help="make a user nkey: public key out, seed to a file")
    nkey.add_argument("--seed-file", required=True, help="where the seed goes (created 0600)")
    nkey.set_defaults(func=_cmd_nats_nkey)
    pub = nats_cmd.add_parser("public-key", help="print the public key of a seed file")
    pub.add_argument("--seed-file", required=True, help="a file holding an nkey seed (SU…)")
    pub.set_defaults(func=_cmd_nats_public_key)


def _add_local_commands(commands: Any) -> None:
    up = commands.add_parser("up", help="run NATS, replicator and paper accounts until Ctrl-C")
    up.add_argument("--config", help="TOML file (default: the shipped engine/up.toml)")
    up.add_argument(
        "--nats-port", type=_port, default=None, metavar="PORT",
        help="NATS client port, instead of the config's [nats] port (0 picks a free one)",
    )  # fmt: skip
    _add_log_level(up, "warning")
    up.set_defaults(func=_cmd_up)

    demo = commands.add_parser(
        "demo", help="copy a master (scripted, or an SMA strategy) on real XAUUSD prices to "
        "paper followers",
    )  # fmt: skip
    demo.add_argument(
        "--source", choices=("script", "strategy"), default="script",
        help="who trades the master: a script doing every kind of action once, or the shipped "
        "SMA crossover through the signal worker and the drive",
    )  # fmt: skip
    demo.add_argument(
        "--seconds", type=float, default=None,
        help="length of the script (default 20) or of the strategy's run (default 30)",
    )  # fmt: skip
    demo.add_argument("--followers", type=int, default=7, help="paper followers (min 1)")
    demo.add_argument(
        "--speed", type=float, default=None,
        help="bars per minute of replay (default 60; strategy: 360, a 5m candle each 0.83 s)",
    )  # fmt: skip
    _add_json(demo, "one JSON object on the last line")
    _add_database_url(demo)
    demo.set_defaults(func=_cmd_demo)


def _add_bench_commands(commands: Any) -> None:
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    fanout = bench.add_parser("fanout", help="replicator fan-out vs the raw NATS floor")
    fanout.add_argument("--events", type=int, default=200, help="master events per run")
    fanout.add_argument(
        "--followers", default="1,100,1000", help="follower counts to measure, comma-separated"
    )
    _add_json(fanout, "one JSON object")
    fanout.add_argument(
        "--modes", default="per-order,batch", help="per-order and/or batch (one per connector)"
    )
    fanout.add_argument("--sync", default="default", help=SYNC_HELP)
    fanout.add_argument(
        "--instances", default="1",
        help="replicator processes, comma-separated; n > 1 splits the links into n link shards",
    )  # fmt: skip
    fanout.set_defaults(func=_cmd_bench_fanout)
    e2e = bench.add_parser("e2e", help="paper master fill → paper follower fill, every hop")
    e2e.add_argument("--trades", type=int, default=200, help="master trades per run")
    e2e.add_argument(
        "--gap-ms", "--gaps-ms", dest="gaps_ms", default="0,20",
        help="pauses between trades to measure, comma-separated (1500: sparse traffic)",
    )  # fmt: skip
    _add_json(e2e, "one JSON object")
    e2e.add_argument("--sync", default="default", help=SYNC_HELP)
    e2e.set_defaults(func=_cmd_bench_e2e)
    bridge = bench.add_parser(
        "bridge", help="paper terminal → bridge connectors → paper terminal, lost/duplicates"
    )
    bridge.add_argument("--trades", type=int, default=200, help="master trades per run")
    bridge.add_argument(
        "--gap-ms", type=float, default=0.0, help="pause between trades, milliseconds"
    )
    bridge.add_argument(
        "--plaintext", action="store_true", help="without CURVE (default: encrypted, as deployed)"
    )
    _add_json(bridge, "one JSON object")
    bridge.set_defaults(func=_cmd_bench_bridge)
    state = bench.add_parser(
        "state", help="connector order memory: time per order, first vs last 10 %% of a long run"
    )
    state.add_argument("--orders", type=int, default=100_000, help="orders to remember")
    state.add_argument("--batch", type=int, default=10, help="orders per commit")
    state.add_argument(
        "--fsync", action=argparse.BooleanOptionalAction, default=True,
        help="fsync every commit (the connectors' default)",
    )  # fmt: skip
    _add_json(state, "one JSON object")
    state.set_defaults(func=_cmd_bench_state)
    ledger = bench.add_parser(
        "ledger", help="ledger ingest into PostgreSQL and its lag vs raw COPY of the same rows"
    )
    ledger.add_argument("--messages", type=int, default=20_000, help="messages per phase")
    ledger.add_argument(
        "--rate", type=float, default=20_000.0, help="messages per second in the steady phase"
    )
    ledger.add_argument("--batch", type=int, default=1_000, help="most messages per commit")
    ledger.add_argument("--writers", type=int, default=2, help="the ledger's batches in flight")
    _add_database_url(ledger)
    _add_json(ledger, "one JSON object on the last line")
    ledger.set_defaults(func=_cmd_bench_ledger)
    api = bench.add_parser(
        "api", help="a follower's positions at a fixed rate through the API vs a bare aiohttp "
        "handler; SSE decision latency",
    )  # fmt: skip
    api.add_argument("--rps", type=float, default=500.0, help="requests per second (open loop)")
    api.add_argument("--seconds", type=float, default=10.0, help="measured seconds per target")
    api.add_argument("--sse-samples", type=int, default=200, help="decisions timed over SSE")
    _add_database_url(api)
    _add_json(api, "one JSON object on the last line")
    api.set_defaults(func=_cmd_bench_api)


# ------------------------------------------------------------------------ the ledger


def _add_database_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL (default: $TRADECOPY_DATABASE_URL, else the embedded server under the "
        "state directory, the one `tradecopy up` runs)",
    )


async def _with_database(args: argparse.Namespace, work: Callable[[str], Awaitable[T]]) -> T:
    """Run ``work`` against the configured database, or the embedded one (adopted when `up`
    runs it, else started for this command and stopped after)."""
    from engine.runtime.postgres import start_database

    url, server = await start_database(args.database_url)
    try:
        return await work(url)
    finally:
        if server is not None:
            await server.stop()


def _cmd_ledger_run(args: argparse.Namespace) -> int:
    from engine.ledger.config import LedgerConfig
    from engine.ledger.service import run_ledger
    from engine.runtime.logging import configure_logging

    configure_logging(args.log_level, json=not args.console_logs)
    options: dict[str, Any] = {
        "nats_url": _nats_url(args),
        "database_url": args.database_url,
        "metrics_port": None if args.metrics_port < 0 else args.metrics_port,
        "metrics_host": args.metrics_host,
        "batch_max": args.batch_max,
        "writers": args.writers,
        "ack_wait_s": args.ack_wait,
        "default_tenant": args.default_tenant,
        "migrate": args.migrate,
    }
    if args.instance:
        options["instance"] = args.instance
    run_async(run_ledger(LedgerConfig(**options)))
    return 0


def _cmd_db_migrate(args: argparse.Namespace) -> int:
    from engine.api.store import migrate as migrate_api
    from engine.billing.store import migrate as migrate_billing
    from engine.ledger.store import migrate as migrate_ledger

    async def work(url: str) -> list[str]:
        # Each service owns its tables and its migrations (a history per component).
        ledger = [f"ledger {v}" for v in await migrate_ledger(url)]
        api = [f"api {v}" for v in await migrate_api(url)]
        return ledger + api + [f"billing {v}" for v in await migrate_billing(url)]

    applied = run_async(_with_database(args, work))
    print(f"applied {', '.join(applied)}" if applied else "the database is up to date")
    return 0


def _cmd_db_prune(args: argparse.Namespace) -> int:
    from engine.ledger.retention import prune

    async def work(url: str) -> dict[str, int]:
        return await prune(url, time.time_ns(), orders_months=args.orders_months,
                           decisions_months=args.decisions_months)  # fmt: skip

    deleted = run_async(_with_database(args, work))
    print(", ".join(f"{n} {kind} deleted" for kind, n in deleted.items()) or "nothing to delete")
    return 0


def _money(units: int | None, currency: str | None) -> str:
    from engine.core.money import format_money

    if units is None:
        return "?"
    return format_money(units, currency) if currency else str(units)


def _cmd_history(args: argparse.Namespace) -> int:
    from engine.ledger.queries import UnknownAccount, account_book

    try:
        book = run_async(_with_database(args, lambda url: account_book(url, args.account)))
    except UnknownAccount as exc:
        raise CommandFailed(str(exc)) from None
    closed = book.closed_positions[-args.last :] if args.last else book.closed_positions
    if args.json:
        _print_json({**_builtins(book), "closed_positions": _builtins(closed)})
        return 0
    ccy = book.currency
    print(f"account {book.account} ({ccy or 'currency unknown'})")
    print(f"\nopen positions: {len(book.open_positions)}")
    if book.open_positions:
        rows = [(p.position_id, p.symbol, p.side, p.volume, p.open_price, _clock(p.open_ts_ns),
                 "copy" if p.is_copy else "manual") for p in book.open_positions]  # fmt: skip
        print(_table(("POSITION", "SYMBOL", "SIDE", "VOLUME", "PRICE", "OPENED", "ORIGIN"), rows))
    print(f"\npending orders: {len(book.pending_orders)}")
    if book.pending_orders:
        rows = [(o.order_id, o.symbol, o.order_type, o.volume, o.price)
                for o in book.pending_orders]  # fmt: skip
        print(_table(("ORDER", "SYMBOL", "TYPE", "VOLUME", "PRICE"), rows))
    shown = f" (last {len(closed)})" if len(closed) < len(book.closed_positions) else ""
    print(f"\nclosed positions: {len(book.closed_positions)}{shown}")
    if closed:
        rows = [(p.position_id, p.symbol, p.side, p.volume, p.open_price,
                 "?" if p.close_price is None else p.close_price, _clock(p.close_ts_ns),
                 p.reason, _money(p.profit, ccy), "copy" if p.is_copy else "manual")
                for p in closed]  # fmt: skip
        headers = ("POSITION", "SYMBOL", "SIDE", "VOLUME", "OPEN", "CLOSE", "CLOSED", "REASON",
                   "PROFIT", "ORIGIN")  # fmt: skip
        print(_table(headers, rows))
    if book.cash_flows:
        print(f"\ndeposits and withdrawals (balance changes no trade explains): "
              f"{len(book.cash_flows)}")  # fmt: skip
        rows = [(_clock(c.ts_ns), _money(c.amount, ccy)) for c in book.cash_flows]
        print(_table(("WHEN", "AMOUNT"), rows))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from engine.ledger.queries import UnknownAccount, account_statistics

    async def work(url: str) -> Any:
        return await account_statistics(url, args.account, args.link)

    try:
        book, stats = run_async(_with_database(args, work))
    except UnknownAccount as exc:
        raise CommandFailed(str(exc)) from None
    if args.json:
        _print_json({"account": args.account, "link": args.link, "currency": book.currency,
                     **_builtins(stats)})  # fmt: skip
        return 0
    ccy = book.currency

    def ratio(value: float | None, percent: bool = False) -> str:
        if value is None:
            return "n/a"
        return f"{value * 100:.2f}%" if percent else f"{value:.2f}"

    scope = f"account {args.account}" + (f", copies through link {args.link}" if args.link else "")
    rows = [
        ("closed trades", stats.trades),
        ("wins / losses", f"{stats.wins} / {stats.losses} (a trade with P&L <= 0 is no win)"),
        ("win rate", ratio(stats.win_rate, percent=True)),
        ("gross profit / loss",
         f"{_money(stats.gross_profit, ccy)} / {_money(stats.gross_loss, ccy)}"),
        ("net profit", _money(stats.net_profit, ccy)),
        ("profit factor", ratio(stats.profit_factor)),
        ("average win / loss",
         f"{_money(stats.average_win, ccy)} / {_money(stats.average_loss, ccy)}"),
        ("largest win / loss",
         f"{_money(stats.largest_win, ccy)} / {_money(stats.largest_loss, ccy)}"),
        ("expectancy (per trade)", _money(stats.expectancy, ccy)),
        ("gain (time-weighted)", ratio(stats.gain, percent=True)),
        ("max drawdown (equity)",
         f"{_money(stats.max_drawdown, ccy)} ({ratio(stats.max_drawdown_ratio, percent=True)})"),
        ("trades per day", ratio(stats.trades_per_day)),
        ("Sharpe (daily, x sqrt 252)", ratio(stats.sharpe)),
    ]  # fmt: skip
    print(f"{scope} ({ccy or 'currency unknown'})")
    print(_table(("STATISTIC", "VALUE"), rows))
    months = [(m, _money(v, ccy)) for m, v in stats.monthly_pnl.items() if v]
    if months:
        print("\nmonthly P&L (months with trades, last 24)")
        print(_table(("MONTH", "P&L"), months))
    return 0


# ------------------------------------------------------------------------ billing


def _billing_config(args: argparse.Namespace) -> Any:
    import msgspec

    from engine.billing.config import BillingConfig

    config = (
        msgspec.toml.decode(Path(args.config).read_bytes(), type=BillingConfig)
        if args.config
        else BillingConfig()
    )
    if args.database_url:
        config = msgspec.structs.replace(config, database_url=args.database_url)
    return config


def _cmd_billing_run(args: argparse.Namespace) -> int:
    from engine.billing.service import run_billing
    from engine.runtime.logging import configure_logging

    configure_logging(args.log_level, json=not args.console_logs)
    run_async(run_billing(_billing_config(args)))
    return 0


def _cmd_billing_run_job(args: argparse.Namespace) -> int:
    import msgspec

    from engine.billing.service import parse_at, run_billing_job
    from engine.runtime.logging import configure_logging

    configure_logging(args.log_level, json=False)
    at_ns = parse_at(args.at) if args.at else time.time_ns()
    summary = run_async(run_billing_job(_billing_config(args), args.name, at_ns))
    print(json.dumps(msgspec.to_builtins(summary), sort_keys=True))
    return 0


def _cmd_billing_seal(args: argparse.Namespace) -> int:
    from engine.billing.config import seal_secret

    # Read from stdin, not argv: a key on the command line stays in the shell's history.
    print(seal_secret(sys.stdin.readline().strip()))
    return 0


def _cmd_billing_smtp_set(args: argparse.Namespace) -> int:
    from engine.billing.notifications import configure_provider_smtp, read_smtp_password
    from engine.runtime.mail import SmtpSettings
    from engine.runtime.postgres import configured_database_url

    url = configured_database_url(args.database_url)
    if url is None:
        raise CommandFailed("name the database: --database-url or $TRADECOPY_DATABASE_URL")
    # From stdin or a variable the operator names, never argv (every user of the machine
    # sees a process's arguments, and shells keep them in their history).
    password = read_smtp_password(
        stdin=sys.stdin if args.password_stdin else None, env_name=args.password_env
    )
    settings = SmtpSettings(
        host=args.host, port=args.port, security=args.security, username=args.username,
        from_address=args.from_address,
    )  # fmt: skip
    run_async(configure_provider_smtp(url, args.provider, settings, password))
    print(f"SMTP settings of {args.provider} stored, sealed")
    return 0


def _add_billing_commands(commands: Any) -> None:
    billing = commands.add_parser(
        "billing", help="the billing service: fees, invoices, Stripe Connect charges"
    ).add_subparsers(dest="billing_command", required=True)
    run = billing.add_parser(
        "run", help="serve Stripe webhooks and run the billing jobs (one instance leads)"
    )
    run.add_argument("--config", help="a billing TOML file (engine/billing/README.md)")
    _add_database_url(run)
    _add_log_level(run, "info")
    run.add_argument("--console-logs", action="store_true", help="human log lines, not JSON")
    run.set_defaults(func=_cmd_billing_run)
    job = billing.add_parser("run-job", help="run one billing job once, as of a given instant")
    job.add_argument(
        "name",
        choices=["weekly_fees", "hourly_sync", "daily_recheck", "prune", "period_charges",
                 "allowance_sync"],
        help="the job",
    )  # fmt: skip
    job.add_argument(
        "--at", help="the instant the job runs as of, ISO 8601 with offset (default: now)"
    )
    job.add_argument("--config", help="a billing TOML file (engine/billing/README.md)")
    _add_database_url(job)
    _add_log_level(job, "warning")
    job.set_defaults(func=_cmd_billing_run_job)
    seal = billing.add_parser(
        "seal-secret", help="seal a Stripe key read from stdin with $TRADECOPY_BILLING_KEY"
    )
    seal.set_defaults(func=_cmd_billing_seal)
    smtp = billing.add_parser(
        "smtp-set", help="store a provider's SMTP server, its password sealed (never from argv)"
    )
    smtp.add_argument("provider", help="the provider (the API's tenant id)")
    smtp.add_argument("--host", required=True, help="the SMTP server")
    smtp.add_argument("--port", type=int, default=587, help="default 587 (submission)")
    smtp.add_argument(
        "--security", choices=["starttls", "tls", "none"], default="starttls",
        help="starttls (submission, 587), tls (implicit, 465) or none (a local relay)",
    )  # fmt: skip
    smtp.add_argument("--username", help="the login; its password from stdin or a variable")
    smtp.add_argument("--from", dest="from_address", required=True, help="Name <address>")
    source = smtp.add_mutually_exclusive_group()
    source.add_argument("--password-stdin", action="store_true", help="read the password")
    source.add_argument("--password-env", metavar="NAME", help="the variable holding it")
    _add_database_url(smtp)
    smtp.set_defaults(func=_cmd_billing_smtp_set)


def _add_ledger_commands(commands: Any) -> None:
    ledger = commands.add_parser(
        "ledger", help="the ledger service: every account's history in PostgreSQL"
    ).add_subparsers(dest="ledger_command", required=True)
    run = ledger.add_parser("run", help="run one ledger instance (run several to share the work)")
    _add_nats_url(run)
    _add_database_url(run)
    run.add_argument("--instance", help="this instance's name in logs and metrics (host name)")
    run.add_argument(
        "--metrics-port", type=int, default=9465, help="/metrics and /healthz port (-1: none)"
    )
    run.add_argument("--metrics-host", default="127.0.0.1", help="address of /metrics")
    run.add_argument(
        "--batch-max", type=int, default=1_000, help="most messages of one stream per commit"
    )
    run.add_argument("--writers", type=int, default=2, help="batches in flight at once")
    run.add_argument(
        "--ack-wait", type=float, default=30.0,
        help="seconds a fetched message may wait for its commit before another instance gets it",
    )  # fmt: skip
    run.add_argument(
        "--default-tenant", default="default", help="tenant of accounts with no tenant row"
    )
    run.add_argument(
        "--migrate", action="store_true", help="apply the migrations first (local set-ups)"
    )
    _add_log_level(run, "info")
    run.add_argument("--console-logs", action="store_true", help="human log lines, not JSON")
    run.set_defaults(func=_cmd_ledger_run)

    db = commands.add_parser("db", help="the ledger's PostgreSQL database").add_subparsers(
        dest="db_command", required=True
    )
    migrate = db.add_parser(
        "migrate", help="apply the migrations this version lacks (under a lock: safe anywhere)"
    )
    _add_database_url(migrate)
    migrate.set_defaults(func=_cmd_db_migrate)
    prune = db.add_parser(
        "prune", help="delete follower orders and decisions past their retention (safe twice)"
    )
    _add_database_url(prune)
    prune.add_argument("--orders-months", type=int, default=3, help="keep orders this long")
    prune.add_argument("--decisions-months", type=int, default=3, help="keep decisions this long")
    prune.set_defaults(func=_cmd_db_prune)

    history = commands.add_parser(
        "history", help="an account's positions, pending orders, closed trades and cash flows"
    )
    history.add_argument("--account", required=True, help="the account id")
    history.add_argument(
        "--last", type=int, default=50, help="closed positions shown, newest last (0: all)"
    )
    _add_database_url(history)
    _add_json(history)
    history.set_defaults(func=_cmd_history)

    stats = commands.add_parser(
        "stats", help="an account's statistics: gain, drawdown, profit factor, win rate, Sharpe"
    )
    stats.add_argument("--account", required=True, help="the account id")
    stats.add_argument("--link", help="only the account's copies through this link")
    _add_database_url(stats)
    _add_json(stats)
    stats.set_defaults(func=_cmd_stats)


# ------------------------------------------------------------------------ the platform API


def _cmd_api_run(args: argparse.Namespace) -> int:
    from engine.api.config import ApiConfig
    from engine.api.service import run_api
    from engine.runtime.logging import configure_logging

    configure_logging(args.log_level, json=not args.console_logs)
    config = ApiConfig(
        host=args.host, port=args.port, nats_url=_nats_url(args), database_url=args.database_url,
        cors_origins=args.cors_origin, migrate=args.migrate,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_host=args.metrics_host,
    )  # fmt: skip
    run_async(run_api(config, dev=args.dev))
    return 0


def _api_database_url(args: argparse.Namespace) -> str:
    from engine.runtime.postgres import configured_database_url

    url = configured_database_url(args.database_url)
    if url is None:
        raise CommandFailed("name the database: --database-url or $TRADECOPY_DATABASE_URL")
    return url


def _cmd_api_create_operator(args: argparse.Namespace) -> int:
    import getpass

    from engine.api.errors import ApiError
    from engine.api.store import create_operator

    password = os.environ.get(ENV_API_OPERATOR_PASSWORD) or getpass.getpass("password: ")
    try:
        user_id = run_async(
            create_operator(_api_database_url(args), args.email, password, args.username)
        )
    except ApiError as exc:
        raise CommandFailed(str(exc)) from None
    print(f"operator {args.email}: {user_id}")
    return 0


def _cmd_api_rotate_key(args: argparse.Namespace) -> int:
    from engine.api.config import ENV_MASTER_KEY, MasterKey
    from engine.api.errors import ApiError
    from engine.api.store import rotate_key

    old = MasterKey.parse(args.old_key_id, os.environ.get(ENV_API_OLD_MASTER_KEY, ""))
    new = MasterKey.parse(args.new_key_id, os.environ.get(ENV_MASTER_KEY, ""))
    try:
        count = run_async(rotate_key(_api_database_url(args), old, new))
    except ApiError as exc:
        raise CommandFailed(str(exc)) from None
    print(f"re-encrypted {count} account credential(s) from {old.key_id} to {new.key_id}")
    return 0


def _cmd_api_openapi(args: argparse.Namespace) -> int:
    from engine.api.openapi import main as openapi_main

    return openapi_main(["--check"] if args.check else [])


def _add_api_commands(commands: Any) -> None:
    api = commands.add_parser(
        "api", help="the platform API: HTTP for web frontends and platform backends"
    ).add_subparsers(dest="api_command", required=True)
    run = api.add_parser("run", help="serve the API until Ctrl-C")
    run.add_argument("--host", default="127.0.0.1", help="address (0.0.0.0 only when meant)")
    run.add_argument("--port", type=int, default=8080, help="HTTP port")
    _add_nats_url(run)
    _add_database_url(run)
    run.add_argument(
        "--cors-origin", action="append", default=[],
        help="a browser origin allowed to call the API (repeat for more; none by default)",
    )  # fmt: skip
    run.add_argument(
        "--metrics-port", type=int, default=9466, help="/metrics and /healthz port (-1: none)"
    )
    run.add_argument(
        "--metrics-host", default="127.0.0.1",
        help="/metrics and /healthz address (0.0.0.0 in a container, for probes and Prometheus)",
    )  # fmt: skip
    run.add_argument("--migrate", action="store_true", help="apply the API's migrations first")
    run.add_argument(
        "--dev", action="store_true",
        help="make ephemeral secrets when TRADECOPY_API_JWT_SECRET / _MASTER_KEY are unset "
        "(tokens and credentials die with the process: never in production)",
    )  # fmt: skip
    _add_log_level(run, "info")
    run.add_argument("--console-logs", action="store_true", help="human log lines, not JSON")
    run.set_defaults(func=_cmd_api_run)
    operator = api.add_parser(
        "create-operator",
        help=f"add an operator user (password from ${ENV_API_OPERATOR_PASSWORD}, else asked)",
    )
    operator.add_argument("--email", required=True, help="the operator's email (their login)")
    operator.add_argument("--username", help="a login name besides the email")
    _add_database_url(operator)
    operator.set_defaults(func=_cmd_api_create_operator)
    rotate = api.add_parser(
        "rotate-key",
        help=f"re-encrypt every broker credential from the key in ${ENV_API_OLD_MASTER_KEY} "
        "to the one in $TRADECOPY_API_MASTER_KEY",
    )
    rotate.add_argument("--old-key-id", required=True, help="id of the key being retired")
    rotate.add_argument("--new-key-id", required=True, help="id of the new key")
    _add_database_url(rotate)
    rotate.set_defaults(func=_cmd_api_rotate_key)
    openapi = api.add_parser(
        "openapi", help="write the HTTP contract (engine/api/openapi.json) from the code"
    )
    openapi.add_argument("--check", action="store_true", help="fail if the file is stale")
    openapi.set_defaults(func=_cmd_api_openapi)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tradecopy",
        description="Event-driven copy trading on NATS JetStream.",
        epilog=f"Commands that talk to NATS take --nats-url or ${ENV_NATS_URL}.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # One group of commands per function; a new group is one more line here.
    for add in (
        _add_local_commands,
        _add_links_commands,
        _add_stop_commands,
        _add_read_commands,
        _add_service_commands,
        _add_ledger_commands,
        _add_billing_commands,
        _add_api_commands,
        _add_nats_commands,
        _add_schema_commands,
        _add_bench_commands,
    ):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from engine.runtime.logging import configure_logging

    args = build_parser().parse_args(argv)
    # Log lines go to stderr, never into a command's output; services reconfigure on start.
    configure_logging("warning", json=False)
    try:
        return int(args.func(args) or 0)
    except TradecopyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
