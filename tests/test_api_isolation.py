"""Tenant isolation, generated over every route of the app: provider A can neither read nor
change anything of provider B, a follower nothing of another follower; and each wall holds on
its own (application scoping alone, row-level security alone), while without both the same
matrix finds the leaks (so it can fail)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nats.js.errors
import pytest
from test_api_history import copy_facts, store_facts
from test_api_support import (
    CREDENTIALS,
    PASSWORD,
    Api,
    Person,
    api_config,
    running_api,
    serve,
)

from engine.api.auth import Role
from engine.api.routes import ROUTES
from engine.api.totp import totp
from engine.billing import store as billing_store
from engine.ledger import store as ledger_store
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from schemas import subjects


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    await ledger_store.migrate(database_url)  # the history routes read the ledger's views
    await ensure_streams(js)  # the live stream reads them
    await billing_store.migrate(database_url)  # plans and Checkout live in billing
    async with running_api(database_url, nc, js) as running:
        yield running


_PARAM = re.compile(r"\{([a-z_]+)\}")


@dataclass
class Holdings:
    """What one party owns: the ids a request would name, and the markers a leak would show."""

    person: Person
    tenant: str
    user_id: str
    master: str
    follower: str
    link: str
    key_id: str
    markers: list[str] = field(default_factory=list)
    follower_only: bool = False
    invite_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    risk_template_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    order_template_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    source_id: str = "sig-0000000000000000"
    plan_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    operator_plan_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    checkout_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    onboarding_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    plan_id_2: str = field(default_factory=lambda: str(uuid.uuid4()))
    """A second plan of the tenant's: what a plan change moves to."""
    follower_user: str = field(default_factory=lambda: str(uuid.uuid4()))
    """The follower (a user id) whose plan changes are named."""
    plan_change_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    strategy_id: str = "stg-0000000000000000"
    deployment_id: str = "dep-0000000000000000"
    version_id: str = "sv-" + "0" * 24
    paper_master: str = ""
    slug: str = "no-such-provider"

    def param(self, name: str) -> str:
        return {"account_id": self.follower, "link_id": self.link, "user_id": self.user_id,
                "key_id": self.key_id, "invite_id": self.invite_id,
                "position_id": "1", "risk_template_id": self.risk_template_id,
                "order_template_id": self.order_template_id,
                "source_id": self.source_id, "plan_id": self.plan_id,
                "operator_plan_id": self.operator_plan_id, "checkout_id": self.checkout_id,
                "tenant_id": self.tenant, "strategy_id": self.strategy_id,
                "deployment_id": self.deployment_id, "slug": self.slug,
                "onboarding_id": self.onboarding_id, "follower": self.follower_user,
                "plan_change_id": self.plan_change_id}[name]  # fmt: skip


@dataclass
class World:
    provider_a: Holdings
    provider_b: Holdings
    follower_a1: Holdings
    follower_a2: Holdings
    backend_a: Holdings
    """Provider A's platform backend, calling with A's API key."""


async def _key(api: Api, who: Person) -> tuple[str, str, str]:
    status, body = await api.call("POST", "/v1/api-keys", who, json={"name": "backend"})
    assert status == 201, body
    return body["key_id"], body["prefix"], body["key"]


async def _identity_rows(api: Api, who: Person, invitee: str) -> str:
    """An invite, an email verification and a confirmed TOTP of ``who``: rows in every
    identity table (and the outbox) of its tenant. Returns the invite's id."""
    status, invite = await api.call(
        "POST", "/v1/invites", who, json={"email": invitee, "role": "follower"}
    )
    assert status == 201, invite
    assert (await api.call("POST", "/v1/me/email-verification", who))[0] == 202
    status, enrolment = await api.call("POST", "/v1/me/totp", who)
    assert status == 201, enrolment
    secret = base64.b32decode(enrolment["secret"] + "=" * (-len(enrolment["secret"]) % 8))
    status, _ = await api.call(
        "POST", "/v1/me/totp/confirm", who, json={"code": totp(secret, time.time())}
    )
    assert status == 200
    return str(invite["invite_id"])


