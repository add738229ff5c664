//! Application state and start-up: what a server process holds, and the entry
//! point the binary and the tests share.
//!
//! `AppState` is the composition root: it connects to Postgres and Redis once
//! and builds the domain services on those connections (a run manager, the
//! waitpoints, the appender, the dispatcher, ...). Each service holds only what
//! it uses; handlers take the services they need (`State<RunManager>`, through
//! `FromRef`), and jobs receive theirs as job data, through the dispatch
//! table in [`job_dispatch`].

pub mod job_dispatch;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::watch;

use axum::extract::FromRef;

use crate::analytics::session_list::ClickHouseSessionList;
use crate::analytics::ClickHouse;
use crate::auth::cache::EnvCache;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::jobs::queue::JobQueue;
use crate::jobs::schedule::Schedule;
use crate::jobs::{self, Jobs};
use crate::runs::dispatch::Dispatcher;
use crate::runs::queue::RunQueue;
use crate::runs::RunTimings;
use crate::sessions::access::ChannelAccess;
use crate::sessions::list::{PgSessionList, SessionListRepository};
use crate::sessions::lookup::SessionLookup;
use crate::sessions::run_manager::RunManager;
use crate::shutdown::Drain;
use crate::streams::effects::Appender;
use crate::streams::hub::Hub;
use crate::streams::permits::{StreamCaps, StreamPermits};
use crate::streams::store::ChannelStore;
use crate::streams::RealtimeSettings;
use crate::tenancy::keys::MasterKey;
use crate::waitpoints::Waitpoints;

