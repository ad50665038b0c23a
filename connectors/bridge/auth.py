"""Who may talk to a bridge connector, and how much a stranger may make it write.

The connector's ROUTER is a CURVE server: ``TerminalAuthenticator`` answers libzmq's ZAP
requests (RFC 27) and admits a handshake only with a public key configured for one of its
terminals, naming that terminal's account as the connection's User-Id. ``LogLimiter`` bounds the
log lines that refused or broken peers can cause; metrics still count every frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
import zmq
import zmq.asyncio
import zmq.utils.z85

log = structlog.get_logger("tradecopy.bridge")

#: The ZAP endpoint libzmq asks about every CURVE handshake (RFC 27), one per context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: Handshakes that failed before ZAP was asked: a client without CURVE, or with another
#: server key. (An unlisted key is ZAP's refusal, counted there.)
HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
#: Log lines per reason (and account) per window before they are only counted.
LOG_BURST = 5
LOG_WINDOW_S = 10.0
#: Text from a peer in a log line or an error frame is cut to this many characters.
TEXT_MAX = 200
#: Bytes of an unreadable frame shown in its log line.
PREFIX_MAX = 32


class LogLimiter:
    """At most ``limit`` lines per ``window_s`` for each key, then one summary line per window
    saying how many similar lines were held back; callers count every occurrence in metrics.

    A key is a reason, or a reason and a configured account (the session's, or the account a
    CURVE key belongs to), never anything a peer chooses: a peer that picks a fresh identity
    per frame would otherwise make a fresh budget per frame. So there are at most
    reasons × (accounts + 1) keys.
    """

    def __init__(
        self,
        logger: Any,
        limit: int = LOG_BURST,
        window_s: float = LOG_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window_s = limit, window_s
        self._log, self._clock = logger, clock
        self._windows: dict[tuple[str, str], list[float]] = {}
        """Key → [window start, lines logged, lines held back]."""

    def allow(self, reason: str, account: str = "") -> bool:
        """Whether this line may be written; False counts it as held back."""
        now = self._clock()
        key = (reason, account)
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window_s:
            if window is not None:
                self._summarise(key, window)
            window = self._windows[key] = [now, 0, 0]
        if window[1] < self.limit:
            window[1] += 1
            return True
        window[2] += 1
        return False

    def flush(self, *, closing: bool = False) -> None:
        """Summarise the windows that have closed (every one when ``closing``)."""
        now = self._clock()
        for key, window in list(self._windows.items()):
            if closing or now - window[0] >= self.window_s:
                self._summarise(key, window)
                del self._windows[key]

    def _summarise(self, key: tuple[str, str], window: list[float]) -> None:
        if window[2]:
            self._log.warning("bridge_log_suppressed", reason=key[0], account=key[1] or None,
                              suppressed=int(window[2]), window_s=self.window_s)  # fmt: skip


class TerminalAuthenticator:
    """The connector's ZAP handler (ZeroMQ RFC 27) on its own context: a CURVE client gets
    through the handshake only with a public key configured for one of this connector's
    terminals, and that terminal's account becomes the connection's User-Id.

    A ROUTER, not a REP socket: a reply that fails can never wedge a send/receive state machine
    (libzmq would then hold every later handshake forever)."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        accounts_by_key: Mapping[bytes, str],
        refused: Callable[[str, str], None],
    ) -> None:
        self._context = context
        self._accounts = dict(accounts_by_key)
        self._refused = refused
        self._sock: Any = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Bind before the ROUTER listens: a CURVE server with no ZAP handler admits any key."""
        self._sock = self._context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    async def _serve(self) -> None:
        while True:
            try:
                parts = await self._sock.recv_multipart()
            except zmq.ContextTerminated:
                return
            try:
                reply = self.answer(parts)
            except Exception as exc:  # the handler must outlive any request: fail this one only
                log.error("bridge_zap_failed", error=short_text(repr(exc)))
                reply = _zap_refusal(parts, b"500", b"internal error")
            if reply is not None:
                with contextlib.suppress(zmq.ZMQError):
                    await self._sock.send_multipart(reply)

    def answer(self, parts: list[bytes]) -> list[bytes] | None:
        """The reply to one ZAP request (ROUTER envelope included); None for garbage."""
        if b"" not in parts:
            return None
        split = parts.index(b"") + 1
        envelope, request = parts[:split], parts[split:]
        if len(request) < 6:
            return None
        version, request_id, _domain, address, _identity, mechanism, *credentials = request
        if version != b"1.0":
            return [*envelope, b"1.0", request_id, b"500", b"ZAP version 1.0 only", b"", b""]
        key = credentials[0] if mechanism == b"CURVE" and len(credentials) == 1 else b""
        account = self._accounts.get(key) if len(key) == 32 else None
        if account is None:
            shown = zmq.utils.z85.encode(key).decode() if len(key) == 32 else mechanism.decode(
                "ascii", "replace")  # fmt: skip
            self._refused(address.decode("ascii", "replace")[:64], shown[:64])
            return [*envelope, b"1.0", request_id, b"400", b"unknown key", b"", b""]
        return [*envelope, b"1.0", request_id, b"200", b"OK", account.encode(), b""]


def _zap_refusal(parts: list[bytes], status: bytes, text: bytes) -> list[bytes] | None:
    """A refusal for a ZAP request that could not be answered otherwise (None if unreadable)."""
    if b"" not in parts or len(parts) < parts.index(b"") + 3:
        return None
    split = parts.index(b"") + 1
    return [*parts[:split], b"1.0", parts[split + 1], status, text, b"", b""]


def short_text(text: str) -> str:
    return text if len(text) <= TEXT_MAX else f"{text[:TEXT_MAX]}… ({len(text)} characters)"


def peer_text(raw: bytes) -> str:
    """Peer-chosen bytes as printable text (escapes kept), for a log line."""
    return raw.decode("utf-8", "backslashreplace")[:TEXT_MAX]