async def build_world(api: Api) -> World:
    pa = await api.provider("tenant-alfa-3q")
    pb = await api.provider("tenant-bravo-7x")
    fa1 = await api.follower(pa, "fiona-a1")
    fa2 = await api.follower(pa, "felix-a2")
    fb = await api.follower(pb, "frank-b1")
    am = (await api.account(pa, "master", name="alfa-master"))["account_id"]
    af1 = (await api.account(pa, "follower", owner=fa1, name="fiona-acc"))["account_id"]
    af2 = (await api.account(pa, "follower", owner=fa2, name="felix-acc"))["account_id"]
    bm = (await api.account(pb, "master", name="bravo-master"))["account_id"]
    bf = (await api.account(pb, "follower", owner=fb, name="bravo-acc"))["account_id"]
    l1 = (await api.link(pa, am, af1))["link_id"]
    l2 = (await api.link(pa, am, af2))["link_id"]
    lb = (await api.link(pb, bm, bf))["link_id"]
    for account in (af2, bf):
        status, _ = await api.call("POST", f"/v1/accounts/{account}/terminal-token",
                                   pb if account == bf else pa)  # fmt: skip
        assert status == 201
    # ledger rows of the victims' accounts, through the ledger's own store
    await store_facts(api.database_url, copy_facts(bf, bm, lb, "-bravo-fact"))
    await store_facts(api.database_url, copy_facts(af2, am, l2, "-felix-fact"))
    ka, _, ka_secret = await _key(api, pa)
    kb, kb_prefix, _ = await _key(api, pb)
    b = Holdings(pb, "tenant-bravo-7x", pb.user_id, bm, bf, lb, kb)
    b.markers = ["tenant-bravo-7x", pb.email, fb.email, fb.user_id, pb.user_id, bm, bf, lb, kb,
                 kb_prefix, "bravo-master", "bravo-acc", "-bravo-fact"]  # fmt: skip
    a2 = Holdings(fa2, "tenant-alfa-3q", fa2.user_id, am, af2, l2, ka, follower_only=True)
    a2.markers = [fa2.email, fa2.user_id, af2, l2, "felix-acc", "-felix-fact"]
    a2.invite_id = await _identity_rows(api, pa, "invitee-a@alfa.example.com")
    b.invite_id = await _identity_rows(api, pb, "invitee-b@bravo.example.com")
    b.markers += [b.invite_id, "invitee-b@bravo.example.com"]
    a = Holdings(pa, "tenant-alfa-3q", pa.user_id, am, af1, l1, ka)
    for owner, holder, label in ((pa, a, "alfa"), (pb, b, "bravo"), (fa2, a2, "felix")):
        if owner is not fa2:  # risk templates are a provider's
            status, body = await api.call("POST", "/v1/risk-templates", owner,
                                          json={"name": f"{label}-risk",
                                                "settings": {"max_lot": 1.0}})  # fmt: skip
            assert status == 201, body
            holder.risk_template_id = body["template_id"]
        status, body = await api.call("POST", "/v1/order-templates", owner,
                                      json={"name": f"{label}-preset", "symbol": "XAUUSD",
                                            "side": "buy", "volume": 0.1})  # fmt: skip
        assert status == 201, body
        holder.order_template_id = body["template_id"]
    b.markers += [b.risk_template_id, b.order_template_id, "bravo-risk", "bravo-preset"]
    for owner, holder, label in ((pa, a, "alfa"), (pb, b, "bravo")):
        holder.source_id = await _signal_source(api, owner, label)
        await _strategy_and_profile(api, owner, holder, label)
    b.markers += [b.source_id, "bravo-signals", "bravo-paper"]
    b.markers += [b.strategy_id, b.deployment_id, b.version_id, b.paper_master, b.slug,
                  "bravo-strategy", "bravo-profile"]  # fmt: skip
    await _plans(api, a, b, a2, fb)
    a2.markers += [a2.order_template_id, "felix-preset"]
    return World(
        provider_a=a,
        provider_b=b,
        follower_a1=Holdings(fa1, "tenant-alfa-3q", fa1.user_id, am, af1, l1, ka),
        follower_a2=a2,
        backend_a=Holdings(
            dataclasses.replace(pa, api_key=ka_secret),
            "tenant-alfa-3q",
            pa.user_id,
            am,
            af1,
            l1,
            ka,
        ),
    )


