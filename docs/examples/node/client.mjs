// A platform backend on the tradecopy wire contract: NATS JetStream + msgpack + JSON Schema.
//
//   node client.mjs copy  --url nats://host:port --connector ID --master ACC --follower ACC
//   node client.mjs audit --url nats://host:port
//   node client.mjs check CASES.msgpack    (no server: validate cases another program wrote)
//
// The identity comes from the environment, as for every tradecopy process: TRADECOPY_NATS_USER
// (the user's name, which names its private inbox) and TRADECOPY_NATS_SEED (its nkey seed).
// Prints one JSON line of counts last; exits 1 on any failure. See README.md.
import fs from "node:fs";
import process from "node:process";
import { parseArgs } from "node:util";

import { AckPolicy, DeliverPolicy, connect, consumerOpts, headers, nkeyAuthenticator } from "nats";

import {
  CONTRACT_STREAMS,
  PREFIX,
  Tally,
  decode,
  describeErrors,
  encode,
  familyOf,
  forValidation,
  loadSchemas,
  nowNs,
} from "./contract.mjs";

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    url: { type: "string" },
    schemas: { type: "string" },
    connector: { type: "string" },
    master: { type: "string" },
    follower: { type: "string" },
    link: { type: "string" },
    symbol: { type: "string", default: "XAUUSD" },
    timeout: { type: "string", default: "20" },
  },
});
const mode = positionals[0];
const TIMEOUT_MS = Number(opts.timeout) * 1000;

class Failure extends Error {}

function need(name) {
  const value = opts[name];
  if (!value) throw new Failure(`--${name} is required in ${mode} mode`);
  return value;
}

async function connectAs() {
  const user = process.env.TRADECOPY_NATS_USER;
  const seed = process.env.TRADECOPY_NATS_SEED;
  if (!user || !seed) throw new Failure("set TRADECOPY_NATS_USER and TRADECOPY_NATS_SEED");
  return connect({
    servers: need("url"),
    name: `node-${mode}-${user}`,
    authenticator: nkeyAuthenticator(new TextEncoder().encode(seed.trim())),
    // Replies and push deliveries of this user come to its own inbox prefix, the only inbox
    // its permissions let it subscribe to.
    inboxPrefix: `_INBOX_${user}`,
  });
}

