-- Dashboard operators, their signed-in sessions, and the audit log of what
-- they did. Operators are not tenants: they see every environment.
CREATE TABLE operators (
    id            uuid PRIMARY KEY,
    email         text NOT NULL UNIQUE,
    -- argon2id, PHC string format (algorithm, parameters and salt included).
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'viewer')),
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- A signed-in browser. The cookie carries the id (signed); the row is what
-- logout revokes, and it holds the session's CSRF token.
CREATE TABLE operator_sessions (
    id          uuid PRIMARY KEY,
    operator_id uuid NOT NULL REFERENCES operators (id) ON DELETE CASCADE,
    csrf_token  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX operator_sessions_expires_idx ON operator_sessions (expires_at);

-- Every operator action, written in the action's own transaction.
CREATE TABLE audit_log (
    id          uuid PRIMARY KEY,
    operator_id uuid NOT NULL REFERENCES operators (id),
    action      text NOT NULL,
    -- What the action was on: 'session:<friendly id>', 'job:<uuid>', ...
    target      text NOT NULL,
    detail      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- The audit page, newest first, keyset on (created_at, id).
CREATE INDEX audit_log_created_idx ON audit_log (created_at DESC, id DESC);
