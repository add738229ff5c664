-- An operator can cancel a pending job (dashboard): it never starts, and no
-- relay or lost-queue recovery pushes it again. Like a failed job, it can be
-- retried, which puts it back in line with a fresh attempt budget.
ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'canceled'));

-- The dashboard lists jobs newest first by id (uuid v7: creation order), in
-- keyset pages. Unfiltered, the primary key serves that order; by kind, this
-- index does, and replaces the (kind, created_at) one, which nothing reads, so
-- a job insert maintains no more indexes than before.
DROP INDEX jobs_kind_idx;
CREATE INDEX jobs_kind_id_idx ON jobs (kind, id DESC);

-- Failed and canceled jobs, newest first: the list operators open most (what
-- needs a retry), its retry-all preview and the retry itself. Partial, so it
-- stays as small as the set of jobs that need a person, and costs the hot
-- path (pending -> running -> succeeded) nothing.
CREATE INDEX jobs_needs_retry_idx ON jobs (id DESC) WHERE status IN ('failed', 'canceled');