async def _plans(api: Api, a: Holdings, b: Holdings, a2: Holdings, fb: Person) -> None:
    """Both providers on an operator plan, a plan each, and a Checkout of B's follower and of
    A's follower a2 (billing's rows, written through the API)."""
    operator = await api.as_operator()
    status, body = await api.call("POST", "/v1/operator-plans", operator, json={
        "name": "isolation-ops", "currency": "EUR", "platform_fee_percent": "10",
        "account_pool_limit": 100, "modules": ["subscription"]})  # fmt: skip
    assert status == 201, body
    for holder in (a, b):
        holder.operator_plan_id = body["plan_id"]
        status, _ = await api.call("PUT", f"/v1/tenants/{holder.tenant}/operator-plan", operator,
                                   json={"plan_id": body["plan_id"]})  # fmt: skip
        assert status == 200
    for holder, label in ((a, "alfa"), (b, "bravo")):
        status, plan = await api.call("POST", "/v1/plans", holder.person, json={
            "name": f"{label}-plan", "currency": "EUR", "modules": ["subscription"],
            "subscription_price_minor": 900, "subscription_period": "monthly",
            "risk_template_id": holder.risk_template_id})  # fmt: skip
        assert status == 201, plan
        holder.plan_id = plan["plan_id"]
    for follower, holder, plan_id in ((fb, b, b.plan_id), (a2.person, a2, a.plan_id)):
        status, body = await api.call("POST", f"/v1/plans/{plan_id}/checkout", follower,
                                      json={"client_key": "isolation"})  # fmt: skip
        assert status == 202, body
        holder.checkout_id = body["checkout_id"]
    b.markers += [b.plan_id, "bravo-plan", b.checkout_id]
    a2.markers += [a2.checkout_id]
    # A plan change of B's follower and of A's follower a2: each subscribed (billing's row, as
    # billing writes it) and asking through the API to move to a second plan of its provider.
    for holder, label in ((a, "alfa"), (b, "bravo")):
        status, plan = await api.call("POST", "/v1/plans", holder.person, json={
            "name": f"{label}-plan-2", "currency": "EUR", "modules": ["subscription"],
            "subscription_price_minor": 1900, "subscription_period": "monthly"})  # fmt: skip
        assert status == 201, plan
        holder.plan_id_2 = plan["plan_id"]
    for follower, holder, owner in ((fb, b, b), (a2.person, a2, a)):
        async with api.pool.acquire() as conn:
            await billing_store.subscribe(
                conn, follower=follower.user_id, plan_id=owner.plan_id, started_ns=1
            )
        status, body = await api.call(
            "POST", f"/v1/followers/{follower.user_id}/plan-changes", follower,
            json={"from_plan": owner.plan_id, "to_plan": owner.plan_id_2},
        )  # fmt: skip
        assert status == 202, body
        holder.follower_user, holder.plan_change_id = follower.user_id, body["plan_change_id"]
    a.follower_user, a.plan_change_id = a2.follower_user, a2.plan_change_id  # A's own follower
    b.markers += [b.plan_id_2, "bravo-plan-2", b.plan_change_id]
    a2.markers += [a2.plan_change_id]
    # Onboarding requests of both providers (pending: no billing service runs here), and a
    # charge of B's follower and of A's follower a2 (billing's own rows, as its jobs write them).
    for holder in (a, b):
        status, body = await api.call("POST", "/v1/billing/onboarding", holder.person,
                                      json={"country": "DE"})  # fmt: skip
        assert status == 202, body
        holder.onboarding_id = body["onboarding_id"]
    async with api.pool.acquire() as conn:
        for follower, holder, tenant in ((fb.user_id, b, b.tenant), (a2.user_id, a2, a.tenant)):
            key = f"{follower}-charge"
            await conn.execute(
                "INSERT INTO billing_invoices (invoice_id, follower, provider, plan_id, window_id,"
                " currency, total_minor, platform_fee_minor, lines, issued_ns)"
                " VALUES ($1, $2, $3, 'p', $1, 'EUR', 101, 10, '[]'::jsonb, 1772323200000000000)",
                key, follower, tenant,
            )  # fmt: skip
            await conn.execute(
                "INSERT INTO billing_charges (idempotency_key, invoice_id, module, follower,"
                " provider, plan_id, window_id, currency, amount_minor, platform_fee_minor,"
                " destination, issued_ns) VALUES ($1, $1, 'subscription', $2, $3, 'p', $1, 'EUR',"
                " 101, 10, 'acct_x', 1772323200000000000)",
                key, follower, tenant,
            )  # fmt: skip
            holder.markers.append(key)
    b.markers.append(b.onboarding_id)


