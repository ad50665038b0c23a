"""The connectors' order journal (connectors/journal.py): replay after a crash at any point of
an append or a compaction, pruning by age and by count, compaction keeping exactly what is
unexpired, state and records committed together, and old state files upgraded on open."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from prometheus_client import REGISTRY

from connectors import journal as journal_module
from connectors.journal import (
    MAGIC,
    ORDER_RETENTION_S,
    Batch,
    OrderJournal,
    OrderJournalError,
    OrderMemoryConfig,
    read_frames,
    write_snapshot,
)
from schemas.streams import follower_orders_stream

S = 1_000_000_000
T0 = 1_700_000_000 * S


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * S)


def journal(path: Path | None, clock: Clock, **config: object) -> OrderJournal:
    return OrderJournal(path, OrderMemoryConfig(**config), clock=clock)  # type: ignore[arg-type]


def report(i: int) -> bytes:
    return f"report-{i}".encode()


def journal_file(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def snapshot_records(path: Path) -> dict[str, bytes]:
    """What the snapshot file itself holds, read without the journal."""
    frames, end = read_frames(path.read_bytes())
    assert end == path.stat().st_size
    held: dict[str, bytes] = {}
    for payload in frames[1:]:
        for record in msgspec.msgpack.decode(payload, type=Batch).orders:
            held[record.order_id] = record.report
    return held


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- durability and replay ------------------------------------------------------------------


def test_committed_records_and_state_come_back_on_open(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "orders.state"
    first = journal(path, clock)
    first.record("o-1", report(1))
    assert first["o-1"] == report(1)  # seen before the commit: a redelivery in the same batch
    first.commit(b"state-1")
    first.record("o-2", report(2))
    first.commit(b"state-2")
    first.close()

    again = journal(path, clock)
    assert dict(again) == {"o-1": report(1), "o-2": report(2)}
    assert again.state == b"state-2"


def test_a_torn_last_frame_is_ignored_and_everything_before_it_kept(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "orders.state"
    before = sample("tradecopy_connector_order_journal_torn_total", {"memory": path.name})
    writer = journal(path, clock)
    for i in range(3):
        writer.record(f"o-{i}", report(i))
        writer.commit(f"state-{i}".encode())
    size_before_last = journal_file(path).stat().st_size
    writer.record("o-3", report(3))
    writer.commit(b"state-3")
    writer.close()
    # The process died in the middle of the last append: only part of its frame reached disk.
    with open(journal_file(path), "r+b") as handle:
        handle.truncate(size_before_last + 11)

    reopened = journal(path, clock)
    assert dict(reopened) == {f"o-{i}": report(i) for i in range(3)}
    assert reopened.state == b"state-2"  # the state of the lost commit went with its records
    assert journal_file(path).stat().st_size == size_before_last  # the torn tail is cut off
    assert sample("tradecopy_connector_order_journal_torn_total", {"memory": path.name}) == (
        before + 1
    )
    # Appends after the cut are readable: nothing valid hides behind garbage.
    reopened.record("o-4", report(4))
    reopened.commit()
    reopened.close()
    assert set(journal(path, clock)) == {"o-0", "o-1", "o-2", "o-4"}


def test_a_last_frame_with_a_bad_checksum_is_dropped(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "orders.state"
    writer = journal(path, clock)
    writer.record("o-1", report(1))
    writer.commit()
    writer.record("o-2", report(2))
    writer.commit()
    writer.close()
    data = bytearray(journal_file(path).read_bytes())
    # Power loss garbled the last block: still valid msgpack, but not what was written.
    data[data.rindex(report(2)) + 7] = ord("X")
    journal_file(path).write_bytes(bytes(data))
    assert dict(journal(path, clock)) == {"o-1": report(1)}


def test_a_crash_after_the_snapshot_before_the_journal_reset_replays_no_stale_frame(
    tmp_path: Path,
) -> None:
    clock = Clock()
    path = tmp_path / "orders.state"
    writer = journal(path, clock)
    writer.record("a", report(1))
    writer.commit(b"state-1")
    old_journal = journal_file(path).read_bytes()
    writer.record("b", report(2))
    writer.commit(b"state-2")
    writer.compact()
    writer.close()
    # The crash came between the new snapshot's rename and the journal's reset: the journal
    # on disk is one the snapshot already holds (here, as it was before its last frame).
    journal_file(path).write_bytes(old_journal)

    reopened = journal(path, clock)
    assert reopened.state == b"state-2"  # not set back by the stale journal's older state
    assert dict(reopened) == {"a": report(1), "b": report(2)}
    reopened.record("c", report(3))
    reopened.commit()
    reopened.close()
    assert dict(journal(path, clock)) == {"a": report(1), "b": report(2), "c": report(3)}


def test_a_damaged_snapshot_is_refused_not_forgotten(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "orders.state"
    writer = journal(path, clock)
    writer.record("o-1", report(1))
    writer.commit()
    writer.compact()
    writer.close()
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(OrderJournalError, match="damaged"):
        journal(path, clock)


def test_commit_fsyncs_only_when_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(journal_module.os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    clock = Clock()
    durable = journal(tmp_path / "a.state", clock)
    synced.clear()
    durable.record("o-1", report(1))
    durable.commit(durable=False)  # e.g. a master event's save: survives a process crash
    assert synced == []
    durable.commit()  # the order commit syncs whatever was appended before it too
    assert len(synced) == 1
    durable.commit()  # nothing new: nothing to sync
    assert len(synced) == 1
    relaxed = journal(tmp_path / "b.state", clock, durable=False)
    synced.clear()
    relaxed.record("o-1", report(1))
    relaxed.commit()
    assert synced == []


# --- pruning --------------------------------------------------------------------------------


def test_the_default_retention_is_the_follower_orders_streams_max_age() -> None:
    assert follower_orders_stream().max_age == ORDER_RETENTION_S
    assert OrderMemoryConfig().retention_s == ORDER_RETENTION_S
    assert ORDER_RETENTION_S >= 7 * 86_400


@pytest.mark.parametrize("persistent", [True, False])
def test_an_order_is_forgotten_only_after_its_retention_since_it_last_came(
    tmp_path: Path, persistent: bool
) -> None:
    clock = Clock()
    memory = journal(tmp_path / "o.state" if persistent else None, clock, retention_s=100.0)
    memory.record("a", report(1))
    memory.record("b", report(2))
    memory.commit()
    clock.advance(60)
    assert memory.recall("a") == report(1)  # redelivered: its memory starts over
    memory.commit()
    clock.advance(60)  # b is 120 s old, a was seen 60 s ago
    memory.commit()
    assert dict(memory) == {"a": report(1)}
    clock.advance(41)
    memory.commit()
    assert dict(memory) == {}


def test_the_count_cap_evicts_the_oldest_and_says_so_when_they_were_still_young(
    tmp_path: Path,
) -> None:
    clock = Clock()
    path = tmp_path / "capped.state"
    labels = {"memory": path.name}
    before = sample("tradecopy_connector_order_memory_evicted_total", labels)
    memory = journal(path, clock, max_orders=3)
    with structlog.testing.capture_logs() as logs:
        for i in range(5):
            memory.record(f"o-{i}", report(i))
            clock.advance(1)
        memory.commit()
    assert list(memory) == ["o-2", "o-3", "o-4"]
    assert sample("tradecopy_connector_order_memory_evicted_total", labels) == before + 2
    [line] = [e for e in logs if e["event"] == "order_memory_cap_evicted"]
    assert (line["log_level"], line["evicted"], line["max_orders"]) == ("warning", 2, 3)
    assert sample("tradecopy_connector_order_memory_orders", labels) == 3
    memory.close()
    assert list(journal(path, clock, max_orders=3)) == ["o-2", "o-3", "o-4"]


def test_ids_past_their_retention_are_pruned_silently(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "aged.state"
    before = sample("tradecopy_connector_order_memory_evicted_total", {"memory": path.name})
    memory = journal(path, clock, retention_s=10.0, max_orders=3)
    for i in range(5):
        memory.record(f"o-{i}", report(i))
        clock.advance(11)
        memory.commit()
    assert list(memory) == []
    assert sample("tradecopy_connector_order_memory_evicted_total", {"memory": path.name}) == (
        before
    )


# --- compaction -----------------------------------------------------------------------------


def test_compaction_keeps_exactly_the_unexpired_records(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "orders.state"
    memory = journal(path, clock, retention_s=100.0)
    for i in range(10):
        memory.record(f"o-{i}", report(i))
        memory.commit(b"state")
        clock.advance(20)
    memory.record("o-3", report(33))  # made again: the newer outcome is the one kept
    memory.commit(b"state-final")
    # Now o-0..o-4 were last written 100 s ago or more, o-3 just now.
    memory.compact()
    unexpired = {"o-3": report(33), **{f"o-{i}": report(i) for i in range(5, 10)}}
    assert dict(memory) == unexpired
    assert snapshot_records(path) == unexpired
    assert read_frames(journal_file(path).read_bytes())[0][1:] == []  # the journal is empty
    memory.close()
    reopened = journal(path, clock, retention_s=100.0)
    assert dict(reopened) == unexpired
    assert reopened.state == b"state-final"


def test_compaction_starts_when_the_journal_outgrows_its_thresholds_and_the_snapshot(
    tmp_path: Path,
) -> None:
    clock = Clock()
    path = tmp_path / "orders.state"
    memory = journal(path, clock, compact_records=4, compact_bytes=1 << 30)
    generations = []
    for i in range(40):
        memory.record(f"o-{i}", report(i))
        memory.commit()
        memory.await_compaction()
        generations.append(memory.stats().generation)
    # Compacted after 4 records, then each time the journal held as many records as the
    # memory: every compaction follows at least as many appends as it rewrites.
    assert generations[3] == 1 and generations[2] == 0
    assert memory.stats().generation == 4
    assert memory.stats().journal_records < 40
    memory.close()
    assert len(journal(path, clock)) == 40

    by_bytes = journal(tmp_path / "b.state", clock, compact_records=10**9, compact_bytes=256)
    for i in range(20):
        by_bytes.record(f"o-{i}", report(i) * 10)
        by_bytes.commit()
        by_bytes.await_compaction()
    assert by_bytes.stats().generation >= 2


def test_clear_forgets_every_order_on_disk_too(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "orders.state"
    memory = journal(path, clock)
    memory.record("o-1", report(1))
    memory.commit(b"state")
    memory.clear()
    memory.close()
    reopened = journal(path, clock)
    assert len(reopened) == 0 and reopened.state == b"state"


# --- old state files ------------------------------------------------------------------------


def test_an_old_state_file_is_upgraded_on_open(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "legacy.state"
    path.write_bytes(b"\x81\xa1k\xa1v")  # what whole-file msgpack state used to look like
    seen: list[bytes] = []

    def upgrade(data: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
        seen.append(data)
        return b"new-state", [("o-1", report(1)), ("o-2", report(2))]

    upgraded = OrderJournal(path, OrderMemoryConfig(retention_s=100.0), legacy=upgrade,
                            clock=clock)  # fmt: skip
    assert seen == [b"\x81\xa1k\xa1v"]
    assert dict(upgraded) == {"o-1": report(1), "o-2": report(2)}
    assert path.read_bytes().startswith(MAGIC)  # rewritten in the journal's format
    upgraded.close()
    clock.advance(99)  # aged from the upgrade: their true age is unknown
    reopened = OrderJournal(path, OrderMemoryConfig(retention_s=100.0), legacy=upgrade,
                            clock=clock)  # fmt: skip
    assert len(seen) == 1 and reopened.state == b"new-state" and len(reopened) == 2


def test_an_unknown_file_without_an_upgrade_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.state"
    path.write_bytes(b"something else")
    with pytest.raises(OrderJournalError, match="not an order-journal"):
        OrderJournal(path)


def test_a_lost_snapshot_replays_what_the_journal_holds(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "orders.state"
    memory = journal(path, clock)
    memory.record("o-1", report(1))
    memory.commit(b"state")
    memory.close()
    backup = tmp_path / "copy.state"
    shutil.copy(journal_file(path), journal_file(backup))
    assert not backup.exists()
    assert dict(journal(backup, clock)) == {"o-1": report(1)}


# --- compaction off the event loop ----------------------------------------------------------


class BlockedSnapshots:
    """``write_snapshot`` that waits to be released (and may then fail), on the thread."""

    def __init__(self, fail: bool = False) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail = fail

    def __call__(self, *args: Any) -> int:
        self.started.set()
        assert self.release.wait(10)
        if self.fail:
            raise OSError(28, "No space left on device")
        return write_snapshot(*args)


def state_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


def test_commits_go_on_while_a_compaction_runs_and_a_crash_in_it_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    live = tmp_path / "live"
    path = live / "orders.state"
    blocked = BlockedSnapshots()
    monkeypatch.setattr(journal_module, "write_snapshot", blocked)
    memory = journal(path, clock, compact_records=4, compact_bytes=1 << 30)
    for i in range(4):
        memory.record(f"o-{i}", report(i))
        memory.commit(b"state-a")
    assert blocked.started.wait(10) and memory.stats().compacting
    for i in range(4, 7):  # the event loop is not held up: these go to the next journal
        memory.record(f"o-{i}", report(i))
        memory.commit(b"state-b")
    assert state_files(path) == ["orders.state.journal", "orders.state.journal.compacting"]
    # The process dies here, the snapshot not written: what is on disk now is all there is.
    shutil.copytree(live, tmp_path / "crashed")
    blocked.release.set()
    memory.close()
    assert state_files(path) == ["orders.state", "orders.state.journal"]
    assert dict(journal(path, clock)) == {f"o-{i}": report(i) for i in range(7)}

    monkeypatch.setattr(journal_module, "write_snapshot", write_snapshot)
    crashed = tmp_path / "crashed" / "orders.state"
    recovered = journal(crashed, clock)
    assert dict(recovered) == {f"o-{i}": report(i) for i in range(7)}
    assert recovered.state == b"state-b"
    # Both journals were folded at open: one snapshot and an empty journal remain.
    assert state_files(crashed) == ["orders.state", "orders.state.journal"]
    assert snapshot_records(crashed) == dict(recovered)


def test_a_failed_compaction_is_counted_and_the_next_one_folds_its_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    path = tmp_path / "orders.state"
    labels = {"memory": path.name}
    before = sample("tradecopy_connector_order_journal_compaction_failures_total", labels)
    failing = BlockedSnapshots(fail=True)
    failing.release.set()
    monkeypatch.setattr(journal_module, "write_snapshot", failing)
    memory = journal(path, clock, compact_records=4, compact_bytes=1 << 30)
    with structlog.testing.capture_logs() as logs:
        for i in range(4):
            memory.record(f"o-{i}", report(i))
            memory.commit()
        memory.await_compaction()  # the thread failed; the next commit would notice it too
        memory.record("o-4", report(4))
        memory.commit()  # the failure is noticed and logged; this commit is unaffected
    assert any(e["event"] == "order_journal_compaction_failed" for e in logs)
    assert sample("tradecopy_connector_order_journal_compaction_failures_total", labels) == (
        before + 1
    )
    assert "orders.state.journal.compacting" in state_files(path)
    monkeypatch.setattr(journal_module, "write_snapshot", write_snapshot)
    for i in range(5, 9):
        memory.record(f"o-{i}", report(i))
        memory.commit()
    assert state_files(path) == ["orders.state", "orders.state.journal"]
    memory.close()
    assert dict(journal(path, clock)) == {f"o-{i}": report(i) for i in range(9)}