pub struct Inner {
    pub config: Config,
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub redis_client: redis::Client,
    pub auth: Authenticator,
    pub session_list: Arc<dyn SessionListRepository>,
    pub sessions: Arc<SessionLookup>,
    pub run_queue: RunQueue,
    pub jobs: Jobs,
    pub channels: ChannelStore,
    pub hub: Hub,
    pub runs: RunManager,
    pub waitpoints: Waitpoints,
    pub appender: Appender,
    /// Places of the long-lived requests (SSE, long-polls, the live tail).
    pub stream_permits: StreamPermits,
    /// Request-rate limits (see [`crate::limits`]).
    pub rate_limits: crate::limits::RateLimits,
    pub dispatcher: Dispatcher,
    pub analytics: ClickHouse,
    pub dashboard: crate::dashboard::auth::DashboardAuth,
    /// The cron schedules, read once here: the runtime ticks these and the
    /// dashboard shows these, even if the file changes while the server runs.
    pub schedules: Arc<[Schedule]>,
    /// Begun on SIGTERM (see [`crate::shutdown`]).
    pub drain: Drain,
}

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// Connects to Redis and assembles the state around an open Postgres pool.
    pub async fn connect(config: Config, db: PgPool, master_key: MasterKey) -> anyhow::Result<Self> {
        let schedules = jobs::schedule::load(config.job_schedules_file.as_deref())?.into();
        let (redis_client, redis) = connect_redis(&config).await?;
        let envs = EnvCache::new(Duration::from_millis(config.auth_cache_ttl_ms));
        let failed_tokens = crate::auth::AddressThrottle {
            throttle: crate::auth::throttle::Throttle::new(
                redis.clone(),
                &config.redis_prefix,
                "bearer-addr",
                crate::auth::throttle::Policy::per_address(config.auth_failures_per_minute),
            ),
            trusted_proxies: config.trusted_proxies.clone().into(),
        };
        let auth =
            Authenticator::new(db.clone(), master_key, envs, config.jwt_leeway_secs).with_throttle(failed_tokens);
        let analytics = ClickHouse::new(&config);
        let dashboard = crate::dashboard::auth::DashboardAuth::new(&config, db.clone(), redis.clone());
        let session_list = Arc::new(ClickHouseSessionList::new(
            PgSessionList { pool: db.clone() },
            analytics.clone(),
            Duration::from_millis(config.list_overlay_margin_ms),
            config.list_overlay_max_rows,
        ));
        let run_queue = RunQueue::new(redis.clone(), &config.redis_prefix);
        let jobs = jobs(&config, db.clone(), redis.clone());
        let channels =
            ChannelStore::new(redis.clone(), db.clone(), &config.redis_prefix, config.append_dedupe_window_secs * 1000);
        channels.set_max_channel_bytes(config.max_channel_bytes);
        let drain = Drain::default();
        let hub = Hub::with_drain(channels.clone(), Duration::from_millis(config.feed_safety_poll_ms), drain.clone());
        let runs = RunManager::new(db.clone(), jobs.clone(), channels.clone());
        let waitpoints = Waitpoints::new(
            db.clone(),
            channels.clone(),
            hub.clone(),
            config.channel_retention_secs * 1000,
            Duration::from_millis(config.waitpoint_recheck_ms),
        )
        .with_max_pending_per_run(config.max_pending_waitpoints_per_run);
        // The server's share is set again by `serve` once the connection cap
        // has been fitted to the fd limit.
        let stream_permits = StreamPermits::new(
            StreamCaps::from_config(&config),
            crate::http::conn::long_lived_cap(config.max_connections, config.sse_reserved_connections),
        );
        let rate_limits = crate::limits::RateLimits::from_config(&config, redis.clone());
        // Environments' overrides before the first request; a failure leaves
        // the defaults until the background refresh succeeds.
        if let Err(err) = rate_limits.reload_overrides(&db).await {
            tracing::warn!(%err, "rate-limit overrides not loaded at start; defaults until the next refresh");
        }
        rate_limits.spawn_override_refresh(db.clone());
        let appender = Appender::new(channels.clone(), jobs.clone(), runs.clone());
        let dispatcher = Dispatcher::new(
            db.clone(),
            run_queue.clone(),
            config.run_heartbeat_timeout_ms,
            Duration::from_millis(config.dequeue_recheck_ms),
        )
        .with_drain(drain.clone());
        Ok(AppState(Arc::new(Inner {
            config,
            db,
            redis,
            redis_client,
            auth,
            session_list,
            sessions: Arc::new(SessionLookup::new(Duration::from_millis(1_000))),
            run_queue,
            jobs,
            channels,
            hub,
            runs,
            waitpoints,
            appender,
            stream_permits,
            rate_limits,
            dispatcher,
            analytics,
            dashboard,
            schedules,
            drain,
        })))
    }
}

/// Connects to Redis as a server does (see [`redis_config`]).
pub async fn connect_redis(config: &Config) -> anyhow::Result<(redis::Client, ConnectionManager)> {
    let client = redis::Client::open(config.redis_url.as_str())?;
    let manager = ConnectionManager::new_with_config(client.clone(), redis_config(config)).await?;
    Ok((client, manager))
}

/// The job outbox alone, for commands that only queue jobs.
pub fn jobs(config: &Config, db: PgPool, redis: ConnectionManager) -> Jobs {
    let engine = JobQueue::new(redis.clone(), &config.redis_prefix, crate::jobs::Lane::Engine);
    let analytics = JobQueue::new(redis, &config.redis_prefix, crate::jobs::Lane::Analytics);
    Jobs::new(db, engine, analytics)
}

/// The run manager alone, for commands that trigger runs.
pub fn run_manager(config: &Config, db: PgPool, redis: ConnectionManager) -> RunManager {
    let jobs = jobs(config, db.clone(), redis.clone());
    let channels = ChannelStore::new(redis, db.clone(), &config.redis_prefix, config.append_dedupe_window_secs * 1000);
    RunManager::new(db, jobs, channels)
}

/// Fail fast while Redis is away: a lost connection is retried briefly, then
/// requests get an error (503) rather than waiting out a long backoff.
fn redis_config(config: &Config) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(config.redis_connect_timeout_ms)))
        .set_response_timeout(Some(Duration::from_millis(config.redis_response_timeout_ms)))
        .set_number_of_retries(config.redis_reconnect_retries)
        .set_max_delay(Duration::from_millis(200))
}

