//! Application state and start-up: what a server process holds, and the entry
//! point the binary and the tests share.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::cache::EnvCache;
use crate::config::Config;
use crate::jobs::queue::JobQueue;
use crate::jobs::{self, Jobs};
use crate::runs::queue::RunQueue;
use crate::sessions::list::{PgSessionList, SessionListRepository};
use crate::sessions::lookup::SessionLookup;
use crate::streams::hub::Hub;
use crate::streams::store::ChannelStore;
use crate::tenancy::keys::MasterKey;

pub struct Inner {
    pub config: Config,
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub redis_client: redis::Client,
    pub master_key: MasterKey,
    pub envs: EnvCache,
    pub session_list: Arc<dyn SessionListRepository>,
    pub run_queue: RunQueue,
    pub jobs: Jobs,
    pub channels: ChannelStore,
    pub hub: Hub,
    pub sessions: SessionLookup,
    /// Fault seams for tests (all off in a real server).
    pub faults: crate::streams::effects::Faults,
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
        let redis_client = redis::Client::open(config.redis_url.as_str())?;
        let redis = ConnectionManager::new_with_config(redis_client.clone(), redis_config(&config)).await?;
        let envs = EnvCache::new(Duration::from_millis(config.auth_cache_ttl_ms));
        let session_list = Arc::new(PgSessionList { pool: db.clone() });
        let run_queue = RunQueue::new(redis.clone(), &config.redis_prefix);
        let jobs = Jobs::new(db.clone(), JobQueue::new(redis.clone(), &config.redis_prefix));
        let channels = ChannelStore::new(redis.clone(), &config.redis_prefix, config.append_dedupe_window_secs * 1000);
        let hub = Hub::new(channels.clone(), Duration::from_millis(config.feed_safety_poll_ms));
        Ok(AppState(Arc::new(Inner {
            config,
            db,
            redis,
            redis_client,
            master_key,
            envs,
            session_list,
            run_queue,
            jobs,
            channels,
            hub,
            sessions: SessionLookup::new(Duration::from_millis(1_000)),
            faults: Default::default(),
        })))
    }
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

/// Reads the master key from the configuration.
pub fn master_key(config: &Config) -> anyhow::Result<MasterKey> {
    let hex = config.master_key.as_deref().ok_or_else(|| {
        anyhow::anyhow!("SESSIOND_MASTER_KEY is not set (64 hex characters; scripts/dev.sh makes one)")
    })?;
    Ok(MasterKey::from_hex(hex)?)
}

/// How long shutdown waits for open connections (SSE subscribers included)
/// before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves HTTP and runs the job runtime until `shutdown` turns true, then stops
/// both, letting in-flight requests and jobs finish.
///
/// Connections are served by hyper's HTTP/1.1 connection directly rather than
/// `axum::serve`, whose HTTP/1+2 auto-detecting connection costs about 50 KB per
/// idle connection; with thousands of long-lived SSE subscribers that dominates.
/// The connection limits (timeouts, cap) are in [`crate::http::conn`].
pub async fn serve(listener: TcpListener, state: AppState, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    use crate::http::conn;

    let connections = conn::Registry::new(conn::Limits::from_config(&state.config)?);
    let reaper = tokio::spawn(connections.clone().reap_idle());
    let schedules = jobs::schedule::load(state.config.job_schedules_file.as_deref())?;
    let runtime = jobs::runtime::start(&state, schedules, shutdown.clone())?;
    let app = crate::http::router(state);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = shutdown;
    loop {
        let (stream, _) = tokio::select! {
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
        tokio::spawn(conn::serve_connection(stream, registration, app.clone(), &graceful));
    }
    drop(listener);
    reaper.abort();
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace period; dropping them");
    }
    let _ = runtime.await;
    Ok(())
}
