-- Enforcement (which links billing stops and why), account deletion, and the email outbox.

-- Which provider owns each trading account, and for a follower account which billing follower
-- (the person billed, `billing_subscriptions.follower`) it belongs to. The platform backend
-- records it when it creates an account; enforcement reads it to find the links of a cause.
CREATE TABLE billing_accounts (
    account_id  text PRIMARY KEY,
    provider    text NOT NULL,
    follower    text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_accounts_provider ON billing_accounts (provider);
CREATE INDEX billing_accounts_follower ON billing_accounts (follower) WHERE follower IS NOT NULL;

-- One row per reason to stop copying: a scope (every account of a provider, one follower's
-- accounts, optionally only into one provider's masters, or one account being deleted), its
-- subject, and the cause (`charge:<key>`, `allowance:<plan>`, `subscription:<plan>`, ...).
-- `needs_apply`: the row changed in a transaction that could not write to NATS; the
-- enforcement worker applies it to the links afterwards.
CREATE TABLE billing_enforcement (
    scope       text NOT NULL CHECK (scope IN ('provider', 'follower', 'account')),
    subject     text NOT NULL,
    cause       text NOT NULL,
    provider    text,
    state       text NOT NULL CHECK (state IN ('active', 'lifted')),
    needs_apply boolean NOT NULL DEFAULT true,
    last_error  text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    lifted_at   timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, subject, cause)
);
CREATE INDEX billing_enforcement_pending ON billing_enforcement (updated_at) WHERE needs_apply;

-- Every link billing holds stopped. `billing_disabled`: billing itself wrote enabled = false
-- (lifting writes it back); false: the link was already disabled (by its provider), so lifting
-- leaves it alone. `status` failed: retries ran out, the daily recheck tries again.
CREATE TABLE billing_enforced_links (
    link_id          text PRIMARY KEY,
    billing_disabled boolean NOT NULL,
    status           text NOT NULL DEFAULT 'applied'
                     CHECK (status IN ('applied', 'failed', 'release_failed')),
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- The deletion of an account: active → delete_pending → disabled → deleted, or delete_failed.
CREATE TABLE billing_account_deletions (
    account_id  text PRIMARY KEY,
    state       text NOT NULL CHECK (state IN ('active', 'delete_pending', 'disabled', 'deleted',
                                               'delete_failed')),
    error       text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The email outbox: one row per message to send, rendered when queued, sent with retries.
CREATE TABLE billing_email_outbox (
    email_id        text PRIMARY KEY,
    provider        text NOT NULL,
    kind            text NOT NULL,
    language        text NOT NULL,
    recipient       text NOT NULL,
    subject         text NOT NULL,
    body_text       text NOT NULL,
    body_html       text NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    sent_at         timestamptz,
    failed_at       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_email_outbox_due ON billing_email_outbox (next_attempt_at)
    WHERE sent_at IS NULL AND failed_at IS NULL;

-- Each provider's SMTP server; the settings are sealed (config.seal_secret), password included.
CREATE TABLE billing_smtp_settings (
    provider        text PRIMARY KEY,
    settings_sealed text NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Where a follower's emails go, and in which language.
CREATE TABLE billing_contacts (
    follower   text PRIMARY KEY,
    email      text NOT NULL,
    language   text NOT NULL DEFAULT 'en',
    updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE billing_notifications ADD COLUMN queued_at timestamptz;

-- Every kind billing tells a follower about is a notification row now, not only the two that
-- asked for action; the outbox renders each once (queued_at).
ALTER TABLE billing_notifications DROP CONSTRAINT billing_notifications_kind_check;
ALTER TABLE billing_notifications ADD CONSTRAINT billing_notifications_kind_check CHECK (kind IN (
    'payment_succeeded', 'payment_failed', 'authentication_required', 'dispute_opened',
    'fee_charged', 'allowance_used_up', 'pool_limit_reached', 'invite'));
