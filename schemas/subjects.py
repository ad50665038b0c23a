"""The subject map: every subject tradecopy uses, under one versioned prefix.

Per-account subjects let a connector subscribe to exactly its accounts and let the master
event stream partition by master account (see ``schemas.streams``).
"""

from __future__ import annotations

PREFIX = "tc.v1"

# Connectors publish master events here; the stream rewrites the subject to carry a partition.
MASTER_EVENTS_IN = f"{PREFIX}.master.*.events"
# The replicator answers every master event it refuses here (outside the event stream's
# subjects): a producer learns that an event JetStream acknowledged was not copied.
MASTER_REJECTIONS = f"{PREFIX}.master.*.rejections"
# Stored subject: tc.v1.mp.<partition>.<master>
MASTER_PARTITIONED = f"{PREFIX}.mp"

FOLLOWER_ORDERS = f"{PREFIX}.follower.*.orders"
CONNECTOR_ORDERS = f"{PREFIX}.connector.*.orders"
EXECUTION_REPORTS = f"{PREFIX}.follower.*.reports"
DECISIONS = f"{PREFIX}.decision.*.*"
QUOTES = f"{PREFIX}.quotes.>"
# Strategy runs (engine/signals), stored in TC_SIGNALS: tc.v1.signal.<version>.signals carries
# what a strategy version decided on a closed candle, tc.v1.signal.<version>.failures its
# failed runs (crash, timeout, memory, forbidden, bad output).
STRATEGY_RUNS = f"{PREFIX}.signal.*.*"

# KV buckets (JetStream key-value): the replicator caches and watches all of them.
KV_LINKS = "tc_links"
KV_ACCOUNTS = "tc_accounts"
KV_SYMBOLS = "tc_symbols"
KV_FX = "tc_fx"
KV_CONTROL = "tc_control"
KV_LINK_STATE = "tc_link_state"
# Who runs a strategy version on a closed candle: created once per candle by the first worker
# (the signal workers' only; the replicator does not watch it).
KV_SIGNAL_CLAIMS = "tc_signal_claims"
# Strategy deployments made at run time (the API's deployment routes write them; the signal
# workers watch them): key ``deployment_key(version, symbol, timeframe)``, value a
# ``schemas.signals.StrategyDeployment`` as JSON.
KV_SIGNAL_DEPLOYMENTS = "tc_signal_deployments"


def master_events(master: str) -> str:
    return f"{PREFIX}.master.{master}.events"


def master_rejections(master: str) -> str:
    """Where the replicator says which of ``master``'s events it refused, and why."""
    return f"{PREFIX}.master.{master}.rejections"


def master_from_subject(subject: str) -> str:
    """The master account a master-event subject names, as published
    (``tc.v1.master.<master>.events``) or as stored (``tc.v1.mp.<partition>.<master>``)."""
    if subject.startswith(f"{MASTER_PARTITIONED}."):
        return subject.rpartition(".")[2]
    return subject.split(".")[-2] if subject.count(".") >= 3 else ""


def master_partition_filter(partition: int) -> str:
    return f"{MASTER_PARTITIONED}.{partition}.*"


def follower_orders(follower: str) -> str:
    return f"{PREFIX}.follower.{follower}.orders"


def connector_orders(connector: str) -> str:
    return f"{PREFIX}.connector.{connector}.orders"


def execution_reports(follower: str) -> str:
    return f"{PREFIX}.follower.{follower}.reports"


def decisions(follower: str, link_id: str) -> str:
    return f"{PREFIX}.decision.{follower}.{link_id}"


def strategy_signals(version_id: str) -> str:
    """What strategy version ``version_id`` decided on each closed candle it acted on."""
    return f"{PREFIX}.signal.{version_id}.signals"


def strategy_failures(version_id: str) -> str:
    """The runs of strategy version ``version_id`` that failed, with the kind and the reason."""
    return f"{PREFIX}.signal.{version_id}.failures"


def deployment_key(version_id: str, symbol: str, timeframe: str) -> str:
    """A strategy deployment's key in ``tc_signal_deployments``: ``<version>.<symbol>.<tf>``,
    the symbol escaped into one key token (``usdjpy.`` → ``usdjpy=2E``)."""
    return f"{version_id}.{encode_key_token(symbol)}.{encode_key_token(str(timeframe))}"


def quotes(symbol: str) -> str:
    """A symbol's quotes (core NATS, not stored: only the latest price matters)."""
    return f"{PREFIX}.quotes.{encode_key_token(symbol)}"


_KEY_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def encode_key_token(text: str) -> str:
    """Escape any text (e.g. the symbol ``usdjpy.``) into one KV key token: ``usdjpy=2E``."""
    return "".join(c if c in _KEY_SAFE else "".join(f"={b:02X}" for b in c.encode()) for c in text)


def decode_key_token(token: str) -> str:
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "=":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out.extend(token[i].encode())
            i += 1
    return out.decode()


def symbol_key(account: str, symbol: str) -> str:
    return f"{account}.{encode_key_token(symbol)}"


def fx_key(base: str, quote: str) -> str:
    return f"{base}{quote}"
