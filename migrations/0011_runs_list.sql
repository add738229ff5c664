-- The dashboard's runs list: one environment's runs newest first, keyset on
-- (created_at, id) (`runs::store::page`).
CREATE INDEX task_runs_env_created_idx ON task_runs (runtime_environment_id, created_at DESC, id DESC);

-- The failed-handoffs page walks open sessions newest first
-- (`sessions::store::open_page`); closed ones, most of the table, stay out.
CREATE INDEX sessions_open_created_idx ON sessions (created_at DESC, id DESC) WHERE closed_at IS NULL;

-- The trigger-run jobs that failed for good, by the run they were to queue
-- (`jobs::store::failed_triggers`): few rows, and untouched by the hot path.
CREATE INDEX jobs_failed_trigger_run_idx ON jobs ((payload->>'run_id'))
    WHERE kind = 'trigger-run' AND status = 'failed';

-- A run's page lists its waitpoints of every status (`waitpoints::store::for_run`).
CREATE INDEX waitpoints_run_created_idx ON waitpoints (run_id, created_at);
