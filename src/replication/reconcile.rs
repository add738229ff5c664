//! Reconciliation: the scheduled `replication-reconcile` job compares
//! ClickHouse's copy with Postgres and re-copies the buckets that differ.
//!
//! Replication is at-least-once and a lost slot is healed by a full
//! backfill, so this normally finds nothing. It is the check that catches a
//! change lost any other way (a TRUNCATE, a hand edit of either store, a bug).
//!
//! Both stores digest the rows created before the cutoff and not changed
//! since (their number, the newest `updated_at` and the sum of every
//! `updated_at`, see [`digest::Digest`]). The cutoff is the table's watermark
//! less the list's overlay margin: every change before it is in the copy.
//! A row changed after it is left out on both sides, so changes still on
//! their way under load do not make a bucket differ. Three steps narrow the
//! comparison down:
//!
//! 1. per environment and month of creation, over the whole table: a few
//!    groups per environment, one scan on each side;
//! 2. per hour, within the environment-months that differ: an index range in
//!    Postgres (`*_env_created_idx`) and in ClickHouse (the sort key starts
//!    with the environment and `created_at`), so it reads only those months;
//! 3. per hour that still differs, again with the ids Postgres changed after
//!    the cutoff left out of the copy's digest as well: the copy may still
//!    hold those at an older version from before the cutoff, which step 1 and
//!    2 count on one side only. A row the copy holds changed after the cutoff
//!    that Postgres did not list was changed after Postgres was read: both
//!    are read again (a few times, then the hour counts as differing).
//!
//! Hours are the unit because a repair is a range of creation within one
//! environment, which both stores read by index: an hour holds a small part
//! of a month (re-copying whole months under load moved 170k rows for
//! nothing), while a finer grain would multiply the groups step 2 returns
//! without making the common repair smaller.
//!
//! For every hour that differs:
//!
//! 1. rows the copy holds in that hour but Postgres does not are marked
//!    deleted in ClickHouse, versioned with the current WAL position;
//! 2. the hour's rows are copied again from Postgres in chunks, each
//!    versioned with a WAL position read before its rows, so they outrank the
//!    markers and any stale copy while a live change made meanwhile outranks
//!    them. An hour too large to copy here is handed to a ranged backfill.
//!
//! A row deleted in Postgres after the cutoff whose deletion has not reached
//! ClickHouse yet still makes its hour differ (Postgres keeps no trace of
//! it). The repair then rewrites rows that were not wrong, which costs work
//! but never correctness.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::analytics::backfill::{self, BackfillRequest, DEFAULT_CHUNK_SIZE};
use crate::analytics::digest::{self, Digest, Grain, Scope};
use crate::analytics::rows::{RunRow, SessionRow};
use crate::analytics::source;
use crate::analytics::watermark::{self, Table};
use crate::analytics::{AnalyticsError, ClickHouse};
use crate::db::StoreError;
use crate::jobs::Jobs;
use crate::runs::store as run_store;
use crate::sessions::store as session_store;

/// Most environment-months one run looks into by the hour, most hours it
/// compares again with late changes left out, and most hours it repairs
/// (the next run takes the rest).
const MAX_MONTHS: usize = 24;
const MAX_HOURS: usize = 240;
const MAX_REPAIRS: usize = 48;
/// Reads of an hour's two digests before it counts as differing: a read
/// races a change that Postgres made after its read and the copy already
/// holds, which the next read sees.
const ROUNDS: usize = 3;
/// More rows changed after the cutoff in one hour than this, and the hour
/// counts as differing rather than sending their ids to ClickHouse.
const MAX_LEFT_OUT: usize = 50_000;
/// An hour with more rows than this is handed to a ranged backfill (durable
/// and chunked by jobs) instead of being copied inside this job.
const MAX_INLINE_ROWS: usize = 100_000;
/// Ids per tombstone query.
const TOMBSTONE_CHUNK: usize = 10_000;

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
    /// Postgres rows the digests covered (created before the cutoff and not
    /// changed since), and the environment-months they fell in.
    pub rows_compared: i64,
    pub months: usize,
    /// Hours looked into (within months that differed), and those that
    /// still differed with late changes left out.
    pub hours: usize,
    pub differing: usize,
    /// Rows of the copy marked deleted (Postgres no longer has them).
    pub tombstoned: usize,
    /// Rows copied again from Postgres.
    pub copied: usize,
    /// Hours repaired here, by environment and first instant.
    pub repaired: Vec<(String, DateTime<Utc>)>,
    /// Hours handed to a ranged backfill (too large to copy here), and hours
    /// left to a later run: a running backfill covers them, or this run had
    /// looked into or repaired as many as it takes.
    pub backfilled: usize,
    pub deferred: usize,
}

