"""Enforcement: billing stops exactly the links a cause names (close-only) and lifts only its own.

A cause (a failed or disputed charge, a used-up allowance, a cancelled subscription, an account
being deleted) is a row of ``billing_enforcement``. Its link set is computed from the
``tc_links`` KV and the accounts' owners (which provider, and which follower, owns an account):
the API's ``api_billing_account_owners()``, with ``billing_accounts`` for accounts registered
without the API:

- scope ``provider``: every link whose master or follower account belongs to the provider;
- scope ``follower``: every link into one of the follower's accounts, only from that provider's
  masters when the cause names one (a follower who did not pay provider A still copies B);
- scope ``account``: every link from or into one account (its deletion).

"Stop" is ``enabled = false`` on the link, written with a revision-checked update, so an edit
the API or the CLI makes between the read and the write is re-read, never overwritten. The
replicator then opens no new copy on the link while closes, partial closes and SL/TP changes
still go through (``tests/test_rules.py::
test_disabled_link_skips_opens_but_copies_closes_and_changes``). Billing never uses emergency
stops. ``billing_enforced_links`` remembers whether billing itself wrote the stop: lifting the
last cause that holds a link writes ``enabled = true`` back only then, never on a link its
provider had disabled. Each link write is tried at most ``attempts`` (5) times with exponential
backoff, then recorded as failed; the daily recheck re-applies every active cause and releases
every link no active cause holds (idempotent), which heals what failed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TypeVar

import asyncpg
import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from engine.billing import metrics, store
from engine.billing.linkskv import LinksKv
from engine.billing.store import EnforcementCause
from engine.core.errors import TradecopyError
from schemas.links import CopyLink

log = structlog.get_logger("tradecopy.billing.enforcement")

T = TypeVar("T")

#: Errors that mean "NATS did not answer or refused for now": the write is tried again.


class Scope(enum.StrEnum):
    PROVIDER = "provider"
    FOLLOWER = "follower"
    ACCOUNT = "account"


class EnforcementFailed(TradecopyError):
    """A link could not be written after every retry; it is recorded for the daily recheck."""


# --------------------------------------------------------------- causes


def charge_cause(charge: store.Charge) -> EnforcementCause:
    """A charge that failed or was disputed stops the follower's links to its provider."""
    return EnforcementCause(
        scope=Scope.FOLLOWER,
        subject=charge.follower,
        cause=f"charge:{charge.idempotency_key}",
        provider=charge.provider,
    )


def allowance_cause(follower: str, plan_id: str, provider: str) -> EnforcementCause:
    """A pay-per-trade allowance used up: the follower's links on that provider stop."""
    return EnforcementCause(
        scope=Scope.FOLLOWER, subject=follower, cause=f"allowance:{plan_id}", provider=provider
    )


def subscription_cause(follower: str, plan_id: str, provider: str) -> EnforcementCause:
    """A cancelled subscription: the follower's links on that provider stop."""
    return EnforcementCause(
        scope=Scope.FOLLOWER, subject=follower, cause=f"subscription:{plan_id}", provider=provider
    )


def provider_cause(provider: str, cause: str) -> EnforcementCause:
    """A provider who does not pay the operator: every account of the provider stops."""
    return EnforcementCause(scope=Scope.PROVIDER, subject=provider, cause=cause)


async def raise_cause(conn: asyncpg.Connection, cause: EnforcementCause) -> bool:
    """Record ``cause`` as active inside the caller's transaction (which may not write to
    NATS); the enforcement worker applies it to the links after the commit."""
    return await store.set_enforcement(conn, cause, "active")


async def lift_cause(conn: asyncpg.Connection, cause: EnforcementCause) -> bool:
    """Record ``cause`` as lifted inside the caller's transaction; applied after the commit."""
    return await store.set_enforcement(conn, cause, "lifted")


async def cancel_subscription(conn: asyncpg.Connection, follower: str, plan_id: str) -> bool:
    """Cancel a subscription and raise its cause; False when there is no such subscription."""
    provider = await store.set_subscription_status(conn, follower, plan_id, "cancelled")
    if provider is None:
        return False
    await raise_cause(conn, subscription_cause(follower, plan_id, provider))
    return True


