//! SQL that owns `environment_rate_limits`: the environments whose limit of
//! a route class differs from the server's default (no row: the default).

use uuid::Uuid;

use super::RouteClass;
use crate::db::StoreError;

/// One environment's own limit of one class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub environment_id: Uuid,
    pub class: RouteClass,
    pub per_second: u32,
}

fn row(environment_id: Uuid, class: String, per_second: i32) -> Result<Override, StoreError> {
    let parsed = RouteClass::parse(&class).zip(u32::try_from(per_second).ok());
    let (class, per_second) = parsed.ok_or_else(|| {
        StoreError::Corrupt(format!("environment {environment_id} has a {class} limit of {per_second}"))
    })?;
    Ok(Override { environment_id, class, per_second })
}

/// Every override (a handful per environment at most; every process holds
/// them all).
pub async fn all(conn: impl sqlx::PgExecutor<'_>) -> Result<Vec<Override>, StoreError> {
    let rows: Vec<(Uuid, String, i32)> =
        sqlx::query_as("SELECT environment_id, route_class, per_second FROM environment_rate_limits")
            .fetch_all(conn)
            .await?;
    rows.into_iter().map(|(env, class, n)| row(env, class, n)).collect()
}

/// One environment's overrides, on the caller's transaction.
pub async fn of_environment(conn: &mut sqlx::PgConnection, env: Uuid) -> Result<Vec<Override>, StoreError> {
    let rows: Vec<(Uuid, String, i32)> = sqlx::query_as(
        "SELECT environment_id, route_class, per_second FROM environment_rate_limits WHERE environment_id = $1",
    )
    .bind(env)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(|(env, class, n)| row(env, class, n)).collect()
}

/// Sets `class`'s limit of `env` (`None`: back to the default).
pub async fn set(
    conn: &mut sqlx::PgConnection,
    env: Uuid,
    class: RouteClass,
    per_second: Option<u32>,
) -> Result<(), StoreError> {
    match per_second {
        Some(n) => {
            let n = i32::try_from(n).map_err(|_| StoreError::Corrupt(format!("a limit of {n} does not fit")))?;
            sqlx::query(
                "INSERT INTO environment_rate_limits (environment_id, route_class, per_second) VALUES ($1, $2, $3)
                 ON CONFLICT (environment_id, route_class)
                 DO UPDATE SET per_second = EXCLUDED.per_second, updated_at = now()",
            )
            .bind(env)
            .bind(class.as_str())
            .bind(n)
            .execute(conn)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM environment_rate_limits WHERE environment_id = $1 AND route_class = $2")
                .bind(env)
                .bind(class.as_str())
                .execute(conn)
                .await?;
        }
    }
    Ok(())
}
