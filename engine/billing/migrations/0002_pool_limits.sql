-- The account pool each provider's operator plan allows (master + follower accounts), for the
-- API to enforce before it creates an account. A documented read contract: the API reads this
-- view and nothing else of billing's, as a member of tradecopy_billing_reader. `tenant_id` is
-- the provider (providers are the API's tenants). Either component may be migrated first:
-- whichever comes first makes the role (roles are cluster-wide).

CREATE VIEW billing_account_pool_limits AS
    SELECT p.provider AS tenant_id, o.account_pool_limit, o.plan_id AS operator_plan
    FROM billing_providers p
    JOIN billing_operator_plans o ON o.plan_id = p.operator_plan;

DO $$
BEGIN
    CREATE ROLE tradecopy_billing_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

GRANT SELECT ON billing_account_pool_limits TO tradecopy_billing_reader;