async def _signal_source(api: Api, owner: Person, label: str) -> str:
    """A signal source on a paper master of ``owner``, with a refusal in its log."""
    status, body = await api.call("POST", "/v1/accounts", owner, json={
        "name": f"{label}-paper", "platform": "paper", "role": "master",
        "credentials": CREDENTIALS})  # fmt: skip
    assert status == 201, body
    status, body = await api.call("POST", "/v1/signal-sources", owner, json={
        "name": f"{label}-signals", "master_account_id": body["account_id"],
        "symbol_map": {"XAUUSD": "XAUUSD"}, "allowed_ips": []})  # fmt: skip
    assert status == 201, body
    source_id = body["source"]["source_id"]
    status, _ = await api.call("POST", f"/v1/signals/tradingview/{source_id}", json={
        "secret": "wrong", "ticker": "XAUUSD", "time": "2026-02-16T02:15:00Z",
        "action": "close"})  # fmt: skip
    assert status == 401
    return str(source_id)


STRATEGY_SOURCE = "def strategy(candles, params):\n    return None\n"


async def _strategy_and_profile(api: Api, owner: Person, holder: Holdings, label: str) -> None:
    """A strategy with a version deployed on a paper master, and a marketplace profile:
    published for A (its own by-id reads answer), unpublished for B (404 to everyone else)."""
    status, body = await api.call("POST", "/v1/accounts", owner, json={
        "name": f"{label}-strategy-master", "platform": "paper", "role": "master",
        "credentials": CREDENTIALS})  # fmt: skip
    assert status == 201, body
    holder.paper_master = body["account_id"]
    status, body = await api.call("POST", "/v1/strategies", owner, json={
        "name": f"{label}-strategy", "source": STRATEGY_SOURCE + f"# {label}\n"})  # fmt: skip
    assert status == 201, body
    holder.strategy_id = body["strategy"]["strategy_id"]
    holder.version_id = body["version"]["version_id"]
    status, body = await api.call(
        "POST", f"/v1/strategies/{holder.strategy_id}/deployments", owner,
        json={"version_id": holder.version_id, "master_account_id": holder.paper_master,
              "symbol": "XAUUSD", "timeframe": "1h"},
    )  # fmt: skip
    assert status == 201, body
    holder.deployment_id = body["deployment_id"]
    holder.slug = f"{label}-profile"
    status, body = await api.call("PUT", "/v1/marketplace/profile", owner, json={
        "slug": holder.slug, "master_account_id": holder.master,
        "strategy_id": holder.strategy_id, "published": label == "alfa"})  # fmt: skip
    assert status == 200, body


