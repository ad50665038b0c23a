"""The billing service's wiring: the webhook endpoint, the event worker, the job scheduler.

``BillingService`` serves Stripe's webhooks (verify, store, answer), applies stored events in
a background worker, and runs the scheduler, which does the jobs only while this instance holds
the leader lock; any number of instances may run. ``run_billing`` runs it until signalled;
``run_billing_job`` runs one job once (``tradecopy billing run-job NAME --at TIME``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from engine.billing import checkout, notifications, onboarding, plan_changes, store
from engine.billing.config import BillingConfig, stripe_api_key, webhook_secret
from engine.billing.enforcement import EnforcementFailed, Enforcer
from engine.billing.gateway import StripeGateway
from engine.billing.jobs import JobContext, JobSummary, Scheduler, run_job
from engine.billing.ledgerfacts import LedgerViewFacts
from engine.billing.provisioning import Provisioner, ProvisioningFailed
from engine.billing.webhooks import process_stored_events, webhook_routes
from engine.runtime.http import OpsServer
from engine.runtime.jetstream import ensure_buckets
from engine.runtime.natsconn import connect
from engine.runtime.postgres import start_database
from schemas import subjects

log = structlog.get_logger("tradecopy.billing.service")

_EPOCH = datetime.fromisoformat("1970-01-01T00:00:00+00:00")


def parse_at(text: str) -> int:
    """``2026-03-27T22:00:00Z`` (any ISO 8601 instant with an offset) as UTC nanoseconds."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset: say which instant (…Z or +01:00)")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


class BillingService:
    def __init__(
        self, config: BillingConfig, database_url: str, gateway: StripeGateway, secret: str
    ) -> None:
        self.config = config
        self.database_url = database_url
        self.gateway = gateway
        self.secret = secret
        self.pool: asyncpg.Pool | None = None
        self.scheduler: Scheduler | None = None
        self.enforcer: Enforcer | None = None
        self.provisioner: Provisioner | None = None
        self._checkout_wake = asyncio.Event()
        self._onboarding_wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._last_sync = 0.0
        self.nc: Any = None
        self.webhook_port = 0
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        if self.config.migrate:
            await store.migrate(self.database_url)
        # A catalogue missing a kind, a key or a placeholder fails here, at start.
        notifications.check_catalogues()
        self.pool = await asyncpg.create_pool(self.database_url, min_size=1, max_size=8)
        if self.config.nats_url is not None:
            self.nc = await connect(self.config.nats_url, "tradecopy-billing")
            js = self.nc.jetstream()
            links = (await ensure_buckets(js))[subjects.KV_LINKS]
            self.enforcer = Enforcer(
                self.pool,
                js,
                links,
                attempts=self.config.enforcement_attempts,
                base_delay_s=self.config.enforcement_base_delay_s,
            )
            self.provisioner = Provisioner(
                self.pool,
                js,
                links,
                attempts=self.config.enforcement_attempts,
                base_delay_s=self.config.enforcement_base_delay_s,
            )
        # The API's Checkout requests wake the session worker at once (NOTIFY), and its poll
        # catches any notification sent while no listener was connected.
        self._listener = await asyncpg.connect(self.database_url)
        await checkout.listen(self._listener, self._checkout_wake)
        await plan_changes.listen(self._listener, self._checkout_wake)
        await onboarding.listen(self._listener, self._onboarding_wake)
        ctx = JobContext(
            enforcer=self.enforcer,
            pool=self.pool,
            gateway=self.gateway,
            facts=LedgerViewFacts(self.pool),
            send_lease_s=self.config.send_lease_s,
            event_retention_days=self.config.event_retention_days,
            portal_url=self.config.portal_url,
        )
        app = web.Application()
        app.add_routes(webhook_routes(self.pool, self.secret))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.config.webhook_host, self.config.webhook_port).start()
        self.webhook_port = int(self._runner.addresses[0][1])
        self.scheduler = Scheduler(ctx, self.database_url)
        self._tasks = [
            asyncio.create_task(self._apply_events(), name="billing-events"),
            asyncio.create_task(self.scheduler.run(self._stop), name="billing-scheduler"),
            asyncio.create_task(self._create_checkouts(), name="billing-checkouts"),
            asyncio.create_task(self._create_onboarding_links(), name="billing-onboarding"),
        ]
        log.info("billing_started", webhook_port=self.webhook_port)

    async def _apply_events(self) -> None:
        """Apply stored events as they come; a failing pass is logged and tried again."""
        while not self._stop.is_set():
            assert self.pool is not None
            try:
                await process_stored_events(self.pool)
                # What the events caused, after their transactions committed: the links'
                # stops and lifts, then the emails.
                if self.enforcer is not None:
                    await self.enforcer.apply_pending()
                if self.provisioner is not None:
                    await self._provision()
                await notifications.queue_notifications(self.pool, self.config.portal_url)
                await notifications.drain_outbox(
                    self.pool,
                    base_delay_s=self.config.email_base_delay_s,
                    max_attempts=self.config.email_max_attempts,
                )
            except EnforcementFailed as exc:
                log.warning("billing_enforcement_pass_failed", error=str(exc))
            except ProvisioningFailed as exc:
                log.warning("billing_provisioning_pass_failed", error=str(exc))
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                store.SerializableRetriesExhausted,
            ) as exc:
                log.warning("billing_event_pass_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.config.event_poll_s)

    async def _provision(self) -> None:
        """Plans activated since the last pass get their risk template; every hour, all of
        them again (links created after activation)."""
        assert self.provisioner is not None
        await self.provisioner.drain_due()
        now = asyncio.get_running_loop().time()
        if now - self._last_sync >= self.config.recovery_interval_s:
            self._last_sync = now
            await self.provisioner.sync()

    async def _create_checkouts(self) -> None:
        """Create Checkout Sessions for the API's requests as they come, store the payment
        methods completed sessions saved, and apply requested plan changes; a failing pass is
        logged and tried again."""
        while not self._stop.is_set():
            assert self.pool is not None
            self._checkout_wake.clear()
            try:
                await checkout.create_sessions(self.pool, self.gateway)
                # Completed sessions' saved cards (their completion NOTIFYs this channel too).
                await checkout.save_payment_methods(self.pool, self.gateway)
                # Plan changes ride the same worker: the same Stripe calls under a key each.
                await plan_changes.apply_plan_changes(
                    self.pool, self.gateway, provisioner=self.provisioner
                )
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                store.SerializableRetriesExhausted,
                ProvisioningFailed,
            ) as exc:
                log.warning("billing_checkout_pass_failed", error=str(exc))
            wake = asyncio.ensure_future(self._checkout_wake.wait())
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait(
                {wake, stop}, timeout=self.config.event_poll_s, return_when="FIRST_COMPLETED"
            )
            wake.cancel()
            stop.cancel()

    async def _create_onboarding_links(self) -> None:
        """Create providers' Express accounts and onboarding links as the API asks; a failing
        pass is logged and tried again."""
        while not self._stop.is_set():
            assert self.pool is not None
            self._onboarding_wake.clear()
            try:
                await onboarding.create_links(self.pool, self.gateway)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("billing_onboarding_pass_failed", error=str(exc))
            wake = asyncio.ensure_future(self._onboarding_wake.wait())
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait(
                {wake, stop}, timeout=self.config.event_poll_s, return_when="FIRST_COMPLETED"
            )
            wake.cancel()
            stop.cancel()

    def health(self) -> dict[str, object]:
        running = bool(self._tasks) and not any(t.done() for t in self._tasks)
        return {
            "ok": running,
            "leader": bool(self.scheduler and self.scheduler.leader),
            **({} if running else {"reason": "a billing task stopped"}),
        }

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        if self._listener is not None:
            await self._listener.close()
        if self.nc is not None:
            await self.nc.close()
        if self.pool is not None:
            await self.pool.close()


