"""One way to connect to NATS: credentials and TLS from the environment, reconnect forever, and
log connection changes in one line each."""

from __future__ import annotations

import ssl
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client

from engine.runtime.natsauth import (
    ENV_CREDS,
    ENV_SEED,
    ENV_USER,
    NatsCredentials,
    NatsCredentialsError,
    tls_context_from_env,
)

log = structlog.get_logger("tradecopy.nats")

_AUTH_FAILED = "authorization violation"


async def connect(
    url: str,
    name: str,
    *,
    credentials: NatsCredentials | None = None,
    tls: ssl.SSLContext | None = None,
    **options: Any,
) -> Any:
    """A nats-py client that keeps reconnecting and logs state changes without tracebacks.

    ``credentials`` default to the environment (``TRADECOPY_NATS_SEED`` or
    ``TRADECOPY_NATS_CREDS`` with ``TRADECOPY_NATS_USER``), ``tls`` to ``TRADECOPY_NATS_TLS_*``;
    with neither the client is anonymous, which only an open server accepts. A server that
    refuses the credentials (or their absence) fails the first connect at once with
    ``NatsCredentialsError`` naming the variables, instead of retrying forever.
    """
    creds = credentials if credentials is not None else NatsCredentials.from_env()
    context = tls if tls is not None else tls_context_from_env()
    client = Client()
    connected = False
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
        nonlocal last_error
        # While the server is away every reconnect attempt fails the same way: say it once.
        if repr(exc) != last_error:
            last_error = repr(exc)
            log.warning("nats_error", client=name, error=last_error)

    async def on_disconnected() -> None:
        if not client.is_closed:  # a close of our own is no news
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
    try:
        await client.connect(url, **settings)
    except BaseException:
        await client.close()
        raise
    connected = True
    return client


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