def hostile_bodies(path: str, method: str, me: Holdings, victim: Holdings) -> list[Any] | None:
    """Bodies aimed at the victim, for every route that takes one (None: no body)."""
    new = uuid.uuid4().hex[:8]
    bodies: dict[tuple[str, str], list[Any]] = {
        ("POST", "/v1/auth/login"): [{"identifier": victim.person.email, "password": "guess-1"}],
        ("POST", "/v1/auth/refresh"): [{"refresh_token": victim.person.refresh + "x"}],
        ("POST", "/v1/auth/logout"): [{"refresh_token": victim.person.refresh + "x"}],
        ("POST", "/v1/tenants"): [{"tenant_id": victim.tenant, "name": "x",
                                   "provider_email": f"{new}@x.example.com",
                                   "provider_password": PASSWORD}],
        ("POST", "/v1/users"): [{"email": f"{new}@x.example.com", "password": PASSWORD}],
        ("POST", "/v1/api-keys"): [{"name": "probe"}],
        ("PUT", "/v1/me/password"): [{"current_password": "guess-1", "new_password": "x" * 12}],
        ("POST", "/v1/accounts"): [{"name": "x", "platform": "mt5", "role": "follower",
                                    "credentials": CREDENTIALS,
                                    "owner_user_id": victim.user_id}],
        ("PATCH", "/v1/accounts/{account_id}"): [{"name": "taken over",
                                                  "credentials": CREDENTIALS}],
        ("POST", "/v1/links"): [
            {"master": victim.master, "follower": victim.follower},
            {"master": me.master, "follower": victim.follower},
            {"master": victim.master, "follower": me.follower},
        ],
        ("PUT", "/v1/links/{link_id}"): [
            {"master": me.master, "follower": me.follower},
            {"master": victim.master, "follower": victim.follower},
        ],
        ("POST", "/v1/stops"): [{"scope": "link", "target": victim.link, "force": True}],
        ("POST", "/v1/accounts/{account_id}/orders"): [
            {"symbol": "XAUUSD", "side": "buy", "volume": 0.1, "client_order_id": new}],
        ("PATCH", "/v1/accounts/{account_id}/positions/{position_id}"): [{"sl": 1.0}],
        ("POST", "/v1/accounts/{account_id}/positions/{position_id}/close"): [{}],
        ("POST", "/v1/risk-templates"): [{"name": f"probe-{new}", "settings": {"max_lot": 2.0}}],
        ("PUT", "/v1/risk-templates/{risk_template_id}"): [
            {"name": f"taken-{new}", "settings": {}}],
        ("POST", "/v1/links/{link_id}/apply-template"): [
            {"template_id": victim.risk_template_id}, {"template_id": me.risk_template_id}],
        ("POST", "/v1/order-templates"): [{"name": f"probe-{new}", "symbol": "XAUUSD",
                                           "side": "sell", "volume": 0.2}],
        ("PUT", "/v1/order-templates/{order_template_id}"): [
            {"name": f"taken-{new}", "symbol": "XAUUSD", "side": "sell", "volume": 0.2}],
        ("POST", "/v1/invites"): [
            {"email": f"{new}@x.example.com", "role": "follower", "tenant_id": victim.tenant},
            {"email": f"{new}@x.example.com", "role": "provider", "tenant_id": victim.tenant},
        ],
        ("POST", "/v1/invites/accept"): [{"token": "x" * 43, "password": PASSWORD}],
        ("POST", "/v1/auth/password-reset"): [{"email": f"{new}@x.example.com"}],
        ("POST", "/v1/auth/password-reset/confirm"): [{"token": "x" * 43,
                                                       "new_password": PASSWORD}],
        ("POST", "/v1/auth/verify-email"): [{"token": "x" * 43}],
        ("POST", "/v1/me/totp/confirm"): [{"code": "000000"}],
        ("DELETE", "/v1/me/totp"): [{"password": "guess-1"}, {"code": "000000"}],
        ("PUT", "/v1/security/totp-policy"): [{"required_roles": ["provider", "follower"]}],
        ("POST", "/v1/operator-plans"): [{"name": f"probe-{new}", "currency": "EUR",
                                          "platform_fee_percent": "10",
                                          "account_pool_limit": 1, "modules": []}],
        ("PUT", "/v1/tenants/{tenant_id}/operator-plan"): [
            {"plan_id": victim.operator_plan_id}],
        ("POST", "/v1/plans"): [
            {"name": f"probe-{new}", "currency": "EUR", "modules": ["subscription"],
             "subscription_price_minor": 1, "subscription_period": "monthly",
             "risk_template_id": victim.risk_template_id}],
        ("POST", "/v1/plans/{plan_id}/checkout"): [{"client_key": f"probe-{new}"}],
        ("POST", "/v1/billing/onboarding"): [{"country": "DE"}],
        ("POST", "/v1/followers/{follower}/plan-changes"): [
            {"from_plan": victim.plan_id, "to_plan": victim.plan_id_2},
            {"from_plan": me.plan_id, "to_plan": me.plan_id_2},
        ],
        ("POST", "/v1/signal-sources"): [{"name": f"probe-{new}", "symbol_map": {"X": "X"},
                                          "master_account_id": victim.master}],
        ("POST", "/v1/strategies"): [{"name": f"probe-{new}", "source": STRATEGY_SOURCE}],
        ("POST", "/v1/strategies/{strategy_id}/versions"): [
            {"source": STRATEGY_SOURCE + f"# {new}\n"}],
        ("POST", "/v1/strategies/{strategy_id}/deployments"): [
            {"version_id": victim.version_id, "master_account_id": victim.paper_master,
             "symbol": "XAUUSD", "timeframe": "4h"},
            {"version_id": me.version_id, "master_account_id": victim.paper_master,
             "symbol": "XAUUSD", "timeframe": "4h"},
        ],
        ("PUT", "/v1/marketplace/profile"): [
            {"slug": victim.slug, "master_account_id": victim.master, "published": True},
            {"slug": f"probe-{new}", "master_account_id": victim.master, "published": True},
        ],
        ("POST", "/v1/marketplace/providers/{slug}/follow-on-paper"): [{}],
        ("POST", "/v1/signals/tradingview/{source_id}"): [
            {"secret": "guess-1", "ticker": "XAUUSD", "time": "2026-02-16T02:15:00Z",
             "action": "close"}],
    }  # fmt: skip
    return bodies.get((method, path))