/// Handlers take the parts of the state they use.
macro_rules! from_state {
    ($($ty:ty => $field:ident),* $(,)?) => {
        $(impl FromRef<AppState> for $ty {
            fn from_ref(state: &AppState) -> Self {
                state.$field.clone()
            }
        })*
    };
}

from_state! {
    PgPool => db,
    ConnectionManager => redis,
    Authenticator => auth,
    Arc<dyn SessionListRepository> => session_list,
    Arc<SessionLookup> => sessions,
    Jobs => jobs,
    ChannelStore => channels,
    Hub => hub,
    RunManager => runs,
    Waitpoints => waitpoints,
    Appender => appender,
    StreamPermits => stream_permits,
    crate::limits::RateLimits => rate_limits,
    Dispatcher => dispatcher,
    ClickHouse => analytics,
    crate::dashboard::auth::DashboardAuth => dashboard,
    Drain => drain,
}

impl FromRef<AppState> for ChannelAccess {
    fn from_ref(state: &AppState) -> Self {
        ChannelAccess { lookup: state.sessions.clone(), db: state.db.clone() }
    }
}

impl FromRef<AppState> for crate::sessions::close::SessionCloser {
    fn from_ref(state: &AppState) -> Self {
        crate::sessions::close::SessionCloser {
            db: state.db.clone(),
            jobs: state.jobs.clone(),
            lookup: state.sessions.clone(),
            waitpoints: state.waitpoints.clone(),
        }
    }
}

impl FromRef<AppState> for crate::runs::cancel::RunCanceller {
    fn from_ref(state: &AppState) -> Self {
        crate::runs::cancel::RunCanceller { db: state.db.clone(), jobs: state.jobs.clone() }
    }
}

impl FromRef<AppState> for RunTimings {
    fn from_ref(state: &AppState) -> Self {
        RunTimings {
            heartbeat_timeout_ms: state.config.run_heartbeat_timeout_ms,
            retry_base_ms: state.config.run_retry_base_ms,
            retry_max_ms: state.config.run_retry_max_ms,
        }
    }
}

impl FromRef<AppState> for crate::dashboard::OpsSettings {
    fn from_ref(state: &AppState) -> Self {
        let c = &state.config;
        crate::dashboard::OpsSettings {
            auth_cache_ttl_ms: c.auth_cache_ttl_ms,
            replication: crate::replication::ReplicationTarget::of(c),
            schedules_file: c.job_schedules_file.clone(),
            schedules: state.schedules.clone(),
            run_jobs: c.run_jobs,
        }
    }
}

impl FromRef<AppState> for Option<crate::replication::ReplicationTarget> {
    fn from_ref(state: &AppState) -> Self {
        crate::replication::ReplicationTarget::of(&state.config)
    }
}

impl FromRef<AppState> for RealtimeSettings {
    fn from_ref(state: &AppState) -> Self {
        RealtimeSettings {
            public_url: state.config.public_url.clone(),
            keepalive: Duration::from_millis(state.config.sse_keepalive_ms),
        }
    }
}

/// Reads the master key from the configuration.
pub fn master_key(config: &Config) -> anyhow::Result<MasterKey> {
    let hex = config.master_key.as_deref().ok_or_else(|| {
        anyhow::anyhow!("SESSIOND_MASTER_KEY is not set (64 hex characters; scripts/dev.sh makes one)")
    })?;
    Ok(MasterKey::from_hex(hex)?)
}

