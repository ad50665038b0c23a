"""A paper follower connector in a process of its own, for the fault tests to SIGKILL.

    python tests/fault_follower.py NATS_URL STATE_FILE CONNECTOR_ID ACCOUNT [ACCOUNT ...]

It opens (or restores) the follower accounts, prices them with one real XAUUSD quote, serves
their orders until SIGTERM, then stops cleanly. Prints ``ready`` once it consumes.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import msgspec

from connectors.paper.connector import PaperConnector, PaperTerminal
from connectors.paper.prices import bar_to_ticks, load_bars
from engine.runtime.eventloop import run_async
from engine.runtime.logging import configure_logging
from engine.runtime.natsconn import connect

#: Enough money for hundreds of 0.01-lot copies on every account.
BALANCE = 1_000_000.0


def first_quote() -> object:
    quote = next(iter(bar_to_ticks(load_bars()[0], "XAUUSD")))
    return msgspec.structs.replace(quote, ts_ns=time.time_ns())


def open_terminal(state: Path, accounts: list[str]) -> PaperTerminal:
    rows = [(account, "USD", BALANCE, 100, "follower") for account in accounts]
    terminal = PaperTerminal.open(state, rows)
    terminal.on_quote(first_quote())  # type: ignore[arg-type]
    return terminal


async def serve(url: str, state: Path, connector_id: str, accounts: list[str]) -> None:
    terminal = open_terminal(state, accounts)
    nc = await connect(url, f"fault-{connector_id}")
    connector = PaperConnector(nc, connector_id, terminal, None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await connector.start()
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await connector.stop()
        await nc.close()


if __name__ == "__main__":
    url, state_file, connector_id, *follower_accounts = sys.argv[1:]
    configure_logging("warning", json=True)  # stderr: stdout carries only "ready"
    run_async(serve(url, Path(state_file), connector_id, follower_accounts))
