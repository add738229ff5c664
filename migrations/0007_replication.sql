-- Logical replication into ClickHouse: deletes must carry the whole old row
-- (ClickHouse needs its sort key to hide it), and updates the old row too, for
-- the TOASTed values an update does not resend.
ALTER TABLE sessions REPLICA IDENTITY FULL;
ALTER TABLE task_runs REPLICA IDENTITY FULL;

-- Replication batches on their way to ClickHouse. The consumer writes a batch
-- here with its `replication-flush` job in one transaction; the job writes the
-- rows to ClickHouse and marks the batch flushed. The slot's confirmed position
-- only moves past a batch once it and every batch before it are flushed.
CREATE TABLE replication_flushes (
    id          uuid PRIMARY KEY,
    slot        text NOT NULL,
    -- Commit LSN of the batch's first transaction and end LSN of its last.
    start_lsn   pg_lsn NOT NULL,
    end_lsn     pg_lsn NOT NULL,
    -- Commit time of the batch's last transaction: the watermark it earns.
    commit_time timestamptz NOT NULL,
    row_count   integer NOT NULL,
    rows        jsonb NOT NULL,
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'flushed')),
    -- The batch's replication-flush job (retried by the consumer whenever it
    -- has failed: a flush never gives up).
    job_id      uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    flushed_at  timestamptz
);

CREATE INDEX replication_flushes_slot_lsn_idx ON replication_flushes (slot, end_lsn);
