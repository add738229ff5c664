-- Per-environment rate-limit overrides: one row per (environment, route
-- class) whose limit differs from the server's default (`RATE_LIMIT_*_PER_SEC`).
-- No row means the default, so a default changed in the configuration still
-- reaches every environment that was never overridden. Written by an
-- operator on the dashboard's environments page (audited); read by every
-- server process into memory (see `limits::overrides`).
CREATE TABLE environment_rate_limits (
    environment_id uuid NOT NULL REFERENCES runtime_environments (id) ON DELETE CASCADE,
    route_class text NOT NULL CHECK (route_class IN ('create', 'append', 'subscribe', 'list', 'mint')),
    -- Requests per second across all processes; the cap matches the form's.
    per_second integer NOT NULL CHECK (per_second BETWEEN 1 AND 1000000),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (environment_id, route_class)
);