/** Resolves when `predicate()` holds, polling; rejects naming `what` after the timeout. */
async function waitFor(predicate, what) {
  const deadline = Date.now() + TIMEOUT_MS;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Failure(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

// ------------------------------------------------------------------------------ copy mode

/**
 * The platform's connector for one master and one follower account: publishes their state
 * and symbol, a master position opened then closed, reads the follower orders the replicator
 * made from them, and publishes one event with a float ts_ns to see it refused.
 */
async function copy(validators, tally) {
  const connectorId = need("connector");
  const master = need("master");
  const follower = need("follower");
  const link = opts.link ?? null;
  const symbol = opts.symbol;
  const nc = await connectAs();
  const js = nc.jetstream();
  const counts = { orders: 0, rejections: 0, published: 0 };
  const orders = [];
  const rejections = new Map();

  // Everything this client publishes is checked against the contract first.
  async function publish(subject, family, message, msgID) {
    if (!tally.check(validators, family, message, `outgoing ${subject}`)) {
      throw new Failure(`refusing to publish an invalid ${family}: ${tally.problems.at(-1)}`);
    }
    const ack = await js.publish(subject, encode(message), msgID ? { msgID } : undefined);
    counts.published += 1;
    return ack;
  }

  // Account state and symbol specs go to the KV buckets (a KV put is a JetStream publish on
  // $KV.<bucket>.<key>): the replicator sizes and gates copies with them.
  for (const account of [master, follower]) {
    const state = {
      account,
      ts_ns: nowNs(),
      currency: "USD",
      balance: 10_000.0,
      equity: 10_000.0,
      free_margin: 10_000.0,
      leverage: 100,
      connector: connectorId,
    };
    await publish(`$KV.tc_accounts.${account}`, "account_state", state);
    const spec = {
      account,
      symbol,
      ts_ns: nowNs(),
      contract_size: 100.0,
      tick_size: 0.01,
      tick_value: 1.0,
      digits: 2,
      volume_min: 0.01,
      volume_max: 100.0,
      volume_step: 0.01,
    };
    await publish(`$KV.tc_symbols.${account}.${symbol}`, "symbol_spec", spec);
  }

  // Follower orders: the connector's own durable consumer on TC_FOLLOWER_ORDERS, pushed to
  // its inbox and acknowledged explicitly. JetStream delivers each stored order once per
  // consumer, in stream order, and again only until it is acknowledged.
  const durable = `connector-${connectorId}`;
  const jsm = await nc.jetstreamManager({ checkAPI: false }); // no $JS.API.INFO: a connector may not ask it
  const deliver = `_INBOX_${process.env.TRADECOPY_NATS_USER}.orders`;
  await jsm.consumers.add("TC_FOLLOWER_ORDERS", {
    durable_name: durable,
    deliver_subject: deliver,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.New,
    filter_subjects: [
      `${PREFIX}.follower.${follower}.orders`,
      `${PREFIX}.connector.${connectorId}.orders`,
    ],
  });
  const orderSub = await js.subscribe(
    `${PREFIX}.follower.${follower}.orders`,
    consumerOpts().bind("TC_FOLLOWER_ORDERS", durable).manualAck(),
  );
  (async () => {
    for await (const m of orderSub) {
      const family = familyOf("TC_FOLLOWER_ORDERS", m.subject);
      const message = decode(m.data);
      tally.check(validators, family, message, `${m.subject} #${m.info.streamSequence}`);
      for (const order of family === "follower_order_batch" ? message.orders : [message]) {
        if (order.follower === follower) orders.push(order);
      }
      counts.orders = orders.length;
      // A real backend executes the order here and publishes its ExecutionReport on
      // tc.v1.follower.<follower>.reports before acknowledging; this example only reads.
      m.ack();
    }
  })();

  // Rejections of this connector's master: a connector's permissions allow the rejections
  // subject itself (not a consumer on TC_REJECTIONS), so duplicates are dropped here by
  // rejection_id, which is also the message's Nats-Msg-Id.
  const rejectionSub = nc.subscribe(`${PREFIX}.master.${master}.rejections`);
  (async () => {
    for await (const m of rejectionSub) {
      const message = decode(m.data);
      tally.check(validators, "master_event_rejected", message, m.subject);
      rejections.set(message.rejection_id, message);
      counts.rejections = rejections.size;
    }
  })();
  await nc.flush();

  const positionId = `node-${Date.now()}`;
  const base = { master, symbol, position_id: positionId, side: "buy", magic: 7 };
  const opened = {
    type: "position_opened",
    event_id: `${master}:deal:${positionId}:open`,
    ts_ns: nowNs(),
    volume: 0.1,
    price: 2650.35,
    sl: 2640.0,
    tp: 2680.0,
    comment: "node client",
    trace: { terminal_ns: nowNs(), connector_ns: nowNs() },
    ...base,
  };
  await publish(`${PREFIX}.master.${master}.events`, "master_event", opened, opened.event_id);
  await waitFor(
    () => orders.some((o) => o.type === "open" && o.master_event_id === opened.event_id),
    `the follower's open order for ${opened.event_id}`,
  );
  const closed = {
    type: "position_closed",
    event_id: `${master}:deal:${positionId}:close`,
    ts_ns: nowNs(),
    volume: 0.1,
    price: 2655.1,
    reason: "client",
    trace: { terminal_ns: nowNs(), connector_ns: nowNs() },
    ...base,
  };
  await publish(`${PREFIX}.master.${master}.events`, "master_event", closed, closed.event_id);
  await waitFor(
    () => orders.some((o) => o.type === "close" && o.master_event_id === closed.event_id),
    `the follower's close order for ${closed.event_id}`,
  );
  for (const order of orders) {
    if (link !== null && order.link_id !== link) {
      throw new Failure(`order ${order.order_id} names link ${order.link_id}, not ${link}`);
    }
    if (typeof order.ts_ns !== "bigint") {
      throw new Failure(`order ${order.order_id}: ts_ns decoded as ${typeof order.ts_ns}`);
    }
  }

  // The mistake every JavaScript producer makes once: a nanosecond time computed as a Number.
  // Date.now() * 1e6 is above 2^53, so msgpack carries it as a float64 and the replicator
  // refuses the event on the master's rejections subject, naming the field.
  const floaty = {
    ...opened,
    type: "position_opened",
    event_id: `${master}:deal:${positionId}:float-ts`,
    position_id: `${positionId}-f`,
    ts_ns: Date.now() * 1e6,
  };
  // JSON Schema cannot see the difference (an integer-valued float is an integer to it),
  // so the float event is sent without the check and the engine's answer is the test.
  const h = headers();
  h.set("Nats-Msg-Id", floaty.event_id);
  const ack = await js.publish(`${PREFIX}.master.${master}.events`, encode(floaty), {
    headers: h,
  });
  counts.published += 1;
  let refusal;
  await waitFor(() => {
    refusal = [...rejections.values()].find((r) => BigInt(r.stream_seq ?? 0) === BigInt(ack.seq));
    return refusal !== undefined;
  }, `the rejection of the float ts_ns event (stream seq ${ack.seq})`);
  if (!refusal.message.includes("ts_ns") || !refusal.message.includes("int64")) {
    throw new Failure(`the rejection does not name ts_ns as int64: ${refusal.message}`);
  }
  console.log(`float ts_ns refused (${refusal.reason}): ${refusal.message}`);
  for (const o of orders) console.log(`order ${o.type} ${o.order_id} ${o.volume ?? ""}`);

  await orderSub.drain();
  await rejectionSub.drain();
  await nc.drain();
  return {
    orders_seen: counts.orders,
    rejections_seen: counts.rejections,
    published: counts.published,
    float_ts_rejection: refusal.message,
  };
}

// ----------------------------------------------------------------------------- audit mode

/**
 * Reads every stream of the contract from its first message to its last, with one ordered
 * consumer each, and validates every message. Needs a role that may read them all (api).
 */
async function audit(validators, tally) {
  const nc = await connectAs();
  const js = nc.jetstream();
  const jsm = await nc.jetstreamManager({ checkAPI: false });
  const perStream = {};
  for (const stream of CONTRACT_STREAMS) {
    const info = await jsm.streams.info(stream);
    const last = info.state.last_seq;
    perStream[stream] = 0;
    if (info.state.messages === 0) continue;
    // An ordered consumer: ephemeral, flow-controlled, re-created by the client at the right
    // sequence after any gap. It reads the stream as stored: deduplicated, in order.
    const ordered = consumerOpts().orderedConsumer().bindStream(stream).deliverAll();
    const sub = await js.subscribe(">", ordered);
    for await (const m of sub) {
      const family = familyOf(stream, m.subject);
      const operation = m.headers?.get("KV-Operation");
      // KV deletes and purges carry no value; everything else is a contract message.
      if (family !== null && m.data.length > 0 && operation !== "DEL" && operation !== "PURGE") {
        tally.check(validators, family, decode(m.data), `${stream} #${m.info.streamSequence}`);
        perStream[stream] += 1;
      }
      if (m.info.streamSequence >= last) break;
    }
    sub.unsubscribe();
  }
  await nc.drain();
  return { per_stream: perStream };
}

// ----------------------------------------------------------------------------- check mode

/**
 * Validates cases written by another program: a msgpack array of maps {family, missing,
 * payload}, each payload a message as it travels (msgpack bytes). A case with `missing: null`
 * must be valid; one with `missing: "<field>"` must give exactly one error, naming the field,
 * with every error reported.
 */
async function check(validators, tally, file) {
  const everyError = loadSchemas(opts.schemas, { allErrors: true });
  const cases = decode(fs.readFileSync(file));
  let wrong = 0;
  let oneErrorEach = 0;
  for (const c of cases) {
    const message = decode(c.payload);
    if (c.missing === null) {
      tally.check(validators, c.family, message, `${c.family} case`);
      continue;
    }
    // Without a required field: invalid, with one error naming it even when ajv reports all.
    const validate = everyError[c.family];
    const valid = validate(forValidation(message));
    const errors = describeErrors(validate.errors);
    if (valid || errors.length !== 1 || !errors[0].includes(`'${c.missing}'`)) {
      wrong += 1;
      console.log(`WRONG ${c.family} without ${c.missing}: ${JSON.stringify(errors)}`);
    } else {
      oneErrorEach += 1;
    }
  }
  if (wrong > 0) throw new Failure(`${wrong} cases without a field did not get one clear error`);
  return { cases: cases.length, missing_field_cases: oneErrorEach };
}

// ------------------------------------------------------------------------------------ main

async function main() {
  if (!["copy", "audit", "check"].includes(mode)) {
    throw new Failure("usage: node client.mjs copy|audit|check [options] (see README.md)");
  }
  const validators = loadSchemas(opts.schemas);
  // The contract itself, checked the way a consumer relies on it: a master event missing one
  // field gets one clear error naming it, even with every error reported (not one per variant).
  const everyError = loadSchemas(opts.schemas, { allErrors: true });
  const sample = {
    type: "position_opened",
    event_id: "acc-1:deal:1",
    master: "acc-1",
    symbol: "XAUUSD",
    ts_ns: nowNs(),
    position_id: "1",
    side: "buy",
    volume: 0.1,
  };
  if (!everyError.master_event(forValidation({ ...sample, price: 1.5 }))) {
    throw new Failure(`a valid master event fails: ${describeErrors(everyError.master_event.errors)}`);
  }
  everyError.master_event(forValidation(sample)); // no price
  const sampleErrors = describeErrors(everyError.master_event.errors);
  if (sampleErrors.length !== 1 || !sampleErrors[0].includes("price")) {
    throw new Failure(`a master event without price gave: ${JSON.stringify(sampleErrors)}`);
  }
  const tally = new Tally();
  const result =
    mode === "copy"
      ? await copy(validators, tally)
      : mode === "audit"
        ? await audit(validators, tally)
        : await check(validators, tally, positionals[1]);
  for (const problem of tally.problems) console.log(`INVALID ${problem}`);
  const summary = {
    mode,
    schemas: Object.keys(validators).length,
    validated: tally.validated,
    invalid: tally.invalid,
    by_family: tally.byFamily,
    missing_field_errors: sampleErrors,
    ...result,
  };
  console.log(JSON.stringify(summary));
  if (tally.invalid > 0) throw new Failure(`${tally.invalid} invalid messages`);
  if (tally.validated === 0) throw new Failure("no message was validated");
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(`FAILED: ${err instanceof Failure ? err.message : err.stack ?? err}`);
    process.exit(1);
  },
);
