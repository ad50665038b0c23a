-- The API reads the ledger's read views (engine/ledger/migrations/0002_read_views.sql) as a
-- member of tradecopy_ledger_reader. Either component may be migrated first: whichever comes
-- first makes the role (roles are cluster-wide, so an earlier database may have made it).
-- Ledger rows carry no RLS of their own: every API statement joins them to api_accounts,
-- whose policy is the second wall.

DO $$
BEGIN
    CREATE ROLE tradecopy_ledger_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

DO $$
BEGIN
    GRANT tradecopy_ledger_reader TO tradecopy_api;
EXCEPTION WHEN unique_violation THEN
    NULL;  -- granted at the same moment by another database's migration
END
$$;

-- Whether an account's ledger facts changed since a reader folded them, in one round trip:
-- the caller's scope settings and role are set inside, before the query runs, so row-level
-- security applies to it exactly as in a transaction Store.tx opened (SET LOCAL lasts until
-- the statement's own transaction ends). The scope parameters are the application's own
-- filters (NULL: not narrowed). Not SECURITY DEFINER: the query runs as p_role.
CREATE FUNCTION api_ledger_facts_version(
    p_tenant text, p_follower text, p_role text, p_account text,
    p_scope_tenant text, p_scope_follower uuid
) RETURNS TABLE (facts bigint, latest timestamptz, seqs numeric)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM set_config('tradecopy.tenant', p_tenant, true),
            set_config('tradecopy.follower', p_follower, true);
    IF p_role IS NOT NULL THEN
        PERFORM set_config('role', p_role, true);
    END IF;
    RETURN QUERY
        SELECT count(f.account), max(f.stored_at), coalesce(sum(f.stream_seq), 0)
        FROM api_accounts a
        LEFT JOIN ledger_account_facts f ON f.account = a.account_id AND f.account = p_account
        WHERE a.account_id = p_account
          AND (p_scope_tenant IS NULL OR a.tenant_id = p_scope_tenant)
          AND (p_scope_follower IS NULL OR a.owner_user_id = p_scope_follower)
        GROUP BY a.account_id;
END
$$;
