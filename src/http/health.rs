//! Readiness: whether this process can serve requests now. `/healthz` (in the
//! router) only says the process is up; `/readyz` also checks its dependencies,
//! so a load balancer can stop sending traffic while Postgres or Redis is away.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use redis::aio::ConnectionManager;
use sqlx::PgPool;

/// How long each dependency has to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// 200 when Postgres and Redis both answer within a second, else 503.
pub async fn readyz(State(db): State<PgPool>, State(redis): State<ConnectionManager>) -> ApiResult<Json<Value>> {
    let postgres = async {
        let ping = sqlx::query("SELECT 1").execute(&db);
        matches!(tokio::time::timeout(READY_TIMEOUT, ping).await, Ok(Ok(_)))
    };
    let redis = async {
        let mut conn = redis.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(READY_TIMEOUT, ping).await, Ok(Ok(_)))
    };
    let (postgres, redis) = tokio::join!(postgres, redis);
    if !(postgres && redis) {
        tracing::warn!(postgres, redis, "not ready: a dependency did not answer");
        return Err(ApiError::Unavailable);
    }
    Ok(Json(json!({ "ready": true, "postgres": "ok", "redis": "ok" })))
}
