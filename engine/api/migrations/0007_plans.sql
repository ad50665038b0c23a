-- Plans and Checkout live in billing (engine/billing/migrations/0004_plans_api.sql); the API
-- writes them only through billing's SECURITY DEFINER functions, as a member of
-- tradecopy_billing_writer, and reads billing's billing_api_* views as a member of
-- tradecopy_billing_reader (0005_billing_reads.sql). Either component may be migrated first:
-- whichever comes first makes the role.
--
-- The other way round, billing reads a provider plan's risk template through the view
-- api_plan_risk_templates (template id, tenant, settings), as a member of
-- tradecopy_api_template_reader, to apply it to a follower's links when the plan activates.
-- The view is read past row-level security (it runs with its owner's rights): billing reads
-- every tenant's templates, and nothing else of the API's.

DO $$
BEGIN
    CREATE ROLE tradecopy_billing_writer NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

DO $$
BEGIN
    GRANT tradecopy_billing_writer TO tradecopy_api;
EXCEPTION WHEN unique_violation THEN
    NULL;  -- granted at the same moment by another database's migration
END
$$;

DO $$
BEGIN
    CREATE ROLE tradecopy_api_template_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

CREATE VIEW api_plan_risk_templates AS
    SELECT template_id::text AS template_id, tenant_id, settings, updated_at
    FROM api_risk_templates;

GRANT SELECT ON api_plan_risk_templates TO tradecopy_api_template_reader;
