-- The API reads billing's documented view of account pool limits
-- (engine/billing/migrations/0002_pool_limits.sql) as a member of tradecopy_billing_reader.
-- Either component may be migrated first: whichever comes first makes the role. Without
-- billing in the database, no pool limit applies.

DO $$
BEGIN
    CREATE ROLE tradecopy_billing_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

DO $$
BEGIN
    GRANT tradecopy_billing_reader TO tradecopy_api;
EXCEPTION WHEN unique_violation THEN
    NULL;  -- granted at the same moment by another database's migration
END
$$;

-- How many accounts the caller's tenant holds, for the pool limit. A follower's row-level
-- security shows it only its own accounts, yet the pool is the tenant's: this counts past the
-- policy, for the tenant of the transaction's own scope setting only, and returns a number.
CREATE FUNCTION api_tenant_account_count() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT count(*) FROM public.api_accounts
    WHERE tenant_id = current_setting('tradecopy.tenant', true)
$$;
REVOKE ALL ON FUNCTION api_tenant_account_count() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION api_tenant_account_count() TO tradecopy_api;