async def run_billing(config: BillingConfig) -> None:
    """Run until SIGINT/SIGTERM; serves /metrics and /healthz when a port is set."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    database_url, embedded = await start_database(config.database_url)
    gateway = StripeGateway(
        stripe_api_key(config), api_base=config.stripe_api_base, timeout_s=config.stripe_timeout_s
    )
    service = BillingService(config, database_url, gateway, webhook_secret(config))
    try:
        await service.start()
        ops = None
        if config.metrics_port is not None:
            ops = OpsServer(config.metrics_host, config.metrics_port, service.health)
            await ops.start()
        try:
            await stop.wait()
        finally:
            if ops is not None:
                await ops.stop()
            await service.stop()
    finally:
        await gateway.close()
        if embedded is not None:
            await embedded.stop()


async def run_billing_job(config: BillingConfig, name: str, at_ns: int) -> JobSummary:
    """Run one job once, as of ``at_ns``: what operators and tests call."""
    database_url, embedded = await start_database(config.database_url)
    gateway = StripeGateway(
        stripe_api_key(config), api_base=config.stripe_api_base, timeout_s=config.stripe_timeout_s
    )
    try:
        if config.migrate:
            await store.migrate(database_url)
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
        try:
            ctx = JobContext(
                pool=pool,
                gateway=gateway,
                facts=LedgerViewFacts(pool),
                send_lease_s=config.send_lease_s,
                event_retention_days=config.event_retention_days,
            )
            return await run_job(ctx, name, at_ns)
        finally:
            await pool.close()
    finally:
        await gateway.close()
        if embedded is not None:
            await embedded.stop()
