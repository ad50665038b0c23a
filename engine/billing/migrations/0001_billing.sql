-- Billing's tables: plans, subscriptions (with the high-water mark and the pay-per-trade
-- allowance), invoices, charges and their transitions, Stripe webhook events, job runs.
-- Money is bigint minor units of the row's currency, never a float; rates are exact numeric.

-- What the operator sells to providers.
CREATE TABLE billing_operator_plans (
    plan_id              text PRIMARY KEY,
    currency             text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    recurring_minor      bigint NOT NULL DEFAULT 0 CHECK (recurring_minor >= 0),
    setup_minor          bigint NOT NULL DEFAULT 0 CHECK (setup_minor >= 0),
    period               text NOT NULL DEFAULT 'monthly'
                         CHECK (period IN ('monthly', 'quarterly', 'yearly')),
    platform_fee_percent numeric(9, 6) NOT NULL
                         CHECK (platform_fee_percent >= 0 AND platform_fee_percent <= 100),
    account_pool_limit   integer NOT NULL CHECK (account_pool_limit >= 0),
    modules              text[] NOT NULL DEFAULT '{}',
    created_at           timestamptz NOT NULL DEFAULT now()
);

-- A provider on an operator plan, with its Stripe Connect (Express) account.
CREATE TABLE billing_providers (
    provider         text PRIMARY KEY,
    operator_plan    text NOT NULL REFERENCES billing_operator_plans (plan_id),
    stripe_account   text UNIQUE,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- What a provider sells to followers: any of the four modules.
CREATE TABLE billing_follower_plans (
    plan_id                   text PRIMARY KEY,
    provider                  text NOT NULL REFERENCES billing_providers (provider),
    currency                  text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    modules                   text[] NOT NULL,
    subscription_price_minor  bigint CHECK (subscription_price_minor >= 0),
    subscription_period       text CHECK (subscription_period IN ('monthly', 'quarterly', 'yearly')),
    ppt_trades                integer CHECK (ppt_trades > 0),
    ppt_price_minor           bigint CHECK (ppt_price_minor >= 0),
    performance_rate          numeric(9, 6) CHECK (performance_rate >= 0 AND performance_rate <= 1),
    volume_rate_per_lot_minor numeric(20, 6) CHECK (volume_rate_per_lot_minor >= 0),
    created_at                timestamptz NOT NULL DEFAULT now(),
    CHECK (modules <@ ARRAY['subscription', 'pay_per_trade', 'performance', 'volume']::text[])
);

-- A follower's Stripe customer and the payment method saved for off-session charges.
CREATE TABLE billing_customers (
    follower        text PRIMARY KEY,
    stripe_customer text NOT NULL UNIQUE,
    payment_method  text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- A follower on a provider's plan, with the state the weekly fees fold forward.
CREATE TABLE billing_subscriptions (
    follower             text NOT NULL,
    plan_id              text NOT NULL REFERENCES billing_follower_plans (plan_id),
    status               text NOT NULL DEFAULT 'active'
                         CHECK (status IN ('active', 'cancelled')),
    started_ns           bigint NOT NULL,
    anchor_ns            bigint NOT NULL,
    stripe_subscription  text,
    -- the high-water mark (engine/billing/hwm.py), kept across pauses and restarts
    hwm_mark_minor       bigint,
    hwm_flows_through_ns bigint,
    hwm_settled_window   text,
    hwm_settled_end_ns   bigint NOT NULL DEFAULT 0,
    -- the pay-per-trade allowance (engine/billing/fees.py)
    ppt_purchase_id      text,
    ppt_trades_bought    integer NOT NULL DEFAULT 0,
    ppt_counted          text[] NOT NULL DEFAULT '{}',
    ppt_over             text[] NOT NULL DEFAULT '{}',
    volume_settled_end_ns bigint NOT NULL DEFAULT 0,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (follower, plan_id)
);

-- One invoice per charge key: its lines say what the amount is made of.
CREATE TABLE billing_invoices (
    invoice_id         text PRIMARY KEY,
    follower           text NOT NULL,
    provider           text NOT NULL,
    plan_id            text NOT NULL,
    window_id          text NOT NULL,
    currency           text NOT NULL,
    total_minor        bigint NOT NULL CHECK (total_minor > 0),
    platform_fee_minor bigint NOT NULL CHECK (platform_fee_minor >= 0
                                              AND platform_fee_minor <= total_minor),
    lines              jsonb NOT NULL,
    issued_ns          bigint NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);

-- A charge is the money movement of one invoice. The idempotency key is unique: a second
-- run, a second instance or a replayed webhook cannot make a second row for the same charge.
CREATE TABLE billing_charges (
    charge_id             bigserial PRIMARY KEY,
    idempotency_key       text NOT NULL UNIQUE,
    invoice_id            text NOT NULL REFERENCES billing_invoices (invoice_id),
    module                text NOT NULL,
    follower              text NOT NULL,
    provider              text NOT NULL,
    plan_id               text NOT NULL,
    window_id             text NOT NULL,
    currency              text NOT NULL,
    amount_minor          bigint NOT NULL CHECK (amount_minor > 0),
    platform_fee_minor    bigint NOT NULL CHECK (platform_fee_minor >= 0
                                                 AND platform_fee_minor <= amount_minor),
    destination           text NOT NULL,
    state                 text NOT NULL DEFAULT 'pending'
                          CHECK (state IN ('pending', 'requires_action', 'failed', 'succeeded',
                                           'disputed', 'refunded')),
    attempts              integer NOT NULL DEFAULT 0,
    send_lease_until      timestamptz,
    next_attempt_ns       bigint,
    stripe_payment_intent text UNIQUE,
    stripe_charge         text,
    failure_code          text,
    issued_ns             bigint NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_charges_follower ON billing_charges (follower, issued_ns);
CREATE INDEX billing_charges_provider ON billing_charges (provider, issued_ns);
CREATE INDEX billing_charges_open ON billing_charges (state) WHERE state IN ('pending', 'failed');

-- Every state change of a charge, with what caused it: the audit trail.
CREATE TABLE billing_charge_transitions (
    transition_id bigserial PRIMARY KEY,
    charge_id     bigint NOT NULL REFERENCES billing_charges (charge_id),
    from_state    text,
    to_state      text NOT NULL,
    cause         text NOT NULL,
    at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_charge_transitions_charge ON billing_charge_transitions (charge_id);

-- Stripe events, stored once by id as they arrive and processed afterwards by a worker.
CREATE TABLE billing_webhook_events (
    event_id     text PRIMARY KEY,
    type         text NOT NULL,
    created_s    bigint NOT NULL,
    payload      jsonb NOT NULL,
    source       text NOT NULL CHECK (source IN ('webhook', 'recovery')),
    received_at  timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text
);
CREATE INDEX billing_webhook_events_unprocessed ON billing_webhook_events (created_s)
    WHERE processed_at IS NULL;

-- A job run per (job, run key): a finished row means the run is done and is never redone.
CREATE TABLE billing_job_runs (
    job         text NOT NULL,
    run_key     text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    summary     jsonb,
    PRIMARY KEY (job, run_key)
);

-- What a follower must be told (a charge that needs them on-session, a failed payment): one
-- row per (kind, charge), read and delivered by whoever sends mail or pushes to dashboards.
CREATE TABLE billing_notifications (
    notification_id text PRIMARY KEY,
    follower        text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('authentication_required', 'payment_failed')),
    charge_key      text NOT NULL,
    payment_intent  text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX billing_notifications_undelivered ON billing_notifications (created_at)
    WHERE delivered_at IS NULL;

-- Deposits and withdrawals of follower accounts. The trading contract carries no cash-flow
-- fact, so the platform backend records them here (unique by its own id); they move the
-- high-water mark so a deposit is never charged as profit.
CREATE TABLE billing_cash_flows (
    flow_id      text PRIMARY KEY,
    follower     text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('deposit', 'withdrawal')),
    amount_minor bigint NOT NULL CHECK (amount_minor > 0),
    ts_ns        bigint NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_cash_flows_follower ON billing_cash_flows (follower, ts_ns);
