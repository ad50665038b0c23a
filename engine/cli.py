"""The ``tradecopy`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.runtime.eventloop import run_async

DEFAULT_NATS = "nats://127.0.0.1:4222"


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

    async def apply() -> None:
        import nats

        from engine.runtime.jetstream import ensure_buckets
        from engine.runtime.links import apply_links
        from schemas import subjects

        nc = await nats.connect(args.nats_url)
        try:
            buckets = await ensure_buckets(nc.jetstream())
            result = await apply_links(buckets[subjects.KV_LINKS], links, prune=args.prune)
        finally:
            await nc.close()
        for label, ids in (
            ("created", result.created),
            ("updated", result.updated),
            ("unchanged", result.unchanged),
            ("removed", result.removed),
        ):
            if ids:
                print(f"{label:>9}: {', '.join(ids)}")

    run_async(apply())
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    import time

    from schemas import codec, subjects
    from schemas.common import is_account_id
    from schemas.control import EmergencyStop, StopScope

    scope = StopScope(args.scope)
    if scope is not StopScope.GLOBAL and not args.target:
        print(f"an emergency stop for a {scope.value} needs its id", file=sys.stderr)
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
        active=args.action == "set",
        reason=args.reason,
        ts_ns=time.time_ns(),
    )

    async def write() -> None:
        import nats

        from engine.runtime.jetstream import ensure_buckets

        nc = await nats.connect(args.nats_url)
        try:
            buckets = await ensure_buckets(nc.jetstream())
            await buckets[subjects.KV_CONTROL].put(stop.key, codec.encode(stop))
        finally:
            await nc.close()

    run_async(write())
    state = "ACTIVE" if stop.active else "cleared"
    print(f"emergency stop {stop.key}: {state}")
    return 0


def _cmd_links_resume(args: argparse.Namespace) -> int:
    async def resume() -> bool:
        import nats

        from engine.replicator.control import resume_link
        from engine.runtime.jetstream import ensure_buckets
        from schemas import subjects

        nc = await nats.connect(args.nats_url)
        try:
            buckets = await ensure_buckets(nc.jetstream())
            return await resume_link(buckets[subjects.KV_LINK_STATE], args.link_id)
        finally:
            await nc.close()

    if run_async(resume()):
        print(f"link {args.link_id}: resumed")
    else:
        print(f"link {args.link_id}: not paused")
    return 0


def _cmd_replicator_run(args: argparse.Namespace) -> int:
    from engine.replicator.config import ReplicatorConfig
    from engine.replicator.service import run_replicator
    from engine.runtime.logging import configure_logging

    configure_logging(args.log_level, json=not args.console_logs)
    options: dict[str, Any] = {
        "nats_url": args.nats_url,
        "partitions": args.partitions,
        "ack_wait_s": args.ack_wait,
        "metrics_port": None if args.metrics_port < 0 else args.metrics_port,
        "metrics_host": args.metrics_host,
        "memory_storage": args.memory_storage,
        "batch_by_connector": args.batch_by_connector,
    }
    if args.instance:
        options["instance"] = args.instance
    run_async(run_replicator(ReplicatorConfig(**options)))
    return 0


def _cmd_nats_run(args: argparse.Namespace) -> int:
    from engine.runtime.natsserver import EmbeddedNats, default_state_dir

    store = Path(args.store_dir) if args.store_dir else default_state_dir() / "nats"

    async def serve() -> None:
        import signal

        server = EmbeddedNats(store_dir=store, port=args.port, http_port=args.http_port)
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

    run_async(serve())
    return 0


def _cmd_bench_fanout(args: argparse.Namespace) -> int:
    from benchmarks.fanout import main as fanout_main

    forwarded = ["--events", str(args.events), "--followers", args.followers]
    forwarded += ["--modes", args.modes]
    if args.json:
        forwarded.append("--json")
    return fanout_main(forwarded)


def _cmd_up(args: argparse.Namespace) -> int:
    from engine.core.errors import TradecopyError
    from engine.runtime.logging import configure_logging
    from engine.up import DEFAULT_CONFIG, run_up

    configure_logging(args.log_level, json=False)
    try:
        run_async(run_up(Path(args.config) if args.config else DEFAULT_CONFIG))
    except TradecopyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import main as demo_main
    from engine.runtime.logging import configure_logging

    configure_logging("warning", json=False)
    return demo_main(args.seconds, args.followers, args.speed, args.json)


def _cmd_bench_e2e(args: argparse.Namespace) -> int:
    from benchmarks.e2e import main as e2e_main

    forwarded = ["--trades", str(args.trades), "--gaps-ms", args.gaps_ms]
    if args.json:
        forwarded.append("--json")
    return e2e_main(forwarded)


def _cmd_quotes_publish(args: argparse.Namespace) -> int:
    async def publish() -> int:
        import nats

        from connectors.paper.prices import PriceReplay, load_bars
        from connectors.paper.quotes import publish_quotes
        from schemas import subjects

        nc = await nats.connect(args.nats_url, name="tradecopy-quotes")
        replay = PriceReplay(load_bars(), start=args.start_bar, speed=args.speed, loop=True,
                             stamp_wall_clock=True, steps_per_leg=3)  # fmt: skip
        print(f"publishing XAUUSD quotes on {subjects.quotes('XAUUSD')}; Ctrl-C stops", flush=True)
        try:
            sent = await publish_quotes(nc, replay, args.count)
        finally:
            await nc.close()
        print(f"{sent} quotes published")
        return 0

    try:
        return int(run_async(publish()))
    except KeyboardInterrupt:
        return 0


def _cmd_bench_bridge(args: argparse.Namespace) -> int:
    from benchmarks.bridge import main as bridge_main

    forwarded = ["--trades", str(args.trades), "--gap-ms", str(args.gap_ms)]
    if args.json:
        forwarded.append("--json")
    return bridge_main(forwarded)


def _cmd_bridge_run(args: argparse.Namespace) -> int:
    from connectors.service import run_bridge
    from engine.core.errors import TradecopyError
    from engine.runtime.logging import configure_logging

    configure_logging(args.log_level, json=not args.console_logs)
    try:
        run_async(run_bridge(Path(args.config), args.nats_url, args.metrics_port,
                             Path(args.state) if args.state else None))  # fmt: skip
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
        run_async(run_mt5(Path(args.config), args.nats_url, args.metrics_port))
    except TradecopyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tradecopy", description="Event-driven copy trading on NATS JetStream."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    schema = commands.add_parser("schema", help="the wire contract").add_subparsers(
        dest="schema_command", required=True
    )
    export = schema.add_parser("export", help="write JSON Schema for every message")
    export.add_argument("--dir", help="target directory (default: schemas/json)")
    export.add_argument("--check", action="store_true", help="fail if checked-in files are stale")
    export.set_defaults(func=_cmd_schema_export)

    links = commands.add_parser("links", help="copy links").add_subparsers(
        dest="links_command", required=True
    )
    validate = links.add_parser("validate", help="check a link file, report every invalid field")
    validate.add_argument("file")
    validate.set_defaults(func=_cmd_links_validate)
    apply = links.add_parser("apply", help="load links from a TOML file into NATS")
    apply.add_argument("file")
    apply.add_argument("--nats-url", default=DEFAULT_NATS)
    apply.add_argument("--prune", action="store_true", help="delete links not in the file")
    apply.set_defaults(func=_cmd_links_apply)

    resume = links.add_parser("resume", help="resume a link paused by a protection")
    resume.add_argument("link_id")
    resume.add_argument("--nats-url", default=DEFAULT_NATS)
    resume.set_defaults(func=_cmd_links_resume)

    stop = commands.add_parser("stop", help="emergency stop: set or clear")
    stop.add_argument("action", choices=["set", "clear"])
    stop.add_argument("scope", choices=["global", "account", "link"])
    stop.add_argument("target", nargs="?", help="follower account id or link id")
    stop.add_argument("--reason", default="")
    stop.add_argument("--nats-url", default=DEFAULT_NATS)
    stop.set_defaults(func=_cmd_stop)

    replicator = commands.add_parser("replicator", help="the replicator service").add_subparsers(
        dest="replicator_command", required=True
    )
    run = replicator.add_parser("run", help="run one replicator instance (run several to scale)")
    run.add_argument("--nats-url", default=DEFAULT_NATS)
    run.add_argument("--instance", help="instance name in logs and health (default: hostname)")
    run.add_argument("--partitions", type=int, default=16)
    run.add_argument("--ack-wait", type=float, default=5.0, help="failover time, seconds")
    run.add_argument("--metrics-host", default="0.0.0.0")
    run.add_argument("--metrics-port", type=int, default=9464, help="-1 disables /metrics")
    run.add_argument("--memory-storage", action="store_true")
    run.add_argument(
        "--batch-by-connector",
        action="store_true",
        help="one order batch per connector and master event",
    )
    run.add_argument("--log-level", default="info")
    run.add_argument("--console-logs", action="store_true", help="human-readable logs")
    run.set_defaults(func=_cmd_replicator_run)

    nats_cmd = commands.add_parser("nats", help="embedded nats-server").add_subparsers(
        dest="nats_command", required=True
    )
    nats_run = nats_cmd.add_parser("run", help="run nats-server with JetStream from the wheel")
    nats_run.add_argument("--port", type=int, default=4222)
    nats_run.add_argument("--http-port", type=int, default=None)
    nats_run.add_argument("--store-dir")
    nats_run.set_defaults(func=_cmd_nats_run)

    for name, helptext, func in (
        ("bridge", "bridge-EA connector: one ZeroMQ ROUTER for many terminals", _cmd_bridge_run),
        ("mt5", "MetaTrader5-package connector (Windows)", _cmd_mt5_run),
    ):
        group = commands.add_parser(name, help=helptext).add_subparsers(
            dest=f"{name}_command", required=True
        )
        runner = group.add_parser("run", help=f"run the {name} connector until Ctrl-C")
        runner.add_argument("--config", required=True, help="TOML file")
        runner.add_argument("--nats-url", default=DEFAULT_NATS)
        runner.add_argument("--metrics-port", type=int, default=9465, help="-1 disables")
        runner.add_argument("--log-level", default="info")
        runner.add_argument("--console-logs", action="store_true")
        if name == "bridge":
            runner.add_argument("--state", help="state file (mirror, copies, outbox)")
        runner.set_defaults(func=func)

    quotes = commands.add_parser("quotes", help="price sources").add_subparsers(
        dest="quotes_command", required=True
    )
    publish = quotes.add_parser(
        "publish", help="publish the shipped real XAUUSD bars as live quotes on NATS"
    )
    publish.add_argument("--nats-url", default=DEFAULT_NATS)
    publish.add_argument("--speed", type=float, default=60.0, help="bars per minute")
    publish.add_argument("--start-bar", type=int, default=0)
    publish.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    publish.set_defaults(func=_cmd_quotes_publish)

    up = commands.add_parser("up", help="run NATS, replicator and paper accounts until Ctrl-C")
    up.add_argument("--config", help="TOML file (default: the shipped engine/up.toml)")
    up.add_argument("--log-level", default="warning")
    up.set_defaults(func=_cmd_up)

    demo = commands.add_parser(
        "demo", help="copy a scripted master on real XAUUSD prices to paper followers"
    )
    demo.add_argument("--seconds", type=float, default=20.0, help="length of the script")
    demo.add_argument("--followers", type=int, default=7, help="paper followers (min 1)")
    demo.add_argument("--speed", type=float, default=60.0, help="bars per minute of replay")
    demo.add_argument("--json", action="store_true", help="one JSON object on the last line")
    demo.set_defaults(func=_cmd_demo)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    fanout = bench.add_parser("fanout", help="replicator fan-out vs the raw NATS floor")
    fanout.add_argument("--events", type=int, default=200)
    fanout.add_argument("--followers", default="1,100,1000")
    fanout.add_argument("--json", action="store_true")
    fanout.add_argument(
        "--modes", default="per-order,batch", help="per-order and/or batch (one per connector)"
    )
    fanout.set_defaults(func=_cmd_bench_fanout)
    e2e = bench.add_parser("e2e", help="paper master fill → paper follower fill, every hop")
    e2e.add_argument("--trades", type=int, default=200)
    e2e.add_argument("--gaps-ms", default="0,20", help="pauses between trades to measure")
    e2e.add_argument("--json", action="store_true")
    e2e.set_defaults(func=_cmd_bench_e2e)
    bridge = bench.add_parser(
        "bridge", help="paper terminal → bridge connectors → paper terminal, lost/duplicates"
    )
    bridge.add_argument("--trades", type=int, default=200)
    bridge.add_argument("--gap-ms", type=float, default=0.0)
    bridge.add_argument("--json", action="store_true")
    bridge.set_defaults(func=_cmd_bench_bridge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
