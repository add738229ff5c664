-- What replication last did, per slot, beside what Postgres reports of the
-- slot itself: the health that operators, the dashboard and metrics read.
CREATE TABLE replication_state (
    slot              text PRIMARY KEY,
    -- The newest flushed batch: when its rows reached ClickHouse, and how long
    -- after the commit of its newest transaction.
    last_flush_at     timestamptz,
    last_flush_lag_ms bigint,
    -- The consumer's newest failure (connecting, streaming, recording a batch).
    last_error        text,
    last_error_at     timestamptz,
    -- The newest reconciliation of ClickHouse against Postgres, and what it found.
    reconciled_at     timestamptz,
    last_reconcile    text
);