async def victim_snapshot(api: Api, victim: Holdings) -> Any:
    """Every row and bucket entry of the victim's, read past every wall (superuser)."""
    owner = uuid.UUID(victim.user_id) if victim.follower_only else None
    conn = await asyncpg.connect(api.database_url)
    try:
        rows = {}
        for table, owner_column in (
            ("api_tenants", None), ("api_users", "user_id"), ("api_refresh_tokens", "user_id"),
            ("api_keys", "user_id"), ("api_accounts", "owner_user_id"),
            ("api_links", "owner_user_id"), ("api_invites", None), ("api_user_tokens", "user_id"),
            ("api_email_outbox", None), ("api_totp", "user_id"), ("api_recovery_codes", "user_id"),
            ("api_risk_templates", None), ("api_order_templates", "owner_user_id"),
            ("api_signal_sources", None), ("api_strategies", None),
            ("api_strategy_versions", None), ("api_strategy_deployments", None),
            ("api_marketplace_profiles", None),
        ):  # fmt: skip
            where = "tenant_id = $1"
            if owner_column is not None:
                where += f" AND ($2::uuid IS NULL OR {owner_column} = $2)"
            else:
                where += " AND $2::uuid IS NULL"
            found = await conn.fetch(
                f"SELECT to_jsonb(t)::text FROM {table} t WHERE {where} ORDER BY 1",
                victim.tenant, owner,
            )  # fmt: skip
            rows[table] = [r[0] for r in found]
        # Anyone may post to a webhook, and its refusals are logged; what must not change is
        # what the source accepted.
        rows["signals_accepted"] = await conn.fetchval(
            "SELECT count(*) FROM api_signal_log WHERE tenant_id = $1 AND outcome = 'accepted'",
            victim.tenant,
        )
        rows["billing_plans"] = [r[0] for r in await conn.fetch(
            "SELECT to_jsonb(p)::text FROM billing_follower_plans p WHERE provider = $1"
            " AND $2::uuid IS NULL ORDER BY 1", victim.tenant, owner)]  # fmt: skip
        rows["billing_checkouts"] = [r[0] for r in await conn.fetch(
            "SELECT to_jsonb(c)::text FROM billing_checkouts c WHERE provider = $1"
            " AND ($2::uuid IS NULL OR follower = $2::text) ORDER BY 1",
            victim.tenant, owner)]  # fmt: skip
        rows["billing_plan_changes"] = [r[0] for r in await conn.fetch(
            "SELECT to_jsonb(c)::text FROM billing_plan_changes c WHERE provider = $1"
            " AND ($2::uuid IS NULL OR follower = $2::text) ORDER BY 1",
            victim.tenant, owner)]  # fmt: skip
        rows["billing_subscriptions"] = [r[0] for r in await conn.fetch(
            "SELECT to_jsonb(s)::text FROM billing_subscriptions s JOIN billing_follower_plans p"
            " USING (plan_id) WHERE p.provider = $1 AND ($2::uuid IS NULL OR s.follower ="
            " $2::text) ORDER BY 1", victim.tenant, owner)]  # fmt: skip
        rows["billing_onboardings"] = [r[0] for r in await conn.fetch(
            "SELECT to_jsonb(o)::text FROM billing_onboardings o WHERE provider = $1"
            " AND $2::uuid IS NULL ORDER BY 1", victim.tenant, owner)]  # fmt: skip
        rows["audit"] = await conn.fetchval(
            "SELECT count(*) FROM api_audit_log WHERE entity_id = ANY($1::text[])",
            victim.markers,
        )
    finally:
        await conn.close()
    assert rows["api_accounts"] and rows["api_links"], "the victim owns nothing to protect"
    buckets = await ensure_buckets(api.js)
    rows["kv_link"] = (await buckets[subjects.KV_LINKS].get(victim.link)).value
    # The victim's own deployment, read by its key: listing the bucket's keys (a watcher)
    # can come back empty on a loaded machine, which would look like a deletion.
    key = subjects.deployment_key(victim.version_id, "XAUUSD", "1h")
    try:
        entry = await buckets[subjects.KV_SIGNAL_DEPLOYMENTS].get(key)
        rows["kv_deployment"] = (entry.revision, entry.value)
    except nats.js.errors.KeyNotFoundError:
        rows["kv_deployment"] = None
    # A victim that deployed a strategy has something there to protect.
    assert rows["kv_deployment"] is not None or victim.version_id.startswith("sv-0000"), key
    return rows


