"""Signal sources: TradingView alerts that drive a provider's paper master through the API.

A provider creates a source naming one of its paper master accounts; TradingView posts each
alert to ``POST /v1/signals/tradingview/{source_id}``. The alert (``engine.core.tradingview``)
becomes manual orders on the master whose ids derive from the alert's id, so a retried
webhook maps to the same orders: the accepted entry of the source's log stops it in the
database, ``Nats-Msg-Id`` stops it in JetStream (also across API instances), and the
connector's order journal stops it at the venue. The replicator copies the master's trades.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import math
import secrets
import time
from typing import Annotated, Any

import msgspec
import nats.errors
import structlog
from aiohttp import web

from engine.api import store as sql
from engine.api.auth import token_hash
from engine.api.errors import (
    FieldProblem,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from engine.api.handling import (
    PROVIDERS,
    Context,
    Route,
    iso,
    next_cursor,
    page_params,
    parse_body,
)
from engine.api.models import Page
from engine.api.store import PLATFORM, Scope
from engine.api.trading import _symbol_spec
from engine.core.book import OpenPosition
from engine.core.errors import AlertError
from engine.core.tradingview import (
    MAX_ALERT_BYTES,
    MasterActionKind,
    TradeIntent,
    TradingViewAlert,
    alert_id,
    intent_of,
    parse_alert,
)
from engine.core.volume import STEP_EPSILON
from engine.runtime.ledger_reads import decode_facts, open_positions
from schemas import codec, subjects
from schemas.account import SymbolSpec
from schemas.common import Side
from schemas.orders import MANUAL_LINK_ID, FollowerClose, FollowerOpen, FollowerOrder
from schemas.orders import manual_order_id as _manual_order_id

log = structlog.get_logger("tradecopy.api")

#: TradingView's published webhook sender addresses ("About webhooks", TradingView's help
#: centre). TradingView may change them: operators keep this list current, and a source
#: may carry its own list (empty: no address check).
TRADINGVIEW_ADDRESSES = ("52.89.214.238", "34.212.75.30", "54.218.53.128", "52.32.178.7")

#: aiohttp reads a missing Content-Type as application/octet-stream.
_BODY_TYPES = frozenset({"text/plain", "application/json", "application/octet-stream"})

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Ticker = Annotated[str, msgspec.Meta(min_length=1, max_length=130)]
Symbol = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Address = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class SignalOutcome(enum.StrEnum):
    ACCEPTED = "accepted"
    WRONG_SECRET = "wrong_secret"
    ADDRESS_NOT_ALLOWED = "address_not_allowed"
    MALFORMED = "malformed"


class SignalSourceRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A TradingView webhook driving one of the tenant's paper masters."""

    name: Name
    master_account_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    symbol_map: Annotated[dict[Ticker, Symbol], msgspec.Meta(min_length=1, max_length=200)]
    """TradingView ticker (``XAUUSD``, or ``EXCHANGE:TICKER`` as ``OANDA:XAUUSD``) -> the
    master's symbol. An alert's ``exchange:ticker`` is looked up first, then its ticker."""
    volume_scale: Annotated[float, msgspec.Meta(gt=0.0, le=1_000_000.0)] = 1.0
    """Lots per alert contract (a plain message's volume is in contracts too)."""
    allowed_ips: Annotated[list[Address], msgspec.Meta(max_length=64)] | None = None
    """Senders allowed (addresses or CIDR networks); left out: TradingView's published
    addresses; empty: any sender (the secret alone guards the source)."""


class SignalSourceView(msgspec.Struct, frozen=True, kw_only=True):
    source_id: str
    name: str
    master_account_id: str
    symbol_map: dict[str, str]
    volume_scale: float
    allowed_ips: list[str]
    webhook_path: str
    """Where TradingView posts: the API's base URL followed by this path."""
    created_at: str


class SignalSourceCreated(msgspec.Struct, frozen=True, kw_only=True):
    source: SignalSourceView
    secret: str
    """Shown once: put it in the alert message's ``secret``. Only its SHA-256 is stored."""


class SignalLogEntry(msgspec.Struct, frozen=True, kw_only=True):
    log_id: int
    at: str
    outcome: SignalOutcome
    reason: str
    alert_id: str | None
    order_ids: list[str] | None
    remote: str
    """The sender's address as the API saw it."""


