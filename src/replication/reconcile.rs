//! Reconciliation: the scheduled `replication-reconcile` job compares
//! ClickHouse's copy with Postgres and repairs the ranges that differ.
//!
//! Replication is at-least-once and a lost slot is healed by a full
//! backfill, so this normally finds nothing. It is the check that catches a
//! change lost any other way (a TRUNCATE, a hand edit of either store, a bug).
//!
//! Per table, both stores digest the rows created before the cutoff per
//! environment and month of creation (the partition): their number, the
//! newest `updated_at` and the sum of every `updated_at` (see
//! [`digest::Digest`]). The cutoff is the table's watermark less the list's
//! overlay margin, so changes still on their way count as little as possible.
//! For every month whose digest differs:
//!
//! 1. rows the copy holds in that month but Postgres does not are marked
//!    deleted in ClickHouse, versioned with the current WAL position;
//! 2. the month is backfilled (unless a running backfill covers it). Its
//!    chunks read a later WAL position, so their rows outrank both the
//!    markers and any stale copy.
//!
//! A digest can also differ because of a change committed after the cutoff
//! whose new version has not reached ClickHouse yet (an update to an old
//! row). The repair then rewrites rows that were not wrong, which costs work
//! but never correctness.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::analytics::backfill::{self, BackfillRequest, DEFAULT_CHUNK_SIZE};
use crate::analytics::digest::{self, Digest};
use crate::analytics::watermark::{self, Table};
use crate::analytics::{AnalyticsError, ClickHouse};
use crate::db::{self, StoreError};
use crate::jobs::Jobs;

/// Most months one run repairs (the next run takes the rest).
const MAX_REPAIRS: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Analytics(#[from] AnalyticsError),
}

/// What one table's reconciliation found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Environment-months compared, and those that differed.
    pub compared: usize,
    pub differing: usize,
    /// Rows of the copy marked deleted (Postgres no longer has them).
    pub tombstoned: usize,
    /// Months backfilled (each a ranged backfill), by their first day.
    pub backfilled: Vec<DateTime<Utc>>,
}

/// Reconciles both tables; returns a summary for the job log and health.
pub async fn run(
    pool: &PgPool,
    ch: &ClickHouse,
    jobs: &Jobs,
    margin: std::time::Duration,
) -> Result<String, ReconcileError> {
    let mut parts = Vec::new();
    for table in [Table::Sessions, Table::Runs] {
        parts.push(match reconcile(pool, ch, jobs, table, margin).await? {
            None => format!("{}: no watermark yet", table.as_str()),
            Some(o) => format!(
                "{}: {} of {} months differ, {} rows marked deleted, {} months backfilled",
                table.as_str(),
                o.differing,
                o.compared,
                o.tombstoned,
                o.backfilled.len()
            ),
        });
    }
    Ok(parts.join("; "))
}

/// Reconciles one table. None while no watermark vouches for the copy (a
/// first backfill has not finished: there is nothing to compare yet).
pub async fn reconcile(
    pool: &PgPool,
    ch: &ClickHouse,
    jobs: &Jobs,
    table: Table,
    margin: std::time::Duration,
) -> Result<Option<Outcome>, ReconcileError> {
    let Some(mark) = watermark::read(ch, table).await? else { return Ok(None) };
    let cutoff = mark - Duration::from_std(margin).unwrap_or_else(|_| Duration::zero());
    let pg_table = pg_table(table);
    let ours = db::created_digests(pool, pg_table, cutoff).await?;
    let theirs = digest::digests(ch, table, cutoff).await?;
    let differing = differing(&ours, &theirs);
    let mut outcome = Outcome {
        compared: keys(&ours).union(&keys(&theirs)).count(),
        differing: differing.len(),
        ..Outcome::default()
    };
    let mut months = BTreeSet::new();
    for (environment, month) in differing.into_iter().take(MAX_REPAIRS) {
        let Some((from, to)) = month_range(month) else { continue };
        let to = to.min(cutoff);
        outcome.tombstoned += remove_extra_rows(pool, ch, table, &environment, from, to).await?;
        months.insert(from);
    }
    for from in months {
        let Some((_, next)) = month_range(yyyymm(from)) else { continue };
        // Backfill ranges are inclusive.
        let to = next - Duration::microseconds(1);
        if backfill::store::running_covers(pool, table, from, to).await? {
            continue;
        }
        let req =
            BackfillRequest { tables: vec![table], from: Some(from), to: Some(to), chunk_size: DEFAULT_CHUNK_SIZE };
        backfill::start(pool, jobs, &req).await?;
        outcome.backfilled.push(from);
    }
    Ok(Some(outcome))
}

