-- Plans through the API, Checkout, and auto-provisioning of risk templates.
--
-- Billing owns these tables. The API (the HTTP facade) never writes them: it calls the
-- SECURITY DEFINER functions below as a member of tradecopy_billing_writer, and reads the
-- billing_api_* views as a member of tradecopy_billing_reader. Billing's provider id is the
-- API's tenant id; billing's follower id is the API's user id (its uuid as text).

ALTER TABLE billing_operator_plans ADD COLUMN name text;
ALTER TABLE billing_follower_plans ADD COLUMN name text;
-- A risk template of the provider's tenant (api_risk_templates.template_id), applied to the
-- follower's links into the provider's masters when the plan activates.
ALTER TABLE billing_follower_plans ADD COLUMN risk_template_id text;

-- A plan's terms never change once someone subscribed: a change is a new plan. Rewriting the
-- same terms (the demo re-running its set-up) is not a change.
CREATE FUNCTION billing_follower_plan_frozen() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (OLD.provider, OLD.currency, OLD.modules, OLD.subscription_price_minor,
        OLD.subscription_period, OLD.ppt_trades, OLD.ppt_price_minor, OLD.performance_rate,
        OLD.volume_rate_per_lot_minor, OLD.risk_template_id)
       IS DISTINCT FROM
       (NEW.provider, NEW.currency, NEW.modules, NEW.subscription_price_minor,
        NEW.subscription_period, NEW.ppt_trades, NEW.ppt_price_minor, NEW.performance_rate,
        NEW.volume_rate_per_lot_minor, NEW.risk_template_id)
       AND EXISTS (SELECT 1 FROM billing_subscriptions WHERE plan_id = OLD.plan_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation',
            MESSAGE = format('plan %s has subscribers: its terms are fixed, make a new plan',
                             OLD.plan_id);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER billing_follower_plans_frozen BEFORE UPDATE ON billing_follower_plans
    FOR EACH ROW EXECUTE FUNCTION billing_follower_plan_frozen();

-- A follower's purchase of a plan through Stripe Checkout. The API records the request
-- (pending); the billing service creates the Checkout Session and stores its URL (ready) or
-- why it could not (failed); checkout.session.completed activates the plan (completed).
CREATE TABLE billing_checkouts (
    checkout_id  uuid PRIMARY KEY,
    follower     text NOT NULL,
    provider     text NOT NULL,
    plan_id      text NOT NULL REFERENCES billing_follower_plans (plan_id),
    client_key   text NOT NULL,
    email        text,
    success_url  text NOT NULL,
    cancel_url   text NOT NULL,
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'ready', 'failed', 'completed')),
    session_id   text UNIQUE,
    url          text,
    reason       text,
    attempts     integer NOT NULL DEFAULT 0,
    lease_until  timestamptz,
    completed_by text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (follower, plan_id, client_key)
);
CREATE INDEX billing_checkouts_pending ON billing_checkouts (created_at) WHERE state = 'pending';

-- Auto-provisioning: one row per (follower, plan, link, template), so a template is applied
-- to a link once however often (and however concurrently) the plan activates.
CREATE TABLE billing_plan_provisioning (
    follower    text NOT NULL,
    plan_id     text NOT NULL,
    link_id     text NOT NULL,
    template_id text NOT NULL,
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'applied', 'failed')),
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    applied_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (follower, plan_id, link_id, template_id)
);

-- Subscriptions that became active since the provisioner last looked: written by a trigger
-- (every path that subscribes or reactivates), drained by the service after the commit.
CREATE TABLE billing_provisioning_due (
    follower text NOT NULL,
    plan_id  text NOT NULL,
    due_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (follower, plan_id)
);

CREATE FUNCTION billing_subscription_activated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status
       OR OLD.started_ns IS DISTINCT FROM NEW.started_ns THEN
        INSERT INTO billing_provisioning_due (follower, plan_id) VALUES (NEW.follower, NEW.plan_id)
        ON CONFLICT (follower, plan_id) DO UPDATE SET due_at = now();
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER billing_subscriptions_activated AFTER INSERT OR UPDATE ON billing_subscriptions
    FOR EACH ROW WHEN (NEW.status = 'active') EXECUTE FUNCTION billing_subscription_activated();

-- ------------------------------------------------------------------ the API's read views