class SignalAccepted(msgspec.Struct, frozen=True, kw_only=True):
    alert_id: str
    intent: str
    """What the alert does to the master: open, add, reduce, close, reverse or none."""
    order_ids: list[str]
    duplicate: bool
    """True when this alert was accepted before: nothing new was sent."""


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(message, errors=[FieldProblem(field=field, message=message)])


def _source_view(row: Any) -> SignalSourceView:
    def decoded(value: Any) -> Any:
        return msgspec.json.decode(value) if isinstance(value, str) else value

    return SignalSourceView(
        source_id=row["source_id"], name=row["name"], master_account_id=row["master_account_id"],
        symbol_map=decoded(row["symbol_map"]), volume_scale=row["volume_scale"],
        allowed_ips=decoded(row["allowed_ips"]),
        webhook_path=f"/v1/signals/tradingview/{row['source_id']}",
        created_at=iso(row["created_at"]),
    )  # fmt: skip


def _log_entry(row: Any) -> SignalLogEntry:
    order_ids = row["order_ids"]
    return SignalLogEntry(
        log_id=row["log_id"], at=iso(row["at"]), outcome=SignalOutcome(row["outcome"]),
        reason=row["reason"], alert_id=row["alert_id"],
        order_ids=msgspec.json.decode(order_ids) if isinstance(order_ids, str) else order_ids,
        remote=row["remote"],
    )  # fmt: skip


def _checked_addresses(raw: list[str] | None) -> list[str]:
    if raw is None:
        return list(TRADINGVIEW_ADDRESSES)
    out = []
    for i, text in enumerate(raw):
        try:
            if "/" in text:
                out.append(str(ipaddress.ip_network(text, strict=False)))
            else:
                out.append(str(ipaddress.ip_address(text)))
        except ValueError:
            raise _invalid(f"allowed_ips[{i}]", f"{text!r} is not an address or network") from None
    return out


# ------------------------------------------------------------------------------ sources


async def create_signal_source(ctx: Context) -> tuple[int, Any]:
    """A new source for one of the tenant's paper masters; its secret is shown once."""
    body = await parse_body(ctx.request, SignalSourceRequest)
    caller, store = ctx.who, ctx.state.store
    allowed = _checked_addresses(body.allowed_ips)
    secret = secrets.token_urlsafe(32)
    source_id = "sig-" + secrets.token_hex(8)
    async with store.tx(Scope.of(caller)) as conn:
        master = await store.get_account(conn, Scope.of(caller), body.master_account_id)
        if master is None:
            raise _invalid("master_account_id", "no account of this tenant has that id")
        if master["role"] != "master" or master["platform"] != "paper":
            # Signal sources drive paper masters: a live account would take orders no
            # terminal of its owner placed.
            raise _invalid("master_account_id", "a signal source drives a paper master account")
        row = await sql.create_signal_source(
            store, conn, source_id=source_id, tenant_id=str(caller.tenant_id),
            fields={"name": body.name, "master_account_id": master["account_id"],
                    "symbol_map": body.symbol_map, "volume_scale": body.volume_scale,
                    "allowed_ips": allowed, "secret_hash": token_hash(secret)},
        )  # fmt: skip
        view = _source_view(row)
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="create", entity="signal_source",
            entity_id=source_id, after=msgspec.to_builtins(view),
        )  # fmt: skip
    return 201, SignalSourceCreated(source=view, secret=secret)


async def list_signal_sources(ctx: Context) -> tuple[int, Any]:
    after, limit = page_params(ctx, str)
    store, scope = ctx.state.store, Scope.of(ctx.who)
    async with store.tx(scope) as conn:
        rows = await sql.list_signal_sources(store, conn, scope, after, limit + 1)
    items = [_source_view(r) for r in rows[:limit]]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: r["source_id"]))


async def _source_in_scope(ctx: Context, conn: Any) -> Any:
    source_id = ctx.request.match_info["source_id"]
    row = await sql.get_signal_source(ctx.state.store, conn, Scope.of(ctx.who), source_id)
    if row is None:
        raise NotFound("no such signal source")
    return row


