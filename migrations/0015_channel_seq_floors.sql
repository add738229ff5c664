-- Per-channel sequence floor: Redis hands out a channel's sequence numbers only
-- below `reserved_upto`, which is raised here a block at a time before Redis
-- may pass it. So `reserved_upto` is above every number ever acknowledged, and
-- when Redis loses a channel (restarted empty) its counter restarts from here
-- instead of from 0. See `src/streams/floor.rs`.
CREATE TABLE channel_seq_floors (
    session_id    uuid NOT NULL,
    io            text NOT NULL CHECK (io IN ('in', 'out')),
    reserved_upto bigint NOT NULL CHECK (reserved_upto >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, io)
);
