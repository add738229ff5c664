//! What the copy holds, summed up per environment and period of creation, so
//! that it can be compared with Postgres without moving rows (see
//! `replication::reconcile`), and the reads and writes that repair a bucket
//! found to differ.

use chrono::{DateTime, TimeZone, Utc};
use clickhouse::Row;
use serde::Deserialize;

use super::rows::{RunRow, SessionRow, Versioned};
use super::watermark::Table;
use super::{ch_time, AnalyticsError, ClickHouse};

/// How finely a digest groups rows by creation. Months find the differing
/// part of a table in one scan with few groups (the table's partition in
/// ClickHouse); hours within a month that differs are what gets repaired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// `YYYYMM` of `created_at` in UTC.
    Month,
    /// Whole hours since the epoch of `created_at`.
    Hour,
}

impl Grain {
    /// The bucket of a row, over ClickHouse's `created_at`.
    fn clickhouse_key(self) -> &'static str {
        match self {
            Grain::Month => "toInt64(toYYYYMM(created_at, 'UTC'))",
            Grain::Hour => "toInt64(intDiv(toUnixTimestamp64Micro(created_at), 3600000000))",
        }
    }

    /// The same bucket over Postgres's `created_at` (for [`super::source`]).
    pub fn postgres_key(self) -> &'static str {
        match self {
            Grain::Month => {
                "(extract(year FROM created_at AT TIME ZONE 'UTC') * 100
                  + extract(month FROM created_at AT TIME ZONE 'UTC'))::bigint"
            }
            Grain::Hour => "floor(extract(epoch FROM created_at) / 3600)::bigint",
        }
    }

    /// The first instant of bucket `key` and of the bucket after it.
    pub fn range(self, key: i64) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        match self {
            Grain::Month => {
                let (year, month) = (i32::try_from(key / 100).ok()?, u32::try_from(key % 100).ok()?);
                let start = Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).single()?;
                let (ny, nm) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
                let next = Utc.with_ymd_and_hms(ny, nm, 1, 0, 0, 0).single()?;
                Some((start, next))
            }
            Grain::Hour => {
                let start = Utc.timestamp_opt(key.checked_mul(3600)?, 0).single()?;
                Some((start, start + chrono::Duration::hours(1)))
            }
        }
    }
}

/// One environment's rows created in one bucket before a cutoff and not
/// changed since. Postgres and ClickHouse compute the same digest over the
/// same rows.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize, sqlx::FromRow)]
pub struct Digest {
    pub environment_id: String,
    /// The bucket's key at the digest's [`Grain`].
    pub bucket: i64,
    pub rows: i64,
    /// The newest `updated_at`, in µs since the epoch (0 if none).
    pub newest_update_us: i64,
    /// The sum of every `updated_at` (µs), in decimal. The newest alone
    /// misses a lost change to any row but the newest; the sum moves with
    /// every row's.
    pub update_sum: String,
}

/// One environment's rows created in [`from`, `to`).
#[derive(Debug, Clone)]
pub struct Scope {
    pub environment_id: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// One bucket's digest with some rows left out, and the ids of rows changed
/// after the cutoff: in Postgres, all of them; in the copy, those the caller
/// did not already leave out (see `replication::reconcile`).
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize, sqlx::FromRow)]
pub struct BucketDigest {
    pub rows: i64,
    pub newest_update_us: i64,
    pub update_sum: String,
    pub changed: Vec<String>,
}

impl BucketDigest {
    /// Whether two digests cover the same rows at the same versions.
    pub fn same_rows(&self, other: &BucketDigest) -> bool {
        (self.rows, self.newest_update_us, &self.update_sum) == (other.rows, other.newest_update_us, &other.update_sum)
    }
}

/// The ClickHouse table copying `table`, and its id column.
pub fn copy_of(table: Table) -> (&'static str, &'static str) {
    match table {
        Table::Sessions => ("sessions_v1", "session_id"),
        Table::Runs => ("task_runs_v1", "run_id"),
    }
}

/// The copy's digests at `grain` of the rows created before `cutoff` (within
/// `scope` if given) and not changed since, every version merged (FINAL),
/// deleted rows left out. The cutoff filters through `-If` combinators rather
/// than WHERE, so it reads each row's merged version, never an older one.
pub async fn digests(
    ch: &ClickHouse,
    table: Table,
    grain: Grain,
    scope: Option<&Scope>,
    cutoff: DateTime<Utc>,
) -> Result<Vec<Digest>, AnalyticsError> {
    let (copy, _) = copy_of(table);
    let key = grain.clickhouse_key();
    let within = if scope.is_some() {
        " AND environment_id = {env:String}
          AND created_at >= {from:DateTime64(6, 'UTC')} AND created_at < {to:DateTime64(6, 'UTC')}"
    } else {
        ""
    };
    let sql = format!(
        "SELECT environment_id, {key} AS bucket, toInt64(countIf(fresh)) AS rows,
                toUnixTimestamp64Micro(maxIf(updated_at, fresh)) AS newest_update_us,
                toString(sumIf(toInt128(toUnixTimestamp64Micro(updated_at)), fresh)) AS update_sum
         FROM (SELECT environment_id, created_at, updated_at, updated_at < {{cutoff:DateTime64(6, 'UTC')}} AS fresh
               FROM {copy} FINAL WHERE created_at < {{cutoff:DateTime64(6, 'UTC')}}{within})
         GROUP BY environment_id, bucket HAVING rows > 0 ORDER BY environment_id, bucket"
    );
    let mut query = ch.client().query(&sql).param("cutoff", ch_time(cutoff));
    if let Some(s) = scope {
        query = query.param("env", &s.environment_id).param("from", ch_time(s.from)).param("to", ch_time(s.to));
    }
    ch.write(query.fetch_all()).await
}

