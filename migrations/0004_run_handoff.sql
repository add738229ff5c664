-- Hand-off fencing: a run replaced by another (end-and-continue, a manual
-- trigger, a continuation) is canceled and remembers which run took over, so
-- its late calls are answered "superseded" rather than a bare "canceled".
ALTER TABLE task_runs ADD COLUMN superseded_by text;

-- Waits a superseded run left pending end CANCELED rather than dangling.
ALTER TABLE waitpoints DROP CONSTRAINT waitpoints_status_check;
ALTER TABLE waitpoints ADD CONSTRAINT waitpoints_status_check
    CHECK (status IN ('WAITING', 'COMPLETED', 'TIMED_OUT', 'CANCELED'));
