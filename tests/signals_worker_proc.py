"""A strategy worker in its own process for the tests: ``python signals_worker_proc.py CONFIG``.

Prints ``ready`` on stdout once it takes quotes; logs JSON lines on stderr; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from engine.runtime.logging import configure_logging
from engine.signals.config import load_config
from engine.signals.worker import run_worker


async def main(path: str) -> None:
    config = load_config(path)
    stop, started = asyncio.Event(), asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.create_task(run_worker(config, stop, started))
    ready = asyncio.create_task(started.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if started.is_set():
        print("ready", flush=True)
    await task  # raises what stopped the worker before it was ready


if __name__ == "__main__":
    configure_logging("info", json=True)
    asyncio.run(main(sys.argv[1]))
