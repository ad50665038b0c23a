"""``python -m engine.ledger``: run one ledger instance (``tradecopy ledger run`` does the same).

python -m engine.ledger --nats-url URL [--database-url URL] [--instance NAME]
    [--metrics-port N|-1] [--ack-wait S] [--batch-max N] [--writers N] [--migrate]
        [--log-level L]
"""

from __future__ import annotations

import argparse
import socket

from engine.ledger.config import LedgerConfig
from engine.ledger.service import run_ledger
from engine.runtime.eventloop import run_async
from engine.runtime.logging import configure_logging


def parse_config(argv: list[str] | None = None) -> tuple[LedgerConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description="run one ledger instance")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument(
        "--database-url",
        default=None,
        help="default: TRADECOPY_DATABASE_URL, else embedded PostgreSQL",
    )
    parser.add_argument("--instance", default=socket.gethostname())
    parser.add_argument("--metrics-port", type=int, default=9465, help="-1: no ops server")
    parser.add_argument("--ack-wait", type=float, default=30.0)
    parser.add_argument("--batch-max", type=int, default=1_000)
    parser.add_argument("--writers", type=int, default=2, help="batches in flight at once")
    parser.add_argument("--default-tenant", default="default")
    parser.add_argument("--migrate", action="store_true", help="apply migrations first")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--console-logs", action="store_true")
    args = parser.parse_args(argv)  # fmt: skip
    config = LedgerConfig(
        nats_url=args.nats_url,
        database_url=args.database_url,
        instance=args.instance,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        ack_wait_s=args.ack_wait,
        batch_max=args.batch_max,
        writers=args.writers,
        default_tenant=args.default_tenant,
        migrate=args.migrate,
    )
    return config, args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(argv)
    configure_logging(args.log_level, json=not args.console_logs)
    run_async(run_ledger(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
