//! Runtime configuration: one struct, filled from flags or environment variables.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Postgres connection string.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres:postgres@127.0.0.1:5432/sessiond")]
    pub database_url: String,

    /// Optional Postgres schema to keep all tables in (tests use one per test).
    #[arg(long, env = "DATABASE_SCHEMA")]
    pub database_schema: Option<String>,

    /// Maximum connections in the Postgres pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 20)]
    pub database_max_connections: u32,

    /// How long a request waits for a pooled Postgres connection, in ms. While
    /// Postgres is down or restarting, requests answer 503 after this long.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT_MS", default_value_t = 10_000)]
    pub database_acquire_timeout_ms: u64,

    /// Redis connection string.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Address the HTTP server binds to.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:3030")]
    pub listen_addr: String,

    /// 64 hex characters. Seals environment secret keys at rest.
    #[arg(long, env = "SESSIOND_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,

    /// Largest request body accepted, in bytes; larger bodies get 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Clock leeway for JWT `exp`/`nbf`, in seconds (at most 60). A token
    /// minted on one process is judged by another's clock: 60 s lets every
    /// host be up to 30 s off true time (two such hosts differ by 60 s).
    #[arg(long, env = "JWT_LEEWAY_SECS", default_value_t = 60)]
    pub jwt_leeway_secs: u64,

    /// How long an authenticated environment is cached in-process, in milliseconds.
    /// Bounds how long a rotated key keeps working on a running server.
    #[arg(long, env = "AUTH_CACHE_TTL_MS", default_value_t = 5000)]
    pub auth_cache_ttl_ms: u64,

    /// Prefix of every Redis key this server writes (tests use one per test).
    #[arg(long, env = "REDIS_PREFIX", default_value = "sessiond")]
    pub redis_prefix: String,

    /// A run whose worker has not heartbeated for this long is CRASHED.
    #[arg(long, env = "RUN_HEARTBEAT_TIMEOUT_MS", default_value_t = 30_000)]
    pub run_heartbeat_timeout_ms: u64,

    /// First retry delay of a failed run attempt; doubles per attempt.
    #[arg(long, env = "RUN_RETRY_BASE_MS", default_value_t = 1_000)]
    pub run_retry_base_ms: u64,

    /// Longest retry delay of a failed run attempt.
    #[arg(long, env = "RUN_RETRY_MAX_MS", default_value_t = 60_000)]
    pub run_retry_max_ms: u64,

    /// First retry delay of a failed job attempt; grows exponentially with jitter.
    #[arg(long, env = "JOB_RETRY_BASE_MS", default_value_t = 500)]
    pub job_retry_base_ms: u64,

    /// Cron schedules file (defaults to the built-in copy of jobs/schedules.toml).
    #[arg(long, env = "JOB_SCHEDULES_FILE")]
    pub job_schedules_file: Option<String>,

    /// Public base URL of this server, used in URLs it hands out (defaults to
    /// http://<Host header>).
    #[arg(long, env = "PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Interval of SSE keep-alive comments, in milliseconds.
    #[arg(long, env = "SSE_KEEPALIVE_MS", default_value_t = 15_000)]
    pub sse_keepalive_ms: u64,

    /// How long a closed or expired session's channel data is kept, in seconds.
    #[arg(long, env = "CHANNEL_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub channel_retention_secs: u64,

    /// How long an append's X-Part-Id is remembered for dedupe, in seconds.
    #[arg(long, env = "APPEND_DEDUPE_WINDOW_SECS", default_value_t = 600)]
    pub append_dedupe_window_secs: u64,

    /// A request head must arrive within this many ms of the connection opening
    /// (or of the previous response, on a kept-alive connection).
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,

    /// A request body must arrive whole within this many ms of its head (408).
    #[arg(long, env = "BODY_READ_TIMEOUT_MS", default_value_t = 30_000)]
    pub body_read_timeout_ms: u64,

    /// A connection on which no byte moves for this many ms is closed (unless
    /// the server is still preparing its response). Must exceed SSE_KEEPALIVE_MS.
    #[arg(long, env = "IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,

    /// Most open client connections; beyond it the oldest connection outside a
    /// request is shed. Lowered to fit the file-descriptor limit.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,

    /// Most concurrent SSE subscriptions (and waitpoint long-polls) one public
    /// token holds on this process; 429 `too_many_streams` beyond it. A secret
    /// key is the environment's own credential: the environment cap bounds it.
    #[arg(long, env = "SSE_MAX_PER_TOKEN", default_value_t = 32)]
    pub sse_max_per_token: usize,

    /// Most concurrent SSE subscriptions to one session's channels on this
    /// process, whoever holds them; 429 `too_many_streams` beyond it.
    #[arg(long, env = "SSE_MAX_PER_SESSION", default_value_t = 64)]
    pub sse_max_per_session: usize,

    /// Most concurrent SSE subscriptions and waitpoint long-polls of one
    /// environment on this process; 429 `too_many_streams` beyond it.
    #[arg(long, env = "SSE_MAX_PER_ENVIRONMENT", default_value_t = 4096)]
    pub sse_max_per_environment: usize,

    /// Connections long-lived requests (SSE, waitpoint long-polls, the
    /// dashboard's live tail) may never take, kept for short requests and
    /// `/healthz`: long-lived requests get at most `MAX_CONNECTIONS` minus
    /// this (at most half of the cap is reserved).
    #[arg(long, env = "SSE_RESERVED_CONNECTIONS", default_value_t = 1024)]
    pub sse_reserved_connections: usize,

    /// Most bytes (record bodies plus their headers, as stored) one channel
    /// holds; an append past it answers 409 `channel_full`. 0: no bound.
    #[arg(long, env = "MAX_CHANNEL_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_channel_bytes: u64,

    /// Most WAITING waitpoints one run may have; creating another answers 409
    /// `too_many_waitpoints`.
    #[arg(long, env = "MAX_PENDING_WAITPOINTS_PER_RUN", default_value_t = 100)]
    pub max_pending_waitpoints_per_run: i64,

    /// Request-rate limits (see [`crate::limits`]): off, no route is limited.
    #[arg(long, env = "RATE_LIMITS_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub rate_limits_enabled: bool,

    /// Session creates one environment may make per second, across all
    /// processes; 429 `rate_limited` beyond it. 0: no limit.
    #[arg(long, env = "RATE_LIMIT_CREATE_PER_SEC", default_value_t = 1_000)]
    pub rate_limit_create_per_sec: u32,

    /// Channel appends one environment may make per second, across all processes.
    #[arg(long, env = "RATE_LIMIT_APPEND_PER_SEC", default_value_t = 20_000)]
    pub rate_limit_append_per_sec: u32,

    /// SSE connects (subscriptions opened) one environment may make per second.
    #[arg(long, env = "RATE_LIMIT_SUBSCRIBE_PER_SEC", default_value_t = 2_000)]
    pub rate_limit_subscribe_per_sec: u32,

    /// Session lists one environment may make per second.
    #[arg(long, env = "RATE_LIMIT_LIST_PER_SEC", default_value_t = 1_000)]
    pub rate_limit_list_per_sec: u32,

    /// Token mints (public tokens, channel write tokens) one environment may
    /// make per second.
    #[arg(long, env = "RATE_LIMIT_MINT_PER_SEC", default_value_t = 1_000)]
    pub rate_limit_mint_per_sec: u32,

    /// Requests of the limited classes together one public (browser) token may
    /// make per second, across all processes. 0: no limit.
    #[arg(long, env = "RATE_LIMIT_PUBLIC_TOKEN_PER_SEC", default_value_t = 500)]
    pub rate_limit_public_token_per_sec: u32,

    /// Test seam (`test-faults` builds only): the length of a rate-limit
    /// window, in ms (the limits above are per window). Tests lengthen it so
    /// that a slow machine spreading a burst over more than a second cannot
    /// let a second window's allowance in.
    #[cfg(feature = "test-faults")]
    #[arg(long, env = "RATE_LIMIT_WINDOW_MS", default_value_t = 1_000, hide = true)]
    pub rate_limit_window_ms: u32,

    /// How long connecting to Redis may take, in ms.
    #[arg(long, env = "REDIS_CONNECT_TIMEOUT_MS", default_value_t = 500)]
    pub redis_connect_timeout_ms: u64,

    /// How long one Redis command may take, in ms.
    #[arg(long, env = "REDIS_RESPONSE_TIMEOUT_MS", default_value_t = 500)]
    pub redis_response_timeout_ms: u64,

    /// Reconnect attempts to a lost Redis before a request gives up (503).
    #[arg(long, env = "REDIS_RECONNECT_RETRIES", default_value_t = 1)]
    pub redis_reconnect_retries: usize,

    /// A waiting dequeue re-checks the run queues this often even without a
    /// wake-up (a push announced while this server's listener was reconnecting), in ms.
    #[arg(long, env = "DEQUEUE_RECHECK_MS", default_value_t = 1_000)]
    pub dequeue_recheck_ms: u64,

    /// A waitpoint long-poll re-checks its waitpoint this often even without a
    /// record on its channel (timeouts, close, another server's drain), in ms.
    #[arg(long, env = "WAITPOINT_RECHECK_MS", default_value_t = 250)]
    pub waitpoint_recheck_ms: u64,

    /// A live channel feed re-reads Redis this often even without a gap, in
    /// case an announcement was lost together with its successors, in ms.
    #[arg(long, env = "FEED_SAFETY_POLL_MS", default_value_t = 1_000)]
    pub feed_safety_poll_ms: u64,

    /// Run the job workers, cron schedules and outbox relay in this process
    /// (`false` for a process that only serves the API). The wake-ups that
    /// requests wait on (channel feed, run queue) are followed either way.
    #[arg(long, env = "RUN_JOBS", default_value_t = true, action = clap::ArgAction::Set)]
    pub run_jobs: bool,

    /// After SIGTERM, how long the process has to drain (in-flight requests,
    /// job attempts, the replicator) before it exits, in ms.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,

    /// Keep ClickHouse current by logical replication from Postgres (needs
    /// `wal_level=logical`).
    /// `1`/`0`, `true`/`false`, `yes`/`no` or `on`/`off`.
    #[arg(long, env = "SESSION_REPLICATION_ENABLED", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub replication_enabled: bool,

    /// Mark the dashboard's cookies `Secure` (served over HTTPS only). Set it
    /// wherever the dashboard is reached over TLS; plain-HTTP development
    /// leaves it off.
    #[arg(long, env = "DASHBOARD_COOKIE_SECURE", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub dashboard_cookie_secure: bool,

    /// How long a dashboard sign-in lasts, in hours.
    #[arg(long, env = "DASHBOARD_SESSION_HOURS", default_value_t = 12)]
    pub dashboard_session_hours: i64,

    /// Name of this deployment's logical replication slot and publication
    /// (default: `sessiond`, or `sessiond_<DATABASE_SCHEMA>`).
    #[arg(long, env = "REPLICATION_SLOT")]
    pub replication_slot: Option<String>,

    /// A replication batch is flushed to ClickHouse at this many rows...
    #[arg(long, env = "REPLICATION_BATCH_ROWS", default_value_t = 100)]
    pub replication_batch_rows: usize,

    /// ...or this long after its first row, in ms.
    #[arg(long, env = "REPLICATION_BATCH_MS", default_value_t = 1_000)]
    pub replication_batch_ms: u64,

    /// How long the replication lease lasts without renewal, in ms. The holder
    /// renews it every third of this and stops consuming once two thirds have
    /// passed without a renewal, before anyone else may take it.
    #[arg(long, env = "REPLICATION_LEASE_MS", default_value_t = 30_000)]
    pub replication_lease_ms: u64,

    /// ClickHouse HTTP endpoint the session list and analytics read (the dev
    /// server from scripts/clickhouse.sh, or a real ClickHouse).
    #[arg(long, env = "CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    pub clickhouse_url: String,

    /// ClickHouse database holding sessiond's tables (tests use one per test).
    #[arg(long, env = "CLICKHOUSE_DATABASE", default_value = "sessiond")]
    pub clickhouse_database: String,

    #[arg(long, env = "CLICKHOUSE_USER")]
    pub clickhouse_user: Option<String>,

    #[arg(long, env = "CLICKHOUSE_PASSWORD", hide_env_values = true)]
    pub clickhouse_password: Option<String>,

    /// `none` (the dev server speaks uncompressed HTTP only) or `lz4` (a real
    /// ClickHouse; less traffic for big reads and backfills).
    #[arg(long, env = "CLICKHOUSE_COMPRESSION", default_value = "none", value_parser = parse_compression)]
    pub clickhouse_compression: ClickHouseCompression,

    /// How long one ClickHouse request may take before the list answers from
    /// Postgres instead, in ms.
    #[arg(long, env = "CLICKHOUSE_TIMEOUT_MS", default_value_t = 2_000)]
    pub clickhouse_timeout_ms: u64,

    /// After a failed ClickHouse request, the list answers from Postgres without
    /// trying ClickHouse for this long, in ms (so an outage costs no latency).
    #[arg(long, env = "CLICKHOUSE_RETRY_AFTER_MS", default_value_t = 5_000)]
    pub clickhouse_retry_after_ms: u64,

    /// Apply the ClickHouse schema when `serve` starts (retried in the
    /// background while ClickHouse is down).
    #[arg(long, env = "CLICKHOUSE_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub clickhouse_migrate_on_start: bool,

    /// The list overlays Postgres rows changed up to this long before
    /// ClickHouse's watermark, covering transactions that stamped `updated_at`
    /// before the watermark but committed after it, in ms. sessiond's own
    /// transactions on `sessions` last milliseconds; the overlay grows with
    /// this times the write rate (2 s at 500 creates/s: about 1,000 rows).
    #[arg(long, env = "LIST_OVERLAY_MARGIN_MS", default_value_t = 2_000)]
    pub list_overlay_margin_ms: u64,

    /// Most changed rows the list overlays onto a ClickHouse page; beyond it
    /// ClickHouse lags too far and the list answers from Postgres.
    #[arg(long, env = "LIST_OVERLAY_MAX_ROWS", default_value_t = 2_000)]
    pub list_overlay_max_rows: usize,

    /// Addresses (or CIDR ranges, comma-separated) of reverse proxies whose
    /// `X-Forwarded-For` is believed. A request from anywhere else is judged
    /// by its peer address alone, so a client cannot pick the address it is
    /// throttled under. Behind a proxy that is not listed, every client
    /// shares the proxy's address (and its failure budget).
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Failed sign-ins (dashboard) or failed bearer tokens (API) one client
    /// address may have in a minute; the next attempt waits, 429 with
    /// `Retry-After`: 1 min, doubling per repeat up to 15 min.
    #[arg(long, env = "AUTH_FAILURES_PER_MINUTE", default_value_t = 10)]
    pub auth_failures_per_minute: u32,

    /// Test seam: `1` allows the test-only settings below. Two settings, both
    /// named as tests', so a production environment cannot shift its clock by
    /// one stray variable.
    #[cfg(feature = "test-faults")]
    #[arg(long, env = "SESSIOND_TEST_MODE", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), hide = true)]
    pub test_mode: bool,

    /// Test seam (with `SESSIOND_TEST_MODE=1` only): shifts this process's
    /// clock (see `clock`) by this many ms, to play a host whose clock is off.
    #[cfg(feature = "test-faults")]
    #[arg(long, env = "SESSIOND_TEST_CLOCK_OFFSET_MS", default_value_t = 0, allow_hyphen_values = true, hide = true)]
    pub test_clock_offset_ms: i64,
}

