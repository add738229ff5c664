-- ClickHouse backfills: one row per table copied, with its keyset cursor, so a
-- killed backfill resumes where it stopped. Each chunk is its own durable job;
-- the next chunk's job is written in the transaction that moves the cursor.
CREATE TABLE clickhouse_backfills (
    id                uuid PRIMARY KEY,
    target            text NOT NULL CHECK (target IN ('sessions', 'runs')),
    created_from      timestamptz,
    created_to        timestamptz,
    chunk_size        integer NOT NULL CHECK (chunk_size > 0),
    status            text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'completed', 'canceled')),
    cursor_created_at timestamptz,
    cursor_id         uuid,
    chunks_done       integer NOT NULL DEFAULT 0,
    rows_copied       bigint NOT NULL DEFAULT 0,
    -- Every change committed before this is in ClickHouse once the backfill
    -- completes (each chunk reads after it): the watermark a full backfill sets.
    started_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz
);

CREATE INDEX clickhouse_backfills_started_idx ON clickhouse_backfills (started_at DESC);

-- The backfill's keyset walks each table in (created_at, id) order across all
-- environments; without these every chunk would sort the whole table.
CREATE INDEX sessions_created_id_idx ON sessions (created_at, id);
CREATE INDEX task_runs_created_id_idx ON task_runs (created_at, id);

-- The list's read-your-writes overlay: sessions of an environment changed
-- since ClickHouse's watermark.
CREATE INDEX sessions_env_updated_idx ON sessions (runtime_environment_id, updated_at);