async def reactivate_subscription(conn: asyncpg.Connection, follower: str, plan_id: str) -> bool:
    """Reactivate a subscription and lift its cause."""
    provider = await store.set_subscription_status(conn, follower, plan_id, "active")
    if provider is None:
        return False
    await lift_cause(conn, subscription_cause(follower, plan_id, provider))
    return True


async def allowance_used_up(conn: asyncpg.Connection, follower: str, plan_id: str) -> bool:
    """The allowance's last trade was copied (``fees`` named it ``exhausted_by``): stop."""
    provider = await store.plan_provider(conn, plan_id)
    if provider is None:
        return False
    return await raise_cause(conn, allowance_cause(follower, plan_id, provider))


async def allowance_renewed(conn: asyncpg.Connection, follower: str, plan_id: str) -> bool:
    """A new allowance was bought: lift the stop."""
    provider = await store.plan_provider(conn, plan_id)
    if provider is None:
        return False
    return await lift_cause(conn, allowance_cause(follower, plan_id, provider))


# --------------------------------------------------------------- the link set (pure)


def links_of(
    cause: EnforcementCause | store.EnforcementRow,
    links: Iterable[CopyLink],
    owners: dict[str, tuple[str, str | None]],
) -> set[str]:
    """The ids of the links ``cause`` stops; ``owners``: account → (provider, follower)."""
    chosen: set[str] = set()
    for link in links:
        master = owners.get(link.master)
        follower = owners.get(link.follower)
        if cause.scope == Scope.PROVIDER:
            hit = (master is not None and master[0] == cause.subject) or (
                follower is not None and follower[0] == cause.subject
            )
        elif cause.scope == Scope.FOLLOWER:
            hit = follower is not None and follower[1] == cause.subject
            if hit and cause.provider is not None:
                hit = master is not None and master[0] == cause.provider
        else:
            hit = cause.subject in (link.master, link.follower)
        if hit:
            chosen.add(link.link_id)
    return chosen


# --------------------------------------------------------------- account deletion (pure)


class DeletionState(enum.StrEnum):
    ACTIVE = "active"
    DELETE_PENDING = "delete_pending"
    DISABLED = "disabled"
    """Every link of the account is stopped; nothing new copies into or out of it."""
    DELETED = "deleted"
    DELETE_FAILED = "delete_failed"


class DeletionEvent(enum.StrEnum):
    REQUESTED = "requested"
    LINKS_STOPPED = "links_stopped"
    REMOVED = "removed"
    FAILED = "failed"


class IllegalDeletionTransition(TradecopyError):
    """A deletion step that does not follow from the account's state."""


_DELETION: dict[tuple[DeletionState, DeletionEvent], DeletionState] = {
    (DeletionState.ACTIVE, DeletionEvent.REQUESTED): DeletionState.DELETE_PENDING,
    (DeletionState.DELETE_FAILED, DeletionEvent.REQUESTED): DeletionState.DELETE_PENDING,
    (DeletionState.DELETE_PENDING, DeletionEvent.LINKS_STOPPED): DeletionState.DISABLED,
    (DeletionState.DISABLED, DeletionEvent.REMOVED): DeletionState.DELETED,
    (DeletionState.DELETE_PENDING, DeletionEvent.FAILED): DeletionState.DELETE_FAILED,
    (DeletionState.DISABLED, DeletionEvent.FAILED): DeletionState.DELETE_FAILED,
}


def next_deletion_state(current: DeletionState, event: DeletionEvent) -> DeletionState:
    """active → delete_pending → disabled → deleted, or delete_failed (which may be requested
    again); a deleted account stays deleted, and a repeated request while pending is a no-op."""
    if current is DeletionState.DELETE_PENDING and event is DeletionEvent.REQUESTED:
        return current
    following = _DELETION.get((current, event))
    if following is None:
        raise IllegalDeletionTransition(f"an account {current} cannot take {event}")
    return following


# --------------------------------------------------------------- the enforcer (NATS + database)


