-- Templates of trading from the web, each tenant-scoped behind row-level security as in
-- 0001_api.sql:
--   api_risk_templates   a provider's named fragments of link settings (sizing, protection)
--                        it applies to links; followers see none
--   api_order_templates  one user's named presets of manual orders (symbol, side, volume,
--                        SL/TP distance in points)

CREATE TABLE api_risk_templates (
    template_id uuid PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES api_tenants (tenant_id),
    name text NOT NULL,
    settings jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE api_order_templates (
    template_id uuid PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES api_tenants (tenant_id),
    owner_user_id uuid NOT NULL REFERENCES api_users (user_id),
    name text NOT NULL,
    symbol text NOT NULL,
    side text NOT NULL CHECK (side IN ('buy', 'sell')),
    volume double precision NOT NULL CHECK (volume > 0),
    sl_points integer CHECK (sl_points > 0),
    tp_points integer CHECK (tp_points > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner_user_id, name)
);
CREATE INDEX api_order_templates_owner ON api_order_templates (tenant_id, owner_user_id);

ALTER TABLE api_risk_templates ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_risk_templates FORCE ROW LEVEL SECURITY;
CREATE POLICY api_risk_templates_scope ON api_risk_templates
    USING (api_tenant_visible(tenant_id) AND api_scope_follower() = '');

ALTER TABLE api_order_templates ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_order_templates FORCE ROW LEVEL SECURITY;
CREATE POLICY api_order_templates_scope ON api_order_templates
    USING (api_tenant_visible(tenant_id) AND api_follower_visible(owner_user_id));

GRANT SELECT, INSERT, UPDATE, DELETE ON api_risk_templates, api_order_templates TO tradecopy_api;