CREATE VIEW billing_api_operator_plans AS
    SELECT plan_id, name, currency, recurring_minor, setup_minor, period,
           platform_fee_percent::text AS platform_fee_percent, account_pool_limit, modules,
           created_at
    FROM billing_operator_plans;

-- The views a tenant's rows are in also honour the API's transaction scope (the settings
-- tradecopy.tenant and tradecopy.follower, engine/api/migrations/0001_api.sql): the API
-- filters by the caller's tenant itself, and this is the second wall, as row-level security
-- is for the API's own tables. Outside the API (no setting) they show nothing.
CREATE VIEW billing_api_provider_plans AS
    SELECT f.plan_id, f.provider AS tenant_id, f.name, f.currency, f.modules,
           f.subscription_price_minor, f.subscription_period, f.ppt_trades, f.ppt_price_minor,
           f.performance_rate::text AS performance_rate,
           f.volume_rate_per_lot_minor::text AS volume_rate_per_lot_minor,
           f.risk_template_id,
           EXISTS (SELECT 1 FROM billing_subscriptions s WHERE s.plan_id = f.plan_id)
               AS has_subscribers,
           f.created_at
    FROM billing_follower_plans f
    WHERE coalesce(current_setting('tradecopy.tenant', true), '') IN ('*', f.provider);

CREATE VIEW billing_api_provider_operator_plans AS
    SELECT provider AS tenant_id, operator_plan FROM billing_providers;

CREATE VIEW billing_api_checkouts AS
    SELECT checkout_id, follower, provider AS tenant_id, plan_id, client_key, state, url,
           reason, created_at, updated_at
    FROM billing_checkouts
    WHERE coalesce(current_setting('tradecopy.tenant', true), '') IN ('*', provider)
      AND coalesce(current_setting('tradecopy.follower', true), '') IN ('', follower);

DO $$
BEGIN
    CREATE ROLE tradecopy_billing_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;
DO $$
BEGIN
    CREATE ROLE tradecopy_billing_writer NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

GRANT SELECT ON billing_api_operator_plans, billing_api_provider_plans,
    billing_api_provider_operator_plans, billing_api_checkouts TO tradecopy_billing_reader;

-- ------------------------------------------------------------------ the API's write functions
-- Each refuses what billing would not store, with SQLSTATE and the column named:
--   check_violation (23514) + COLUMN  a term that is not allowed (the API answers 422)
--   no_data_found   (P0002)           a plan or provider that does not exist (404 / 409)

CREATE FUNCTION billing_api_create_operator_plan(
    p_plan_id text, p_name text, p_currency text, p_recurring_minor bigint,
    p_setup_minor bigint, p_period text, p_platform_fee_percent numeric,
    p_account_pool_limit integer, p_modules text[]
) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF NOT p_modules <@ ARRAY['subscription', 'pay_per_trade', 'performance', 'volume'] THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', COLUMN = 'modules',
            MESSAGE = 'modules are subscription, pay_per_trade, performance, volume';
    END IF;
    INSERT INTO billing_operator_plans (plan_id, name, currency, recurring_minor, setup_minor,
        period, platform_fee_percent, account_pool_limit, modules)
    VALUES (p_plan_id, p_name, p_currency, p_recurring_minor, p_setup_minor, p_period,
        p_platform_fee_percent, p_account_pool_limit, p_modules)
    ON CONFLICT (plan_id) DO NOTHING;
    RETURN FOUND;
END
$$;

