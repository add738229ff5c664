-- A slot streams only what commits after its creation, so a new slot (a first
-- start, or one dropped or invalidated for lost WAL and recreated) leaves the
-- ClickHouse copy without whatever the old slot had not flushed until a full
-- backfill started after the new slot has completed. Meanwhile the new slot's
-- flushes still move the watermark, which would vouch for that gap: so the
-- session list reads this row and answers from Postgres until the copy of the
-- current generation is complete (`replication::slot::copy_incomplete`).
ALTER TABLE replication_state
    -- How many slots this deployment has created under this name.
    ADD COLUMN slot_generation       bigint NOT NULL DEFAULT 0,
    -- Set (and slot_created_at cleared) just before a slot is created: from
    -- then on the copy counts as incomplete. Null on rows of slots created
    -- before this column existed, whose copy was vouched for by then.
    ADD COLUMN generation_started_at timestamptz,
    -- Stamped once the slot exists: a full backfill of a table that started at
    -- or after it completes that table's copy.
    ADD COLUMN slot_created_at       timestamptz;