/// Follows the announcements that requests of any process wait on: appends
/// (SSE subscribers, `.in` waitpoints and their long-polls, through the hub's
/// feeds) and pushes onto the run queue (workers' dequeue long-polls).
/// Every process does, whatever `RUN_JOBS` says: an API-only process that did
/// not would answer its subscribers only at the feed's fallback poll (measured
/// p50 510 ms against 1.4 ms). The job queues' wake-ups stay with the job
/// runtime, the only thing that waits on them.
fn follow_wakeups(state: &AppState) {
    tokio::spawn(state.run_queue.clone().listen(state.redis_client.clone()));
    tokio::spawn(state.hub.clone().listen(state.redis_client.clone()));
}

/// Serves HTTP and runs the job runtime until `shutdown` turns true, then
/// drains (see [`crate::shutdown`]) and returns within `SHUTDOWN_GRACE_MS`:
/// `/readyz` turns 503 and the listener closes at once; idle keep-alive
/// connections close, SSE responses end with an error frame and long polls
/// answer; in-flight requests (appends) finish; job attempts finish or are
/// handed back; the replicator stops and releases its lease, so another
/// process takes the slot at once rather than after the lease's term.
///
/// Connections are served by hyper's HTTP/1.1 connection directly rather than
/// `axum::serve`, whose HTTP/1+2 auto-detecting connection costs about 50 KB per
/// idle connection; with thousands of long-lived SSE subscribers that dominates.
/// The connection limits (timeouts, cap) are in [`crate::http::conn`].
pub async fn serve(listener: TcpListener, state: AppState, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    use crate::http::conn;

    let limits = conn::Limits::from_config(&state.config)?;
    state.stream_permits.set_server_cap(limits.long_lived);
    let connections = conn::Registry::new(limits);
    let reaper = tokio::spawn(connections.clone().reap_idle());
    follow_wakeups(&state);
    let runtime =
        if state.config.run_jobs { Some(jobs::runtime::start(state.job_runtime(), shutdown.clone())?) } else { None };
    if state.config.clickhouse_migrate_on_start {
        crate::analytics::schema::migrate_in_background(state.analytics.clone());
    }
    let replicator = if state.config.replication_enabled && state.config.run_jobs {
        let replicator = crate::replication::consumer::Replicator::new(
            &state.config,
            state.db.clone(),
            state.redis.clone(),
            state.jobs.clone(),
            state.analytics.clone(),
        );
        Some(tokio::spawn(replicator.run(shutdown.clone())))
    } else {
        None
    };
    let drain = state.drain.clone();
    let grace = Duration::from_millis(state.config.shutdown_grace_ms);
    let app = crate::http::router(state);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = shutdown;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // The guard `wait_for` returns is not Send: drop it inside.
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        // At the cap with every connection inside a request: refuse this one.
        let Some(registration) = connections.admit() else { continue };
        tokio::spawn(conn::serve_connection(stream, peer, registration, app.clone(), &graceful));
    }
    // First: readiness turns 503, subscribers and long polls are told.
    drain.begin();
    let started = tokio::time::Instant::now();
    let deadline = started + grace;
    drop(listener);
    tracing::info!(grace_ms = grace.as_millis() as u64, "draining");
    let connections_closed = async {
        // Closes idle keep-alive connections now, the others once their
        // response is written.
        if tokio::time::timeout_at(deadline, graceful.shutdown()).await.is_err() {
            tracing::warn!("connections still open after the shutdown grace period; dropping them");
        }
        reaper.abort();
    };
    let jobs_done = async {
        if let Some(runtime) = runtime {
            // The runtime hands back what is unfinished at the grace's end;
            // a moment more for that bookkeeping.
            let _ = tokio::time::timeout_at(deadline + Duration::from_secs(1), runtime).await;
        }
    };
    let replicator_stopped = async {
        if let Some(replicator) = replicator {
            if tokio::time::timeout_at(deadline, replicator).await.is_err() {
                tracing::warn!("the replicator did not stop within the shutdown grace period");
            }
        }
    };
    tokio::join!(connections_closed, jobs_done, replicator_stopped);
    tracing::info!(drain_ms = started.elapsed().as_millis() as u64, "drained");
    Ok(())
}
