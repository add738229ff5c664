-- Waitpoints: a run suspended until a record lands on a session channel.
CREATE TABLE waitpoints (
    id                         uuid PRIMARY KEY,
    friendly_id                text NOT NULL UNIQUE,
    runtime_environment_id     uuid NOT NULL,
    run_id                     uuid NOT NULL,
    session_id                 uuid NOT NULL,
    io                         text NOT NULL CHECK (io IN ('in', 'out')),
    status                     text NOT NULL DEFAULT 'WAITING' CHECK (status IN ('WAITING', 'COMPLETED', 'TIMED_OUT')),
    -- The waitpoint completes with the first record after this seq (-1: any record).
    after_seq                  bigint NOT NULL DEFAULT -1,
    idempotency_key            text,
    idempotency_key_expires_at timestamptz,
    tags                       text[] NOT NULL DEFAULT '{}',
    timeout_at                 timestamptz,
    output                     jsonb,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    completed_at               timestamptz
);

CREATE UNIQUE INDEX waitpoints_env_idempotency_key ON waitpoints (runtime_environment_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX waitpoints_waiting_timeout_idx ON waitpoints (timeout_at) WHERE status = 'WAITING';
CREATE INDEX waitpoints_waiting_session_idx ON waitpoints (session_id, io) WHERE status = 'WAITING';
CREATE INDEX waitpoints_run_idx ON waitpoints (run_id) WHERE status = 'WAITING';

-- When a session's channels were closed for writing (close, or expiry), so the
-- expiry sweep does it once.
ALTER TABLE sessions ADD COLUMN channels_closed_at timestamptz;