def app_routes(api: Api) -> list[tuple[str, str]]:
    found = []
    for route in api.client.app.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue
        found.append((route.method, route.resource.canonical))
    return sorted(set(found))


async def _stream_opening(client_api: Api, path: str, who: Person) -> tuple[int, Any]:
    """A live stream never ends: its answer is its opening event (the accounts it follows)."""
    response = await client_api.client.get(path, headers=who.headers)
    try:
        if response.status != 200:
            return response.status, await response.json(content_type=None)
        head = b""
        while not head.endswith(b"\n\n"):
            head += await asyncio.wait_for(response.content.readline(), 5)
        return response.status, head.decode()
    finally:
        response.close()


async def attack(
    api: Api, client_api: Api, me: Holdings, victim: Holdings
) -> tuple[list[str], int]:
    """Every route, aimed at the victim; the violations found and the requests made."""
    violations: list[str] = []
    made = 0
    for method, path in app_routes(api):
        params = _PARAM.findall(path)
        concrete = path
        for name in params:
            concrete = concrete.replace("{" + name + "}", victim.param(name))
        bodies = hostile_bodies(path, method, me, victim)
        declared = next(r for r in ROUTES if (r.method, r.path) == (method, path))
        if declared.request is not None:
            assert bodies, f"add hostile bodies for {method} {path}"
        for body in bodies or [None]:
            if declared.media_type == "text/event-stream":
                status, answer = await _stream_opening(client_api, concrete, me.person)
            else:
                status, answer = await client_api.call(method, concrete, me.person, json=body)
            made += 1
            text = "" if answer is None else str(answer)
            sent = concrete + str(body)  # echoing what the attacker sent reveals nothing
            leaked = [m for m in victim.markers if m in text and m not in sent]
            if leaked:
                violations.append(f"{method} {concrete} -> {status} shows {leaked}")
            if params and 200 <= status < 300:
                violations.append(f"{method} {concrete} -> {status}: reached the victim's resource")
    return violations, made


PAIRS = [
    ("provider A vs provider B", "provider_a", "provider_b"),
    ("follower vs follower", "follower_a1", "follower_a2"),
    ("follower A vs provider B", "follower_a1", "provider_b"),
    ("API key of A vs provider B", "backend_a", "provider_b"),
]

#: (app scoping, database role): which walls stand.
WALLS = {
    "both walls": (True, "tradecopy_api"),
    "row-level security alone": (False, "tradecopy_api"),
    "application scoping alone": (True, None),
}


@pytest.mark.parametrize("walls", list(WALLS))
async def test_no_route_lets_one_party_reach_another(api: Api, nc: Any, walls: str) -> None:
    app_scoping, role = WALLS[walls]
    world = await build_world(api)
    client, pool = await serve(
        api.database_url, nc, api_config(database_role=role), app_scoping=app_scoping
    )
    attacker_api = Api(client=client, pool=pool, database_url=api.database_url, js=api.js)
    try:
        total = 0
        for label, me_name, victim_name in PAIRS:
            me, victim = getattr(world, me_name), getattr(world, victim_name)
            before = await victim_snapshot(api, victim)
            violations, made = await attack(api, attacker_api, me, victim)
            total += made
            assert violations == [], f"{walls}, {label}:\n" + "\n".join(violations)
            assert await victim_snapshot(api, victim) == before, f"{walls}, {label}: changed"
        assert total >= len(PAIRS) * len(app_routes(api))
        print(f"{walls}: {total} requests over {len(app_routes(api))} routes")
    finally:
        await client.close()
        await pool.close()


