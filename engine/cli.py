"""The ``tradecopy`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.runtime.eventloop import run_async
from engine.runtime.files import write_new_secret

DEFAULT_NATS = "nats://127.0.0.1:4222"
#: Ops endpoints (/metrics, /healthz) are for this machine unless told otherwise.
DEFAULT_METRICS_HOST = "127.0.0.1"
SYNC_HELP = (
    "JetStream fsync settings to measure, comma-separated: default (the server's 2 min), "
    "always (every write before its ack), or a duration such as 1s"
)


async def _operator_connect(url: str, name: str = "tradecopy-cli") -> Any:
    """A one-shot command's connection: credentials from the environment, no endless retry."""
    from engine.runtime.natsconn import connect

    return await connect(url, name, allow_reconnect=False, connect_timeout=5)


def _run_operator(work: Any) -> int:
    """Run a command's NATS work; a refused or missing credential is a clear error, exit 2."""
    from engine.core.errors import TradecopyError

    try:
        run_async(work)
    except TradecopyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


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
        from engine.runtime.jetstream import ensure_buckets
        from engine.runtime.links import apply_links
        from schemas import subjects

        nc = await _operator_connect(args.nats_url)
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

    return _run_operator(apply())


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
        from engine.runtime.jetstream import ensure_buckets

        nc = await _operator_connect(args.nats_url)
        try:
            buckets = await ensure_buckets(nc.jetstream())
            await buckets[subjects.KV_CONTROL].put(stop.key, codec.encode(stop))
        finally:
            await nc.close()

    if _run_operator(write()):
        return 2
    state = "ACTIVE" if stop.active else "cleared"
    print(f"emergency stop {stop.key}: {state}")
    return 0


def _cmd_links_resume(args: argparse.Namespace) -> int:
    async def resume() -> bool:
        from engine.replicator.control import resume_link
        from engine.runtime.jetstream import ensure_buckets
        from schemas import subjects

        nc = await _operator_connect(args.nats_url)
        try:
            buckets = await ensure_buckets(nc.jetstream())
            return await resume_link(buckets[subjects.KV_LINK_STATE], args.link_id)
        finally:
            await nc.close()

    resumed: list[bool] = []

    async def run() -> None:
        resumed.append(await resume())

    if _run_operator(run()):
        return 2
    print(f"link {args.link_id}: {'resumed' if resumed[0] else 'not paused'}")
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
    if args.replicas is not None:
        from engine.runtime.jetstream import ENV_REPLICAS, check_replicas

        # ensure_streams/ensure_buckets read it for whatever this instance creates.
        os.environ[ENV_REPLICAS] = str(check_replicas(args.replicas))
    run_async(run_replicator(ReplicatorConfig(**options)))
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

    async def bootstrap() -> None:
        from engine.runtime.jetstream import ensure_buckets, ensure_streams

        nc = await _operator_connect(args.nats_url, "tradecopy-bootstrap")
        try:
            js = nc.jetstream()
            await ensure_streams(js, args.partitions, replicas=args.replicas)
            await ensure_buckets(js, replicas=args.replicas)
        finally:
            await nc.close()

    if _run_operator(bootstrap()):
        return 2
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
    forwarded += ["--modes", args.modes, "--sync", args.sync]
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

    forwarded = ["--trades", str(args.trades), "--gaps-ms", args.gaps_ms, "--sync", args.sync]
    if args.json:
        forwarded.append("--json")
    return e2e_main(forwarded)


def _cmd_quotes_publish(args: argparse.Namespace) -> int:
    async def publish() -> int:
        from connectors.paper.prices import PriceReplay, load_bars
        from connectors.paper.quotes import publish_quotes
        from engine.runtime.natsconn import connect
        from schemas import subjects

        # The quotes user may publish quotes and nothing else.
        nc = await connect(args.nats_url, "tradecopy-quotes")
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
        run_async(run_bridge(Path(args.config), args.nats_url, args.metrics_port,
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
        run_async(run_mt5(Path(args.config), args.nats_url, args.metrics_port, args.metrics_host))
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
    run.add_argument(
        "--metrics-host", default=DEFAULT_METRICS_HOST, help="0.0.0.0 to serve other machines"
    )
    run.add_argument("--metrics-port", type=int, default=9464, help="-1 disables /metrics")
    run.add_argument(
        "--replicas", type=int, default=None,
        help="replicas of the streams and buckets this instance creates "
        "(default: $TRADECOPY_NATS_REPLICAS or 1)",
    )  # fmt: skip
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
    nats_run.add_argument("--host", default="127.0.0.1")
    nats_run.add_argument("--port", type=int, default=4222)
    nats_run.add_argument("--http-port", type=int, default=None)
    nats_run.add_argument("--store-dir")
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
    boot.add_argument("--nats-url", default=DEFAULT_NATS)
    boot.add_argument("--partitions", type=int, default=16)
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
    pub.add_argument("--seed-file", required=True)
    pub.set_defaults(func=_cmd_nats_public_key)

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
        runner.add_argument(
            "--metrics-host", default=DEFAULT_METRICS_HOST, help="0.0.0.0 to serve other machines"
        )
        runner.add_argument("--log-level", default="info")
        runner.add_argument("--console-logs", action="store_true")
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
            keys.add_argument("--json", action="store_true", help="one JSON object")
            keys.set_defaults(func=_cmd_bridge_keys)

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
    fanout.add_argument("--sync", default="default", help=SYNC_HELP)
    fanout.set_defaults(func=_cmd_bench_fanout)
    e2e = bench.add_parser("e2e", help="paper master fill → paper follower fill, every hop")
    e2e.add_argument("--trades", type=int, default=200)
    e2e.add_argument("--gaps-ms", default="0,20", help="pauses between trades to measure")
    e2e.add_argument("--json", action="store_true")
    e2e.add_argument("--sync", default="default", help=SYNC_HELP)
    e2e.set_defaults(func=_cmd_bench_e2e)
    bridge = bench.add_parser(
        "bridge", help="paper terminal → bridge connectors → paper terminal, lost/duplicates"
    )
    bridge.add_argument("--trades", type=int, default=200)
    bridge.add_argument("--gap-ms", type=float, default=0.0)
    bridge.add_argument(
        "--plaintext", action="store_true", help="without CURVE (default: encrypted, as deployed)"
    )
    bridge.add_argument("--json", action="store_true")
    bridge.set_defaults(func=_cmd_bench_bridge)
    state = bench.add_parser(
        "state", help="connector order memory: time per order, first vs last 10 %% of a long run"
    )
    state.add_argument("--orders", type=int, default=100_000)
    state.add_argument("--batch", type=int, default=10, help="orders per commit")
    state.add_argument(
        "--fsync", action=argparse.BooleanOptionalAction, default=True,
        help="fsync every commit (the connectors' default)",
    )  # fmt: skip
    state.add_argument("--json", action="store_true")
    state.set_defaults(func=_cmd_bench_state)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
