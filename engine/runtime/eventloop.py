"""The event loop every tradecopy process runs on: uvloop where it exists (not on Windows)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion on uvloop, or on asyncio's own loop where uvloop is missing."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
