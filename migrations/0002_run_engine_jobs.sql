-- Run engine: liveness, cancellation, results.
ALTER TABLE task_runs
    ADD COLUMN heartbeat_deadline  timestamptz,
    ADD COLUMN cancel_requested_at timestamptz,
    ADD COLUMN available_at        timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN enqueued_at         timestamptz,
    ADD COLUMN output              jsonb,
    ADD COLUMN error               jsonb,
    ADD COLUMN worker_id           text;

-- Sweeps scan only live runs.
CREATE INDEX task_runs_executing_deadline_idx ON task_runs (heartbeat_deadline) WHERE status IN ('EXECUTING', 'WAITING');
CREATE INDEX task_runs_queued_idx ON task_runs (available_at) WHERE status = 'QUEUED';

-- Durable jobs. A row is written in the same transaction as the state change
-- that causes it (the outbox), then relayed to the Redis queue. `relayed_at`
-- NULL means "not yet on the queue": the relay retries those.
CREATE TABLE jobs (
    id            uuid PRIMARY KEY,
    kind          text NOT NULL,
    payload       jsonb NOT NULL,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'running', 'succeeded', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    max_attempts  integer NOT NULL DEFAULT 5,
    last_error    text,
    run_at        timestamptz NOT NULL DEFAULT now(),
    relayed_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);

CREATE INDEX jobs_unrelayed_idx ON jobs (created_at) WHERE relayed_at IS NULL;
CREATE INDEX jobs_status_idx ON jobs (status, updated_at DESC);
CREATE INDEX jobs_kind_idx ON jobs (kind, created_at DESC);

-- Every attempt of every job, with its error: what operators search.
CREATE TABLE job_attempts (
    id          bigserial PRIMARY KEY,
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    status      text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    error       text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

CREATE INDEX job_attempts_job_idx ON job_attempts (job_id, attempt);
