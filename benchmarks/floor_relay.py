"""The NATS floor: a bare relay that turns each master event into N pre-encoded orders.

It consumes exactly like the replicator (durable push consumer, one event in flight) and
publishes exactly like it (async JetStream publishes with ``Nats-Msg-Id``, all acks awaited
before the event is acknowledged) but applies no rules and encodes nothing: the difference
between the two is the cost of tradecopy itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig

from engine.runtime.eventloop import run_async
from engine.runtime.memory import keep_heap
from engine.runtime.natsconn import connect
from schemas import codec, subjects
from schemas.common import Side
from schemas.orders import FollowerOpen, FollowerOrderBatch
from schemas.streams import MASTER_EVENTS_STREAM


def order_payload(follower: str, master: str) -> bytes:
    """An order the size of a real one, encoded once up front."""
    return codec.encode(
        FollowerOpen(
            order_id="bench-000000:floor-link-0000",
            link_id="floor-link-0000",
            follower=follower,
            master=master,
            master_event_id="bench-000000",
            symbol="XAUUSD",
            ts_ns=time.time_ns(),
            master_position_id="1000000",
            side=Side.BUY,
            volume=0.1,
            sl=1990.0,
            tp=2100.0,
            master_price=2000.0,
            master_volume=0.1,
            comment="tc.floor.1000000",
        )
    )


def batch_payloads(master: str, followers: list[str], batches: int) -> list[tuple[str, bytes]]:
    """``batches`` connector batches holding the followers' orders, encoded once up front."""
    per = -(-len(followers) // batches)
    out = []
    for b in range(batches):
        connector = f"bench-conn-{b:03d}"
        orders = [
            codec.follower_order_decoder.decode(order_payload(f, master))
            for f in followers[b * per : (b + 1) * per]
        ]
        batch = FollowerOrderBatch(
            batch_id=f"bench-000000@{connector}",
            connector=connector,
            master=master,
            master_event_id="bench-000000",
            ts_ns=time.time_ns(),
            orders=orders,
        )
        out.append((subjects.connector_orders(connector), codec.encode(batch)))
    return out


async def relay(
    nats_url: str, master: str, followers: list[str], durable: str, batches: int = 0
) -> None:
    # Credentials from the environment: the replicator's, whose work this measures.
    nc = await connect(nats_url, "tradecopy-floor-relay")
    keep_heap()  # the replicator's heap settings, so the two differ only in what they do
    js = nc.jetstream(publish_async_max_pending=65_536)
    if batches:
        targets = batch_payloads(master, followers, batches)
    else:
        targets = [(subjects.follower_orders(f), order_payload(f, master)) for f in followers]
    publish = js.publish_async

    async def relay_one(msg: Any) -> None:
        seq = msg.metadata.sequence.stream
        futures = [
            await publish(subject, payload, headers={"Nats-Msg-Id": f"{seq}:{i}"})
            for i, (subject, payload) in enumerate(targets)
        ]
        await asyncio.gather(*futures)
        await msg.ack()

    # Consumed exactly like the replicator consumes a partition: a durable push consumer,
    # one event in flight, acknowledged after every order is stored.
    deliver = nc.new_inbox()
    await nc.subscribe(deliver, cb=relay_one)
    await js.add_consumer(
        MASTER_EVENTS_STREAM,
        ConsumerConfig(
            durable_name=durable,
            deliver_subject=deliver,
            filter_subject=f"{subjects.MASTER_PARTITIONED}.*.{master}",
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=1,
            ack_wait=5.0,
        ),
    )
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    with contextlib.suppress(Exception):
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--master", required=True)
    followers = parser.add_mutually_exclusive_group(required=True)
    followers.add_argument("--followers", help="comma-separated follower ids")
    followers.add_argument(
        "--followers-file", help="a file of follower ids, one a line (10,000 ids outgrow argv)"
    )
    parser.add_argument("--durable", default="floor-relay")
    parser.add_argument("--batches", type=int, default=0, help="connector batches (0: none)")
    args = parser.parse_args()
    if args.followers_file:
        with open(args.followers_file, encoding="utf-8") as ids:
            accounts = [line.strip() for line in ids if line.strip()]
    else:
        accounts = args.followers.split(",")
    run_async(relay(args.nats_url, args.master, accounts, args.durable, args.batches))


if __name__ == "__main__":
    main()
