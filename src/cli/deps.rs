//! The services a command builds, each on demand.

use redis::aio::ConnectionManager;
use sqlx::PgPool;

use sessiond::app;
use sessiond::config::Config;
use sessiond::db;
use sessiond::jobs::Jobs;

/// Postgres, with the migrations applied: every command that reads or
/// writes the database may be the first thing run against a new one.
pub async fn database(config: &Config) -> anyhow::Result<PgPool> {
    let pool = db::connect(config).await?;
    db::migrate(&pool).await?;
    Ok(pool)
}

pub async fn redis(config: &Config) -> anyhow::Result<ConnectionManager> {
    Ok(app::connect_redis(config).await?.1)
}

/// The job queue (Postgres rows relayed to Redis), for commands that submit
/// or retry jobs.
pub async fn jobs(config: &Config, pool: &PgPool) -> anyhow::Result<Jobs> {
    let redis = redis(config).await?;
    Ok(app::jobs(config, pool.clone(), redis))
}
