-- A provider's Express account status from account.updated, and one open Checkout per
-- (follower, plan).

-- What Stripe last said of the provider's Express account (account.updated): whether it may
-- take charges, receive payouts, and whether the provider finished the onboarding form.
-- account_status_created_s is the applied event's `created`: an older event (Stripe delivers
-- in no particular order) never overwrites a newer state.
ALTER TABLE billing_providers
    ADD COLUMN charges_enabled          boolean,
    ADD COLUMN payouts_enabled          boolean,
    ADD COLUMN details_submitted        boolean,
    ADD COLUMN account_status_created_s bigint,
    ADD COLUMN account_status_event     text;

-- The onboarding answer carries the account's status, so a provider sees when it is done.
CREATE OR REPLACE VIEW billing_api_onboardings AS
    SELECT o.onboarding_id, o.provider AS tenant_id, o.state, o.account, o.url, o.expires_at,
           o.reason, o.created_at, o.updated_at, p.charges_enabled, p.payouts_enabled,
           p.details_submitted
    FROM billing_onboardings o JOIN billing_providers p USING (provider)
    WHERE coalesce(current_setting('tradecopy.tenant', true), '') IN ('*', o.provider)
      AND coalesce(current_setting('tradecopy.follower', true), '') = '';

-- At most one open (pending or ready) Checkout per (follower, plan): two paid sessions would
-- make two subscriptions. The function below answers the open one; this index is the
-- guarantee for any other writer.
CREATE UNIQUE INDEX billing_checkouts_one_open ON billing_checkouts (follower, plan_id)
    WHERE state IN ('pending', 'ready');

-- A follower's Checkout request: the id of the request with the same client key, else of the
-- follower's open (pending or ready) Checkout of the plan, else of a new one. Refused
-- (unique_violation) while the follower has an active subscription to a plan with the
-- subscription module. Concurrent requests of one (follower, plan) queue on a transaction
-- advisory lock, so the second sees the first's row. Wakes the service (NOTIFY
-- billing_checkout).
CREATE OR REPLACE FUNCTION billing_api_request_checkout(
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
    PERFORM pg_advisory_xact_lock(hashtextextended('billing_checkout:' || p_follower || ':'
        || p_plan_id, 0));
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
    SELECT checkout_id INTO found_id FROM billing_checkouts
        WHERE follower = p_follower AND plan_id = p_plan_id AND state IN ('pending', 'ready');
    IF found_id IS NOT NULL THEN
        RETURN found_id;  -- the open Checkout, whatever key the client sent this time
    END IF;
    INSERT INTO billing_checkouts (checkout_id, follower, provider, plan_id, client_key, email,
        success_url, cancel_url)
    VALUES (p_checkout_id, p_follower, p_provider, p_plan_id, p_client_key, p_email,
        p_success_url, p_cancel_url);
    PERFORM pg_notify('billing_checkout', p_checkout_id::text);
    RETURN p_checkout_id;
END
$$;
