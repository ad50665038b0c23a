"""The embedded PostgreSQL (a real server from the wheel) and the migration runner."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import asyncpg
import pytest

from engine.ledger.store import migrate
from engine.runtime.postgres import (
    ENV_DATABASE_URL,
    SERVER_SETTINGS,
    EmbeddedPostgres,
    MigrationError,
    apply_migrations,
    configured_database_url,
    load_migrations,
    start_database,
)


async def test_embedded_postgres_serves_queries_and_keeps_its_data_across_restarts(
    tmp_path: Path,
) -> None:
    root = tmp_path / "state" / "postgres"
    server = EmbeddedPostgres(root=root)
    await server.start()
    try:
        conn = await asyncpg.connect(server.url)
        try:
            await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
        finally:
            await conn.close()
    finally:
        await server.stop()
    assert not server.running
    again = EmbeddedPostgres(root=root)
    await again.start()
    try:
        conn = await asyncpg.connect(again.url)
        try:
            assert await conn.fetchval("SELECT x FROM kept") == 42
        finally:
            await conn.close()
    finally:
        await again.stop()


async def test_embedded_postgres_creates_wal_without_zero_filling_and_keeps_every_commit_durable(
    tmp_path: Path,
) -> None:
    server = EmbeddedPostgres(root=tmp_path / "postgres")
    await server.start()
    try:
        conn = await asyncpg.connect(server.url)
        try:
            settings = {
                name: await conn.fetchval(f"SHOW {name}")
                for name in ("wal_init_zero", "min_wal_size", "max_wal_size", "fsync",
                             "synchronous_commit", "full_page_writes")
            }  # fmt: skip
        finally:
            await conn.close()
    finally:
        await server.stop()
    assert settings == {
        "wal_init_zero": "off", "min_wal_size": "256MB", "max_wal_size": "2GB",
        # Durability is not traded for speed: every commit waits for its WAL flush.
        "fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
    }  # fmt: skip
    assert {k: settings[k] for k in SERVER_SETTINGS} == SERVER_SETTINGS


@pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged-user path runs only as root")
async def test_embedded_postgres_as_root_runs_unprivileged_and_changes_no_parent_directory(
    tmp_path: Path,
) -> None:
    import pwd

    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # like /root: the server's user may not walk through it
    before = {p: p.stat().st_mode for p in (tmp_path, private)}
    server = EmbeddedPostgres(root=private / "postgres")
    await server.start()
    try:
        conn = await asyncpg.connect(server.url)
        try:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            backend_uid = os.stat(f"/proc/{pid}").st_uid  # while the backend serves us
        finally:
            await conn.close()
        assert pwd.getpwuid(backend_uid).pw_name == "nobody"
        assert server.data_dir.stat().st_uid == backend_uid
        assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    finally:
        await server.stop()
    assert {p: p.stat().st_mode for p in before} == before
    assert (private / "postgres").stat().st_uid == 0
    assert stat.S_IMODE((private / "postgres" / "password").stat().st_mode) == 0o600


async def test_embedded_postgres_refuses_connections_without_its_password(tmp_path: Path) -> None:
    server = EmbeddedPostgres(root=tmp_path / "postgres")
    await server.start()
    try:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(f"postgresql://postgres:wrong@127.0.0.1:{server.port}/postgres")
    finally:
        await server.stop()


async def test_a_server_left_running_on_the_data_directory_is_adopted_not_fought(
    tmp_path: Path,
) -> None:
    first = EmbeddedPostgres(root=tmp_path / "postgres")
    await first.start()
    try:
        second = EmbeddedPostgres(root=tmp_path / "postgres")
        await second.start()
        assert second.adopted and second.port == first.port
        conn = await asyncpg.connect(second.url)
        await conn.close()
        await second.stop()  # leaves the server it did not start running
        conn = await asyncpg.connect(first.url)
        await conn.close()
    finally:
        await first.stop()


async def test_an_explicit_url_wins_over_the_environment_and_starts_no_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_DATABASE_URL, "postgresql://env/db")
    assert configured_database_url("postgresql://flag/db") == "postgresql://flag/db"
    assert configured_database_url() == "postgresql://env/db"
    url, server = await start_database(root=tmp_path / "never")
    assert (url, server) == ("postgresql://env/db", None)
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------ migrations


def write_migrations(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


FIRST = {"0001_accounts.sql": "CREATE TABLE accounts (id text PRIMARY KEY);"}
SECOND = {"0002_balance.sql": "ALTER TABLE accounts ADD COLUMN balance bigint;"}


async def columns(database_url: str, table: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1"
            " ORDER BY ordinal_position",
            table,
        )
        return [row[0] for row in rows]
    finally:
        await conn.close()


async def test_an_empty_database_gets_every_ledger_migration_and_a_second_run_is_a_no_op(
    database_url: str,
) -> None:
    assert await migrate(database_url) == ["0001_ledger", "0002_read_views"]
    assert "payload" in await columns(database_url, "ledger_follower_orders")
    assert await migrate(database_url) == []


async def test_a_database_at_an_earlier_version_migrates_forward(
    database_url: str, tmp_path: Path
) -> None:
    directory = write_migrations(tmp_path / "m", FIRST)
    assert await apply_migrations(database_url, load_migrations(directory), component="t") == [
        "0001_accounts"
    ]
    write_migrations(directory, SECOND)
    applied = await apply_migrations(database_url, load_migrations(directory), component="t")
    assert applied == ["0002_balance"]
    assert await columns(database_url, "accounts") == ["id", "balance"]


async def test_concurrent_runners_apply_each_migration_once(
    database_url: str, tmp_path: Path
) -> None:
    # Neither migration could run twice: CREATE TABLE and ADD COLUMN fail on a second run.
    migrations = load_migrations(write_migrations(tmp_path / "m", {**FIRST, **SECOND}))
    results = await asyncio.gather(
        *(apply_migrations(database_url, migrations, component="t") for _ in range(4))
    )
    assert sorted(v for result in results for v in result) == ["0001_accounts", "0002_balance"]
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM tradecopy_migrations") == 2
    finally:
        await conn.close()


async def test_a_changed_applied_migration_is_refused(database_url: str, tmp_path: Path) -> None:
    directory = write_migrations(tmp_path / "m", FIRST)
    await apply_migrations(database_url, load_migrations(directory), component="t")
    write_migrations(directory, {"0001_accounts.sql": "CREATE TABLE accounts (id bigint);"})
    with pytest.raises(MigrationError, match="0001_accounts was changed"):
        await apply_migrations(database_url, load_migrations(directory), component="t")


async def test_a_missing_migration_older_than_the_newest_applied_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    directory = write_migrations(
        tmp_path / "m", {**FIRST, "0003_late.sql": "CREATE TABLE late (x int);"}
    )
    await apply_migrations(database_url, load_migrations(directory), component="t")
    write_migrations(directory, SECOND)
    with pytest.raises(MigrationError, match="older than the applied 0003_late"):
        await apply_migrations(database_url, load_migrations(directory), component="t")


async def test_a_failing_migration_leaves_nothing_of_itself_behind(
    database_url: str, tmp_path: Path
) -> None:
    directory = write_migrations(
        tmp_path / "m",
        {**FIRST, "0002_broken.sql": "CREATE TABLE half (x int); SELECT * FROM missing;"},
    )
    with pytest.raises(asyncpg.UndefinedTableError):
        await apply_migrations(database_url, load_migrations(directory), component="t")
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('half')") is None
        versions = await conn.fetch("SELECT version FROM tradecopy_migrations")
        assert [row[0] for row in versions] == ["0001_accounts"]
    finally:
        await conn.close()


def test_misnamed_or_doubly_numbered_migration_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="NNNN_lower_case_name"):
        load_migrations(write_migrations(tmp_path / "a", {"1_x.sql": "SELECT 1;"}))
    with pytest.raises(MigrationError, match="share a number"):
        load_migrations(
            write_migrations(tmp_path / "b", {"0001_a.sql": "SELECT 1;", "0001_b.sql": ""})
        )


def test_a_folder_without_migrations_is_a_broken_install_not_an_empty_history(
    tmp_path: Path,
) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(MigrationError, match="no migrations in"):
        load_migrations(tmp_path / "m")


def test_every_services_migrations_and_contract_files_ship_in_the_package() -> None:
    """`pip install .` (not editable) copies only package data: each service's migrations and
    the API's OpenAPI document must be declared, or an installed `demo` finds no tables."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    for folder in sorted((root / "engine").glob("*/migrations")):
        package = f"engine.{folder.parent.name}"
        assert "migrations/*.sql" in declared.get(package, []), package
    assert "openapi.json" in declared.get("engine.api", [])
