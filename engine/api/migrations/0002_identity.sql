-- Invites, one-use tokens of users (password reset, email verification), the email outbox,
-- the TOTP second factor with its recovery codes, and the roles that must use it.
-- The same two walls as 0001: every statement filters by tenant, and these policies.

ALTER TABLE api_users ADD COLUMN email_verified_at timestamptz;

CREATE TABLE api_invites (
    invite_id uuid PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES api_tenants (tenant_id),
    email text NOT NULL CHECK (email = lower(email)),
    role text NOT NULL CHECK (role IN ('provider', 'follower')),
    token_hash bytea NOT NULL UNIQUE,
    invited_by uuid REFERENCES api_users (user_id),
    expires_at timestamptz NOT NULL,
    accepted_at timestamptz,
    accepted_user_id uuid REFERENCES api_users (user_id),
    revoked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_invites_tenant ON api_invites (tenant_id, invite_id);

-- One-use tokens sent to a user's email: password resets and email verifications.
CREATE TABLE api_user_tokens (
    token_id uuid PRIMARY KEY,
    tenant_id text REFERENCES api_tenants (tenant_id),
    user_id uuid NOT NULL REFERENCES api_users (user_id),
    purpose text NOT NULL CHECK (purpose IN ('password_reset', 'verify_email')),
    token_hash bytea NOT NULL UNIQUE,
    expires_at timestamptz NOT NULL,
    used_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_user_tokens_user ON api_user_tokens (user_id, purpose);

-- Emails waiting for the SMTP server, written in the transaction that made their token, so
-- none is lost. The message is sealed (AES-256-GCM, key_id beside it): it carries a token
-- link; once sent, only its envelope is kept.
CREATE TABLE api_email_outbox (
    email_id uuid PRIMARY KEY,
    tenant_id text REFERENCES api_tenants (tenant_id),
    kind text NOT NULL,
    recipient text NOT NULL,
    sealed bytea,
    key_id text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz,
    failed_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_email_outbox_due ON api_email_outbox (next_attempt_at)
    WHERE sent_at IS NULL AND failed_at IS NULL;

-- The TOTP secret (sealed, bound to tenant and user), confirmed once a first code matched.
-- last_step: the newest 30 s step a code was accepted for; no step at or before it counts.
CREATE TABLE api_totp (
    user_id uuid PRIMARY KEY REFERENCES api_users (user_id),
    tenant_id text REFERENCES api_tenants (tenant_id),
    secret bytea NOT NULL,
    key_id text NOT NULL,
    confirmed_at timestamptz,
    last_step bigint,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_recovery_codes (
    code_hash bytea PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES api_users (user_id),
    tenant_id text REFERENCES api_tenants (tenant_id),
    used_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_recovery_codes_user ON api_recovery_codes (user_id);

-- Platform-wide: the roles whose users must enrol in TOTP (operators set it).
CREATE TABLE api_totp_required_roles (
    role text PRIMARY KEY CHECK (role IN ('operator', 'provider', 'follower')),
    set_by uuid REFERENCES api_users (user_id),
    set_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE api_invites ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_invites FORCE ROW LEVEL SECURITY;
-- Followers never see invites (only providers and operators make them).
CREATE POLICY api_invites_scope ON api_invites
    USING (api_tenant_visible(tenant_id) AND api_scope_follower() = '');

ALTER TABLE api_user_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_user_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY api_user_tokens_scope ON api_user_tokens
    USING (api_tenant_visible(tenant_id) AND api_follower_visible(user_id));

ALTER TABLE api_email_outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_email_outbox FORCE ROW LEVEL SECURITY;
CREATE POLICY api_email_outbox_scope ON api_email_outbox
    USING (api_tenant_visible(tenant_id) AND api_scope_follower() = '')
    WITH CHECK (api_tenant_visible(tenant_id));

ALTER TABLE api_totp ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_totp FORCE ROW LEVEL SECURITY;
CREATE POLICY api_totp_scope ON api_totp
    USING (api_tenant_visible(tenant_id) AND api_follower_visible(user_id));

ALTER TABLE api_recovery_codes ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_recovery_codes FORCE ROW LEVEL SECURITY;
CREATE POLICY api_recovery_codes_scope ON api_recovery_codes
    USING (api_tenant_visible(tenant_id) AND api_follower_visible(user_id));

ALTER TABLE api_totp_required_roles ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_totp_required_roles FORCE ROW LEVEL SECURITY;
CREATE POLICY api_totp_required_roles_scope ON api_totp_required_roles
    USING (api_scope_tenant() = '*');

GRANT SELECT, INSERT, UPDATE ON api_invites, api_user_tokens, api_email_outbox TO tradecopy_api;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON api_totp, api_recovery_codes, api_totp_required_roles TO tradecopy_api;
