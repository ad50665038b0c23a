"""One way to connect to NATS: credentials and TLS from the environment, reconnect forever, and
log connection changes in one line each; or, for a one-shot command, connect once or fail fast."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client

from engine.core.errors import TradecopyError
from engine.runtime.natsauth import (
    ENV_CREDS,
    ENV_SEED,
    ENV_USER,
    NatsCredentials,
    NatsCredentialsError,
    tls_context_from_env,
)

log = structlog.get_logger("tradecopy.nats")

#: The NATS server of every command that is given no ``--nats-url`` (never a guessed default).
ENV_NATS_URL = "TRADECOPY_NATS_URL"
#: How long a one-shot command waits for a server before it says the server is unreachable.
ONE_SHOT_CONNECT_TIMEOUT_S = 3.0
_ONE_SHOT_ATTEMPTS = 3


class NatsUnreachable(TradecopyError):
    """A one-shot command could not reach NATS (refused, timed out, no route, bad URL)."""


_AUTH_FAILED = "authorization violation"


async def connect(
    url: str,
    name: str,
    *,
    credentials: NatsCredentials | None = None,
    tls: ssl.SSLContext | None = None,
    fail_fast: bool = False,
    **options: Any,
) -> Any:
    """A nats-py client that keeps reconnecting and logs state changes without tracebacks.

    ``credentials`` default to the environment (``TRADECOPY_NATS_SEED`` or
    ``TRADECOPY_NATS_CREDS`` with ``TRADECOPY_NATS_USER``), ``tls`` to ``TRADECOPY_NATS_TLS_*``;
    with neither the client is anonymous, which only an open server accepts. A server that
    refuses the credentials (or their absence) fails the first connect at once with
    ``NatsCredentialsError`` naming the variables, instead of retrying forever.

    ``fail_fast`` (one-shot commands, see ``connect_once``): a few quick attempts, then
    ``NatsUnreachable`` naming the first failure; nothing is logged, and a lost connection is
    not pursued for long.
    """
    creds = credentials if credentials is not None else NatsCredentials.from_env()
    context = tls if tls is not None else tls_context_from_env()
    client = Client()
    connected = False
    failures: list[Exception] = []
    refused_logged = False
    last_error = ""

    async def on_error(exc: Exception) -> None:
        nonlocal refused_logged
        if _AUTH_FAILED in str(exc).lower() or isinstance(exc, nats.errors.AuthorizationError):
            if not connected:
                # Raised inside nats-py's connect loop, this ends it: retrying cannot help.
                raise NatsCredentialsError(_refused(url, creds))
            # A server restarted with other users: it keeps retrying, and says so once.
            if not refused_logged:
                refused_logged = True
                log.error("nats_auth_refused", client=name, hint=_refused(url, creds))
            return
        if fail_fast and not connected:
            failures.append(exc)  # said once, by the caller, if no attempt succeeds
            return
        nonlocal last_error
        # While the server is away every reconnect attempt fails the same way: say it once.
        if repr(exc) != last_error:
            last_error = repr(exc)
            log.warning("nats_error", client=name, error=last_error)

    async def on_disconnected() -> None:
        if not client.is_closed and not fail_fast:  # a close of our own is no news
            log.warning("nats_disconnected", client=name)

    async def on_reconnected() -> None:
        nonlocal refused_logged, last_error
        refused_logged, last_error = False, ""
        log.info("nats_reconnected", client=name)

    settings: dict[str, Any] = {
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
    }
    if creds is not None:
        settings.update(creds.connect_options())
    if context is not None:
        settings["tls"] = context
    settings.update(options)
    if fail_fast:
        # A few quick attempts, never a loop: a server that is starting up or refuses the
        # credentials after a reset still gets its word in, a dead port fails at once.
        settings.update(max_reconnect_attempts=_ONE_SHOT_ATTEMPTS - 1, reconnect_time_wait=0.1)
    try:
        await client.connect(url, **settings)
    except (TradecopyError, asyncio.CancelledError, KeyboardInterrupt):
        await client.close()
        raise
    except BaseException as exc:
        await client.close()
        if fail_fast:
            raise NatsUnreachable(_unreachable(url, failures[0] if failures else exc)) from None
        raise
    connected = True
    return client


async def connect_once(
    url: str, name: str, *, timeout: float = ONE_SHOT_CONNECT_TIMEOUT_S, **options: Any
) -> Any:
    """A one-shot command's client: ``NatsUnreachable`` within ``timeout`` (+1) seconds when the
    server is away (no retry loop, no log lines), and no lasting reconnect later: a command
    that loses its server fails instead of hanging."""
    try:
        return await asyncio.wait_for(
            connect(url, name, fail_fast=True, connect_timeout=timeout, **options),
            timeout + 1.0,
        )
    except TimeoutError:
        raise NatsUnreachable(
            f"cannot reach NATS at {url}: no answer within {timeout:g} s"
        ) from None


def _unreachable(url: str, exc: BaseException) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or repr(exc))
    if isinstance(exc, ConnectionRefusedError):
        reason = "connection refused (is a nats-server running there?)"
    elif isinstance(exc, TimeoutError | asyncio.TimeoutError):
        reason = "no answer in time"
    return f"cannot reach NATS at {url}: {reason}"


def _refused(url: str, creds: NatsCredentials | None) -> str:
    if creds is None:
        return (
            f"NATS at {url} refused an anonymous client: set ${ENV_SEED} (an nkey seed) or "
            f"${ENV_CREDS} (a seed or .creds file), and ${ENV_USER}"
        )
    source = f"${ENV_SEED}" if creds.seed is not None else f"${ENV_CREDS} ({creds.file})"
    return (
        f"NATS at {url} refused user {creds.user!r} (${ENV_USER}) with the key from {source}: "
        f"is its public key in the server's config?"
    )