async def get_signal_source(ctx: Context) -> tuple[int, Any]:
    async with ctx.state.store.tx(Scope.of(ctx.who)) as conn:
        row = await _source_in_scope(ctx, conn)
    return 200, _source_view(row)


async def delete_signal_source(ctx: Context) -> tuple[int, Any]:
    """Remove a source and its log; its webhook answers 404 from now on."""
    caller, store = ctx.who, ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        # No FOR UPDATE: the API role may not update sources; the DELETE takes the row lock.
        row = await _source_in_scope(ctx, conn)
        await sql.delete_signal_source(store, conn, row["source_id"])
        await store.audit(
            conn, caller, tenant_id=row["tenant_id"], action="delete", entity="signal_source",
            entity_id=row["source_id"], before=msgspec.to_builtins(_source_view(row)),
        )  # fmt: skip
    return 204, None


async def list_signal_log(ctx: Context) -> tuple[int, Any]:
    """The source's user log, newest first: every alert accepted or refused, and why."""
    after, limit = page_params(ctx, int)
    store, scope = ctx.state.store, Scope.of(ctx.who)
    async with store.tx(scope) as conn:
        row = await _source_in_scope(ctx, conn)
        rows = await sql.list_signal_log(store, conn, scope, row["source_id"], after, limit + 1)
    items = [_log_entry(r) for r in rows[:limit]]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: r["log_id"]))


# ------------------------------------------------------------------------------ webhook


def _sender(ctx: Context) -> str:
    """The sender's address. Behind a reverse proxy ``request.remote`` is the proxy: name the
    header the proxy sets (``signal_client_ip_header``, e.g. ``X-Forwarded-For``) in the
    config, and its last hop is taken (the one the proxy itself appended)."""
    header = getattr(ctx.state.config, "signal_client_ip_header", None)
    if header:
        value = ctx.request.headers.get(header, "")
        hops = [hop.strip() for hop in value.split(",") if hop.strip()]
        if hops:
            return hops[-1]
    return ctx.request.remote or ""


def _address_allowed(sender: str, allowed: list[str]) -> bool:
    if not allowed:
        return True
    try:
        address = ipaddress.ip_address(sender)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(net, strict=False) for net in allowed)


async def _alert_body(request: web.Request) -> bytes:
    # TradingView sends text/plain for a message that is not JSON-looking, and
    # application/json for one that is: both carry the same message.
    if request.content_type not in _BODY_TYPES:
        raise UnsupportedMediaType(
            f"send text/plain or application/json, not {request.content_type}"
        )
    try:
        raw = await request.read()  # bounded by the app's max_body_bytes
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"an alert message is at most {MAX_ALERT_BYTES} bytes") from None
    if len(raw) > MAX_ALERT_BYTES:
        raise PayloadTooLarge(f"an alert message is at most {MAX_ALERT_BYTES} bytes")
    return raw


async def _refuse(
    ctx: Context, source: Any, outcome: SignalOutcome, reason: str, sender: str,
    alert: str | None = None,
) -> None:  # fmt: skip
    """Write the refusal to the source's log (its provider reads it) before answering."""
    store = ctx.state.store
    async with store.tx(Scope(source["tenant_id"])) as conn:
        await sql.add_signal_log(
            store, conn, tenant_id=source["tenant_id"], source_id=source["source_id"],
            outcome=outcome.value, reason=reason, alert_id=alert, remote=sender,
        )  # fmt: skip
    log.info("signal_refused", source=source["source_id"], outcome=outcome.value,
             reason=reason, sender=sender, alert_id=alert)  # fmt: skip


def _master_symbol(alert: TradingViewAlert, symbol_map: dict[str, str]) -> str | None:
    if alert.exchange:
        mapped = symbol_map.get(f"{alert.exchange}:{alert.ticker}")
        if mapped is not None:
            return mapped
    if ":" in alert.ticker:
        return symbol_map.get(alert.ticker) or symbol_map.get(alert.ticker.partition(":")[2])
    return symbol_map.get(alert.ticker)


async def _master_positions(store: Any, conn: Any, scope: Scope, master: str) -> list[OpenPosition]:
    """The master's open positions as the ledger last recorded them."""
    rows = await store.ledger_account_facts(conn, scope, master)
    if rows is None:
        return []
    return open_positions(master, decode_facts(rows))