/// The copy's digest of one bucket's rows created before `cutoff` and not
/// changed since, leaving out the rows `left_out` names (those Postgres
/// changed after the cutoff: the copy may hold them at an older version, not
/// yet replaced). `changed` lists the copy's rows changed after the cutoff
/// that `left_out` does not name. The ids go in the query's text, not its
/// URL, since there may be thousands.
pub async fn bucket_digest(
    ch: &ClickHouse,
    table: Table,
    scope: &Scope,
    cutoff: DateTime<Utc>,
    left_out: &[String],
) -> Result<BucketDigest, AnalyticsError> {
    let (copy, id) = copy_of(table);
    let sql = format!(
        "SELECT toInt64(countIf(fresh)) AS rows,
                toUnixTimestamp64Micro(maxIf(updated_at, fresh)) AS newest_update_us,
                toString(sumIf(toInt128(toUnixTimestamp64Micro(updated_at)), fresh)) AS update_sum,
                groupArrayIf(id, NOT fresh AND NOT left_out) AS changed
         FROM (SELECT {id} AS id, updated_at, {id} IN ? AS left_out,
                      updated_at < {{cutoff:DateTime64(6, 'UTC')}} AND NOT left_out AS fresh
               FROM {copy} FINAL WHERE environment_id = {{env:String}}
                 AND created_at >= {{from:DateTime64(6, 'UTC')}} AND created_at < {{to:DateTime64(6, 'UTC')}})"
    );
    let query = ch
        .client()
        .query(&sql)
        .bind(left_out)
        .param("cutoff", ch_time(cutoff))
        .param("env", &scope.environment_id)
        .param("from", ch_time(scope.from))
        .param("to", ch_time(scope.to))
        .with_option("max_query_size", MAX_QUERY_BYTES.to_string());
    ch.write(query.fetch_one()).await
}

/// Room for the ids [`bucket_digest`] leaves out (`replication::reconcile`
/// bounds how many: about 40 bytes each).
const MAX_QUERY_BYTES: usize = 4 << 20;

/// Ids of the copy's rows in `scope`.
pub async fn ids(ch: &ClickHouse, table: Table, scope: &Scope) -> Result<Vec<String>, AnalyticsError> {
    let (copy, id) = copy_of(table);
    let sql = format!(
        "SELECT {id} FROM {copy} FINAL WHERE environment_id = {{env:String}}
           AND created_at >= {{from:DateTime64(6, 'UTC')}} AND created_at < {{to:DateTime64(6, 'UTC')}}"
    );
    let query = ch
        .client()
        .query(&sql)
        .param("env", &scope.environment_id)
        .param("from", ch_time(scope.from))
        .param("to", ch_time(scope.to));
    ch.write(query.fetch_all()).await
}

/// Marks rows of the copy deleted (`_is_deleted = 1`) at `version`: rows in
/// `scope` that Postgres no longer has. Bounded by creation too, because a
/// row whose `created_at` changed has a copy under each sort key, and only
/// the one in this range is stale. Returns how many were found to mark.
pub async fn tombstone(
    ch: &ClickHouse,
    table: Table,
    ids: &[String],
    scope: &Scope,
    version: u64,
) -> Result<usize, AnalyticsError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let (copy, id) = copy_of(table);
    let sql = format!(
        "SELECT ?fields FROM {copy} FINAL WHERE {id} IN ? AND environment_id = {{env:String}}
           AND created_at >= {{from:DateTime64(6, 'UTC')}} AND created_at < {{to:DateTime64(6, 'UTC')}}"
    );
    let query = ch
        .client()
        .query(&sql)
        .bind(ids)
        .param("env", &scope.environment_id)
        .param("from", ch_time(scope.from))
        .param("to", ch_time(scope.to))
        .with_option("max_query_size", MAX_QUERY_BYTES.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_ranges_cover_whole_months_and_roll_over_the_year() {
        let (from, to) = Grain::Month.range(202612).unwrap();
        assert_eq!(from, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        assert_eq!(to, Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap());
        assert_eq!(Grain::Month.range(202613), None);
        assert_eq!(Grain::Month.range(202600), None);
    }

    #[test]
    fn hour_ranges_are_whole_hours_since_the_epoch() {
        let at = Utc.with_ymd_and_hms(2026, 12, 7, 4, 0, 0).unwrap();
        let (from, to) = Grain::Hour.range(at.timestamp() / 3600).unwrap();
        assert_eq!((from, to), (at, at + chrono::Duration::hours(1)));
        assert_eq!(Grain::Hour.range(i64::MAX), None);
    }
}
