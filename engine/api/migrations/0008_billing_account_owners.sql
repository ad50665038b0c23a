-- Who owns each trading account, for billing's enforcement: a documented read contract, as
-- 0005_billing_reads.sql is in the other direction. Billing reads this function and nothing
-- else of the API's, as a member of tradecopy_account_owner_reader.
--   account_id  the API's account
--   provider    its tenant (providers are the API's tenants)
--   follower    for a follower account, its owner user's id as text (the person billed:
--               billing_subscriptions.follower); NULL for a master account
-- api_accounts is under row-level security scoped per request: the function runs as its
-- owner with the platform-wide scope ('*', no follower) set for its own duration only (the
-- SET clauses are restored when it returns), so it sees every account and returns only
-- these three columns, never credentials or tokens.

DO $$
BEGIN
    CREATE ROLE tradecopy_account_owner_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- made by an earlier database of this cluster (roles are cluster-wide)
END
$$;

CREATE FUNCTION api_billing_account_owners()
RETURNS TABLE (account_id text, provider text, follower text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public
SET tradecopy.tenant = '*'
SET tradecopy.follower = ''
AS $$
    SELECT a.account_id, a.tenant_id,
           CASE WHEN a.role = 'follower' THEN a.owner_user_id::text END
    FROM public.api_accounts a
$$;
REVOKE ALL ON FUNCTION api_billing_account_owners() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION api_billing_account_owners() TO tradecopy_account_owner_reader;
