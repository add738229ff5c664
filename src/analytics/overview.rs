//! The dashboard overview's aggregates over ClickHouse, and the replication
//! lag samples (`replication_lag_v1`) its lag chart reads.
//!
//! Every read is bounded by one environment's sort-key prefix and, except the
//! open-sessions count, by the window's `created_at`, so ClickHouse reads the
//! window's granules, not the environment's history. `FINAL` is needed (a
//! session replicated twice must count once) and stays cheap with
//! `do_not_merge_across_partitions_select_final`: every version of a row shares
//! its `created_at`, so its versions always sit in one monthly partition and
//! partitions can be finalised independently.

use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::{Deserialize, Serialize};

use super::watermark::{self, Table};
use super::{ch_time, AnalyticsError, ClickHouse};
use crate::sessions::list::EnvScope;

/// The width of one bar or point of the overview's time charts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Hour,
    Day,
}

impl Bucket {
    pub fn seconds(self) -> i64 {
        match self {
            Bucket::Hour => 3_600,
            Bucket::Day => 86_400,
        }
    }

    /// The ClickHouse function that rounds a time down to its bucket.
    fn start_of(self) -> &'static str {
        match self {
            Bucket::Hour => "toStartOfHour",
            Bucket::Day => "toStartOfDay",
        }
    }
}

/// One bucket's count: `bucket` is its start, in Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct BucketCount {
    pub bucket: u32,
    pub n: u64,
}

/// One bucket's runs in one (current) status.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct StatusCount {
    pub bucket: u32,
    pub status: String,
    pub n: u64,
}

/// One bucket's worst replication lag and its number of flushes.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct LagPoint {
    pub bucket: u32,
    pub max_lag_ms: u64,
    pub flushes: u64,
}

/// Everything the overview reads from ClickHouse for one environment and
/// window.
#[derive(Debug, Clone, Default)]
pub struct Aggregates {
    /// Sessions created per bucket (buckets without any are absent).
    pub sessions: Vec<BucketCount>,
    /// Runs created per bucket, by their current status.
    pub runs: Vec<StatusCount>,
    /// Sessions neither closed nor expired now, in the whole environment.
    pub open_sessions: u64,
    /// Replication lag per bucket (None: no slot to read samples of).
    pub lag: Option<Vec<LagPoint>>,
    /// A full backfill vouches for the copy (the sessions watermark exists);
    /// without one, ClickHouse holds only what replication brought.
    pub complete: bool,
}

const FINAL_PER_PARTITION: &str = " SETTINGS do_not_merge_across_partitions_select_final = 1";

const ENV: &str = "organization_id = {org:String} AND project_id = {project:String} AND environment_id = {env:String}";

fn scoped(ch: &ClickHouse, sql: &str, env: EnvScope) -> clickhouse::query::Query {
    ch.client()
        .query(sql)
        .param("org", env.organization_id.to_string())
        .param("project", env.project_id.to_string())
        .param("env", env.environment_id.to_string())
}

/// Reads the overview's aggregates: the reads run at once, each under the
/// read timeout; any failure fails the whole (the page then says analytics
/// are unavailable rather than showing a partial picture).
pub async fn aggregates(
    ch: &ClickHouse,
    env: EnvScope,
    since: DateTime<Utc>,
    bucket: Bucket,
    slot: Option<&str>,
) -> Result<Aggregates, AnalyticsError> {
    let lag = async {
        match slot {
            Some(slot) => lag_points(ch, slot, since, bucket).await.map(Some),
            None => Ok(None),
        }
    };
    let (sessions, runs, open_sessions, lag, mark) = tokio::join!(
        sessions_per_bucket(ch, env, since, bucket),
        runs_per_bucket(ch, env, since, bucket),
        open_sessions(ch, env),
        lag,
        watermark::read(ch, Table::Sessions),
    );
    Ok(Aggregates {
        sessions: sessions?,
        runs: runs?,
        open_sessions: open_sessions?,
        lag: lag?,
        complete: mark?.is_some(),
    })
}

/// Sessions created per bucket since `since`.
pub async fn sessions_per_bucket(
    ch: &ClickHouse,
    env: EnvScope,
    since: DateTime<Utc>,
    bucket: Bucket,
) -> Result<Vec<BucketCount>, AnalyticsError> {
    let sql = format!(
        "SELECT toUInt32(toUnixTimestamp({}(created_at))) AS bucket, count() AS n
         FROM sessions_v1 FINAL WHERE {ENV} AND created_at >= {{since:DateTime64(6, 'UTC')}}
         GROUP BY bucket ORDER BY bucket{FINAL_PER_PARTITION}",
        bucket.start_of()
    );
    ch.read(scoped(ch, &sql, env).param("since", ch_time(since)).fetch_all()).await
}

/// Runs created per bucket since `since`, by their current status.
pub async fn runs_per_bucket(
    ch: &ClickHouse,
    env: EnvScope,
    since: DateTime<Utc>,
    bucket: Bucket,
) -> Result<Vec<StatusCount>, AnalyticsError> {
    let sql = format!(
        "SELECT toUInt32(toUnixTimestamp({}(created_at))) AS bucket, toString(status) AS status, count() AS n
         FROM task_runs_v1 FINAL WHERE {ENV} AND created_at >= {{since:DateTime64(6, 'UTC')}}
         GROUP BY bucket, status ORDER BY bucket, status{FINAL_PER_PARTITION}",
        bucket.start_of()
    );
    ch.read(scoped(ch, &sql, env).param("since", ch_time(since)).fetch_all()).await
}

/// Sessions of the environment neither closed nor expired now: the one read
/// over the whole environment (the same derivation as SessionStatus::derive).
pub async fn open_sessions(ch: &ClickHouse, env: EnvScope) -> Result<u64, AnalyticsError> {
    let sql = format!(
        "SELECT count() FROM sessions_v1 FINAL
         WHERE {ENV} AND closed_at IS NULL AND (expires_at IS NULL OR expires_at > now64(6)){FINAL_PER_PARTITION}"
    );
    ch.read(scoped(ch, &sql, env).fetch_one()).await
}

/// The worst lag and the number of flushes per bucket since `since`.
pub async fn lag_points(
    ch: &ClickHouse,
    slot: &str,
    since: DateTime<Utc>,
    bucket: Bucket,
) -> Result<Vec<LagPoint>, AnalyticsError> {
    let sql = format!(
        "SELECT toUInt32(toUnixTimestamp({}(sampled_at))) AS bucket, max(lag_ms) AS max_lag_ms, count() AS flushes
         FROM replication_lag_v1 WHERE slot = {{slot:String}} AND sampled_at >= {{since:DateTime64(3, 'UTC')}}
         GROUP BY bucket ORDER BY bucket",
        bucket.start_of()
    );
    ch.read(ch.client().query(&sql).param("slot", slot).param("since", ch_time(since)).fetch_all()).await
}

#[derive(Row, Serialize)]
struct LagSample {
    slot: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    sampled_at: DateTime<Utc>,
    lag_ms: u64,
    row_count: u32,
}

/// Records one flush's lag: `lag_ms` from its last commit to its rows going
/// to ClickHouse, sampled at `at`.
pub async fn record_lag(
    ch: &ClickHouse,
    slot: &str,
    at: DateTime<Utc>,
    lag_ms: u64,
    rows: usize,
) -> Result<(), AnalyticsError> {
    let sample = LagSample {
        slot: slot.to_string(),
        sampled_at: at,
        lag_ms,
        row_count: u32::try_from(rows).unwrap_or(u32::MAX),
    };
    ch.insert_rows("replication_lag_v1", std::slice::from_ref(&sample)).await
}
