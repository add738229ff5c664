-- Tenancy: organization -> project -> environment. Every domain row carries the
-- environment id (and its organization/project) as plain scalar columns so that
-- queries are always scoped without joins.
CREATE TABLE organizations (
    id          uuid PRIMARY KEY,
    slug        text NOT NULL UNIQUE,
    title       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
    id              uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    slug            text NOT NULL,
    name            text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organization_id, slug)
);

CREATE TABLE runtime_environments (
    id              uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    project_id      uuid NOT NULL REFERENCES projects (id),
    env_type        text NOT NULL CHECK (env_type IN ('dev', 'staging', 'prod')),
    -- sha256 of the secret key: what authentication looks up.
    api_key_hash    bytea NOT NULL UNIQUE,
    -- The key sealed with the server master key (AEAD). HS256 tokens minted by
    -- the official SDK are signed with the raw key, so it must be recoverable;
    -- it is never stored in clear.
    api_key_sealed  bytea NOT NULL,
    -- First characters of the key, for operators to tell keys apart.
    api_key_hint    text NOT NULL,
    key_rotated_at  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, env_type)
);

-- Sessions: durable, task-bound rows that outlive any single run.
CREATE TABLE sessions (
    id                     uuid PRIMARY KEY,
    friendly_id            text NOT NULL UNIQUE,
    external_id            text,
    type                   text NOT NULL,
    task_identifier        text NOT NULL,
    trigger_config         jsonb NOT NULL,
    tags                   text[] NOT NULL DEFAULT '{}',
    metadata               jsonb,
    organization_id        uuid NOT NULL,
    project_id             uuid NOT NULL,
    runtime_environment_id uuid NOT NULL,
    environment_type       text NOT NULL,
    -- Run manager: the live run and a version bumped on every claim, so a
    -- claim is an optimistic compare-and-set rather than a held lock.
    current_run_id         uuid,
    current_run_version    integer NOT NULL DEFAULT 0,
    closed_at              timestamptz,
    closed_reason          text,
    expires_at             timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

-- NULL external ids never collide, so sessions without one are unconstrained.
CREATE UNIQUE INDEX sessions_env_external_id_key ON sessions (runtime_environment_id, external_id);
CREATE INDEX sessions_env_created_idx ON sessions (runtime_environment_id, created_at DESC, id DESC);
CREATE INDEX sessions_expires_at_idx ON sessions (expires_at) WHERE expires_at IS NOT NULL AND closed_at IS NULL;

-- Terminal markers are write-once: once set, closed_at / closed_reason /
-- expires_at never change, whatever code path issues the UPDATE.
CREATE FUNCTION sessions_write_once() RETURNS trigger AS $$
BEGIN
    IF OLD.closed_at IS NOT NULL AND (NEW.closed_at IS DISTINCT FROM OLD.closed_at
        OR NEW.closed_reason IS DISTINCT FROM OLD.closed_reason) THEN
        RAISE EXCEPTION 'sessions.closed_at/closed_reason are write-once' USING ERRCODE = 'check_violation';
    END IF;
    IF OLD.expires_at IS NOT NULL AND NEW.expires_at IS DISTINCT FROM OLD.expires_at THEN
        RAISE EXCEPTION 'sessions.expires_at is write-once' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER sessions_write_once BEFORE UPDATE ON sessions
    FOR EACH ROW EXECUTE FUNCTION sessions_write_once();

-- Runs: one execution of a task. Sessions trigger them; the engine (workers,
-- liveness, retries) builds on this table.
CREATE TABLE task_runs (
    id                     uuid PRIMARY KEY,
    friendly_id            text NOT NULL UNIQUE,
    organization_id        uuid NOT NULL,
    project_id             uuid NOT NULL,
    runtime_environment_id uuid NOT NULL,
    task_identifier        text NOT NULL,
    session_id             uuid,
    payload                jsonb NOT NULL,
    status                 text NOT NULL DEFAULT 'QUEUED' CHECK (status IN
        ('QUEUED', 'EXECUTING', 'WAITING', 'COMPLETED', 'FAILED', 'CANCELED', 'CRASHED', 'EXPIRED', 'TIMED_OUT')),
    queue                  text,
    machine                text,
    tags                   text[] NOT NULL DEFAULT '{}',
    max_attempts           integer NOT NULL DEFAULT 1,
    attempt_number         integer NOT NULL DEFAULT 0,
    max_duration_secs      integer,
    ttl_secs               integer,
    lock_to_version        text,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    started_at             timestamptz,
    completed_at           timestamptz
);

CREATE INDEX task_runs_session_idx ON task_runs (session_id, created_at DESC) WHERE session_id IS NOT NULL;
CREATE INDEX task_runs_env_task_status_idx ON task_runs (runtime_environment_id, task_identifier, status);

-- Audit: one row per run a session triggers, and why.
CREATE TABLE session_runs (
    id         uuid PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    run_id     uuid NOT NULL,
    reason     text NOT NULL CHECK (reason IN ('initial', 'continuation', 'upgrade', 'manual')),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX session_runs_session_idx ON session_runs (session_id, created_at);
