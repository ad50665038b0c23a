-- Signal sources: TradingView alerts driving a provider's paper master through the API,
-- tenant-scoped behind row-level security as in 0001_api.sql; followers see none:
--   api_signal_sources   one webhook each: the master it drives, the TradingView ticker ->
--                        master symbol map, the volume scale, the sender allow-list and the
--                        SHA-256 of its secret (the secret is 32 random bytes, shown once)
--   api_signal_log       the source's user log: every refused alert (wrong secret, address
--                        not allowed, malformed message) and every accepted one, with its
--                        alert id when known; never the secret nor the raw body

CREATE TABLE api_signal_sources (
    source_id text PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES api_tenants (tenant_id),
    name text NOT NULL,
    master_account_id text NOT NULL REFERENCES api_accounts (account_id),
    symbol_map jsonb NOT NULL,
    volume_scale double precision NOT NULL CHECK (volume_scale > 0),
    allowed_ips jsonb NOT NULL,
    secret_hash bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_signal_sources_tenant ON api_signal_sources (tenant_id, source_id);

CREATE TABLE api_signal_log (
    log_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES api_tenants (tenant_id),
    source_id text NOT NULL REFERENCES api_signal_sources (source_id) ON DELETE CASCADE,
    at timestamptz NOT NULL DEFAULT now(),
    outcome text NOT NULL,
    reason text NOT NULL,
    alert_id text,
    order_ids jsonb,
    remote text NOT NULL
);
CREATE INDEX api_signal_log_source ON api_signal_log (source_id, log_id);
-- One accepted entry per alert: a retry after JetStream's dedup window (or after the
-- master's position moved) finds it and sends nothing.
CREATE UNIQUE INDEX api_signal_log_accepted ON api_signal_log (source_id, alert_id)
    WHERE outcome = 'accepted';

ALTER TABLE api_signal_sources ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_signal_sources FORCE ROW LEVEL SECURITY;
CREATE POLICY api_signal_sources_scope ON api_signal_sources
    USING (api_tenant_visible(tenant_id) AND api_scope_follower() = '');

ALTER TABLE api_signal_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_signal_log FORCE ROW LEVEL SECURITY;
CREATE POLICY api_signal_log_scope ON api_signal_log
    USING (api_tenant_visible(tenant_id) AND api_scope_follower() = '');

-- Sources are created and deleted, never edited (a new secret is a new source); the log is
-- only appended to and read (a source's deletion cascades to it).
GRANT SELECT, INSERT, DELETE ON api_signal_sources TO tradecopy_api;
GRANT SELECT, INSERT ON api_signal_log TO tradecopy_api;
