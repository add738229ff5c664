-- How far each table is known to be complete: every change committed before
-- `watermark` is in ClickHouse. Written by a finished full backfill (its start
-- time) and, later, by replication flushes. ReplacingMergeTree(watermark) keeps
-- the highest per table, and readers take max() anyway, so it only moves
-- forward. It lives beside the data it describes: if the data is lost, so is
-- the claim.
CREATE TABLE IF NOT EXISTS sessiond_watermarks
(
    table_name  LowCardinality(String),
    watermark   DateTime64(6, 'UTC'),
    lsn         UInt64,
    source      LowCardinality(String),
    recorded_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree(watermark)
ORDER BY table_name