def _lots(contracts: float, scale: float, spec: SymbolSpec) -> float:
    """Contracts in lots, down to the symbol's step (never more than the alert asked)."""
    steps = math.floor(contracts * scale / spec.volume_step + STEP_EPSILON)
    return min(round(steps * spec.volume_step, 8), spec.volume_max)


def _orders(
    master: str, symbol: str, aid: str, intent: TradeIntent, held: list[OpenPosition],
    scale: float, spec: SymbolSpec,
) -> list[FollowerOrder]:  # fmt: skip
    """The manual orders of the intent. Ids come from the alert id and the step's place, not
    from the step's kind: a retry that finds the master already moved (an open now read as an
    add) maps to the order id it had the first time."""
    now = time.time_ns()
    orders: list[FollowerOrder] = []
    for step, action in enumerate(intent.actions):
        base: dict[str, Any] = {"link_id": MANUAL_LINK_ID, "follower": master, "master": master,
                                "symbol": symbol, "ts_ns": now, "manual": True}  # fmt: skip
        if action.kind in (MasterActionKind.OPEN, MasterActionKind.ADD):
            assert action.volume is not None
            volume = _lots(action.volume, scale, spec)
            if volume < spec.volume_min - STEP_EPSILON:
                raise _invalid("contracts", f"{action.volume:g} contracts x {scale:g} is below "
                               f"the symbol's minimum {spec.volume_min} lots")  # fmt: skip
            order_id = _manual_order_id(master, f"{aid}:{step}")
            orders.append(FollowerOpen(
                **base, order_id=order_id, master_event_id=order_id, master_position_id=order_id,
                side=action.side, volume=volume, sl=action.sl, tp=action.tp,
                comment=f"tv {aid[3:15]}",
            ))  # fmt: skip
            continue
        ratio = 1.0 if action.kind is MasterActionKind.CLOSE else (action.ratio or 1.0)
        for position in held:
            if position.side is not action.side:
                continue
            order_id = _manual_order_id(master, f"{aid}:{step}:{position.position_id}")
            orders.append(FollowerClose(
                **base, order_id=order_id, master_event_id=order_id,
                master_position_id=position.position_id, ratio=ratio,
            ))  # fmt: skip
    return orders


async def _publish(ctx: Context, orders: list[FollowerOrder]) -> None:
    js = ctx.state.js
    if js is None:
        raise Unavailable("NATS is not reachable")
    for order in orders:
        try:
            await js.publish(
                subjects.follower_orders(order.follower), codec.encode(order),
                headers={"Nats-Msg-Id": order.order_id},
            )  # fmt: skip
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"NATS refused the order: {exc}") from None


