-- Uploaded strategies, their deployments, and the marketplace's provider profiles, all
-- tenant-scoped behind row-level security as in 0001_api.sql:
--   api_strategies            a provider's named strategy (name unique per tenant)
--   api_strategy_versions     its immutable versions: the StrategyVersion's fields, the source
--                             included (read by its own tenant only); version ids are content
--                             hashes, so an identical upload finds the row it made before
--   api_strategy_deployments  a version run on a symbol and timeframe, trading a paper master;
--                             the running copy is the KV entry (tc_signal_deployments) under
--                             kv_key, unique platform-wide because the bucket is
--   api_marketplace_profiles  one profile per provider (tenant): its public slug (unique
--                             platform-wide), description, the master its statistics come from,
--                             the strategy it shows, and whether it is published
-- Followers see none of the strategy tables, and read their own provider's profile only.
-- Other tenants read published profiles only through the SECURITY DEFINER functions at the
-- end, which return public fields (never a tenant, an account id or a source).

CREATE TABLE api_strategies (
    strategy_id text PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES api_tenants (tenant_id),
    name text NOT NULL,
    description text NOT NULL DEFAULT '',
    created_by uuid REFERENCES api_users (user_id),
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE api_strategy_versions (
    strategy_id text NOT NULL REFERENCES api_strategies (strategy_id),
    version_id text NOT NULL CHECK (version_id ~ '^sv-[0-9a-f]{24}$'),
    tenant_id text NOT NULL REFERENCES api_tenants (tenant_id),
    code_sha256 text NOT NULL,
    parameters jsonb NOT NULL,
    author text NOT NULL,
    created_ns bigint NOT NULL,
    source text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (strategy_id, version_id)
);
CREATE INDEX api_strategy_versions_latest ON api_strategy_versions (strategy_id, created_ns DESC);

CREATE TABLE api_strategy_deployments (
    deployment_id text PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES api_tenants (tenant_id),
    strategy_id text NOT NULL,
    version_id text NOT NULL,
    master_account_id text NOT NULL REFERENCES api_accounts (account_id),
    symbol text NOT NULL,
    timeframe text NOT NULL,
    volume double precision NOT NULL CHECK (volume > 0),
    kv_key text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (strategy_id, version_id) REFERENCES api_strategy_versions (strategy_id, version_id)
);
CREATE INDEX api_strategy_deployments_strategy ON api_strategy_deployments (strategy_id, deployment_id);

CREATE TABLE api_marketplace_profiles (
    tenant_id text PRIMARY KEY REFERENCES api_tenants (tenant_id),
    slug text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{1,62}$'),
    description text NOT NULL DEFAULT '',
    master_account_id text NOT NULL REFERENCES api_accounts (account_id),
    strategy_id text REFERENCES api_strategies (strategy_id),
    published boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE api_strategies ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_strategies FORCE ROW LEVEL SECURITY;
CREATE POLICY api_strategies_scope ON api_strategies
    USING (api_tenant_visible(tenant_id) AND api_scope_follower() = '');

ALTER TABLE api_strategy_versions ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_strategy_versions FORCE ROW LEVEL SECURITY;
CREATE POLICY api_strategy_versions_scope ON api_strategy_versions
    USING (api_tenant_visible(tenant_id) AND api_scope_follower() = '');

ALTER TABLE api_strategy_deployments ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_strategy_deployments FORCE ROW LEVEL SECURITY;
CREATE POLICY api_strategy_deployments_scope ON api_strategy_deployments
    USING (api_tenant_visible(tenant_id) AND api_scope_follower() = '');

-- A follower reads its own provider's profile (following it on paper needs its master);
-- only the provider writes it.
ALTER TABLE api_marketplace_profiles ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_marketplace_profiles FORCE ROW LEVEL SECURITY;
CREATE POLICY api_marketplace_profiles_read ON api_marketplace_profiles FOR SELECT
    USING (api_tenant_visible(tenant_id));
CREATE POLICY api_marketplace_profiles_insert ON api_marketplace_profiles FOR INSERT
    WITH CHECK (api_tenant_visible(tenant_id) AND api_scope_follower() = '');
CREATE POLICY api_marketplace_profiles_update ON api_marketplace_profiles FOR UPDATE
    USING (api_tenant_visible(tenant_id) AND api_scope_follower() = '');

-- Versions are immutable: added and read, never changed or removed. Deployments are made
-- and removed (a new version is a new deployment).
GRANT SELECT, INSERT ON api_strategies, api_strategy_versions TO tradecopy_api;
GRANT SELECT, INSERT, DELETE ON api_strategy_deployments TO tradecopy_api;
GRANT SELECT, INSERT, UPDATE ON api_marketplace_profiles TO tradecopy_api;

-- ------------------------------------------------------------ the marketplace's public reads
-- SECURITY DEFINER with the scope settings widened for the function's duration only (a
-- function's SET clause restores them on exit, also on error): they read across tenants and
-- return only published profiles and only their public fields. plpgsql, so the ledger's views
-- need not exist when this runs (either component may be migrated first).

-- Published profiles (all, or the one of p_slug): what a profile page and the leaderboard
-- show, when the profile last changed, and the version of the master's ledger facts (count, latest stored_at, sum of stream
-- sequences) so statistics folded from them can be reused while nothing changed.
CREATE FUNCTION api_marketplace_listing(p_slug text DEFAULT NULL)
RETURNS TABLE (slug text, description text, strategy_name text, strategy_version_id text,
               followers bigint, profile_updated timestamptz, facts bigint,
               latest timestamptz, seqs numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public SET tradecopy.tenant = '*' SET tradecopy.follower = ''
AS $$
BEGIN
    RETURN QUERY
        SELECT p.slug, p.description, s.name,
               (SELECT v.version_id FROM api_strategy_versions v
                 WHERE v.strategy_id = p.strategy_id
                 ORDER BY v.created_ns DESC, v.version_id LIMIT 1),
               (SELECT count(*) FROM api_links l WHERE l.master = p.master_account_id),
               p.updated_at, f.facts, f.latest, f.seqs
          FROM api_marketplace_profiles p
          LEFT JOIN api_strategies s ON s.strategy_id = p.strategy_id
          CROSS JOIN LATERAL (
              SELECT count(*) AS facts, max(x.stored_at) AS latest,
                     coalesce(sum(x.stream_seq), 0) AS seqs
                FROM ledger_account_facts x WHERE x.account = p.master_account_id) f
         WHERE p.published AND (p_slug IS NULL OR p.slug = p_slug)
         ORDER BY p.slug;
END
$$;

-- The ledger facts of a published profile's master, in time order (for its statistics; the
-- API folds them with the master's id, which it never answers).
CREATE FUNCTION api_marketplace_facts(p_slug text)
RETURNS TABLE (account text, kind text, payload bytea, stream_seq bigint, stored_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public SET tradecopy.tenant = '*' SET tradecopy.follower = ''
AS $$
BEGIN
    RETURN QUERY
        SELECT x.account, x.kind, x.payload, x.stream_seq, x.stored_at
          FROM api_marketplace_profiles p
          JOIN ledger_account_facts x ON x.account = p.master_account_id
         WHERE p.published AND p.slug = p_slug
         ORDER BY x.ts_ns, x.stream_seq;
END
$$;

-- The equity series of a published profile's master, oldest first.
CREATE FUNCTION api_marketplace_equity(p_slug text)
RETURNS TABLE (ts_ns bigint, currency text, balance_minor bigint, equity_minor bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public SET tradecopy.tenant = '*' SET tradecopy.follower = ''
AS $$
BEGIN
    RETURN QUERY
        SELECT b.ts_ns, b.currency, b.balance_minor, b.equity_minor
          FROM api_marketplace_profiles p
          JOIN ledger_account_balances b ON b.account = p.master_account_id
         WHERE p.published AND p.slug = p_slug
         ORDER BY b.ts_ns;
END
$$;

REVOKE ALL ON FUNCTION api_marketplace_listing(text), api_marketplace_facts(text),
    api_marketplace_equity(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION api_marketplace_listing(text), api_marketplace_facts(text),
    api_marketplace_equity(text) TO tradecopy_api;
