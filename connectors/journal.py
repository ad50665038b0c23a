"""The connectors' memory of executed follower orders: an append-only journal plus snapshots.

Every connector answers a redelivered follower order with its first outcome and trades
nothing (``Terminal.execute``). JetStream drops a duplicate only within its 120 s window,
while the follower-orders stream keeps an order for days, so the connector itself remembers
every order id it executed, for as long as the stream can hand the order back:
:class:`OrderJournal`.

Files, next to each other:

- ``<path>``: the **snapshot**, the memory as of its generation (replaced atomically);
- ``<path>.journal``: the **journal**, one frame appended per commit since that snapshot;
- ``<path>.journal.compacting``: only while a compaction runs, the journal it folds.

Each is a magic line followed by frames: ``>II`` (payload length, CRC-32 of the payload),
then the msgpack payload. The first frame of a file is a :class:`FileHeader` with its
generation; every other frame is a :class:`Batch`: the order records (order id, UTC ns,
encoded report) committed together and, when it changed, the terminal's own small state
(positions, outbox, ...). One frame is one commit, so a crash keeps a commit whole or drops
it whole: a torn last frame is ignored (and cut off), every frame before it is kept, and a
terminal's state never runs ahead of or behind its reports.

Opening is recovery (crash-only): the snapshot of generation *g*, then every journal of
generation *g* or later, oldest first, then pruning. A journal older than the snapshot was
folded into it already (a crash after the snapshot's rename) and is deleted; a journal being
compacted when the process died is folded at open.

Compaction starts when the journal outgrows its thresholds and the snapshot (so it never
costs more than the appends it follows). It does not stop the event loop: the journal is
renamed ``.compacting``, a new journal of the next generation takes the appends, and a
thread writes the live records as the snapshot of that generation, then deletes the folded
journal. Pruning happens there too: a snapshot holds exactly the unexpired records.

The memory forgets an order id ``retention_s`` after it last reached the terminal (by
default as long as the follower-orders stream keeps an order) and keeps at most
``max_orders`` ids, oldest first; an id evicted by that cap before its retention ran out is
logged and counted (``tradecopy_connector_order_memory_evicted_total``), since a
redelivery of it would then rely on venue-side evidence alone.

Not thread-safe: one event loop owns a journal (synchronous calls, so concurrent
``execute`` coroutines of different accounts interleave only between calls).
"""

from __future__ import annotations

import os
import struct
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import structlog
from prometheus_client import Counter, Gauge

from schemas.streams import follower_orders_stream

log = structlog.get_logger("tradecopy.journal")

#: An executed order id is remembered this long after it last reached the terminal: as long
#: as the follower-orders stream keeps an order, so any redelivery finds its first outcome.
ORDER_RETENTION_S: float = float(follower_orders_stream().max_age)
#: At most this many order ids per memory (≈ 0.65 KB of memory each with its report): size
#: it to a retention's worth of orders, or the oldest go early (logged and counted).
MAX_ORDERS = 250_000
#: Compact once the journal holds this many records or bytes, and at least as much as the
#: snapshot: a compaction then costs no more than the appends it follows (amortised O(1)).
COMPACT_RECORDS = 20_000
COMPACT_BYTES = 16 * 1024 * 1024

MAGIC = b"tradecopy-order-journal/1\n"
_FRAME = struct.Struct(">II")
#: Records per snapshot frame: the compaction thread lets the event loop in between.
_SNAPSHOT_CHUNK = 4_096
_SYNC_EVERY_BYTES = 1 << 20
_NS = 1_000_000_000

