-- Sessions as the list and the dashboard read them. One row per change of a
-- session; ReplacingMergeTree keeps the highest _version (the change's commit
-- LSN, or the LSN a backfill read before its chunk), and _is_deleted = 1 hides
-- a deleted session. Readers use FINAL so a replaced or deleted row never shows.
--
-- Ids are the Postgres uuids as lowercase hyphenated text, which sorts like the
-- uuids do in Postgres, so (created_at, session_id) cursors mean the same in
-- both stores. Times keep microseconds, as timestamptz does.
CREATE TABLE IF NOT EXISTS sessions_v1
(
    session_id       String,
    friendly_id      String,
    organization_id  String,
    project_id       String,
    environment_id   String,
    environment_type LowCardinality(String),
    type             LowCardinality(String),
    task_identifier  LowCardinality(String),
    external_id      Nullable(String),
    tags             Array(String),
    -- JSON text as the API received it; nothing filters on it.
    metadata         String,
    current_run_id   Nullable(String),
    closed_at        Nullable(DateTime64(6, 'UTC')),
    closed_reason    Nullable(String),
    expires_at       Nullable(DateTime64(6, 'UTC')),
    created_at       DateTime64(6, 'UTC'),
    updated_at       DateTime64(6, 'UTC'),
    _version         UInt64,
    _is_deleted      UInt8 DEFAULT 0,
    -- filter[tags] is "has any of": a bloom filter on the array's elements
    -- lets granules without any of the tags be skipped.
    INDEX idx_tags tags TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_external_id external_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(_version, _is_deleted)
PARTITION BY toYYYYMM(created_at)
ORDER BY (organization_id, project_id, environment_id, created_at, session_id)
