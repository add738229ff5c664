//! Analytics: the ClickHouse copy of sessions and runs that the session list
//! and the dashboard read.
//!
//! Postgres stays the source of truth; ClickHouse holds a versioned copy
//! (`ReplacingMergeTree`, read with `FINAL`) that may lag. Everything here is
//! written so that lag or an outage degrades an answer, never breaks it:
//!
//! - [`schema`]: the numbered files of `clickhouse-schema/`, applied once each.
//! - [`rows`]: the row types both stores agree on, and how a Postgres row
//!   becomes one.
//! - [`backfill`]: copying existing rows in resumable chunks, one durable job
//!   per chunk.
//! - [`watermark`]: how far ClickHouse is known to be complete.
//! - [`digest`]: per environment and month, what the copy holds, for
//!   comparing it with Postgres.
//! - [`overview`]: the dashboard overview's aggregates, and the replication
//!   lag samples its chart reads.
//! - [`session_list`]: the session list served from ClickHouse, with the
//!   read-your-writes overlay and the Postgres fallback.
//!
//! The handle here talks HTTP to whatever `CLICKHOUSE_URL` names: a real
//! ClickHouse in production, the chDB dev server in development and tests.

pub mod backfill;
pub mod digest;
pub mod overview;
pub mod rows;
pub mod schema;
pub mod session_list;
pub mod watermark;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clickhouse::Compression;

use crate::config::{ClickHouseCompression, Config};
use crate::db::StoreError;

/// A time as ClickHouse parses a `DateTime64(6, 'UTC')` parameter.
pub fn ch_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("clickhouse did not answer within {0:?}")]
    Timeout(Duration),
    #[error("clickhouse failed recently; not tried again yet")]
    CoolingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A cheap, cloneable handle on ClickHouse: clients for the database and the
/// server, the request timeout, and a short memory of the last failure.
#[derive(Clone)]
pub struct ClickHouse {
    inner: Arc<Inner>,
}

struct Inner {
    client: clickhouse::Client,
    server: clickhouse::Client,
    database: String,
    timeout: Duration,
    retry_after: Duration,
    /// When a request last failed; reads skip ClickHouse until `retry_after`
    /// has passed, so an outage costs each list one timeout at most once.
    failed_at: Mutex<Option<Instant>>,
}

/// Writes (backfill chunks) move more data than a list page; they get longer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(120);

impl ClickHouse {
    pub fn new(config: &Config) -> Self {
        let mut server = clickhouse::Client::default().with_url(&config.clickhouse_url).with_compression(match config
            .clickhouse_compression
        {
            ClickHouseCompression::None => Compression::None,
            ClickHouseCompression::Lz4 => Compression::Lz4,
        });
        if let Some(user) = &config.clickhouse_user {
            server = server.with_user(user);
        }
        if let Some(password) = &config.clickhouse_password {
            server = server.with_password(password);
        }
        let client = server.clone().with_database(&config.clickhouse_database);
        ClickHouse {
            inner: Arc::new(Inner {
                client,
                server,
                database: config.clickhouse_database.clone(),
                timeout: Duration::from_millis(config.clickhouse_timeout_ms),
                retry_after: Duration::from_millis(config.clickhouse_retry_after_ms),
                failed_at: Mutex::new(None),
            }),
        }
    }

    /// A client whose queries run in sessiond's database.
    pub fn client(&self) -> &clickhouse::Client {
        &self.inner.client
    }

    /// A client with no database chosen (to create the database).
    pub fn server(&self) -> &clickhouse::Client {
        &self.inner.server
    }

    pub fn database(&self) -> &str {
        &self.inner.database
    }

    /// Runs one read with the read timeout, remembering a failure.
    pub async fn read<T>(
        &self,
        request: impl Future<Output = clickhouse::error::Result<T>>,
    ) -> Result<T, AnalyticsError> {
        self.timed(self.inner.timeout, request).await
    }

    /// Runs one write (or DDL, or a read over a whole table) with the longer
    /// write timeout.
    pub async fn write<T>(
        &self,
        request: impl Future<Output = clickhouse::error::Result<T>>,
    ) -> Result<T, AnalyticsError> {
        self.timed(WRITE_TIMEOUT, request).await
    }

    /// Inserts `rows` into `table` as one INSERT (nothing for no rows): the
    /// one way backfill chunks, replication flushes and repairs write.
    pub async fn insert_rows<T>(&self, table: &str, rows: &[T]) -> Result<(), AnalyticsError>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let mut insert = self.write(self.client().insert::<T>(table)).await?;
        for row in rows {
            self.write(insert.write(row)).await?;
        }
        self.write(insert.end()).await
    }

    async fn timed<T>(
        &self,
        limit: Duration,
        request: impl Future<Output = clickhouse::error::Result<T>>,
    ) -> Result<T, AnalyticsError> {
        let result = match tokio::time::timeout(limit, request).await {
            Ok(Ok(value)) => {
                self.mark_healthy();
                return Ok(value);
            }
            Ok(Err(err)) => Err(AnalyticsError::ClickHouse(err)),
            Err(_) => Err(AnalyticsError::Timeout(limit)),
        };
        self.set_failed(Some(Instant::now()));
        result
    }

    /// False for a while after a failure: callers with a fallback use it
    /// instead of waiting on ClickHouse again.
    pub fn healthy(&self) -> bool {
        match *self.lock() {
            Some(at) => at.elapsed() >= self.inner.retry_after,
            None => true,
        }
    }

    /// Forgets a failure (after a request succeeded).
    pub fn mark_healthy(&self) {
        self.set_failed(None);
    }

    fn set_failed(&self, at: Option<Instant>) {
        let mut failed = self.lock();
        if failed.is_some() || at.is_some() {
            *failed = at;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // A poisoned lock only means a panic elsewhere while holding an Instant.
        self.inner.failed_at.lock().unwrap_or_else(|e| e.into_inner())
    }
}
