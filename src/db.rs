//! Postgres: pool construction, migrations, transactions, and the storage
//! layer's error type with its classification (an outage or a bug). SQL
//! lives in the store that owns its table; [`paging`] holds the keyset
//! ranges those stores share.

pub mod paging;

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::Config;

/// Storage-layer failure. Unique violations are surfaced by constraint name so the
/// domain can turn them into conflicts; Postgres being away is told apart by
/// [`unavailable`] (503); everything else is an internal error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unique constraint {0} violated")]
    UniqueViolation(String),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err {
            if db.is_unique_violation() {
                return StoreError::UniqueViolation(db.constraint().unwrap_or_default().to_string());
            }
        }
        StoreError::Database(err)
    }
}

/// Whether a failure, anywhere along its chain of causes, is a storage
/// dependency (Postgres or Redis) being away or refusing writes for now. Such
/// a request may well succeed if sent again, so it is answered 503 with
/// `Retry-After`, never 500 (a bug). The one classification: every layer keeps
/// its storage error as a source, and the HTTP and dashboard mappings ask this.
pub fn unavailable(err: &anyhow::Error) -> bool {
    err.chain().any(cause_unavailable)
}

fn cause_unavailable(cause: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(err) = cause.downcast_ref::<redis::RedisError>() {
        return redis_unavailable(err);
    }
    if let Some(err) = cause.downcast_ref::<sqlx::Error>() {
        return postgres_unavailable(err);
    }
    // Errors shared between waiters (the sequence floor's) hold it in an Arc.
    if let Some(err) = cause.downcast_ref::<std::sync::Arc<sqlx::Error>>() {
        return postgres_unavailable(err);
    }
    false
}

/// Redis could not be reached or answer in time (refused, reset, timed out),
/// or it answered but refuses work for now: out of memory under `noeviction`
/// (OOM), a failed snapshot stopping writes (MISCONF), a read-only replica
/// (READONLY), still loading its data (LOADING), or a replica, cluster or
/// script not ready (MASTERDOWN, TRYAGAIN, CLUSTERDOWN, NOREPLICAS, BUSY).
/// Anything else (a script or type error) is a bug, not an outage.
pub fn redis_unavailable(err: &redis::RedisError) -> bool {
    const REFUSING: [&str; 9] =
        ["OOM", "MISCONF", "READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "BUSY"];
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || matches!(err.retry_method(), redis::RetryMethod::WaitAndRetry)
        || err.code().is_some_and(|code| REFUSING.contains(&code))
}

/// Postgres could not be reached (refused, reset, no pooled connection in
/// time), is shutting down, restarting or recovering (SQLSTATE 57P01-57P05),
/// lost the connection (class 08), lacks resources (class 53: too many
/// connections, disk full, out of memory) or is a read-only standby (25006).
/// Constraint violations and other query errors are not outages.
pub fn postgres_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") || code == "25006"
        }),
        _ => false,
    }
}

pub async fn connect(config: &Config) -> anyhow::Result<PgPool> {
    let mut options = PgConnectOptions::from_str(&config.database_url)?;
    if let Some(schema) = &config.database_schema {
        anyhow::ensure!(
            !schema.is_empty() && schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "DATABASE_SCHEMA must be a plain identifier"
        );
        // Create the schema once over a plain connection, then pin every pooled
        // connection's search_path to it.
        let admin = PgPoolOptions::new().max_connections(1).connect_with(options.clone()).await?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")).execute(&admin).await?;
        admin.close().await;
        options = options.options([("search_path", schema.as_str())]);
    }
    let pool = PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .acquire_timeout(std::time::Duration::from_millis(config.database_acquire_timeout_ms))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Starts a transaction that stays correct when its caller is dropped.
///
/// sqlx 0.8's `Pool::begin` is not cancel-safe on Postgres (transact-rs/sqlx
/// #4393): a future dropped while its BEGIN is in flight returns the
/// connection to the pool inside a transaction that nothing rolls back. The
/// next borrower's statements then run inside it, hold its locks, and their
/// "committed" writes vanish when the connection closes. Callers are dropped
/// often enough (a client hanging up on a handler, an aborted task, a
/// timeout) that this is a real way to lose an acknowledged write. Here the
/// BEGIN runs in a task of its own, which finishes even if the caller is
/// gone; a transaction nobody collects is then dropped and rolled back like
/// any other. The cost is one task spawn per transaction.
#[allow(clippy::disallowed_methods)] // the one sanctioned caller
pub async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.begin().await })
        .await
        .map_err(|e| sqlx::Error::Protocol(format!("beginning a transaction: {e}")))?
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::migrate!("./migrations").run(pool).await?;
    Ok(())
}

/// Binds a JSON document as Postgres `json` rather than sqlx's default `jsonb`.
/// `jsonb` refuses `\u0000` (it cannot turn it into text), so data that must be
/// kept as sent (channel records in waitpoint outputs, run outputs and errors)
/// lives in `json` columns and is bound with this.
#[derive(Debug, Clone, Copy)]
pub struct JsonDoc<'a>(pub &'a serde_json::Value);

impl sqlx::Type<sqlx::Postgres> for JsonDoc<'_> {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        // `json`'s OID is fixed in every Postgres.
        sqlx::postgres::PgTypeInfo::with_oid(sqlx::postgres::types::Oid(114))
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for JsonDoc<'_> {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        // The binary form of `json` is its text.
        serde_json::to_writer(&mut **buf, self.0)?;
        Ok(sqlx::encode::IsNull::No)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's error reply, as the client would return it.
    fn reply(line: &str) -> redis::RedisError {
        match redis::parse_redis_value(format!("-{line}\r\n").as_bytes()) {
            Ok(redis::Value::ServerError(err)) => err.into(),
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn redis_refusing_writes_is_unavailable_and_a_bad_command_is_not() {
        for line in [
            "OOM command not allowed when used memory > 'maxmemory'.",
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
            "READONLY You can't write against a read only replica.",
            "LOADING Redis is loading the dataset in memory",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
            "NOREPLICAS Not enough good replicas to write.",
            "BUSY Redis is busy running a script.",
        ] {
            assert!(redis_unavailable(&reply(line)), "{line}");
            let wrapped = anyhow::Error::new(reply(line)).context("appending");
            assert!(unavailable(&wrapped), "{line} behind a context");
        }
        for line in [
            "ERR wrong number of arguments for 'set' command",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "NOSCRIPT No matching script.",
        ] {
            assert!(!redis_unavailable(&reply(line)), "{line}");
        }
    }

    #[test]
    fn postgres_away_is_unavailable_and_a_bad_query_is_not() {
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(postgres_unavailable(&refused));
        assert!(postgres_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(unavailable(&anyhow::Error::new(StoreError::from(sqlx::Error::PoolTimedOut))));
        assert!(!postgres_unavailable(&sqlx::Error::RowNotFound));
        assert!(!unavailable(&anyhow::Error::new(StoreError::Corrupt("bad row".into()))));
    }
}