async def test_with_both_walls_down_the_matrix_finds_the_leaks(api: Api, nc: Any) -> None:
    """The matrix can fail: without scoping and as a role that bypasses RLS, it must."""
    world = await build_world(api)
    client, pool = await serve(api.database_url, nc, api_config(database_role=None),
                               app_scoping=False)  # fmt: skip
    attacker_api = Api(client=client, pool=pool, database_url=api.database_url, js=api.js)
    try:
        violations, _ = await attack(api, attacker_api, world.provider_a, world.provider_b)
    finally:
        await client.close()
        await pool.close()
    reached = "\n".join(violations)
    b = world.provider_b
    assert "GET /v1/accounts -> 200 shows" in reached, reached
    assert f"PATCH /v1/accounts/{b.follower} -> 200: reached" in reached, reached
    assert f"DELETE /v1/links/{b.link} -> 204: reached" in reached, reached


async def test_the_matrix_covers_every_route_and_own_resources_answer(api: Api) -> None:
    world = await build_world(api)
    routes = app_routes(api)
    assert routes == sorted({(r.method, r.path) for r in ROUTES})
    # Positive control: the same by-id reads of one's own resources succeed.
    me = world.provider_a
    for method, path in routes:
        if method != "GET" or not _PARAM.findall(path):
            continue
        declared = next(r for r in ROUTES if (r.method, r.path) == (method, path))
        if declared.roles is not None and Role.PROVIDER not in declared.roles:
            continue  # the operator's, or a follower's own (tests/test_api_plans.py)
        concrete = path
        for name in _PARAM.findall(path):
            concrete = concrete.replace("{" + name + "}", me.param(name))
        status, body = await api.call("GET", concrete, me.person)
        assert status == 200, (concrete, body)


# ------------------------------------------------------------------ the database wall


async def _as_api_role(url: str, tenant: str, follower: str = "") -> asyncpg.Connection:
    conn = await asyncpg.connect(url)
    await conn.execute("SET ROLE tradecopy_api")
    await conn.execute(
        "SELECT set_config('tradecopy.tenant', $1, false),"
        " set_config('tradecopy.follower', $2, false)",
        tenant,
        follower,
    )
    return conn


async def test_row_level_security_refuses_other_tenants_on_every_table(api: Api) -> None:
    world = await build_world(api)
    tables = ["api_tenants", "api_users", "api_refresh_tokens", "api_keys", "api_accounts",
              "api_links", "api_audit_log", "api_invites", "api_user_tokens", "api_email_outbox",
              "api_totp", "api_recovery_codes", "api_risk_templates",
              "api_order_templates", "api_signal_sources", "api_signal_log",
              "api_strategies", "api_strategy_versions", "api_strategy_deployments",
              "api_marketplace_profiles"]  # fmt: skip
    conn = await _as_api_role(api.database_url, world.provider_a.tenant)
    try:
        for table in tables:
            tenants = {r[0] for r in await conn.fetch(f"SELECT tenant_id FROM {table}")}
            assert tenants == {world.provider_a.tenant}, (table, tenants)
        updated = await conn.execute(
            "UPDATE api_accounts SET name = 'x' WHERE account_id = $1", world.provider_b.master
        )
        assert updated == "UPDATE 0"
        deleted = await conn.execute(
            "DELETE FROM api_links WHERE link_id = $1", world.provider_b.link
        )
        assert deleted == "DELETE 0"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "INSERT INTO api_audit_log (tenant_id, action, entity, entity_id)"
                " VALUES ($1, 'x', 'x', 'x')",
                world.provider_b.tenant,
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM api_audit_log")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "UPDATE api_accounts SET tenant_id = $1 WHERE account_id = $2",
                world.provider_b.tenant, world.provider_a.master,
            )  # fmt: skip
    finally:
        await conn.close()
    conn = await _as_api_role(api.database_url, world.follower_a1.tenant, world.follower_a1.user_id)
    try:
        accounts = {r[0] for r in await conn.fetch("SELECT account_id FROM api_accounts")}
        assert accounts == {world.follower_a1.follower}
        users = {str(r[0]) for r in await conn.fetch("SELECT user_id FROM api_users")}
        assert users == {world.follower_a1.user_id}
        assert await conn.fetchval("SELECT count(*) FROM api_audit_log") == 0
    finally:
        await conn.close()
    conn = await _as_api_role(api.database_url, "")
    try:
        for table in tables:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    finally:
        await conn.close()
