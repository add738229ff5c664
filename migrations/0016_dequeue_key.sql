-- The key of the dequeue request that claimed a run (`requestId`, chosen by the
-- worker once per logical dequeue and sent on every retry of it). A dequeue
-- whose answer was lost (server killed or connection cut after the claim)
-- comes back with the same key and is answered with the runs it already
-- claimed instead of new ones, so those runs are not left to crash at their
-- heartbeat deadline. Every claim rewrites it (NULL without a key), so it
-- always names the current attempt's claim. See `runs::store::reclaim`.
ALTER TABLE task_runs ADD COLUMN dequeue_key text;

-- Only live claims are ever looked up by key, so the index holds only those.
CREATE INDEX task_runs_dequeue_key_idx ON task_runs (runtime_environment_id, dequeue_key)
    WHERE dequeue_key IS NOT NULL AND status = 'EXECUTING';
