//! Application state and start-up: what a server process holds, and the entry
//! point the binary and the tests share.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::auth::cache::EnvCache;
use crate::config::Config;
use crate::sessions::list::{PgSessionList, SessionListRepository};
use crate::tenancy::keys::MasterKey;

pub struct Inner {
    pub config: Config,
    pub db: PgPool,
    pub master_key: MasterKey,
    pub envs: EnvCache,
    pub session_list: Arc<dyn SessionListRepository>,
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
    pub fn new(config: Config, db: PgPool, master_key: MasterKey) -> Self {
        let envs = EnvCache::new(Duration::from_millis(config.auth_cache_ttl_ms));
        let session_list = Arc::new(PgSessionList { pool: db.clone() });
        AppState(Arc::new(Inner { config, db, master_key, envs, session_list }))
    }
}

/// Reads the master key from the configuration.
pub fn master_key(config: &Config) -> anyhow::Result<MasterKey> {
    let hex = config
        .master_key
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("SESSIOND_MASTER_KEY is not set (64 hex characters; scripts/dev.sh makes one)"))?;
    Ok(MasterKey::from_hex(hex)?)
}

/// Serves `state` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = crate::http::router(state);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
