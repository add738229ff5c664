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
//!   per chunk ([`jobs`]: the chunk job).
//! - [`watermark`]: how far ClickHouse is known to be complete.
//! - [`digest`]: per environment and month, what the copy holds, for
//!   comparing it with Postgres.
//! - [`source`]: the same digests and id scans over Postgres, the copy's
//!   source (what `replication::reconcile` compares against).
//! - [`overview`]: the dashboard overview's aggregates, and the replication
//!   lag samples its chart reads.
//! - [`session_list`]: the session list served from ClickHouse, with the
//!   read-your-writes overlay and the Postgres fallback.
//!
//! The handle here talks HTTP to whatever `CLICKHOUSE_URL` names: a real
//! ClickHouse in production, the chDB dev server in development and tests.

pub mod backfill;
pub mod digest;
pub mod jobs;
pub mod overview;
pub mod rows;
pub mod schema;
pub mod session_list;
pub mod source;
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

/// What a failed request says about the requests after it.
///
/// Only a failure every request would meet may take ClickHouse out of use
/// (the cool-down of [`ClickHouse::healthy`]): otherwise one caller's odd
/// request (a filter long enough to be refused) would send every
/// environment's lists to Postgres, and repeating it would keep them there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// ClickHouse could not be reached or could not serve: no connection, no
    /// answer in time, a 5xx (or a 408/429, which speak of its load), or a
    /// 401/403 (its credentials, which every request carries). Reads skip it
    /// for a while.
    Unavailable,
    /// This request was at fault: refused before it was sent (the crate could
    /// not build it), judged bad by ClickHouse (another 4xx: syntax, size,
    /// unknown name), or answered with rows that did not decode. It fails
    /// alone; the next request tries ClickHouse as usual.
    Request,
}

impl AnalyticsError {
    /// Whether this failure takes ClickHouse out of use (see [`Failure`]).
    /// Store errors are Postgres's, not ClickHouse's: they count as the
    /// request's own.
    pub fn failure(&self) -> Failure {
        match self {
            AnalyticsError::Timeout(_) | AnalyticsError::CoolingDown => Failure::Unavailable,
            AnalyticsError::Store(_) => Failure::Request,
            AnalyticsError::ClickHouse(err) => classify(err),
        }
    }
}

/// Sorts a crate error into [`Failure`]. The crate keeps no HTTP status: an
/// error answer reaches us as its body's text (`BadResponse`), which is
/// ClickHouse's exception ("Code: 62. DB::Exception: ...", or "Code: 62"
/// alone when only the exception header came) or, for an empty body, the
/// status line ("414 URI Too Long"). An exception's status is the one
/// ClickHouse answers that code with ([`exception_status`]). A body that is
/// neither (a proxy's page) did not come from ClickHouse: something on the
/// way failed, so it counts as the transport's.
pub fn classify(err: &clickhouse::error::Error) -> Failure {
    use clickhouse::error::Error;
    match err {
        Error::Network(_) | Error::TimedOut => Failure::Unavailable,
        Error::BadResponse(reason) => match answered_status(reason) {
            Some(status) if status_is_the_requests(status) => Failure::Request,
            _ => Failure::Unavailable,
        },
        // The crate's own refusals (a URI over the HTTP stack's 64 KiB, a
        // value it cannot write) and decoding failures: nothing about the
        // server.
        _ => Failure::Request,
    }
}

/// A 4xx, but those that speak of the server rather than of this request.
fn status_is_the_requests(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 401 | 403 | 408 | 429)
}

/// The HTTP status an error answer had, read back from its text (see
/// [`classify`]); None if the text is not ClickHouse's nor a bare status.
fn answered_status(reason: &str) -> Option<u16> {
    if let Some(rest) = reason.strip_prefix("Code: ") {
        let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
        return Some(exception_status(digits.parse().ok()?));
    }
    let digits = reason.get(..3)?;
    let rest = &reason[3..];
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    digits.parse().ok().filter(|s| (100..600).contains(s))
}

