-- Every audited action records who took it: an operator (as before), an API
-- caller (a secret key or a public token of an environment), a run, or the
-- command line. One service per action writes the row whoever acts, so the
-- API's close is audited like the dashboard's.
ALTER TABLE audit_log ALTER COLUMN operator_id DROP NOT NULL;
ALTER TABLE audit_log ADD COLUMN actor_kind text NOT NULL DEFAULT 'operator'
    CHECK (actor_kind IN ('operator', 'secret-key', 'public-token', 'run', 'cli'));
-- For an API caller the environment's id, for a run its friendly id; null for
-- an operator (operator_id says who) and the command line.
ALTER TABLE audit_log ADD COLUMN actor text;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_operator_actor
    CHECK ((actor_kind = 'operator') = (operator_id IS NOT NULL));
