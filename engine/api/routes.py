"""Every endpoint of the API, in one table: the router and the OpenAPI document read it."""

from __future__ import annotations

from typing import Any

from engine.api import (
    accounts,
    billing,
    history,
    identity,
    links,
    marketplace,
    people,
    plan_changes,
    plans,
    signals,
    strategies,
    stream,
    trading,
)
from engine.api.handling import Context, Route


async def openapi_document(ctx: Context) -> tuple[int, Any]:
    return 200, ctx.state.openapi


ROUTES: list[Route] = [
    *people.ROUTES,
    *accounts.ROUTES,
    *links.ROUTES,
    *identity.ROUTES,
    *trading.ROUTES,
    *history.ROUTES,
    *stream.ROUTES,
    *signals.ROUTES,
    *plans.ROUTES,
    *plan_changes.ROUTES,
    *billing.ROUTES,
    *strategies.ROUTES,
    *marketplace.ROUTES,
    Route("GET", "/v1/openapi.json", openapi_document, "This document", "meta"),
]