async def tradingview_alert(ctx: Context) -> tuple[int, Any]:
    """A TradingView alert: checked, deduplicated, sent to the master (202, at once)."""
    started = time.perf_counter()
    state, store = ctx.state, ctx.state.store
    source_id = ctx.request.match_info["source_id"]
    state.limit(ctx.request, "signal")
    state.limit(ctx.request, "signal-source:" + source_id)
    raw = await _alert_body(ctx.request)
    async with store.read(PLATFORM) as conn:
        # No caller yet: the source id finds its tenant, and the secret proves the sender.
        source = await sql.get_signal_source(store, conn, PLATFORM, source_id)
    if source is None:
        raise NotFound("no such signal source")
    sender = _sender(ctx)
    allowed = source["allowed_ips"]
    allowed = msgspec.json.decode(allowed) if isinstance(allowed, str) else allowed
    if not _address_allowed(sender, allowed):
        await _refuse(ctx, source, SignalOutcome.ADDRESS_NOT_ALLOWED,
                      f"{sender} is not on the source's allow-list", sender)  # fmt: skip
        raise Forbidden("this sender's address is not allowed for this source")
    try:
        alert = parse_alert(raw)
    except AlertError as exc:
        await _refuse(ctx, source, SignalOutcome.MALFORMED, str(exc), sender)
        raise ValidationFailed(str(exc), errors=[
            FieldProblem(field=exc.field, message=exc.reason)]) from None  # fmt: skip
    # Hashes of equal length compared in constant time: the secret's length leaks nothing.
    if not hmac.compare_digest(token_hash(alert.secret), bytes(source["secret_hash"])):
        await _refuse(ctx, source, SignalOutcome.WRONG_SECRET, "the secret does not match",
                      sender)  # fmt: skip
        raise Unauthorized("the alert's secret is not this source's")
    aid = alert_id(source_id, alert)
    symbol_map = source["symbol_map"]
    symbol_map = msgspec.json.decode(symbol_map) if isinstance(symbol_map, str) else symbol_map
    symbol = _master_symbol(alert, symbol_map)
    if symbol is None:
        reason = f"ticker: {alert.ticker!r} is not in the source's symbol map"
        await _refuse(ctx, source, SignalOutcome.MALFORMED, reason, sender, aid)
        raise _invalid("ticker", f"{alert.ticker!r} is not in the source's symbol map")
    master, scope = source["master_account_id"], Scope(source["tenant_id"])
    spec = await _symbol_spec(ctx, master, symbol)
    if spec is None:
        reason = f"ticker: {symbol!r} is not traded on the master {master}"
        await _refuse(ctx, source, SignalOutcome.MALFORMED, reason, sender, aid)
        raise _invalid("ticker", f"{symbol!r} is not traded on the master account")
    async with store.tx(scope) as conn:
        earlier = await sql.accepted_signal(store, conn, source_id, aid)
        if earlier is None:
            held = [p for p in await _master_positions(store, conn, scope, master)
                    if p.symbol == symbol]  # fmt: skip
            net = sum(p.volume if p.side is Side.BUY else -p.volume for p in held)
            intent = intent_of(alert, net)
            orders = _orders(master, symbol, aid, intent, held, source["volume_scale"], spec)
            order_ids = [o.order_id for o in orders]
            # The accepted entry is the claim: a concurrent retry waits on its unique index
            # and finds it once this transaction commits.
            claimed = await sql.add_signal_log(
                store, conn, tenant_id=source["tenant_id"], source_id=source_id,
                outcome=SignalOutcome.ACCEPTED.value,
                reason=f"{intent.kind}: {len(orders)} order(s)",
                alert_id=aid, remote=sender, order_ids=order_ids,
            )  # fmt: skip
            if claimed:
                await _publish(ctx, orders)
                elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
                log.info("signal_accepted", source=source_id, alert_id=aid, intent=intent.kind,
                         orders=order_ids, ms=elapsed_ms)  # fmt: skip
                return 202, SignalAccepted(alert_id=aid, intent=str(intent.kind),
                                           order_ids=order_ids, duplicate=False)  # fmt: skip
            earlier = await sql.accepted_signal(store, conn, source_id, aid)
    assert earlier is not None
    entry = _log_entry(earlier)
    intent_name = entry.reason.partition(":")[0]
    return 202, SignalAccepted(alert_id=aid, intent=intent_name, order_ids=entry.order_ids or [],
                               duplicate=True)  # fmt: skip


_SOURCES = "/v1/signal-sources"

ROUTES = [
    Route("POST", _SOURCES, create_signal_source, "Create a TradingView signal source",
          "signals", roles=PROVIDERS, request=SignalSourceRequest,
          response=SignalSourceCreated, status=201, errors=(422,)),
    Route("GET", _SOURCES, list_signal_sources, "The tenant's signal sources", "signals",
          roles=PROVIDERS, response=Page[SignalSourceView], query=("cursor", "limit")),
    Route("GET", f"{_SOURCES}/{{source_id}}", get_signal_source, "One signal source",
          "signals", roles=PROVIDERS, response=SignalSourceView, errors=(404,)),
    Route("DELETE", f"{_SOURCES}/{{source_id}}", delete_signal_source,
          "Delete a signal source and its log", "signals", roles=PROVIDERS, status=204,
          errors=(404,)),
    Route("GET", f"{_SOURCES}/{{source_id}}/log", list_signal_log,
          "A signal source's log: alerts accepted and refused", "signals", roles=PROVIDERS,
          response=Page[SignalLogEntry], query=("cursor", "limit"), errors=(404,)),
    Route("POST", "/v1/signals/tradingview/{source_id}", tradingview_alert,
          "A TradingView alert (the source's secret in the body)", "signals",
          request=TradingViewAlert, response=SignalAccepted, status=202,
          errors=(401, 403, 404, 413, 415, 422, 429, 503)),
]  # fmt: skip
