//! Readiness: whether this process can serve requests now. `/healthz` (in the
//! router) only says the process is up; `/readyz` also checks its dependencies,
//! so a load balancer can stop sending traffic while Postgres or Redis is away.
//!
//! With replication on, `/readyz` also reports the slot's retained WAL against
//! its bound, the alert (warning at 50%, critical at 80%, lost) and whether
//! the copy is complete. These never make the process unready: a slot in
//! danger is an operator's alarm, not a reason to stop serving (the list
//! answers from Postgres while the copy heals).

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use crate::replication::health::{self, WalAlert};
use crate::replication::ReplicationTarget;
use redis::aio::ConnectionManager;
use sqlx::PgPool;

/// How long each dependency has to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// 200 when Postgres and Redis both answer within a second, else 503; 503
/// at once while the process drains (see [`crate::shutdown`]).
pub async fn readyz(
    State(drain): State<crate::shutdown::Drain>,
    State(db): State<PgPool>,
    State(redis): State<ConnectionManager>,
    State(replication): State<Option<ReplicationTarget>>,
) -> ApiResult<Json<Value>> {
    if drain.is_draining() {
        return Err(ApiError::Unavailable);
    }
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
    let mut body = json!({ "ready": true, "postgres": "ok", "redis": "ok" });
    if let Some(target) = &replication {
        body["replication"] = match tokio::time::timeout(READY_TIMEOUT, health::summary(&db, &target.slot)).await {
            Ok(Ok(summary)) => {
                if matches!(summary.wal.alert, WalAlert::Warning | WalAlert::Critical | WalAlert::Lost) {
                    tracing::warn!(slot = %target.slot, alert = summary.wal.alert.as_str(),
                        retained = ?summary.wal.retained_bytes, bound = ?summary.wal.bound_bytes,
                        "replication slot's retained WAL needs attention");
                }
                serde_json::to_value(summary).unwrap_or(Value::Null)
            }
            _ => json!({ "slot_name": target.slot, "unknown": true }),
        };
    }
    Ok(Json(body))
}
