// The tradecopy wire contract in JavaScript: msgpack with int64 kept exact, JSON Schema under
// strict ajv, and which schema each stream's messages follow.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { Decoder, Encoder } from "@msgpack/msgpack";
import Ajv2020 from "ajv/dist/2020.js";

export const PREFIX = "tc.v1";

// int64 fields (every `*_ns` time is above 2^53) decode as BigInt and BigInts encode as
// msgpack int64/uint64, never as float64.
const decoder = new Decoder({ useBigInt64: true });
const encoder = new Encoder({ useBigInt64: true });

export const decode = (data) => decoder.decode(data);
export const encode = (value) => encoder.encode(value);

/** UTC nanoseconds now, as a BigInt (what every `*_ns` field carries). */
export const nowNs = () => BigInt(Date.now()) * 1_000_000n;

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const DEFAULT_SCHEMA_DIR = path.resolve(HERE, "../../../schemas/json");

/**
 * A copy of a decoded message for JSON Schema: BigInt becomes Number.
 *
 * JSON Schema has no BigInt, and ajv's `type: integer` refuses one. The copy is used for
 * validation only (type, required, enum, range): the message itself keeps its exact BigInts.
 * Near 2^62 a range check is as exact as a float64 (1 in 2^53); the engine checks exactly.
 */
export function forValidation(value) {
  if (typeof value === "bigint") return Number(value);
  if (Array.isArray(value)) return value.map(forValidation);
  if (value instanceof Uint8Array) return value;
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = forValidation(v);
    return out;
  }
  return value;
}

/**
 * Every schema of `dir` compiled by one ajv: Draft 2020-12, strict, discriminators on.
 *
 * `strict: true` turns every strict-mode warning (strictTypes, strictTuples, ...) into an
 * error, so a schema that would only log under ajv's defaults fails here. `allErrors` reports
 * every error of a message instead of the first.
 */
export function loadSchemas(dir = DEFAULT_SCHEMA_DIR, { allErrors = false } = {}) {
  const ajv = new Ajv2020({ discriminator: true, strict: true, allErrors });
  const validators = {};
  for (const file of fs.readdirSync(dir).filter((f) => f.endsWith(".json")).sort()) {
    const schema = JSON.parse(fs.readFileSync(path.join(dir, file), "utf8"));
    validators[file.replace(/\.json$/, "")] = ajv.compile(schema);
  }
  return validators;
}

/** ajv's errors as one line each: `/path: message`. */
export function describeErrors(errors) {
  return (errors ?? []).map((e) => {
    const where = e.instancePath || "/";
    const missing = e.params?.missingProperty ? ` (${e.params.missingProperty})` : "";
    return `${where}: ${e.message}${missing}`;
  });
}

/** The schema (file stem) of a message stored in `stream` under `subject`; null: not ours. */
export function familyOf(stream, subject) {
  switch (stream) {
    case "TC_MASTER_EVENTS":
      return "master_event";
    case "TC_FOLLOWER_ORDERS":
      return subject.startsWith(`${PREFIX}.connector.`) ? "follower_order_batch" : "follower_order";
    case "TC_EXECUTION_REPORTS":
      return "execution_report";
    case "TC_DECISIONS":
      return "copy_decision";
    case "TC_REJECTIONS":
      return "master_event_rejected";
    case "KV_tc_accounts":
      return "account_state";
    case "KV_tc_symbols":
      return "symbol_spec";
    case "KV_tc_links":
      return "copy_link";
    case "KV_tc_control":
      return "emergency_stop";
    case "KV_tc_fx":
      return "fx_rate";
    default:
      return null;
  }
}

/** Streams holding contract messages, in the order an audit reads them. */
export const CONTRACT_STREAMS = [
  "TC_MASTER_EVENTS",
  "TC_FOLLOWER_ORDERS",
  "TC_EXECUTION_REPORTS",
  "TC_DECISIONS",
  "TC_REJECTIONS",
  "KV_tc_accounts",
  "KV_tc_symbols",
  "KV_tc_links",
  "KV_tc_control",
  "KV_tc_fx",
];

/** Counts of what a client validated, and the first problems it saw. */
export class Tally {
  constructor() {
    this.validated = 0;
    this.invalid = 0;
    this.byFamily = {};
    this.problems = [];
  }

  /** Validate one decoded message against `family`'s schema; true when it is valid. */
  check(validators, family, message, where) {
    const validate = validators[family];
    if (validate === undefined) throw new Error(`no schema for ${family}`);
    const ok = validate(forValidation(message));
    this.validated += 1;
    this.byFamily[family] = (this.byFamily[family] ?? 0) + 1;
    if (!ok) {
      this.invalid += 1;
      if (this.problems.length < 20) {
        this.problems.push(`${where} (${family}): ${describeErrors(validate.errors).join("; ")}`);
      }
    }
    return ok;
  }
}
