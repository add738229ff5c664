-- A job's version: every retry (a reset back to pending) bumps it. A relayed
-- stamp is written only where the job is still at the version read before the
-- push, so a push of an earlier version (say, the lost-queue recovery's, which
-- a failed job dropped on delivery) can no longer mark a reset job as relayed
-- when nothing carries it.
ALTER TABLE jobs ADD COLUMN generation integer NOT NULL DEFAULT 0;

-- The apalis task of the job's last stamped push: the relay loop's sweep asks
-- Redis whether the queue still holds it, and pushes a pending job again when
-- it does not.
ALTER TABLE jobs ADD COLUMN task_id text;

-- An attempt whose process died never ends by itself; the next attempt of its
-- job closes it as `abandoned`.
ALTER TABLE job_attempts DROP CONSTRAINT job_attempts_status_check;
ALTER TABLE job_attempts ADD CONSTRAINT job_attempts_status_check
    CHECK (status IN ('running', 'succeeded', 'failed', 'abandoned'));
