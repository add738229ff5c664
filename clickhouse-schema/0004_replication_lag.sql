-- Replication lag over time, for the dashboard's overview chart: each flush
-- of a replication batch writes one sample (how old the batch's last commit
-- was when its rows went to ClickHouse). Postgres keeps only the newest lag
-- (replication_state); this keeps the history, bounded by the TTL.
CREATE TABLE IF NOT EXISTS replication_lag_v1
(
    slot       LowCardinality(String),
    sampled_at DateTime64(3, 'UTC'),
    lag_ms     UInt64,
    row_count  UInt32
)
ENGINE = MergeTree
ORDER BY (slot, sampled_at)
TTL toDateTime(sampled_at) + INTERVAL 30 DAY
