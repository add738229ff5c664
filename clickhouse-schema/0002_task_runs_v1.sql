-- Task runs for the dashboard's charts (runs by status over time, durations,
-- attempts). Versioned and deleted like sessions_v1; read with FINAL.
CREATE TABLE IF NOT EXISTS task_runs_v1
(
    run_id          String,
    friendly_id     String,
    organization_id String,
    project_id      String,
    environment_id  String,
    session_id      Nullable(String),
    task_identifier LowCardinality(String),
    status          LowCardinality(String),
    attempt_number  UInt32,
    max_attempts    UInt32,
    superseded_by   Nullable(String),
    created_at      DateTime64(6, 'UTC'),
    updated_at      DateTime64(6, 'UTC'),
    started_at      Nullable(DateTime64(6, 'UTC')),
    completed_at    Nullable(DateTime64(6, 'UTC')),
    _version        UInt64,
    _is_deleted     UInt8 DEFAULT 0,
    INDEX idx_session session_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(_version, _is_deleted)
PARTITION BY toYYYYMM(created_at)
ORDER BY (organization_id, project_id, environment_id, created_at, run_id)