/// The status ClickHouse's HTTP interface answers an exception code with
/// (its `exceptionCodeToHTTPStatus`); every code not named is a 500.
fn exception_status(code: u32) -> u16 {
    match code {
        194 => 401, // REQUIRED_PASSWORD
        // UNKNOWN_USER, WRONG_PASSWORD, ACCESS_DENIED, SET_NON_GRANTED_ROLE, AUTHENTICATION_FAILED
        192 | 193 | 497 | 512 | 516 => 403,
        // BAD_ARGUMENTS, CANNOT_PARSE_* (text, escape sequence, quoted string, input
        // assertion, date, datetime, number, uuid, domain value, IPv4, IPv6),
        // THERE_IS_NO_COLUMN, DUPLICATE_COLUMN, ILLEGAL_COLUMN, UNKNOWN_ELEMENT_IN_AST,
        // TYPE_MISMATCH, INCORRECT_DATA, UNKNOWN_TYPE_OF_AST_NODE, TOO_DEEP_AST,
        // TOO_BIG_AST, UNEXPECTED_AST_STRUCTURE, VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE,
        // CANNOT_COMPILE_REGEXP, SYNTAX_ERROR (also "Max query size exceeded")
        6 | 8 | 15 | 25 | 26 | 27 | 36 | 37 | 38 | 41 | 44 | 53 | 62 | 72 | 117 | 123 | 167 | 168 | 223 | 321 | 376
        | 427 | 441 | 675 | 676 => 400,
        // UNKNOWN_FUNCTION, UNKNOWN_IDENTIFIER, UNKNOWN_TYPE, UNKNOWN_STORAGE,
        // UNKNOWN_TABLE, UNKNOWN_AGGREGATE_FUNCTION, UNKNOWN_FORMAT,
        // UNKNOWN_TYPE_OF_QUERY, UNKNOWN_DATABASE, UNKNOWN_SETTING,
        // UNKNOWN_DIRECTION_OF_SORTING, UNKNOWN_DATABASE_ENGINE, UNKNOWN_ROLE
        46 | 47 | 50 | 56 | 60 | 63 | 73 | 78 | 81 | 115 | 152 | 336 | 511 => 404,
        159 => 408, // TIMEOUT_EXCEEDED
        381 => 411, // HTTP_LENGTH_REQUIRED
        229 => 413, // QUERY_IS_TOO_LARGE
        779 => 415, // UNSUPPORTED_MEDIA_TYPE
        48 => 501,  // NOT_IMPLEMENTED
        // SOCKET_TIMEOUT, CANNOT_OPEN_FILE, CANNOT_SCHEDULE_TASK
        209 | 76 | 439 => 503,
        _ => 500,
    }
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
    /// When a request last failed as [`Failure::Unavailable`]; reads skip
    /// ClickHouse until `retry_after` has passed, so an outage costs each list
    /// one timeout at most once. A [`Failure::Request`] leaves it be.
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

    /// Runs one read with the read timeout, remembering a failure that takes
    /// ClickHouse out of use (see [`Failure`]).
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
        let err = match tokio::time::timeout(limit, request).await {
            Ok(Ok(value)) => {
                self.mark_healthy();
                return Ok(value);
            }
            Ok(Err(err)) => AnalyticsError::ClickHouse(err),
            Err(_) => AnalyticsError::Timeout(limit),
        };
        match err.failure() {
            Failure::Unavailable => self.set_failed(Some(Instant::now())),
            Failure::Request => tracing::debug!(error = %err, "clickhouse refused one request; it stays in use"),
        }
        Err(err)
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

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::error::Error;

    fn answered(text: &str) -> Failure {
        classify(&Error::BadResponse(text.into()))
    }

    #[test]
    fn only_transport_failures_take_clickhouse_out_of_use() {
        let io = || Box::new(std::io::Error::other("refused"));
        assert_eq!(classify(&Error::Network(io())), Failure::Unavailable);
        assert_eq!(classify(&Error::TimedOut), Failure::Unavailable);
        assert_eq!(AnalyticsError::Timeout(Duration::from_secs(1)).failure(), Failure::Unavailable);
        // What the crate's HTTP stack says of a URI over 64 KiB: never sent.
        assert_eq!(classify(&Error::InvalidParams(io())), Failure::Request);
        assert_eq!(classify(&Error::NotEnoughData), Failure::Request);
        for request in [
            "Code: 62. DB::Exception: Max query size exceeded: ... (SYNTAX_ERROR) (version 24.8.1.1)",
            "Code: 62",
            "Code: 60. DB::Exception: Unknown table expression identifier 'x'. (UNKNOWN_TABLE)",
            "Code: 229. DB::Exception: Query is too large. (QUERY_IS_TOO_LARGE)",
            "414 URI Too Long",
            "400 Bad Request",
            "413",
        ] {
            assert_eq!(answered(request), Failure::Request, "{request}");
        }
        for unavailable in [
            "Code: 999. DB::Exception: failed by the test's proxy",
            "Code: 241. DB::Exception: Memory limit (total) exceeded. (MEMORY_LIMIT_EXCEEDED)",
            "Code: 210. DB::NetException: I/O error: Broken pipe. (NETWORK_ERROR)",
            "Code: 159. DB::Exception: Timeout exceeded. (TIMEOUT_EXCEEDED)",
            "Code: 516. DB::Exception: default: Authentication failed. (AUTHENTICATION_FAILED)",
            "Code: 209. DB::NetException: Timeout exceeded while reading from socket. (SOCKET_TIMEOUT)",
            "500 Internal Server Error",
            "503 Service Unavailable",
            "429 Too Many Requests",
            "<html><title>414 Request-URI Too Large</title></html>",
            "4000 things",
            "",
        ] {
            assert_eq!(answered(unavailable), Failure::Unavailable, "{unavailable}");
        }
    }
}
