-- A follower's change of plan (plan A to plan B of the same provider and currency, B with the
-- subscription module), prorated, requested through the API and applied by the billing
-- service (engine/billing/plan_changes.py).
--
-- As for Checkout (0004_plans_api.sql): the API records the request through the SECURITY
-- DEFINER function below (as a member of tradecopy_billing_writer) and reads the view (as a
-- member of tradecopy_billing_reader); the view honours the API's transaction scope.

-- The Stripe subscription item a change updates. Checkout's subscriptions are made by Stripe,
-- so the item is read from Stripe at the first change and kept here.
ALTER TABLE billing_subscriptions ADD COLUMN stripe_subscription_item text;

-- One request per change. pending (recorded, waiting for the billing service), applied (the
-- subscription moved: credit, charge, net and the new period stored), failed (reason; a
-- definitive refusal by Stripe keeps Stripe's code in failure_code).
CREATE TABLE billing_plan_changes (
    plan_change_id    uuid PRIMARY KEY,
    seq               bigserial NOT NULL UNIQUE,
    follower          text NOT NULL,
    provider          text NOT NULL,
    from_plan         text NOT NULL REFERENCES billing_follower_plans (plan_id),
    to_plan           text NOT NULL REFERENCES billing_follower_plans (plan_id),
    currency          text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    requested_ns      bigint NOT NULL,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'applied', 'failed')),
    credit_minor      bigint CHECK (credit_minor >= 0),
    charge_minor      bigint CHECK (charge_minor >= 0),
    net_minor         bigint,
    anchor_ns         bigint,
    period_start_ns   bigint,
    period_end_ns     bigint,
    stripe_subscription text,
    reason            text,
    failure_code      text,
    attempts          integer NOT NULL DEFAULT 0,
    lease_until       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (from_plan <> to_plan),
    CHECK (status <> 'applied' OR (credit_minor IS NOT NULL AND charge_minor IS NOT NULL
                                   AND net_minor = charge_minor - credit_minor))
);
-- One pending change per subscription: two would both prorate the same period.
CREATE UNIQUE INDEX billing_plan_changes_one_pending ON billing_plan_changes (follower, from_plan)
    WHERE status = 'pending';
CREATE INDEX billing_plan_changes_follower ON billing_plan_changes (follower, seq);

CREATE VIEW billing_api_plan_changes AS
    SELECT plan_change_id, seq, follower, provider AS tenant_id, from_plan, to_plan, currency,
           requested_ns, status, credit_minor, charge_minor, net_minor, period_start_ns,
           period_end_ns, reason, failure_code, created_at, updated_at
    FROM billing_plan_changes
    WHERE coalesce(current_setting('tradecopy.tenant', true), '') IN ('*', provider)
      AND coalesce(current_setting('tradecopy.follower', true), '') IN ('', follower);

GRANT SELECT ON billing_api_plan_changes TO tradecopy_billing_reader;

-- A follower's request to move its active subscription of p_from_plan (a plan of p_provider)
-- to p_to_plan. Refuses, with SQLSTATE and the column named:
--   no_data_found    (P0002) + COLUMN  a plan that is not the provider's
--   check_violation  (23514) + COLUMN  the same plan, another provider or currency, a plan
--                                      without the subscription module
--   unique_violation (23505) + COLUMN  not subscribed to the first plan, already on the
--                                      second, or a change of this subscription pending
-- Concurrent requests of one follower queue on a transaction advisory lock. Wakes the service
-- (NOTIFY billing_plan_change).
CREATE FUNCTION billing_api_request_plan_change(
    p_plan_change_id uuid, p_follower text, p_provider text, p_from_plan text, p_to_plan text
) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    old_plan billing_follower_plans%ROWTYPE;
    new_plan billing_follower_plans%ROWTYPE;
BEGIN
    SELECT * INTO old_plan FROM billing_follower_plans
        WHERE plan_id = p_from_plan AND provider = p_provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', COLUMN = 'from_plan',
            MESSAGE = format('no plan %s of this provider', p_from_plan);
    END IF;
    SELECT * INTO new_plan FROM billing_follower_plans WHERE plan_id = p_to_plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', COLUMN = 'to_plan',
            MESSAGE = format('no plan %s of this provider', p_to_plan);
    END IF;
    IF p_from_plan = p_to_plan THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', COLUMN = 'to_plan',
            MESSAGE = 'the plan to change to is the plan already held';
    END IF;
    IF new_plan.provider <> old_plan.provider THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', COLUMN = 'to_plan',
            MESSAGE = 'a plan of another provider: a change stays with one provider';
    END IF;
    IF new_plan.currency <> old_plan.currency THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', COLUMN = 'to_plan',
            MESSAGE = format('a plan in %s: a change keeps the currency (%s)',
                             new_plan.currency, old_plan.currency);
    END IF;
    IF NOT 'subscription' = ANY (new_plan.modules) THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', COLUMN = 'to_plan',
            MESSAGE = 'the plan to change to has no subscription module';
    END IF;
    IF NOT 'subscription' = ANY (old_plan.modules) THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', COLUMN = 'from_plan',
            MESSAGE = 'the plan held has no subscription module: nothing to prorate';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('billing_plan_change:' || p_follower, 0));
    IF NOT EXISTS (SELECT 1 FROM billing_subscriptions WHERE follower = p_follower
                   AND plan_id = p_from_plan AND status = 'active') THEN
        RAISE EXCEPTION USING ERRCODE = 'unique_violation', COLUMN = 'from_plan',
            MESSAGE = 'no active subscription to the plan to change from';
    END IF;
    IF EXISTS (SELECT 1 FROM billing_subscriptions WHERE follower = p_follower
               AND plan_id = p_to_plan AND status = 'active') THEN
        RAISE EXCEPTION USING ERRCODE = 'unique_violation', COLUMN = 'to_plan',
            MESSAGE = 'already subscribed to the plan to change to';
    END IF;
    IF EXISTS (SELECT 1 FROM billing_plan_changes WHERE follower = p_follower
               AND from_plan = p_from_plan AND status = 'pending') THEN
        RAISE EXCEPTION USING ERRCODE = 'unique_violation', COLUMN = 'from_plan',
            MESSAGE = 'a change of this subscription is pending';
    END IF;
    INSERT INTO billing_plan_changes (plan_change_id, follower, provider, from_plan, to_plan,
        currency, requested_ns)
    VALUES (p_plan_change_id, p_follower, old_plan.provider, p_from_plan, p_to_plan,
        old_plan.currency,
        (extract(epoch FROM clock_timestamp()) * 1000000)::bigint * 1000);
    PERFORM pg_notify('billing_plan_change', p_plan_change_id::text);
    RETURN p_plan_change_id;
END
$$;

REVOKE ALL ON FUNCTION billing_api_request_plan_change(uuid, text, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing_api_request_plan_change(uuid, text, text, text, text)
    TO tradecopy_billing_writer;
