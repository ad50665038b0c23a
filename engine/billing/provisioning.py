"""Auto-provisioning: a plan's risk template applied to a follower's links when it activates.

A provider plan may name a risk template of the provider's tenant (the API's
``api_risk_templates``, read through its documented view ``api_plan_risk_templates``). When a
follower's subscription to the plan becomes active (a completed Checkout, a subscription created
or reactivated: the trigger of ``billing_subscriptions`` marks it in
``billing_provisioning_due``), the template's settings are merged into every link from one of
the provider's masters into one of the follower's accounts (``billing_accounts`` and the API's
``api_billing_account_owners()``), in the ``tc_links`` KV, with a revision-checked update as
enforcement writes.

- **Once.** ``billing_plan_provisioning`` holds one row per (follower, plan, link, template);
  the row is locked while its link is written, so two activations at once make one write and
  a re-run makes none.
- **Never loosens a stop.** ``enabled`` (billing's close-only stop, or the provider's pause) is
  kept as it is; only the template's settings change, and the merged link is validated by the
  same rules as every link.
- **Links created later** get the template on the next sync (``sync``, hourly in the service),
  which provisions every active subscription again; links already provisioned are skipped.
- A template edited after activation is not pushed again (its row is ``applied``): the provider
  applies an edited template with ``POST /v1/links/{id}/apply-template``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import asyncpg
import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from prometheus_client import Counter

from engine.billing import store
from engine.billing.enforcement import Scope, links_of
from engine.billing.linkskv import LinksKv
from engine.billing.plans import plan_terms
from engine.billing.store import EnforcementCause
from engine.core.errors import TradecopyError
from engine.runtime.links import validate_link
from schemas.links import CopyLink

log = structlog.get_logger("tradecopy.billing.provisioning")

T = TypeVar("T")

LINK_WRITES = Counter(
    "tradecopy_billing_provisioning_links_total",
    "Links a plan's risk template was applied to, skipped (done before) or failed on",
    ["result"],
)

#: What a template never sets: the link's identity and its stop.
_NEVER = frozenset({"link_id", "master", "follower", "enabled"})


class ProvisioningFailed(TradecopyError):
    """A link could not be written (NATS did not answer every try, or the merged link is
    invalid); its row stays ``failed`` and the next sync tries again."""


class ProvisionSummary(msgspec.Struct, frozen=True, kw_only=True):
    applied: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    """Links provisioned before (by another activation or an earlier run)."""
    failed: tuple[str, ...] = ()
    template_id: str | None = None


async def template_settings(
    conn: asyncpg.Connection, template_id: str, tenant_id: str
) -> dict[str, Any] | None:
    """The template's settings from the API's view; None when it is gone (or not the
    provider's)."""
    value = await conn.fetchval(
        "SELECT settings::text FROM api_plan_risk_templates"
        " WHERE template_id = $1 AND tenant_id = $2",
        template_id,
        tenant_id,
    )
    if value is None:
        return None
    settings = msgspec.json.decode(value)
    return settings if isinstance(settings, dict) else None


async def account_owners(conn: asyncpg.Connection) -> dict[str, tuple[str, str | None]]:
    """account → (provider, follower): ``billing_accounts``, and the API's accounts through its
    documented function ``api_billing_account_owners()`` when the API is in this database."""
    owners = await store.account_owners(conn)
    if await conn.fetchval("SELECT to_regprocedure('api_billing_account_owners()') IS NOT NULL"):
        rows = await conn.fetch(
            "SELECT account_id, provider, follower FROM api_billing_account_owners()"
        )
        owners.update({row["account_id"]: (row["provider"], row["follower"]) for row in rows})
    return owners


def merged_link(link: CopyLink, settings: dict[str, Any]) -> CopyLink:
    """``link`` with the template's settings, its identity and ``enabled`` untouched."""
    raw = {**msgspec.to_builtins(link)}
    raw.update({k: v for k, v in settings.items() if k not in _NEVER})
    raw["enabled"] = link.enabled
    merged, errors = validate_link(raw)
    if merged is None:
        problems = "; ".join(f"{e.where}: {e.message}" for e in errors)
        raise ProvisioningFailed(f"the template makes link {link.link_id} invalid: {problems}")
    return merged


class Provisioner:
    """Applies plans' risk templates to ``tc_links``: one per billing service."""

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
        self.links_kv = LinksKv(
            js, kv, failure=ProvisioningFailed, attempts=attempts, base_delay_s=base_delay_s,
            op_timeout_s=op_timeout_s, log_event="provisioning_retry",
        )  # fmt: skip

    async def _write(self, link_id: str, settings: dict[str, Any]) -> bool:
        """Merge ``settings`` into the link (revision-checked: an edit made meanwhile is read
        again and kept); False when the link is gone."""
        edited = await self.links_kv.edit(link_id, lambda link: merged_link(link, settings))
        return edited is not None

    async def provision(self, follower: str, plan_id: str) -> ProvisionSummary:
        """Apply ``plan_id``'s risk template to ``follower``'s links into its provider's
        masters, each once."""
        async with self.pool.acquire() as conn:
            plan = await plan_terms(conn, plan_id)
            active = await conn.fetchval(
                "SELECT status = 'active' FROM billing_subscriptions"
                " WHERE follower = $1 AND plan_id = $2",
                follower,
                plan_id,
            )
            if plan is None or plan.risk_template_id is None or not active:
                return ProvisionSummary()
            template_id = plan.risk_template_id
            try:
                settings = await template_settings(conn, template_id, plan.provider)
            except asyncpg.UndefinedTableError:
                # A database without the API: no template can be read, nothing is applied.
                log.error("provisioning_without_api_view", plan_id=plan_id, template_id=template_id)
                return ProvisionSummary(template_id=template_id)
            owners = await account_owners(conn)
        if settings is None:
            log.warning("provisioning_template_missing", plan_id=plan_id, template_id=template_id)
            return ProvisionSummary(template_id=template_id)
        cause = EnforcementCause(
            scope=Scope.FOLLOWER, subject=follower, cause="provisioning", provider=plan.provider
        )
        targets = sorted(links_of(cause, (await self.links_kv.links()).values(), owners))
        applied: list[str] = []
        skipped: list[str] = []
        failed: list[str] = []
        for link_id in targets:
            async with self.pool.acquire() as conn, conn.transaction():
                # The row lock is the one-writer guarantee: a concurrent activation waits here
                # and then finds the row applied.
                await conn.execute(
                    "INSERT INTO billing_plan_provisioning (follower, plan_id, link_id,"
                    " template_id) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    follower, plan_id, link_id, template_id,
                )  # fmt: skip
                status = await conn.fetchval(
                    "SELECT status FROM billing_plan_provisioning WHERE follower = $1"
                    " AND plan_id = $2 AND link_id = $3 AND template_id = $4 FOR UPDATE",
                    follower, plan_id, link_id, template_id,
                )  # fmt: skip
                if status == "applied":
                    LINK_WRITES.labels(result="skipped").inc()
                    skipped.append(link_id)
                    continue
                try:
                    await self._write(link_id, settings)
                except ProvisioningFailed as exc:
                    await conn.execute(
                        "UPDATE billing_plan_provisioning SET status = 'failed',"
                        " attempts = attempts + 1, last_error = $5, updated_at = now()"
                        " WHERE follower = $1 AND plan_id = $2 AND link_id = $3"
                        " AND template_id = $4",
                        follower, plan_id, link_id, template_id, str(exc),
                    )  # fmt: skip
                    LINK_WRITES.labels(result="failed").inc()
                    log.error("provisioning_link_failed", link_id=link_id, error=str(exc))
                    failed.append(link_id)
                    continue
                await conn.execute(
                    "UPDATE billing_plan_provisioning SET status = 'applied',"
                    " attempts = attempts + 1, last_error = NULL, applied_at = now(),"
                    " updated_at = now() WHERE follower = $1 AND plan_id = $2"
                    " AND link_id = $3 AND template_id = $4",
                    follower, plan_id, link_id, template_id,
                )  # fmt: skip
                LINK_WRITES.labels(result="applied").inc()
                applied.append(link_id)
        log.info(
            "plan_provisioned", follower=follower, plan_id=plan_id, template_id=template_id,
            applied=len(applied), skipped=len(skipped), failed=len(failed),
        )  # fmt: skip
        return ProvisionSummary(
            applied=tuple(applied), skipped=tuple(skipped), failed=tuple(failed),
            template_id=template_id,
        )  # fmt: skip

    async def drain_due(self) -> int:
        """Provision every subscription activated since the last pass; how many."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT follower, plan_id, due_at FROM billing_provisioning_due ORDER BY due_at"
            )
        for row in rows:
            await self.provision(row["follower"], row["plan_id"])
            async with self.pool.acquire() as conn:
                # Only this mark: an activation that came meanwhile stays due.
                await conn.execute(
                    "DELETE FROM billing_provisioning_due"
                    " WHERE follower = $1 AND plan_id = $2 AND due_at = $3",
                    row["follower"], row["plan_id"], row["due_at"],
                )  # fmt: skip
        return len(rows)

    async def sync(self) -> int:
        """Every active subscription to a plan with a template, provisioned again: links made
        after activation get the template, failed ones are tried again. Idempotent."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT s.follower, s.plan_id FROM billing_subscriptions s"
                " JOIN billing_follower_plans p USING (plan_id)"
                " WHERE s.status = 'active' AND p.risk_template_id IS NOT NULL"
                " ORDER BY s.follower, s.plan_id"
            )
        for row in rows:
            await self.provision(row["follower"], row["plan_id"])
        return len(rows)
