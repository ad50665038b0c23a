-- The platform API's tables. Every row belongs to a tenant (a provider) or, for operators
-- and platform-wide rows, to none (tenant_id NULL). Row-level security is the second wall
-- behind the application's own scoping: each transaction sets
--   tradecopy.tenant   = the caller's tenant, or '*' for operators and pre-login lookups
--   tradecopy.follower = the calling follower's user id, or '' for everyone else
-- and the API's connections run as tradecopy_api, which owns nothing, so the policies apply
-- (FORCE applies them to the tables' owner too; only a superuser bypasses them).

DO $$
BEGIN
    CREATE ROLE tradecopy_api NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- made by an earlier database of this cluster (roles are cluster-wide)
END
$$;

CREATE FUNCTION api_scope_tenant() RETURNS text LANGUAGE sql STABLE AS
$$ SELECT coalesce(current_setting('tradecopy.tenant', true), '') $$;
CREATE FUNCTION api_scope_follower() RETURNS text LANGUAGE sql STABLE AS
$$ SELECT coalesce(current_setting('tradecopy.follower', true), '') $$;
-- The row's tenant is the caller's, or the caller is platform-wide.
CREATE FUNCTION api_tenant_visible(row_tenant text) RETURNS boolean LANGUAGE sql STABLE AS
$$ SELECT api_scope_tenant() = '*' OR (row_tenant IS NOT NULL AND row_tenant = api_scope_tenant()) $$;
-- A follower sees only what it owns; everyone else is not narrowed here.
CREATE FUNCTION api_follower_visible(row_owner uuid) RETURNS boolean LANGUAGE sql STABLE AS
$$ SELECT api_scope_follower() = '' OR (row_owner IS NOT NULL AND row_owner::text = api_scope_follower()) $$;

CREATE TABLE api_tenants (
    tenant_id text PRIMARY KEY CHECK (tenant_id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_users (
    user_id uuid PRIMARY KEY,
    tenant_id text REFERENCES api_tenants (tenant_id),
    role text NOT NULL CHECK (role IN ('operator', 'provider', 'follower')),
    email text NOT NULL,
    username text,
    password_hash text NOT NULL,
    disabled boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((role = 'operator') = (tenant_id IS NULL)),
    CHECK (email = lower(email))
);
CREATE UNIQUE INDEX api_users_email ON api_users (email);
CREATE UNIQUE INDEX api_users_username ON api_users (lower(username)) WHERE username IS NOT NULL;

CREATE TABLE api_refresh_tokens (
    token_id uuid PRIMARY KEY,
    family_id uuid NOT NULL,
    user_id uuid NOT NULL REFERENCES api_users (user_id),
    tenant_id text REFERENCES api_tenants (tenant_id),
    token_hash bytea NOT NULL UNIQUE,
    expires_at timestamptz NOT NULL,
    used_at timestamptz,
    revoked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_refresh_tokens_family ON api_refresh_tokens (family_id);

CREATE TABLE api_keys (
    key_id uuid PRIMARY KEY,
    tenant_id text REFERENCES api_tenants (tenant_id),
    user_id uuid NOT NULL REFERENCES api_users (user_id),
    name text NOT NULL,
    prefix text NOT NULL,
    key_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

CREATE TABLE api_accounts (
    account_id text PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES api_tenants (tenant_id),
    owner_user_id uuid REFERENCES api_users (user_id),
    name text NOT NULL,
    platform text NOT NULL CHECK (platform IN ('mt4', 'mt5', 'paper')),
    role text NOT NULL CHECK (role IN ('master', 'follower')),
    credentials bytea NOT NULL,
    key_id text NOT NULL,
    terminal_token_hash bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_accounts_tenant ON api_accounts (tenant_id, account_id);

CREATE TABLE api_links (
    link_id text PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES api_tenants (tenant_id),
    master text NOT NULL REFERENCES api_accounts (account_id),
    follower text NOT NULL REFERENCES api_accounts (account_id),
    owner_user_id uuid REFERENCES api_users (user_id),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_links_tenant ON api_links (tenant_id, link_id);

CREATE TABLE api_audit_log (
    audit_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id text,
    actor_user_id uuid,
    actor_key_id uuid,
    action text NOT NULL,
    entity text NOT NULL,
    entity_id text NOT NULL,
    before jsonb,
    after jsonb,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_audit_log_tenant ON api_audit_log (tenant_id, audit_id);

ALTER TABLE api_tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_tenants FORCE ROW LEVEL SECURITY;
CREATE POLICY api_tenants_scope ON api_tenants USING (api_tenant_visible(tenant_id));

ALTER TABLE api_users ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_users FORCE ROW LEVEL SECURITY;
CREATE POLICY api_users_scope ON api_users
    USING (api_tenant_visible(tenant_id) AND api_follower_visible(user_id));

ALTER TABLE api_refresh_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_refresh_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY api_refresh_tokens_scope ON api_refresh_tokens
    USING (api_tenant_visible(tenant_id) AND api_follower_visible(user_id));

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY api_keys_scope ON api_keys
    USING (api_tenant_visible(tenant_id) AND api_follower_visible(user_id));

ALTER TABLE api_accounts ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_accounts FORCE ROW LEVEL SECURITY;
CREATE POLICY api_accounts_scope ON api_accounts
    USING (api_tenant_visible(tenant_id) AND api_follower_visible(owner_user_id));

ALTER TABLE api_links ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_links FORCE ROW LEVEL SECURITY;
CREATE POLICY api_links_scope ON api_links
    USING (api_tenant_visible(tenant_id) AND api_follower_visible(owner_user_id));

-- Append-only: the API may add and read entries, never change or remove one.
ALTER TABLE api_audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY api_audit_log_read ON api_audit_log FOR SELECT
    USING (api_tenant_visible(tenant_id) AND api_scope_follower() = '');
CREATE POLICY api_audit_log_write ON api_audit_log FOR INSERT
    WITH CHECK (api_tenant_visible(tenant_id));

GRANT SELECT, INSERT, UPDATE, DELETE
    ON api_tenants, api_users, api_refresh_tokens, api_keys, api_accounts, api_links
    TO tradecopy_api;
GRANT SELECT, INSERT ON api_audit_log TO tradecopy_api;
GRANT EXECUTE ON FUNCTION api_scope_tenant(), api_scope_follower(), api_tenant_visible(text),
    api_follower_visible(uuid) TO tradecopy_api;