class Enforcer:
    """Applies causes to the ``tc_links`` KV: one per billing service."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        kv: KeyValue,
        *,
        attempts: int = 5,
        base_delay_s: float = 0.5,
        op_timeout_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.attempts = attempts
        self.links_kv = LinksKv(
            js, kv, failure=EnforcementFailed, attempts=attempts, base_delay_s=base_delay_s,
            op_timeout_s=op_timeout_s, log_event="enforcement_retry",
        )  # fmt: skip
        self._seen_enabled: dict[str, bool] = {}
        self._said_no_api = False

    async def _links(self) -> dict[str, CopyLink]:
        return await self.links_kv.links()

    async def _set_enabled(self, link_id: str, enabled: bool) -> bool | None:
        """Write ``enabled`` on ``link_id`` (revision-checked: a concurrent edit is kept). The
        value it had (True/False) before, or None when the link is gone."""

        def change(link: CopyLink) -> CopyLink:
            if link.enabled == enabled:
                return link
            # Remembered before the write: a write that times out may still land (the
            # client sends it on reconnect), so a failed stop counts as billing's own.
            self._seen_enabled[link_id] = link.enabled
            return msgspec.structs.replace(link, enabled=enabled)

        edited = await self.links_kv.edit(link_id, change)
        return None if edited is None else edited[0].enabled

    async def _hold(self, link_ids: Iterable[str]) -> list[str]:
        """Stop every link of ``link_ids``; the ids that failed every retry."""
        failed: list[str] = []
        for link_id in sorted(link_ids):
            try:
                before = await self._set_enabled(link_id, False)
            except EnforcementFailed as exc:
                failed.append(link_id)
                async with self.pool.acquire() as conn:
                    await store.link_failed(
                        conn,
                        link_id,
                        status="failed",
                        attempts=self.attempts,
                        error=str(exc),
                        billing_disabled=self._seen_enabled.get(link_id, False),
                    )
                metrics.ENFORCEMENT_WRITES.labels(action="stop", result="failed").inc()
                log.error("enforcement_link_failed", link_id=link_id, error=str(exc))
                continue
            self._seen_enabled.pop(link_id, None)
            if before is None:
                continue
            async with self.pool.acquire() as conn:
                await store.hold_link(conn, link_id, billing_disabled=before is True)
            metrics.ENFORCEMENT_WRITES.labels(action="stop", result="ok").inc()
            log.info("enforcement_link_stopped", link_id=link_id, billing_disabled=before)
        return failed

    async def _release_unheld(
        self, links: dict[str, CopyLink], owners: dict[str, tuple[str, str | None]]
    ) -> list[str]:
        """Resume every link billing holds that no active cause names any more; only those
        billing itself stopped get ``enabled = true`` back. The ids that failed."""
        async with self.pool.acquire() as conn:
            active = await store.enforcement_rows(conn, state="active")
            held = await store.enforced_links(conn)
        still: set[str] = set()
        for row in active:
            still |= links_of(row, links.values(), owners)
        failed: list[str] = []
        for link_id, hold in sorted(held.items()):
            if link_id in still:
                continue
            if hold.billing_disabled:
                try:
                    await self._set_enabled(link_id, True)
                except EnforcementFailed as exc:
                    failed.append(link_id)
                    async with self.pool.acquire() as conn:
                        await store.link_failed(
                            conn,
                            link_id,
                            status="release_failed",
                            attempts=self.attempts,
                            error=str(exc),
                            billing_disabled=True,
                        )
                    metrics.ENFORCEMENT_WRITES.labels(action="resume", result="failed").inc()
                    log.error("enforcement_release_failed", link_id=link_id, error=str(exc))
                    continue
                metrics.ENFORCEMENT_WRITES.labels(action="resume", result="ok").inc()
            async with self.pool.acquire() as conn:
                await store.release_link(conn, link_id)
            log.info("enforcement_link_released", link_id=link_id, resumed=hold.billing_disabled)
        return failed

    async def _owners(self) -> dict[str, tuple[str, str | None]]:
        """Every account's owner: the API's accounts (``api_billing_account_owners()``), with
        ``billing_accounts`` for accounts registered without the API. A billing-only database
        has no API: ``billing_accounts`` alone, said once in the log."""
        async with self.pool.acquire() as conn:
            owners = await store.all_account_owners(conn)
        if not owners.api_available and not self._said_no_api:
            self._said_no_api = True
            log.warning(
                "enforcement_without_api_accounts",
                reason="api_billing_account_owners() is not in this database",
                accounts=len(owners.accounts),
            )
        return owners.accounts

    async def stop_for(self, cause: EnforcementCause) -> list[str]:
        """Raise ``cause`` and stop its links now; the ids that failed (recorded for the
        recheck). Raising an active cause again re-applies it (new links are stopped too)."""
        async with self.pool.acquire() as conn:
            await raise_cause(conn, cause)
        return await self._apply(cause, active=True)

    async def lift(self, cause: EnforcementCause) -> list[str]:
        """Lift ``cause`` and resume what billing stopped that no other cause still holds."""
        async with self.pool.acquire() as conn:
            await lift_cause(conn, cause)
        return await self._apply(cause, active=False)

    async def _apply(
        self, cause: EnforcementCause | store.EnforcementRow, *, active: bool
    ) -> list[str]:
        try:
            links = await self._links()
            owners = await self._owners()
            if active:
                failed = await self._hold(links_of(cause, links.values(), owners))
            else:
                failed = await self._release_unheld(links, owners)
        except EnforcementFailed as exc:
            async with self.pool.acquire() as conn:
                await store.enforcement_failed(conn, cause, str(exc))
            log.error("enforcement_failed", cause=cause.cause, error=str(exc))
            raise
        async with self.pool.acquire() as conn:
            await store.mark_enforcement_applied(conn, cause)
        log.info("enforcement_applied", cause=cause.cause, active=active, failed=failed)
        return failed

    async def apply_pending(self) -> int:
        """Apply every cause recorded inside a transaction since the last pass; how many."""
        async with self.pool.acquire() as conn:
            rows = await store.enforcement_rows(conn, needs_apply=True)
        for row in rows:
            await self._apply(row, active=row.state == "active")
        return len(rows)

    async def recheck(self) -> dict[str, int]:
        """The daily recheck: every active cause applied again, every link no active cause
        holds released (a lift that failed, a webhook missed). Idempotent."""
        links = await self._links()
        owners = await self._owners()
        async with self.pool.acquire() as conn:
            active = await store.enforcement_rows(conn, state="active")
        wanted: set[str] = set()
        for row in active:
            wanted |= links_of(row, links.values(), owners)
        failed = await self._hold(wanted)
        failed += await self._release_unheld(links, owners)
        async with self.pool.acquire() as conn:
            for row in await store.enforcement_rows(conn, needs_apply=True):
                await store.mark_enforcement_applied(conn, row)
        log.info("enforcement_rechecked", causes=len(active), held=len(wanted), failed=len(failed))
        return {"causes": len(active), "held": len(wanted), "failed": len(failed)}

    async def delete_account(self, account_id: str) -> DeletionState:
        """Run an account's deletion: stop every link from or into it, then forget its owner.
        A failure leaves ``delete_failed``; asking again starts over from there."""
        async with self.pool.acquire() as conn:
            current = DeletionState(await store.deletion_state(conn, account_id) or "active")
            if current is DeletionState.DELETED:
                return current
            state = next_deletion_state(current, DeletionEvent.REQUESTED)
            await store.set_deletion_state(conn, account_id, state)
        cause = EnforcementCause(scope=Scope.ACCOUNT, subject=account_id, cause="deletion")
        try:
            failed = await self.stop_for(cause)
            if failed:
                raise EnforcementFailed(f"links not stopped: {', '.join(failed)}")
        except EnforcementFailed as exc:
            state = next_deletion_state(state, DeletionEvent.FAILED)
            async with self.pool.acquire() as conn:
                await store.set_deletion_state(conn, account_id, state, str(exc))
            return state
        state = next_deletion_state(state, DeletionEvent.LINKS_STOPPED)
        async with self.pool.acquire() as conn:
            await store.set_deletion_state(conn, account_id, state)
            async with conn.transaction():
                await store.delete_account_owner(conn, account_id)
                state = next_deletion_state(state, DeletionEvent.REMOVED)
                await store.set_deletion_state(conn, account_id, state)
        log.info("account_deleted", account_id=account_id)
        return state