ORDERS = Gauge("tradecopy_connector_order_memory_orders", "Order ids remembered", ["memory"])
EVICTED = Counter(
    "tradecopy_connector_order_memory_evicted_total",
    "Order ids forgotten by the count cap before their retention ran out",
    ["memory"],
)
COMPACTIONS = Counter(
    "tradecopy_connector_order_journal_compactions_total", "Journal compactions", ["memory"]
)
COMPACTION_FAILURES = Counter(
    "tradecopy_connector_order_journal_compaction_failures_total",
    "Background compactions that failed (the next one folds their journal in place)",
    ["memory"],
)
TORN = Counter(
    "tradecopy_connector_order_journal_torn_total",
    "Torn journal tails cut off on open (a crash mid-append)",
    ["memory"],
)


class OrderJournalError(Exception):
    """A snapshot that cannot be read: refusing beats forgetting which orders ran."""


class OrderMemoryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How long and how much a connector remembers of the orders it executed."""

    retention_s: Annotated[float, msgspec.Meta(gt=0)] = ORDER_RETENTION_S
    """Forget an order id this long after it last reached the terminal (wall clock).
    Shorter than the follower-orders stream's ``max_age`` weakens the exactly-once bound."""
    max_orders: Annotated[int, msgspec.Meta(ge=1)] = MAX_ORDERS
    compact_records: Annotated[int, msgspec.Meta(ge=1)] = COMPACT_RECORDS
    compact_bytes: Annotated[int, msgspec.Meta(ge=1)] = COMPACT_BYTES
    durable: bool = True
    """fsync every commit (a power loss keeps what was reported); False survives only a
    crash of the process."""


class FileHeader(msgspec.Struct, frozen=True, array_like=True):
    kind: Literal["snapshot", "journal"]
    generation: int


class OrderRecord(msgspec.Struct, frozen=True, array_like=True, gc=False):
    # gc=False: only str/int/bytes inside, so no cycles; untracked, a memory of 100,000s of
    # records adds nothing to the garbage collector's full passes.
    order_id: str
    ts_ns: int
    """When the order last reached the terminal (UTC ns): its memory ages from here."""
    report: bytes
    """The outcome as the terminal encoded it (``codec.encode(report)``)."""


class Batch(msgspec.Struct, frozen=True, array_like=True):
    """One commit: its records and, if it changed, the terminal's state."""

    orders: list[OrderRecord] = []
    state: bytes | None = None


class JournalStats(msgspec.Struct, frozen=True, kw_only=True):
    orders: int
    snapshot_bytes: int
    journal_bytes: int
    journal_records: int
    generation: int
    compacting: bool


#: A state file from before the journal: its bytes → (the terminal's state, its records).
LegacyUpgrade = Callable[[bytes], tuple[bytes, Iterable[tuple[str, bytes]]]]

_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(FileHeader)
_batch_decoder = msgspec.msgpack.Decoder(Batch)


def frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def read_frames(data: bytes) -> tuple[list[bytes], int]:
    """The intact frames after the magic line, and the offset where intact data ends."""
    frames: list[bytes] = []
    offset = len(MAGIC)
    while offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + length
        payload = data[offset + _FRAME.size : end]
        if end > len(data) or zlib.crc32(payload) != crc:
            break
        frames.append(payload)
        offset = end
    return frames, offset


