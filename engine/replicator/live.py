"""The live view: link configs, account states, symbol specs, FX rates, stops and link states
cached in memory from JetStream KV and kept current by watches (no restart for a change)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from engine.replicator.facts import CompiledLink, MarketView
from engine.replicator.fanout import FanOutCache
from engine.replicator.metrics import BAD_MESSAGES
from engine.replicator.state import LinkState, link_state_decoder
from schemas import codec, subjects
from schemas.account import AccountState

log = structlog.get_logger("tradecopy.replicator.live")

AccountListener = Callable[[AccountState], Awaitable[None]]


LinkFilter = Callable[[str], bool]


class LiveView:
    def __init__(self, buckets: dict[str, KeyValue], owns_link: LinkFilter | None = None) -> None:
        """``owns_link(link_id)``: the links this instance plans (its link shard); every link
        when None. The others are not even compiled."""
        self.buckets = buckets
        self.view = MarketView()
        self.owns_link = owns_link
        self.links: dict[str, CompiledLink] = {}
        self._links_by_master: dict[str, tuple[CompiledLink, ...]] = {}
        self._links_by_follower: dict[str, tuple[CompiledLink, ...]] = {}
        # Indexes are rebuilt on first use after a change, not once per changed link: loading
        # or applying 10,000 links then costs one sort, not 10,000.
        self._stale = False
        #: Each master's links compiled per symbol for the fan-out planner; rebuilt on demand
        #: after any link change.
        self.fan_outs = FanOutCache(lambda: self.links_by_master)
        self.link_revisions: dict[str, int] = {}
        #: Bumped by every change to ``links``: what follows them can tell when to look again.
        self.links_changes = 0
        self._watchers: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._account_listeners: list[AccountListener] = []
        self.link_state_revisions: dict[str, int] = {}

    def on_follower_account(self, listener: AccountListener) -> None:
        self._account_listeners.append(listener)

    async def start(self) -> None:
        """Load every bucket, then keep following it. Returns once the initial load is done."""
        handlers: dict[str, Callable[[str, bytes | None, int], None]] = {
            subjects.KV_LINKS: self._apply_link,
            subjects.KV_ACCOUNTS: self._apply_account,
            subjects.KV_SYMBOLS: self._apply_symbol,
            subjects.KV_FX: self._apply_fx,
            subjects.KV_CONTROL: self._apply_stop,
            subjects.KV_LINK_STATE: self._apply_link_state,
        }
        loaded = []
        for name, handler in handlers.items():
            watcher = await self.buckets[name].watchall()
            self._watchers.append(watcher)
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            loaded.append(ready)
            self._tasks.append(asyncio.create_task(self._follow(name, watcher, handler, ready)))
        await asyncio.gather(*loaded)
        self._reindex()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for watcher in self._watchers:
            # The connection may already be closed on shutdown.
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _follow(
        self,
        bucket: str,
        watcher: Any,
        handler: Callable[[str, bytes | None, int], None],
        ready: asyncio.Future[None],
    ) -> None:
        async for entry in watcher:
            if entry is None:  # end of the initial values
                if not ready.done():
                    ready.set_result(None)
                continue
            deleted = entry.operation in (KV_DEL, KV_PURGE)
            try:
                handler(entry.key, None if deleted else entry.value, entry.revision)
            except Exception as exc:
                # Whatever is wrong with one entry (bad msgpack, bad UTF-8, a failed
                # validation), the watcher must go on: keep the old value, count, log.
                BAD_MESSAGES.labels(f"kv_{bucket}").inc()
                log.error("kv_entry_invalid", bucket=bucket, key=entry.key, error=str(exc))
            if ready.done() and bucket == subjects.KV_ACCOUNTS and not deleted:
                state = self.view.accounts.get(entry.key)
                if state is not None and state.account in self.links_by_follower:
                    for listener in self._account_listeners:
                        await listener(state)
            if not ready.done() and entry.delta == 0:
                ready.set_result(None)

    # Handlers: one per bucket. A bad value is logged and counted, the old one is kept.

    def _apply_link(self, key: str, value: bytes | None, revision: int) -> None:
        if self.owns_link is not None and not self.owns_link(key):
            return  # another shard's link
        if value is None:
            self.links.pop(key, None)
        else:
            link = codec.copy_link_decoder.decode(value)
            if link.link_id != key:
                raise ValueError(f"link stored under key {key!r} has link_id {link.link_id!r}")
            self.links[key] = CompiledLink(link)
            self.link_revisions[key] = revision
        self._stale = True
        self.links_changes += 1
        self.fan_outs.clear()

    @property
    def links_by_master(self) -> dict[str, tuple[CompiledLink, ...]]:
        if self._stale:
            self._reindex()
        return self._links_by_master

    @property
    def links_by_follower(self) -> dict[str, tuple[CompiledLink, ...]]:
        if self._stale:
            self._reindex()
        return self._links_by_follower

    def _reindex(self) -> None:
        self._stale = False
        by_master: dict[str, list[CompiledLink]] = {}
        by_follower: dict[str, list[CompiledLink]] = {}
        for cl in sorted(self.links.values(), key=lambda c: c.link_id):
            by_master.setdefault(cl.link.master, []).append(cl)
            by_follower.setdefault(cl.link.follower, []).append(cl)
        self._links_by_master = {k: tuple(v) for k, v in by_master.items()}
        self._links_by_follower = {k: tuple(v) for k, v in by_follower.items()}
        self.fan_outs.clear()

    def _apply_account(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            self.view.accounts.pop(key, None)
            return
        state = codec.account_state_decoder.decode(value)
        if state.account != key:
            raise ValueError(f"account state under key {key!r} is for {state.account!r}")
        # Keys interned, as the fan-out planner interns its links' (``fanout.LinkProgram``):
        # its lookups then match by identity.
        self.view.accounts[sys.intern(key)] = state

    def _apply_symbol(self, key: str, value: bytes | None, revision: int) -> None:
        account, _, token = key.partition(".")
        symbol = subjects.decode_key_token(token)
        if value is None:
            self.view.symbols.pop((account, symbol), None)
            return
        spec = codec.symbol_spec_decoder.decode(value)
        if (spec.account, spec.symbol) != (account, symbol):
            raise ValueError(f"symbol spec under key {key!r} is for {spec.account}/{spec.symbol}")
        self.view.symbols[(sys.intern(account), sys.intern(symbol))] = spec

    def _apply_fx(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            self.view.fx_rates.pop(key, None)
            return
        rate = codec.fx_rate_decoder.decode(value)
        if key != subjects.fx_key(rate.base, rate.quote):
            raise ValueError(f"fx rate under key {key!r} is for {rate.base}/{rate.quote}")
        self.view.fx_rates[key] = rate.rate

    def _apply_stop(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            self.view.stops.pop(key, None)
            return
        stop = codec.emergency_stop_decoder.decode(value)
        self.view.stops[key] = stop
        log.warning(
            "emergency_stop_changed",
            scope=stop.scope.value,
            target=stop.target,
            active=stop.active,
            reason=stop.reason,
        )

    def _apply_link_state(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            self.view.link_states.pop(key, None)
            self.link_state_revisions.pop(key, None)
            return
        current = self.link_state_revisions.get(key, 0)
        if revision < current:  # our own compare-and-set already put a newer one here
            return
        self.view.link_states[key] = link_state_decoder.decode(value)
        self.link_state_revisions[key] = revision

    def remember_link_state(self, link_id: str, state: LinkState, revision: int) -> None:
        if revision >= self.link_state_revisions.get(link_id, 0):
            self.view.link_states[link_id] = state
            self.link_state_revisions[link_id] = revision