CREATE FUNCTION billing_api_assign_operator_plan(p_provider text, p_plan_id text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM billing_operator_plans WHERE plan_id = p_plan_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', COLUMN = 'plan_id',
            MESSAGE = format('no operator plan %s', p_plan_id);
    END IF;
    INSERT INTO billing_providers (provider, operator_plan) VALUES (p_provider, p_plan_id)
    ON CONFLICT (provider) DO UPDATE SET operator_plan = EXCLUDED.operator_plan;
END
$$;

CREATE FUNCTION billing_api_create_provider_plan(
    p_plan_id text, p_provider text, p_name text, p_currency text, p_modules text[],
    p_subscription_price_minor bigint, p_subscription_period text, p_ppt_trades integer,
    p_ppt_price_minor bigint, p_performance_rate numeric, p_volume_rate_per_lot_minor numeric,
    p_risk_template_id text
) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    allowed text[];
BEGIN
    SELECT o.modules INTO allowed FROM billing_providers p
        JOIN billing_operator_plans o ON o.plan_id = p.operator_plan
        WHERE p.provider = p_provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', COLUMN = 'provider',
            MESSAGE = 'the provider has no operator plan: the operator assigns one first';
    END IF;
    IF cardinality(p_modules) = 0 OR NOT p_modules <@ allowed THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', COLUMN = 'modules',
            MESSAGE = format('the operator plan allows only %s', array_to_string(allowed, ', '));
    END IF;
    INSERT INTO billing_follower_plans (plan_id, provider, name, currency, modules,
        subscription_price_minor, subscription_period, ppt_trades, ppt_price_minor,
        performance_rate, volume_rate_per_lot_minor, risk_template_id)
    VALUES (p_plan_id, p_provider, p_name, p_currency, p_modules, p_subscription_price_minor,
        p_subscription_period, p_ppt_trades, p_ppt_price_minor, p_performance_rate,
        p_volume_rate_per_lot_minor, p_risk_template_id)
    ON CONFLICT (plan_id) DO NOTHING;
    RETURN FOUND;
END
$$;

-- A follower's Checkout request, once per (follower, plan, client key): the id of the first
-- request with that key. Refused (unique_violation) while the follower has an active
-- subscription to a plan with the subscription module. The billing service is woken by
-- NOTIFY billing_checkout.
CREATE FUNCTION billing_api_request_checkout(
    p_checkout_id uuid, p_follower text, p_provider text, p_plan_id text, p_client_key text,
    p_email text, p_success_url text, p_cancel_url text
) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    found_id uuid;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM billing_follower_plans
                   WHERE plan_id = p_plan_id AND provider = p_provider) THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', COLUMN = 'plan_id',
            MESSAGE = format('no plan %s of this provider', p_plan_id);
    END IF;
    SELECT checkout_id INTO found_id FROM billing_checkouts
        WHERE follower = p_follower AND plan_id = p_plan_id AND client_key = p_client_key;
    IF found_id IS NOT NULL THEN
        RETURN found_id;  -- the same request again
    END IF;
    -- A second Checkout of a running subscription would be a second Stripe subscription
    -- charging the same follower; a pay-per-trade allowance may be bought again.
    IF EXISTS (SELECT 1 FROM billing_subscriptions s JOIN billing_follower_plans f USING (plan_id)
               WHERE s.follower = p_follower AND s.plan_id = p_plan_id AND s.status = 'active'
                 AND 'subscription' = ANY (f.modules)) THEN
        RAISE EXCEPTION USING ERRCODE = 'unique_violation', COLUMN = 'plan_id',
            MESSAGE = 'already subscribed to this plan';
    END IF;
    INSERT INTO billing_checkouts (checkout_id, follower, provider, plan_id, client_key, email,
        success_url, cancel_url)
    VALUES (p_checkout_id, p_follower, p_provider, p_plan_id, p_client_key, p_email,
        p_success_url, p_cancel_url)
    ON CONFLICT (follower, plan_id, client_key) DO NOTHING;
    SELECT checkout_id INTO found_id FROM billing_checkouts
        WHERE follower = p_follower AND plan_id = p_plan_id AND client_key = p_client_key;
    PERFORM pg_notify('billing_checkout', found_id::text);
    RETURN found_id;
END
$$;

REVOKE ALL ON FUNCTION billing_api_create_operator_plan(text, text, text, bigint, bigint, text,
    numeric, integer, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing_api_assign_operator_plan(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing_api_create_provider_plan(text, text, text, text, text[], bigint,
    text, integer, bigint, numeric, numeric, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing_api_request_checkout(uuid, text, text, text, text, text, text,
    text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing_api_create_operator_plan(text, text, text, bigint, bigint, text,
    numeric, integer, text[]) TO tradecopy_billing_writer;
GRANT EXECUTE ON FUNCTION billing_api_assign_operator_plan(text, text) TO tradecopy_billing_writer;
GRANT EXECUTE ON FUNCTION billing_api_create_provider_plan(text, text, text, text, text[], bigint,
    text, integer, bigint, numeric, numeric, text) TO tradecopy_billing_writer;
GRANT EXECUTE ON FUNCTION billing_api_request_checkout(uuid, text, text, text, text, text, text,
    text) TO tradecopy_billing_writer;
