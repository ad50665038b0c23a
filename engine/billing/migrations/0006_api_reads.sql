-- Billing history, revenue and Express onboarding through the API.
--
-- As for plans (0004_plans_api.sql): the API reads the billing_api_* views below as a member of
-- tradecopy_billing_reader and writes only through the SECURITY DEFINER function, as a member
-- of tradecopy_billing_writer. Every view honours the API's transaction scope (the settings
-- tradecopy.tenant and tradecopy.follower): a provider sees its tenant only, a follower itself
-- only, the operator ('*') everything; outside the API (no setting) they show nothing.

-- Every charge, as its follower and its provider see it (money in integer minor units).
CREATE VIEW billing_api_charges AS
    SELECT charge_id, follower, provider AS tenant_id, module, plan_id, window_id, currency,
           amount_minor, platform_fee_minor, amount_minor - platform_fee_minor AS provider_minor,
           state, issued_ns, created_at, updated_at
    FROM billing_charges
    WHERE coalesce(current_setting('tradecopy.tenant', true), '') IN ('*', provider)
      AND coalesce(current_setting('tradecopy.follower', true), '') IN ('', follower);

-- Revenue per provider, month (UTC, by the charge's issue instant) and currency: the operator
-- sums it over providers, a provider reads its own. Followers see none (a follower's scope).
-- Paid is what was charged and kept (succeeded, or a dispute won); the platform fee counts on
-- paid charges only; unpaid is pending, waiting for the customer, or failed; reversed is
-- refunded or disputed after payment.
CREATE VIEW billing_api_revenue AS
    SELECT provider AS tenant_id,
           to_char(to_timestamp(issued_ns / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM') AS month,
           currency,
           count(*)::bigint AS charges,
           sum(amount_minor)::bigint AS total_minor,
           coalesce(sum(platform_fee_minor) FILTER (WHERE state IN ('succeeded', 'dispute_won')),
                    0)::bigint AS platform_fee_minor,
           coalesce(sum(amount_minor) FILTER (WHERE state IN ('succeeded', 'dispute_won')),
                    0)::bigint AS paid_minor,
           coalesce(sum(amount_minor) FILTER (WHERE state IN ('pending', 'requires_action',
                                                              'failed')), 0)::bigint AS unpaid_minor,
           coalesce(sum(amount_minor) FILTER (WHERE state IN ('disputed', 'dispute_lost',
                                                              'refunded')), 0)::bigint
               AS reversed_minor
    FROM billing_charges
    WHERE coalesce(current_setting('tradecopy.tenant', true), '') IN ('*', provider)
      AND coalesce(current_setting('tradecopy.follower', true), '') = ''
    GROUP BY 1, 2, 3;

-- A provider's request for an Express onboarding link. The API records it (pending); the
-- billing service creates the provider's Express account once (billing_providers
-- .stripe_account, Stripe idempotency key account:<provider>) and a fresh account link each
-- time (ready: url, expires_at), or stores why it could not (failed).
CREATE TABLE billing_onboardings (
    onboarding_id uuid PRIMARY KEY,
    provider      text NOT NULL REFERENCES billing_providers (provider),
    email         text NOT NULL,
    country       text NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
    refresh_url   text NOT NULL,
    return_url    text NOT NULL,
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'ready', 'failed')),
    account       text,
    url           text,
    expires_at    timestamptz,
    reason        text,
    attempts      integer NOT NULL DEFAULT 0,
    lease_until   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_onboardings_pending ON billing_onboardings (created_at)
    WHERE state = 'pending';

CREATE VIEW billing_api_onboardings AS
    SELECT onboarding_id, provider AS tenant_id, state, account, url, expires_at, reason,
           created_at, updated_at
    FROM billing_onboardings
    WHERE coalesce(current_setting('tradecopy.tenant', true), '') IN ('*', provider)
      AND coalesce(current_setting('tradecopy.follower', true), '') = '';

GRANT SELECT ON billing_api_charges, billing_api_revenue, billing_api_onboardings
    TO tradecopy_billing_reader;

-- A provider's onboarding request: its id. Refused (no_data_found) for a provider on no
-- operator plan (billing knows no such provider yet). Wakes the service (NOTIFY
-- billing_onboarding).
CREATE FUNCTION billing_api_request_onboarding(
    p_onboarding_id uuid, p_provider text, p_email text, p_country text, p_refresh_url text,
    p_return_url text
) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM billing_providers WHERE provider = p_provider) THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', COLUMN = 'provider',
            MESSAGE = 'the provider has no operator plan: the operator assigns one first';
    END IF;
    INSERT INTO billing_onboardings (onboarding_id, provider, email, country, refresh_url,
        return_url)
    VALUES (p_onboarding_id, p_provider, p_email, p_country, p_refresh_url, p_return_url);
    PERFORM pg_notify('billing_onboarding', p_onboarding_id::text);
    RETURN p_onboarding_id;
END
$$;

REVOKE ALL ON FUNCTION billing_api_request_onboarding(uuid, text, text, text, text, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing_api_request_onboarding(uuid, text, text, text, text, text)
    TO tradecopy_billing_writer;
