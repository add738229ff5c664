-- Data kept as sent: a waitpoint's output (the channel record that completed it)
-- and a run's output and error. Any byte sequence a writer appends must flow
-- through, and `jsonb` refuses "\u0000" where `json` keeps the text as given.
ALTER TABLE waitpoints ALTER COLUMN output TYPE json USING output::json;
ALTER TABLE task_runs
    ALTER COLUMN output TYPE json USING output::json,
    ALTER COLUMN error TYPE json USING error::json;
