"""A platform backend on the tradecopy contract with nats-py, msgspec msgpack and jsonschema.

    python client.py copy  --url nats://host:port --connector ID --master ACC --follower ACC
    python client.py audit --url nats://host:port

The identity comes from ``TRADECOPY_NATS_USER`` and ``TRADECOPY_NATS_SEED``, as for every
tradecopy process. Prints one JSON line of counts last; exits 1 on any failure. The same
modes as ``docs/examples/node/client.mjs`` (see its README).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from contract import CONTRACT_STREAMS, PREFIX, Tally, family_of, load_validators


class Failure(Exception):
    """The client could not do what its mode promises."""


async def connect_as(url: str, mode: str) -> Client:
    user, seed = os.environ.get("TRADECOPY_NATS_USER"), os.environ.get("TRADECOPY_NATS_SEED")
    if not user or not seed:
        raise Failure("set TRADECOPY_NATS_USER and TRADECOPY_NATS_SEED")
    # The user's own inbox prefix: the only inbox its permissions let it subscribe to.
    return await nats.connect(
        url,
        name=f"python-{mode}-{user}",
        nkeys_seed_str=seed.strip(),
        inbox_prefix=f"_INBOX_{user}",
    )


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise Failure(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def copy(args: argparse.Namespace, tally: Tally) -> dict[str, Any]:
    """The platform's connector for one master and one follower (as the Node client's copy)."""
    master, follower, symbol = args.master, args.follower, args.symbol
    nc = await connect_as(args.url, "copy")
    js = nc.jetstream()
    orders: list[dict[str, Any]] = []
    rejections: dict[str, dict[str, Any]] = {}
    published = 0

    async def publish(subject: str, family: str, message: dict[str, Any], msg_id: str = "") -> Any:
        nonlocal published
        if not tally.check(family, message, f"outgoing {subject}"):
            raise Failure(f"refusing to publish an invalid {family}: {tally.problems[-1]}")
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        ack = await js.publish(subject, msgspec.msgpack.encode(message), headers=headers)
        published += 1
        return ack

    for account in (master, follower):
        state = {
            "account": account,
            "ts_ns": time.time_ns(),
            "currency": "USD",
            "balance": 10_000.0,
            "equity": 10_000.0,
            "free_margin": 10_000.0,
            "leverage": 100,
            "connector": args.connector,
        }
        await publish(f"$KV.tc_accounts.{account}", "account_state", state)
        spec = {
            "account": account,
            "symbol": symbol,
            "ts_ns": time.time_ns(),
            "contract_size": 100.0,
            "tick_size": 0.01,
            "tick_value": 1.0,
            "digits": 2,
            "volume_min": 0.01,
            "volume_max": 100.0,
            "volume_step": 0.01,
        }
        await publish(f"$KV.tc_symbols.{account}.{symbol}", "symbol_spec", spec)

    # The connector's durable consumer on TC_FOLLOWER_ORDERS, pushed to its own inbox.
    durable = f"connector-{args.connector}"
    deliver = f"_INBOX_{os.environ['TRADECOPY_NATS_USER']}.orders"

    async def on_order(msg: Any) -> None:
        family = family_of("TC_FOLLOWER_ORDERS", msg.subject)
        assert family is not None
        message = msgspec.msgpack.decode(msg.data)
        tally.check(family, message, msg.subject)
        batch = message.get("orders", []) if family == "follower_order_batch" else [message]
        orders.extend(o for o in batch if o.get("follower") == follower)
        await msg.ack()  # a real connector executes and reports first

    order_sub = await nc.subscribe(deliver, cb=on_order)
    await js.add_consumer(
        "TC_FOLLOWER_ORDERS",
        ConsumerConfig(
            durable_name=durable,
            deliver_subject=deliver,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            filter_subjects=[
                f"{PREFIX}.follower.{follower}.orders",
                f"{PREFIX}.connector.{args.connector}.orders",
            ],
        ),
    )

    # A connector may subscribe to its masters' rejections subject, not read TC_REJECTIONS:
    # duplicates are dropped by rejection_id (the message's Nats-Msg-Id).
    async def on_rejection(msg: Any) -> None:
        message = msgspec.msgpack.decode(msg.data)
        tally.check("master_event_rejected", message, msg.subject)
        rejections[message["rejection_id"]] = message

    rejection_sub = await nc.subscribe(f"{PREFIX}.master.{master}.rejections", cb=on_rejection)
    await nc.flush()

    position = f"py-{time.time_ns()}"
    base = {"master": master, "symbol": symbol, "position_id": position, "side": "buy"}
    opened = {
        "type": "position_opened",
        "event_id": f"{master}:deal:{position}:open",
        "ts_ns": time.time_ns(),
        "volume": 0.1,
        "price": 2650.35,
        "trace": {"terminal_ns": time.time_ns(), "connector_ns": time.time_ns()},
        **base,
    }
    subject = f"{PREFIX}.master.{master}.events"
    await publish(subject, "master_event", opened, opened["event_id"])

    def has(kind: str, event: dict[str, Any]) -> Callable[[], bool]:
        return lambda: any(
            o["type"] == kind and o["master_event_id"] == event["event_id"] for o in orders
        )

    await wait_for(has("open", opened), "the follower's open order", args.timeout)
    closed = {
        **opened,
        "type": "position_closed",
        "event_id": f"{master}:deal:{position}:close",
        "ts_ns": time.time_ns(),
        "price": 2655.1,
    }
    await publish(subject, "master_event", closed, closed["event_id"])
    await wait_for(has("close", closed), "the follower's close order", args.timeout)
    if args.link and any(o["link_id"] != args.link for o in orders):
        raise Failure(f"an order came through another link than {args.link}")

    # A float time (what time.time() * 1e9 gives) is refused on the rejections subject.
    floaty = {**opened, "event_id": f"{master}:deal:{position}:float", "ts_ns": time.time() * 1e9}
    ack = await js.publish(
        subject, msgspec.msgpack.encode(floaty), headers={"Nats-Msg-Id": floaty["event_id"]}
    )
    published += 1
    refusal: list[dict[str, Any]] = []

    def refused() -> bool:
        refusal[:] = [r for r in rejections.values() if r.get("stream_seq") == ack.seq]
        return bool(refusal)

    await wait_for(refused, f"the rejection of stream seq {ack.seq}", args.timeout)
    message = refusal[0]["message"]
    if "ts_ns" not in message or "int64" not in message:
        raise Failure(f"the rejection does not name ts_ns as int64: {message}")
    await order_sub.unsubscribe()
    await rejection_sub.unsubscribe()
    await nc.drain()
    return {
        "orders_seen": len(orders),
        "rejections_seen": len(rejections),
        "published": published,
        "float_ts_rejection": message,
    }


async def audit(args: argparse.Namespace, tally: Tally) -> dict[str, Any]:
    """Every contract stream from first to last message, one ordered consumer each."""
    nc = await connect_as(args.url, "audit")
    js = nc.jetstream()
    per_stream: dict[str, int] = {}
    for stream in CONTRACT_STREAMS:
        info = await js.stream_info(stream)
        per_stream[stream] = 0
        if info.state.messages == 0:
            continue
        sub = await js.subscribe(
            ">", stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        while True:
            msg = await sub.next_msg(timeout=args.timeout)
            family = family_of(stream, msg.subject)
            operation = (msg.headers or {}).get("KV-Operation")
            if family is not None and msg.data and operation not in ("DEL", "PURGE"):
                seq = msg.metadata.sequence.stream
                tally.check(family, msgspec.msgpack.decode(msg.data), f"{stream} #{seq}")
                per_stream[stream] += 1
            if msg.metadata.sequence.stream >= info.state.last_seq:
                break
        await sub.unsubscribe()
    await nc.drain()
    return {"per_stream": per_stream}


MODES: dict[str, Callable[[argparse.Namespace, Tally], Awaitable[dict[str, Any]]]] = {
    "copy": copy,
    "audit": audit,
}


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--url", required=True)
    parser.add_argument("--connector")
    parser.add_argument("--master")
    parser.add_argument("--follower")
    parser.add_argument("--link")
    parser.add_argument("--symbol", default="XAUUSD")
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    if args.mode == "copy" and not (args.connector and args.master and args.follower):
        parser.error("copy needs --connector, --master and --follower")
    tally = Tally(load_validators())
    try:
        result = await MODES[args.mode](args, tally)
    except (Failure, TimeoutError, nats.errors.Error) as exc:
        print(f"FAILED: {exc!r}", file=sys.stderr)
        return 1
    for problem in tally.problems:
        print(f"INVALID {problem}")
    summary = {
        "mode": args.mode,
        "schemas": len(tally.validators),
        "validated": tally.validated,
        "invalid": tally.invalid,
        "by_family": tally.by_family,
        **result,
    }
    print(json.dumps(summary))
    return 1 if tally.invalid or not tally.validated else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