def header_of(data: bytes) -> FileHeader | None:
    """A file's header, or None when it has none that can be read."""
    if not data.startswith(MAGIC):
        return None
    frames, _ = read_frames(data)
    try:
        return _header_decoder.decode(frames[0]) if frames else None
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` survive a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(
    path: Path, generation: int, records: list[OrderRecord], state: bytes | None, durable: bool
) -> int:
    """Replace ``path`` with a snapshot of ``records`` and ``state``; its size in bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    size = 0
    try:
        with open(tmp, "wb") as handle:
            head = MAGIC + frame(_encoder.encode(FileHeader("snapshot", generation)))
            for part in (head, frame(_encoder.encode(Batch(state=state)))):
                size += handle.write(part)
            unsynced = 0
            for start in range(0, len(records), _SNAPSHOT_CHUNK):
                chunk = records[start : start + _SNAPSHOT_CHUNK]
                written = handle.write(frame(_encoder.encode(Batch(orders=chunk))))
                size, unsynced = size + written, unsynced + written
                if durable and unsynced >= _SYNC_EVERY_BYTES:
                    # A little at a time: the journal's own fsyncs must not wait behind the
                    # whole snapshot's dirty pages (a file system flushes them together).
                    handle.flush()
                    os.fdatasync(handle.fileno())
                    unsynced = 0
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)
    return size


class _Files:
    """The open journal and the compaction in flight, released with the journal."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.compaction: _Compaction | None = None

    def release(self) -> None:
        if self.compaction is not None:
            self.compaction.thread.join()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Compaction:
    """A snapshot written by a thread while the event loop appends to the next journal."""

    def __init__(self, write: Callable[[], int], generation: int, records: int) -> None:
        self.generation = generation
        self.records = records
        self.size = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(write,), daemon=True,
                                       name="order-journal-compaction")  # fmt: skip

    def _run(self, write: Callable[[], int]) -> None:
        try:
            self.size = write()
        except BaseException as exc:  # handed to the event loop at its next commit
            self.error = exc


class OrderJournal(Mapping[str, bytes]):
    """Executed order ids → their encoded reports, durable and bounded (see module doc).

    ``path=None`` keeps the memory in the process only (same bounds, nothing written).
    Reads see a record as soon as it is made; :meth:`commit` makes it durable.
    """

    def __init__(
        self,
        path: Path | None = None,
        config: OrderMemoryConfig | None = None,
        *,
        legacy: LegacyUpgrade | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.path = path
        self.config = config or OrderMemoryConfig()
        self.clock = clock
        """Wall clock, UTC ns (tests move it to age the memory)."""
        self.name = path.name if path is not None else "memory"
        for counter in (EVICTED, COMPACTIONS, COMPACTION_FAILURES):
            counter.labels(self.name)  # from 0, so increase() sees the first one
        self._records: dict[str, OrderRecord] = {}
        """In the order they were last written (a record made again moves to the end)."""
        self._ages: deque[tuple[int, str]] = deque()
        """(ts, order id) oldest first, for pruning; an entry whose record was made again
        since is stale and skipped."""
        self._pending: list[OrderRecord] = []
        self._state: bytes | None = None
        self._generation = 0
        """The current journal's generation (the next snapshot's is one more)."""
        self._snapshot_bytes = 0
        self._snapshot_records = 0
        self._journal_bytes = 0
        self._journal_records = 0
        self._unsynced = False
        self._must_fold = False
        """A ``.compacting`` journal is left over: the next compaction folds it in place."""
        self._files = _Files()
        self._finalizer: weakref.finalize | None = None
        if path is not None:
            self._finalizer = weakref.finalize(self, self._files.release)
            self._recover(path, legacy)
        self._prune()

    @property
    def persistent(self) -> bool:
        return self.path is not None

    @property
    def state(self) -> bytes | None:
        """The terminal's own state as last committed (None: never written)."""
        return self._state

    def stats(self) -> JournalStats:
        return JournalStats(orders=len(self._records), snapshot_bytes=self._snapshot_bytes,
                            journal_bytes=self._journal_bytes,
                            journal_records=self._journal_records,
                            generation=self._generation,
                            compacting=self._files.compaction is not None)  # fmt: skip

    # ------------------------------------------------------------------ Mapping

    def __getitem__(self, order_id: str) -> bytes:
        return self._records[order_id].report

    def __contains__(self, order_id: object) -> bool:
        return order_id in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    # ------------------------------------------------------------------ writes

    def record(self, order_id: str, report: bytes) -> None:
        """Remember an order's outcome (replacing an earlier one); durable at the next commit."""
        entry = OrderRecord(order_id, self.clock(), report)
        records = self._records
        if order_id in records:
            del records[order_id]  # to the end: the records stay in the order they age
        records[order_id] = entry
        self._ages.append((entry.ts_ns, order_id))
        self._pending.append(entry)

    def recall(self, order_id: str) -> bytes | None:
        """The stored outcome of an order that came again, whose memory then starts over:
        a redo (the same order id in a new message) may follow a redelivery by days."""
        entry = self._records.get(order_id)
        if entry is None:
            return None
        self.record(order_id, entry.report)
        return entry.report

    def commit(self, state: bytes | None = None, *, durable: bool | None = None) -> None:
        """Append the records made since the last commit, and ``state`` if it changed, as one
        frame; fsync it (``durable``, default from the config); compact when due."""
        fd = self._files.fd
        if self.path is not None and fd is None:
            raise OrderJournalError(f"{self.path}: the order journal is closed")
        changed = state is not None and state != self._state
        if self._pending or changed:
            batch = Batch(orders=self._pending, state=state if changed else None)
            self._pending = []
            if changed:
                self._state = state
            if fd is not None:
                self._append(frame(_encoder.encode(batch)), len(batch.orders))
        self._prune()
        if fd is None:
            return
        if self._unsynced and (self.config.durable if durable is None else durable):
            os.fdatasync(fd)
            self._unsynced = False
        self._reap_compaction()
        if self._files.compaction is None and self._compaction_due():
            if self._must_fold:
                self.compact()
            else:
                self._compact_in_background()

    def clear(self) -> None:
        """Forget every order (what losing the files would do); the state stays."""
        self._records.clear()
        self._ages.clear()
        self._pending.clear()
        if self._files.fd is not None:
            self.compact()
        ORDERS.labels(self.name).set(0)

    def compact(self) -> None:
        """Now, on this thread: the unexpired records and the state become the snapshot of the
        next generation, then the journal (and any left ``.compacting`` one) is emptied."""
        fd = self._files.fd
        if self.path is None or fd is None:
            return
        self.await_compaction()
        self._prune()
        records = list(self._records.values())
        generation = self._generation + 1
        size = write_snapshot(self.path, generation, records, self._state, self.config.durable)
        # Only now: a crash before this leaves journals older than the snapshot, which the next
        # open deletes unread (the snapshot holds everything in them).
        self._compacting_path().unlink(missing_ok=True)
        self._must_fold = False
        os.ftruncate(fd, 0)
        self._generation = generation
        self._start_journal(new_file=False)
        self._snapshot_done(size, len(records))

    def close(self) -> None:
        """Finish a compaction in flight and close the journal (later commits raise)."""
        self.await_compaction()
        if self._finalizer is not None:
            self._finalizer()

    # ------------------------------------------------------------------ internals

    def _journal_path(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".journal")

    def _compacting_path(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".journal.compacting")

    def _append(self, data: bytes, records: int) -> None:
        fd = self._files.fd
        assert fd is not None
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        self._journal_bytes += len(data)
        self._journal_records += records
        self._unsynced = True

    def _start_journal(self, *, new_file: bool) -> None:
        """An empty journal of the current generation (the file is new or just truncated)."""
        self._journal_bytes = self._journal_records = 0
        header = FileHeader("journal", self._generation)
        self._append(MAGIC + frame(_encoder.encode(header)), 0)
        if self.config.durable:
            assert self._files.fd is not None
            os.fdatasync(self._files.fd)
            if new_file:  # its name too: commits appended to it are reported as durable
                assert self.path is not None
                fsync_directory(self.path.parent)
        self._unsynced = False

    def _compaction_due(self) -> bool:
        config = self.config
        # Never before the journal is as big as the snapshot: compaction rewrites the snapshot's
        # records too, so it must follow at least as many appends to cost O(1) per order.
        by_records = max(config.compact_records, self._snapshot_records)
        by_bytes = max(config.compact_bytes, self._snapshot_bytes)
        return self._journal_records >= by_records or self._journal_bytes >= by_bytes

    def _compact_in_background(self) -> None:
        """Hand the journal to a thread that folds it into the next snapshot; appends go to a
        new journal meanwhile. A crash at any point: the next open replays both journals."""
        assert self.path is not None and self._files.fd is not None
        self._prune()
        records = list(self._records.values())
        state, generation, durable = self._state, self._generation + 1, self.config.durable
        journal, compacting = self._journal_path(), self._compacting_path()
        os.rename(journal, compacting)
        old_fd = self._files.fd
        self._files.fd = os.open(journal, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC,
                                 0o644)  # fmt: skip
        os.close(old_fd)  # its durable commits were synced already
        self._generation = generation
        self._start_journal(new_file=True)
        path = self.path

        def fold() -> int:
            size = write_snapshot(path, generation, records, state, durable)
            compacting.unlink(missing_ok=True)
            return size

        compaction = _Compaction(fold, generation, len(records))
        self._files.compaction = compaction
        compaction.thread.start()

    def _reap_compaction(self) -> None:
        compaction = self._files.compaction
        if compaction is None or compaction.thread.is_alive():
            return
        compaction.thread.join()
        self._files.compaction = None
        if compaction.error is not None:
            # Nothing is lost: the folded journal is still there, and the next compaction
            # folds it in place (on this thread; if the disk still fails, that commit fails).
            self._must_fold = True
            COMPACTION_FAILURES.labels(self.name).inc()
            log.error("order_journal_compaction_failed", memory=self.name,
                      error=repr(compaction.error))  # fmt: skip
            return
        self._snapshot_done(compaction.size, compaction.records)

    def await_compaction(self) -> None:
        """Wait until a compaction in flight has finished (shutdown, tests)."""
        if self._files.compaction is not None:
            self._files.compaction.thread.join()
            self._reap_compaction()

    def _snapshot_done(self, size: int, records: int) -> None:
        self._snapshot_bytes, self._snapshot_records = size, records
        COMPACTIONS.labels(self.name).inc()

    def _prune(self) -> None:
        """Forget ids past their retention, then the oldest beyond the cap."""
        records, ages = self._records, self._ages
        horizon = self.clock() - int(self.config.retention_s * _NS)
        while ages and ages[0][0] < horizon:
            ts, order_id = ages.popleft()
            entry = records.get(order_id)
            if entry is not None and entry.ts_ns == ts:
                del records[order_id]
        evicted = 0
        youngest = 0
        while len(records) > self.config.max_orders:
            ts, order_id = ages.popleft()
            entry = records.get(order_id)
            if entry is not None and entry.ts_ns == ts:
                del records[order_id]
                evicted += 1
                youngest = ts
        if evicted:
            EVICTED.labels(self.name).inc(evicted)
            log.warning("order_memory_cap_evicted", memory=self.name, evicted=evicted,
                        max_orders=self.config.max_orders,
                        youngest_age_s=round((self.clock() - youngest) / _NS, 1),
                        retention_s=self.config.retention_s)  # fmt: skip
        if len(ages) > 2 * len(records) + 1024:
            # Records made again leave stale entries behind: drop them now and then.
            self._ages = deque((e.ts_ns, e.order_id) for e in records.values())
        ORDERS.labels(self.name).set(len(records))

    def _load(self, entries: Iterable[OrderRecord]) -> None:
        records, ages = self._records, self._ages
        for entry in entries:
            records.pop(entry.order_id, None)
            records[entry.order_id] = entry
            ages.append((entry.ts_ns, entry.order_id))

    # ------------------------------------------------------------------ recovery

    def _recover(self, path: Path, legacy: LegacyUpgrade | None) -> None:
        """Start-up and recovery, one path: snapshot, its journals oldest first, torn tail."""
        journal, compacting = self._journal_path(), self._compacting_path()
        snapshot_generation = 0
        upgraded = False
        if path.exists():
            data = path.read_bytes()
            if data.startswith(MAGIC):
                snapshot_generation = self._read_snapshot(path, data)
            else:
                self._upgrade(path, data, legacy)
                upgraded = True
        path.parent.mkdir(parents=True, exist_ok=True)
        self._generation = snapshot_generation
        live: list[tuple[int, Path, bytes]] = []
        for candidate in (compacting, journal):
            data = b"" if upgraded or not candidate.exists() else candidate.read_bytes()
            header = header_of(data)
            if header is not None and header.kind == "journal":
                if header.generation >= snapshot_generation:
                    live.append((header.generation, candidate, data))
                else:  # folded into the snapshot already (a crash before its deletion)
                    log.info("order_journal_stale", memory=self.name, path=str(candidate),
                             journal=header.generation, snapshot=snapshot_generation)  # fmt: skip
        live.sort(key=lambda item: item[0])
        if live and live[0][0] > snapshot_generation:
            log.warning("order_journal_without_its_snapshot", memory=self.name,
                        journal=live[0][0], snapshot=snapshot_generation)  # fmt: skip
        journal_end: int | None = None
        for generation, candidate, data in live:
            end = self._replay(data)
            self._generation = max(self._generation, generation)
            if candidate == journal:
                journal_end = end
                if end < len(data):
                    # A crash mid-append: the last commit never completed (nor was reported).
                    TORN.labels(self.name).inc()
                    log.warning("order_journal_torn_tail", memory=self.name, path=str(journal),
                                kept_bytes=end, dropped_bytes=len(data) - end)  # fmt: skip
        self._must_fold = any(candidate == compacting for _, candidate, _ in live)
        if not self._must_fold:
            compacting.unlink(missing_ok=True)
        fd = os.open(journal, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._files.fd = fd
        if journal_end is None:
            os.ftruncate(fd, 0)
            self._start_journal(new_file=True)
        else:
            os.ftruncate(fd, journal_end)
            self._journal_bytes = journal_end
        if upgraded or self._must_fold:
            self.compact()

    def _read_snapshot(self, path: Path, data: bytes) -> int:
        frames, end = read_frames(data)
        if end != len(data) or not frames:
            raise OrderJournalError(f"{path}: damaged order-journal snapshot at byte {end}")
        try:
            header = _header_decoder.decode(frames[0])
            batches = [_batch_decoder.decode(f) for f in frames[1:]]
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise OrderJournalError(f"{path}: unreadable order-journal snapshot: {exc}") from exc
        if header.kind != "snapshot":
            raise OrderJournalError(f"{path}: a {header.kind} file where a snapshot belongs")
        self._snapshot_bytes = len(data)
        for batch in batches:
            if batch.state is not None:
                self._state = batch.state
            self._load(batch.orders)
            self._snapshot_records += len(batch.orders)
        return header.generation

    def _replay(self, data: bytes) -> int:
        """Apply a journal's intact frames after its header; the offset where they end."""
        frames, _ = read_frames(data)
        end = len(MAGIC) + _FRAME.size + len(frames[0])
        for payload in frames[1:]:
            try:
                batch = _batch_decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                break
            if batch.state is not None:
                self._state = batch.state
            self._load(batch.orders)
            self._journal_records += len(batch.orders)
            end += _FRAME.size + len(payload)
        return end

    def _upgrade(self, path: Path, data: bytes, legacy: LegacyUpgrade | None) -> None:
        if legacy is None:
            raise OrderJournalError(f"{path}: not an order-journal snapshot")
        state, reports = legacy(data)
        now = self.clock()
        # Their ages are unknown: each is kept one full retention from the upgrade.
        self._load(OrderRecord(order_id, now, report) for order_id, report in reports)
        self._state = state
        log.info("state_file_upgraded", memory=self.name, path=str(path),
                 orders=len(self._records))  # fmt: skip