/// Marks deleted the copy's rows of one environment created in [`from`,
/// `to`) that Postgres does not have.
async fn remove_extra_rows(
    pool: &PgPool,
    ch: &ClickHouse,
    table: Table,
    environment: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<usize, ReconcileError> {
    let copied = digest::ids(ch, table, environment, from, to).await?;
    if copied.is_empty() {
        return Ok(0);
    }
    // An environment id that is not a uuid has no rows in Postgres at all.
    let present: BTreeSet<String> = match Uuid::parse_str(environment) {
        Ok(env) => {
            db::created_ids(pool, pg_table(table), env, from, to).await?.into_iter().map(|id| id.to_string()).collect()
        }
        Err(_) => BTreeSet::new(),
    };
    let extra: Vec<String> = copied.into_iter().filter(|id| !present.contains(id)).collect();
    if extra.is_empty() {
        return Ok(0);
    }
    let lsn = current_lsn(pool).await?;
    Ok(digest::tombstone(ch, table, &extra, environment, from, to, lsn).await?)
}

async fn current_lsn(pool: &PgPool) -> Result<u64, StoreError> {
    let mut conn = pool.acquire().await?;
    crate::sessions::store::current_wal_lsn(&mut conn).await
}

fn pg_table(table: Table) -> &'static str {
    match table {
        Table::Sessions => "sessions",
        Table::Runs => "task_runs",
    }
}

type Key = (String, i32);

fn keys(digests: &[Digest]) -> BTreeSet<Key> {
    digests.iter().map(|d| (d.environment_id.clone(), d.month)).collect()
}

/// The (environment, month) pairs whose digests differ, or that only one
/// store has.
fn differing(ours: &[Digest], theirs: &[Digest]) -> Vec<Key> {
    let index = |ds: &[Digest]| -> BTreeMap<Key, Digest> {
        ds.iter().map(|d| ((d.environment_id.clone(), d.month), d.clone())).collect()
    };
    let (ours, theirs) = (index(ours), index(theirs));
    let all: BTreeSet<&Key> = ours.keys().chain(theirs.keys()).collect();
    all.into_iter().filter(|k| ours.get(*k) != theirs.get(*k)).cloned().collect()
}

/// The first instant of month `YYYYMM` and of the month after it.
fn month_range(yyyymm: i32) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let (year, month) = (yyyymm / 100, (yyyymm % 100) as u32);
    let start = Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).single()?;
    let (ny, nm) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    let next = Utc.with_ymd_and_hms(ny, nm, 1, 0, 0, 0).single()?;
    Some((start, next))
}

fn yyyymm(t: DateTime<Utc>) -> i32 {
    t.year() * 100 + t.month() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(env: &str, month: i32, rows: i64, newest: i64, sum: &str) -> Digest {
        Digest { environment_id: env.into(), month, rows, newest_update_us: newest, update_sum: sum.into() }
    }

    #[test]
    fn months_differ_on_any_part_of_the_digest_or_when_one_side_lacks_them() {
        let ours = vec![d("a", 202611, 3, 10, "30"), d("a", 202612, 1, 5, "5"), d("b", 202612, 2, 7, "9")];
        let theirs = vec![d("a", 202611, 3, 10, "30"), d("a", 202612, 1, 5, "4"), d("c", 202612, 1, 1, "1")];
        assert_eq!(
            differing(&ours, &theirs),
            vec![("a".to_string(), 202612), ("b".to_string(), 202612), ("c".to_string(), 202612)]
        );
        assert!(differing(&ours, &ours).is_empty());
    }

    #[test]
    fn month_ranges_cover_whole_months_and_roll_over_the_year() {
        let (from, to) = month_range(202612).unwrap();
        assert_eq!(from, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        assert_eq!(to, Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap());
        assert_eq!(yyyymm(from), 202612);
        assert_eq!(month_range(202613), None);
        assert_eq!(month_range(202600), None);
    }
}
