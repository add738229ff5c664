-- The replication lease's fencing token, kept where the writes it guards are:
-- every acquisition of a slot's lease increments `fence`, and recording a
-- batch, pruning flushed batches and confirming the slot are refused to a
-- holder whose token is lower (`replication::lease`). In Postgres, not Redis,
-- so it never goes backwards when Redis loses its data.
ALTER TABLE replication_state
    ADD COLUMN fence bigint NOT NULL DEFAULT 0,
    -- The newest position a holder confirmed to the slot, and its token.
    ADD COLUMN confirmed_lsn pg_lsn,
    ADD COLUMN confirmed_fence bigint;

-- The token of the holder that recorded the batch: replay across a takeover
-- shows as a batch with a higher token, never a lower one after a higher.
ALTER TABLE replication_flushes ADD COLUMN fence bigint NOT NULL DEFAULT 0;