impl Config {
    /// The replication slot's (and publication's) name.
    pub fn replication_slot_name(&self) -> String {
        match (&self.replication_slot, &self.database_schema) {
            (Some(name), _) => name.clone(),
            (None, Some(schema)) => format!("sessiond_{schema}"),
            (None, None) => "sessiond".into(),
        }
    }

    /// The clock shift `serve` applies: the setting, honoured in test mode
    /// only, and only in a `test-faults` build.
    #[cfg(feature = "test-faults")]
    pub fn test_clock_offset(&self) -> Option<i64> {
        (self.test_mode && self.test_clock_offset_ms != 0).then_some(self.test_clock_offset_ms)
    }

    /// The length of a rate-limit window, in ms: a second, unless a
    /// `test-faults` build's test set it.
    pub fn rate_limit_window_ms(&self) -> u32 {
        #[cfg(feature = "test-faults")]
        return self.rate_limit_window_ms;
        #[cfg(not(feature = "test-faults"))]
        1_000
    }

    /// Defaults for tests and tools: every field at its default value.
    pub fn for_database(database_url: &str, schema: Option<String>) -> Self {
        Config {
            database_url: database_url.to_string(),
            database_schema: schema,
            database_max_connections: 10,
            database_acquire_timeout_ms: 10_000,
            redis_url: "redis://127.0.0.1:6379".into(),
            listen_addr: "127.0.0.1:0".into(),
            master_key: None,
            max_body_bytes: 1024 * 1024,
            jwt_leeway_secs: 60,
            auth_cache_ttl_ms: 5000,
            redis_prefix: "sessiond".into(),
            run_heartbeat_timeout_ms: 30_000,
            run_retry_base_ms: 1_000,
            run_retry_max_ms: 60_000,
            job_retry_base_ms: 500,
            job_schedules_file: None,
            public_url: None,
            sse_keepalive_ms: 15_000,
            channel_retention_secs: 7 * 24 * 3600,
            append_dedupe_window_secs: 600,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_connections: 16_384,
            sse_max_per_token: 32,
            sse_max_per_session: 64,
            sse_max_per_environment: 4096,
            sse_reserved_connections: 1024,
            max_channel_bytes: 32 * 1024 * 1024,
            max_pending_waitpoints_per_run: 100,
            rate_limits_enabled: true,
            rate_limit_create_per_sec: 1_000,
            rate_limit_append_per_sec: 20_000,
            rate_limit_subscribe_per_sec: 2_000,
            rate_limit_list_per_sec: 1_000,
            rate_limit_mint_per_sec: 1_000,
            rate_limit_public_token_per_sec: 500,
            #[cfg(feature = "test-faults")]
            rate_limit_window_ms: 1_000,
            redis_connect_timeout_ms: 500,
            redis_response_timeout_ms: 500,
            redis_reconnect_retries: 1,
            dequeue_recheck_ms: 1_000,
            waitpoint_recheck_ms: 250,
            feed_safety_poll_ms: 1_000,
            run_jobs: true,
            shutdown_grace_ms: 10_000,
            replication_enabled: false,
            dashboard_cookie_secure: false,
            dashboard_session_hours: 12,
            replication_slot: None,
            replication_batch_rows: 100,
            replication_batch_ms: 1_000,
            replication_lease_ms: 30_000,
            clickhouse_url: "http://127.0.0.1:8123".into(),
            clickhouse_database: "sessiond".into(),
            clickhouse_user: None,
            clickhouse_password: None,
            clickhouse_compression: ClickHouseCompression::None,
            clickhouse_timeout_ms: 2_000,
            clickhouse_retry_after_ms: 5_000,
            clickhouse_migrate_on_start: true,
            list_overlay_margin_ms: 2_000,
            list_overlay_max_rows: 2_000,
            trusted_proxies: Vec::new(),
            auth_failures_per_minute: 10,
            #[cfg(feature = "test-faults")]
            test_mode: false,
            #[cfg(feature = "test-faults")]
            test_clock_offset_ms: 0,
        }
    }
}

/// An address (a single host) or a CIDR range.
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{s}` is neither an IP address nor a CIDR range"))
}

/// How requests to ClickHouse are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClickHouseCompression {
    None,
    Lz4,
}

fn parse_compression(s: &str) -> Result<ClickHouseCompression, String> {
    match s {
        "none" => Ok(ClickHouseCompression::None),
        "lz4" => Ok(ClickHouseCompression::Lz4),
        _ => Err("expected none or lz4".into()),
    }
}
