"""Auto-provisioning on a real nats-server and PostgreSQL: an activated plan's risk template (read
from the API's view) is merged into exactly the follower's links into the provider's masters,
once however often and however concurrently the plan activates, never turning a stopped link
back on; links made later get it on the next sync."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from engine.api.store import migrate as migrate_api
from engine.billing import plans, store
from engine.billing.provisioning import Provisioner
from engine.runtime.jetstream import ensure_buckets
from engine.runtime.links import apply_links
from schemas import codec, subjects
from schemas.links import CopyLink

#: account → (provider, follower). alpha sells m1; beta sells m2. F1 copies both.
OWNERS: dict[str, tuple[str, str | None]] = {
    "m1": ("alpha", None),
    "m2": ("beta", None),
    "a1": ("alpha", "F1"),
    "a2": ("alpha", "F2"),
    "c1": ("beta", "F1"),
    "a3": ("alpha", "F1"),
}
LINKS = [
    CopyLink(link_id="l1", master="m1", follower="a1"),
    CopyLink(link_id="l2", master="m1", follower="a2"),
    CopyLink(link_id="l3", master="m2", follower="c1"),
    # Stopped by billing's enforcement (close-only): the template must not turn it back on.
    CopyLink(link_id="l4", master="m1", follower="a3", enabled=False),
]
#: "enabled" is in no template the API accepts; here it proves billing never turns a stop off.
SETTINGS = {"max_lot": 0.5, "max_open_positions": 3, "enabled": True}


@dataclass
class Setup:
    pool: asyncpg.Pool
    kv: KeyValue
    provisioner: Provisioner
    template_id: str
    js: JetStreamContext

    async def writes(self) -> int:
        """Every write ever made to the links bucket (its stream's last sequence)."""
        info = await self.js.stream_info(f"KV_{subjects.KV_LINKS}")
        return int(info.state.last_seq)

    async def link(self, link_id: str) -> tuple[CopyLink, int]:
        entry = await self.kv.get(link_id)
        assert entry.value is not None and entry.revision is not None
        return codec.copy_link_decoder.decode(entry.value), entry.revision

    async def records(self) -> list[tuple[str, str]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT link_id, status FROM billing_plan_provisioning ORDER BY link_id"
            )
        return [(r["link_id"], r["status"]) for r in rows]


@pytest.fixture
async def setup(database_url: str, js: JetStreamContext) -> AsyncIterator[Setup]:
    await migrate_api(database_url)
    await store.migrate(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=6)
    kv = (await ensure_buckets(js))[subjects.KV_LINKS]
    await apply_links(kv, LINKS)
    template_id = str(uuid.uuid4())
    async with pool.acquire() as conn:
        # The API's tables as the API writes them (a tenant and its risk template).
        await conn.execute("INSERT INTO api_tenants (tenant_id, name) VALUES ('alpha', 'Alpha')")
        await conn.execute(
            "INSERT INTO api_risk_templates (template_id, tenant_id, name, settings)"
            " VALUES ($1::uuid, 'alpha', 'careful', $2::jsonb)",
            template_id,
            json.dumps(SETTINGS),
        )
        for account, (provider, follower) in OWNERS.items():
            await store.upsert_account_owner(
                conn, account_id=account, provider=provider, follower=follower
            )
        await plans.create_operator_plan(
            conn, plan_id="pro", name="Pro", currency="EUR", platform_fee_percent="10",
            account_pool_limit=10, modules=["subscription"],
        )  # fmt: skip
        for provider in ("alpha", "beta"):
            await plans.assign_operator_plan(conn, provider, "pro")
        await plans.create_provider_plan(
            conn, plan_id="gold", provider="alpha", name="Gold", currency="EUR",
            modules=["subscription"], subscription_price_minor=900,
            subscription_period="monthly", risk_template_id=template_id,
        )  # fmt: skip
    try:
        yield Setup(pool, kv, Provisioner(pool, js, kv, base_delay_s=0.01), template_id, js)
    finally:
        await pool.close()


async def _subscribe(setup: Setup, follower: str = "F1") -> None:
    async with setup.pool.acquire() as conn:
        await store.subscribe(conn, follower=follower, plan_id="gold", started_ns=1)


async def test_activation_applies_the_template_to_exactly_the_followers_links(
    setup: Setup,
) -> None:
    await _subscribe(setup)
    assert await setup.provisioner.drain_due() == 1
    l1, _ = await setup.link("l1")
    assert (l1.max_lot, l1.max_open_positions, l1.enabled) == (0.5, 3, True)
    # Another follower of alpha, and F1's link to another provider: untouched.
    for other in ("l2", "l3"):
        link, revision = await setup.link(other)
        assert link.max_lot is None and revision == 1 + ["l1", "l2", "l3", "l4"].index(other)
    # The stopped link gets the template and stays stopped.
    l4, _ = await setup.link("l4")
    assert l4.max_lot == 0.5 and l4.enabled is False
    assert await setup.records() == [("l1", "applied"), ("l4", "applied")]
    async with setup.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM billing_provisioning_due") == 0


async def test_two_activations_at_once_write_each_link_once(setup: Setup) -> None:
    await _subscribe(setup)
    before = await setup.writes()
    first, second = await asyncio.gather(
        setup.provisioner.provision("F1", "gold"), setup.provisioner.provision("F1", "gold")
    )
    assert sorted(first.applied + second.applied) == ["l1", "l4"]
    assert sorted(first.skipped + second.skipped) == ["l1", "l4"]
    assert await setup.writes() == before + 2  # l1 and l4, once each
    # And again later: nothing is written.
    again = await setup.provisioner.provision("F1", "gold")
    assert again.applied == () and sorted(again.skipped) == ["l1", "l4"]
    assert await setup.writes() == before + 2


async def test_an_edit_made_meanwhile_is_kept(setup: Setup) -> None:
    await _subscribe(setup)
    await setup.kv.put("l1", codec.encode(CopyLink(link_id="l1", master="m1", follower="a1",
                                                   symbols_include=["EURUSD"])))  # fmt: skip
    await setup.provisioner.provision("F1", "gold")
    l1, _ = await setup.link("l1")
    assert l1.symbols_include == ["EURUSD"] and l1.max_lot == 0.5


async def test_a_link_made_after_activation_gets_the_template_on_the_next_sync(
    setup: Setup,
) -> None:
    await _subscribe(setup)
    await setup.provisioner.drain_due()
    async with setup.pool.acquire() as conn:
        await store.upsert_account_owner(conn, account_id="a9", provider="alpha", follower="F1")
    await apply_links(setup.kv, [CopyLink(link_id="l9", master="m1", follower="a9")])
    assert await setup.provisioner.drain_due() == 0  # nothing activated since
    assert (await setup.link("l9"))[0].max_lot is None
    assert await setup.provisioner.sync() == 1
    assert (await setup.link("l9"))[0].max_lot == 0.5
    assert ("l9", "applied") in await setup.records()


async def test_a_cancelled_subscription_is_not_provisioned_and_reactivation_is(
    setup: Setup,
) -> None:
    from engine.billing import enforcement

    await _subscribe(setup)
    async with setup.pool.acquire() as conn:
        await enforcement.cancel_subscription(conn, "F1", "gold")
    assert await setup.provisioner.drain_due() == 1
    assert (await setup.link("l1"))[0].max_lot is None
    async with setup.pool.acquire() as conn:
        await enforcement.reactivate_subscription(conn, "F1", "gold")
    assert await setup.provisioner.drain_due() == 1
    assert (await setup.link("l1"))[0].max_lot == 0.5
