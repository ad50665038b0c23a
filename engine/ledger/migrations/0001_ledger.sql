-- The ledger's tables: every stored message of the contract, keyed by its id, with the
-- tenant (provider) it belongs to, the key columns read models filter on, and the raw
-- msgpack payload so any read model can be rebuilt from here.

-- Which tenant (provider) an account belongs to. An account without a row belongs to the
-- ledger's default tenant (single-tenant installs never write here).
CREATE TABLE account_tenants (
    account    text PRIMARY KEY,
    tenant     text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ledger_master_events (
    event_id    text PRIMARY KEY,
    tenant      text NOT NULL,
    master      text NOT NULL,
    type        text NOT NULL,
    symbol      text NOT NULL,
    position_id text,
    ts_ns       bigint NOT NULL,
    stream_seq  bigint NOT NULL,
    payload     bytea NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_master_events_account ON ledger_master_events (master, ts_ns, stream_seq);

CREATE TABLE ledger_follower_orders (
    order_id        text PRIMARY KEY,
    tenant          text NOT NULL,
    follower        text NOT NULL,
    master          text NOT NULL,
    link_id         text NOT NULL,
    master_event_id text NOT NULL,
    type            text NOT NULL,
    symbol          text NOT NULL,
    ts_ns           bigint NOT NULL,
    stream_seq      bigint NOT NULL,
    batch_id        text,
    payload         bytea NOT NULL,
    stored_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_follower_orders_account ON ledger_follower_orders (follower, ts_ns, stream_seq);
CREATE INDEX ledger_follower_orders_age ON ledger_follower_orders (ts_ns);

-- One row per (order, status): an order may be reported unknown, then settled.
CREATE TABLE ledger_execution_reports (
    order_id    text NOT NULL,
    status      text NOT NULL,
    tenant      text NOT NULL,
    follower    text NOT NULL,
    link_id     text NOT NULL,
    symbol      text,
    position_id text,
    ts_ns       bigint NOT NULL,
    stream_seq  bigint NOT NULL,
    payload     bytea NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, status)
);
CREATE INDEX ledger_execution_reports_account
    ON ledger_execution_reports (follower, ts_ns, stream_seq);

CREATE TABLE ledger_decisions (
    decision_id     text PRIMARY KEY,
    tenant          text NOT NULL,
    link_id         text NOT NULL,
    master          text NOT NULL,
    follower        text NOT NULL,
    outcome         text NOT NULL,
    rule            text NOT NULL,
    master_event_id text NOT NULL,
    ts_ns           bigint NOT NULL,
    stream_seq      bigint NOT NULL,
    payload         bytea NOT NULL,
    stored_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_decisions_link ON ledger_decisions (link_id, ts_ns);
CREATE INDEX ledger_decisions_follower ON ledger_decisions (follower, ts_ns, stream_seq);
CREATE INDEX ledger_decisions_age ON ledger_decisions (ts_ns);

CREATE TABLE ledger_rejections (
    rejection_id text PRIMARY KEY,
    tenant       text NOT NULL,
    master       text NOT NULL,
    reason       text NOT NULL,
    event_id     text NOT NULL,
    ts_ns        bigint NOT NULL,
    stream_seq   bigint NOT NULL,
    payload      bytea NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_rejections_account ON ledger_rejections (master, ts_ns);

-- Balance and equity in integer minor units of the account's currency (NULL when the
-- connector sent a value that is not a finite amount).
CREATE TABLE ledger_account_states (
    account       text NOT NULL,
    ts_ns         bigint NOT NULL,
    tenant        text NOT NULL,
    currency      text NOT NULL,
    balance_minor bigint,
    equity_minor  bigint,
    stream_seq    bigint NOT NULL,
    payload       bytea NOT NULL,
    stored_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, ts_ns)
);
