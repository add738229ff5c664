//! What the copy holds, summed up per environment and month of creation, so
//! that it can be compared with Postgres without moving rows (see
//! `replication::reconcile`), and the reads and writes that repair a month
//! found to differ.

use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::Deserialize;

use super::rows::{RunRow, SessionRow, Versioned};
use super::watermark::Table;
use super::{ch_time, AnalyticsError, ClickHouse};

/// One environment's rows created in one month (before a cutoff). Postgres
/// and ClickHouse compute the same digest over the same rows.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize, sqlx::FromRow)]
pub struct Digest {
    pub environment_id: String,
    /// `YYYYMM` of `created_at` in UTC.
    pub month: i32,
    pub rows: i64,
    /// The newest `updated_at` before the cutoff, in µs since the epoch (0 if none).
    pub newest_update_us: i64,
    /// The sum of every `updated_at` before the cutoff (µs), in decimal. The
    /// newest alone misses a lost change to any row but the newest; the sum
    /// moves with every row's.
    pub update_sum: String,
}

/// The ClickHouse table copying `table`, and its id column.
pub fn copy_of(table: Table) -> (&'static str, &'static str) {
    match table {
        Table::Sessions => ("sessions_v1", "session_id"),
        Table::Runs => ("task_runs_v1", "run_id"),
    }
}

/// The copy's digests of the rows created before `cutoff`, every version
/// merged (FINAL), deleted rows left out.
pub async fn digests(ch: &ClickHouse, table: Table, cutoff: DateTime<Utc>) -> Result<Vec<Digest>, AnalyticsError> {
    let (copy, _) = copy_of(table);
    let sql = format!(
        "SELECT environment_id, toInt32(toYYYYMM(created_at, 'UTC')) AS month, toInt64(count()) AS rows,
                toUnixTimestamp64Micro(maxIf(updated_at, updated_at < {{cutoff:DateTime64(6, 'UTC')}})) AS newest_update_us,
                toString(sumIf(toInt128(toUnixTimestamp64Micro(updated_at)), updated_at < {{cutoff:DateTime64(6, 'UTC')}})) AS update_sum
         FROM {copy} FINAL WHERE created_at < {{cutoff:DateTime64(6, 'UTC')}}
         GROUP BY environment_id, month ORDER BY environment_id, month"
    );
    ch.write(ch.client().query(&sql).param("cutoff", ch_time(cutoff)).fetch_all()).await
}

/// Ids of the copy's rows of one environment created in [`from`, `to`).
pub async fn ids(
    ch: &ClickHouse,
    table: Table,
    environment_id: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<String>, AnalyticsError> {
    let (copy, id) = copy_of(table);
    let sql = format!(
        "SELECT {id} FROM {copy} FINAL WHERE environment_id = {{env:String}}
           AND created_at >= {{from:DateTime64(6, 'UTC')}} AND created_at < {{to:DateTime64(6, 'UTC')}}"
    );
    let query =
        ch.client().query(&sql).param("env", environment_id).param("from", ch_time(from)).param("to", ch_time(to));
    ch.write(query.fetch_all()).await
}

/// Marks rows of the copy deleted (`_is_deleted = 1`) at `version`: rows of
/// one environment created in [`from`, `to`) that Postgres no longer has.
/// Bounded by creation too, because a row whose `created_at` changed has a
/// copy under each sort key, and only the one in this range is stale. Returns
/// how many were found to mark.
pub async fn tombstone(
    ch: &ClickHouse,
    table: Table,
    ids: &[String],
    environment_id: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    version: u64,
) -> Result<usize, AnalyticsError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let (copy, id) = copy_of(table);
    let sql = format!(
        "SELECT ?fields FROM {copy} FINAL WHERE {id} IN {{ids:Array(String)}} AND environment_id = {{env:String}}
           AND created_at >= {{from:DateTime64(6, 'UTC')}} AND created_at < {{to:DateTime64(6, 'UTC')}}"
    );
    let query = ch
        .client()
        .query(&sql)
        .param("ids", ids)
        .param("env", environment_id)
        .param("from", ch_time(from))
        .param("to", ch_time(to));
    match table {
        Table::Sessions => mark_deleted::<SessionRow>(ch, copy, query, version).await,
        Table::Runs => mark_deleted::<RunRow>(ch, copy, query, version).await,
    }
}

async fn mark_deleted<T: Versioned>(
    ch: &ClickHouse,
    copy: &str,
    query: clickhouse::query::Query,
    version: u64,
) -> Result<usize, AnalyticsError> {
    let mut rows: Vec<T> = ch.write(query.fetch_all()).await?;
    for row in &mut rows {
        row.tombstone(version);
    }
    ch.insert_rows(copy, &rows).await?;
    Ok(rows.len())
}