impl Outcome {
    /// One line for the job log, `replication_state.last_reconcile` and
    /// `sessiond replication status`.
    pub fn summary(&self, table: Table) -> String {
        format!(
            "{}: {} rows compared over {} environment-months and {} hours, {} hours differ, {} rows marked deleted, \
             {} rows copied, {} hours backfilled, {} hours deferred",
            table.as_str(),
            self.rows_compared,
            self.months,
            self.hours,
            self.differing,
            self.tombstoned,
            self.copied,
            self.backfilled,
            self.deferred
        )
    }
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
        // A new slot generation's backfill is still copying the gap: the
        // watermark runs ahead of it, and comparing now would queue repairs
        // of exactly what that backfill is about to copy.
        if crate::replication::slot::copy_incomplete(pool, table).await? {
            parts.push(format!("{}: copy healing (a new slot's backfill is running); not compared", table.as_str()));
            continue;
        }
        parts.push(match reconcile(pool, ch, jobs, table, margin).await? {
            None => format!("{}: no watermark yet", table.as_str()),
            Some(o) => o.summary(table),
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
    let ours = source::digests(pool, table, Grain::Month, None, cutoff).await?;
    let theirs = digest::digests(ch, table, Grain::Month, None, cutoff).await?;
    let mut outcome = Outcome {
        rows_compared: ours.iter().map(|d| d.rows).sum(),
        months: keys(&ours).union(&keys(&theirs)).count(),
        ..Outcome::default()
    };

    let mut hours = Vec::new();
    for (environment_id, month) in differing(&ours, &theirs).into_iter().take(MAX_MONTHS) {
        let Some((from, to)) = Grain::Month.range(month) else { continue };
        let scope = Scope { environment_id, from, to: to.min(cutoff) };
        let ours = source::digests(pool, table, Grain::Hour, Some(&scope), cutoff).await?;
        let theirs = digest::digests(ch, table, Grain::Hour, Some(&scope), cutoff).await?;
        outcome.hours += keys(&ours).union(&keys(&theirs)).count();
        hours.extend(differing(&ours, &theirs));
    }

    let mut repairs = Vec::new();
    let unchecked = hours.len().saturating_sub(MAX_HOURS);
    for (environment_id, hour) in hours.into_iter().take(MAX_HOURS) {
        let Some((from, to)) = Grain::Hour.range(hour) else { continue };
        let scope = Scope { environment_id, from, to: to.min(cutoff) };
        if differs(pool, ch, table, &scope, cutoff).await? {
            repairs.push(scope);
        }
    }
    outcome.differing = repairs.len();
    outcome.deferred = unchecked + repairs.len().saturating_sub(MAX_REPAIRS);
    for scope in repairs.into_iter().take(MAX_REPAIRS) {
        // Backfill ranges are inclusive.
        let last = scope.to - Duration::microseconds(1);
        if backfill::store::running_covers(pool, table, scope.from, last).await? {
            outcome.deferred += 1;
            continue;
        }
        repair(pool, ch, jobs, table, &scope, &mut outcome).await?;
    }
    Ok(Some(outcome))
}

/// Whether one hour differs once the rows changed after the cutoff in either
/// store are left out of both digests.
async fn differs(
    pool: &PgPool,
    ch: &ClickHouse,
    table: Table,
    scope: &Scope,
    cutoff: DateTime<Utc>,
) -> Result<bool, ReconcileError> {
    for _ in 0..ROUNDS {
        let ours = source::bucket_digest(pool, table, scope, cutoff).await?;
        if ours.changed.len() > MAX_LEFT_OUT {
            return Ok(true);
        }
        let theirs = digest::bucket_digest(ch, table, scope, cutoff, &ours.changed).await?;
        if !theirs.changed.is_empty() {
            // The copy holds a change Postgres made after it was read (or a
            // row Postgres no longer has): read both again.
            continue;
        }
        return Ok(!ours.same_rows(&theirs));
    }
    Ok(true)
}

/// Marks deleted the copy's rows in `scope` that Postgres lacks and copies
/// Postgres's rows in `scope` again.
async fn repair(
    pool: &PgPool,
    ch: &ClickHouse,
    jobs: &Jobs,
    table: Table,
    scope: &Scope,
    outcome: &mut Outcome,
) -> Result<(), ReconcileError> {
    // The copy first: a row it holds was committed in Postgres before, so
    // Postgres read after it lists the row unless it was deleted.
    let copied = digest::ids(ch, table, scope).await?;
    let present = source::ids(pool, table, scope).await?;
    outcome.tombstoned += remove_extra_rows(pool, ch, table, scope, copied, &present).await?;
    if present.len() > MAX_INLINE_ROWS {
        let last = scope.to - Duration::microseconds(1);
        let req = BackfillRequest {
            tables: vec![table],
            from: Some(scope.from),
            to: Some(last),
            chunk_size: DEFAULT_CHUNK_SIZE,
        };
        backfill::start(pool, jobs, &req).await?;
        outcome.backfilled += 1;
        return Ok(());
    }
    let env = Uuid::parse_str(&scope.environment_id).ok();
    for ids in present.chunks(DEFAULT_CHUNK_SIZE as usize) {
        outcome.copied += copy_rows(pool, ch, table, env, ids).await?;
    }
    outcome.repaired.push((scope.environment_id.clone(), scope.from));
    Ok(())
}

/// Copies rows `ids` from Postgres, versioned with the WAL position read
/// before them (as a backfill chunk is); returns how many still existed.
async fn copy_rows(
    pool: &PgPool,
    ch: &ClickHouse,
    table: Table,
    env: Option<Uuid>,
    ids: &[Uuid],
) -> Result<usize, ReconcileError> {
    let version = current_lsn(pool).await?;
    let (copy, _) = digest::copy_of(table);
    match (table, env) {
        (Table::Sessions, Some(env)) => {
            let rows = session_store::find_many(pool, env, ids).await?;
            let copied: Vec<SessionRow> = rows.iter().map(|s| SessionRow::from_session(s, version)).collect();
            ch.insert_rows(copy, &copied).await?;
            Ok(copied.len())
        }
        (Table::Runs, Some(_)) => {
            let rows = run_store::find_many(pool, ids).await?;
            let copied: Vec<RunRow> = rows.iter().map(|r| RunRow::from_run(r, version)).collect();
            ch.insert_rows(copy, &copied).await?;
            Ok(copied.len())
        }
        (_, None) => Ok(0),
    }
}

/// Marks deleted the rows of `copied` (the copy's ids in `scope`) that are
/// not in `present` (Postgres's).
async fn remove_extra_rows(
    pool: &PgPool,
    ch: &ClickHouse,
    table: Table,
    scope: &Scope,
    copied: Vec<String>,
    present: &[Uuid],
) -> Result<usize, ReconcileError> {
    let present: BTreeSet<String> = present.iter().map(|id| id.to_string()).collect();
    let extra: Vec<String> = copied.into_iter().filter(|id| !present.contains(id)).collect();
    if extra.is_empty() {
        return Ok(0);
    }
    let lsn = current_lsn(pool).await?;
    let mut marked = 0;
    for ids in extra.chunks(TOMBSTONE_CHUNK) {
        marked += digest::tombstone(ch, table, ids, scope, lsn).await?;
    }
    Ok(marked)
}

async fn current_lsn(pool: &PgPool) -> Result<u64, StoreError> {
    let mut conn = pool.acquire().await?;
    crate::sessions::store::current_wal_lsn(&mut conn).await
}

type Key = (String, i64);

fn keys(digests: &[Digest]) -> BTreeSet<Key> {
    digests.iter().map(|d| (d.environment_id.clone(), d.bucket)).collect()
}

/// The (environment, bucket) pairs whose digests differ, or that only one
/// store has.
fn differing(ours: &[Digest], theirs: &[Digest]) -> Vec<Key> {
    let index = |ds: &[Digest]| -> BTreeMap<Key, Digest> {
        ds.iter().map(|d| ((d.environment_id.clone(), d.bucket), d.clone())).collect()
    };
    let (ours, theirs) = (index(ours), index(theirs));
    let all: BTreeSet<&Key> = ours.keys().chain(theirs.keys()).collect();
    all.into_iter().filter(|k| ours.get(*k) != theirs.get(*k)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(env: &str, bucket: i64, rows: i64, newest: i64, sum: &str) -> Digest {
        Digest { environment_id: env.into(), bucket, rows, newest_update_us: newest, update_sum: sum.into() }
    }

    #[test]
    fn buckets_differ_on_any_part_of_the_digest_or_when_one_side_lacks_them() {
        let ours = vec![d("a", 202611, 3, 10, "30"), d("a", 202612, 1, 5, "5"), d("b", 202612, 2, 7, "9")];
        let theirs = vec![d("a", 202611, 3, 10, "30"), d("a", 202612, 1, 5, "4"), d("c", 202612, 1, 1, "1")];
        assert_eq!(
            differing(&ours, &theirs),
            vec![("a".to_string(), 202612), ("b".to_string(), 202612), ("c".to_string(), 202612)]
        );
        assert!(differing(&ours, &ours).is_empty());
    }

    #[test]
    fn the_summary_names_rows_compared_and_copied() {
        let o = Outcome { rows_compared: 1200, months: 2, hours: 6, differing: 1, copied: 200, ..Outcome::default() };
        assert_eq!(
            o.summary(Table::Sessions),
            "sessions: 1200 rows compared over 2 environment-months and 6 hours, 1 hours differ, \
             0 rows marked deleted, 200 rows copied, 0 hours backfilled, 0 hours deferred"
        );
    }
}
