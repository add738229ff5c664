//! The replication page: the health `sessiond replication status` prints
//! (slot, retained WAL against its bound with the 50%/80% alert, the slot's
//! generation and whether its copy is complete, lag, lease, pending and
//! failing flushes, the last flush and reconciliation) and the ClickHouse backfills with their progress; and the
//! operator's "start a backfill", audited in the backfill's transaction.

use askama::Template;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use super::auth::{Authorized, Signed};
use super::error::{DashboardError, PageResult};
use super::pages::{iso, render, Frame, PAGE_SIZE};
use super::{charts, paging, OpsSettings};
use crate::analytics::backfill::{self, Backfill};
use crate::audit::Actor;
use crate::db::paging::Keyset;
use crate::jobs::Jobs;
use crate::replication::health::{self, ReplicationHealth, WalAlert};

/// What Postgres says of the slot, as shown.
pub struct SlotView {
    pub active: bool,
    pub wal_status: String,
    pub confirmed_lsn: String,
    pub retained: String,
    pub lag: String,
    /// What may still be written before the slot is in danger.
    pub safe_wal: Option<String>,
}

/// Retained WAL against the bound, as shown.
pub struct WalView {
    /// `max_slot_wal_keep_size`, or None: unlimited.
    pub bound: Option<String>,
    /// Retained WAL as a share of the bound, in whole percent.
    pub percent: Option<i64>,
    /// `ok`, `warning` (50%), `critical` (80%), `lost` or `unbounded`.
    pub alert: &'static str,
    /// The alert's badge class.
    pub badge: &'static str,
}

/// The slot's generation and its copy, as shown.
pub struct GenerationView {
    pub generation: i64,
    pub slot_created_at: Option<String>,
    /// Tables whose copy the generation's backfill has yet to complete.
    pub incomplete: String,
}

pub struct FlushRow {
    pub id: String,
    pub created_at: String,
    pub age: String,
    pub rows: i32,
    pub job: String,
    pub attempts: i32,
    pub error: String,
}

pub struct HealthView {
    pub slot_name: String,
    pub slot: Option<SlotView>,
    pub wal: WalView,
    pub generation: Option<GenerationView>,
    pub lease: Option<u64>,
    pub pending_flushes: i64,
    pub pending_rows: i64,
    pub oldest_pending: Option<String>,
    pub flushes: Vec<FlushRow>,
    /// More are pending than listed.
    pub more_flushes: bool,
    pub last_flush_at: Option<String>,
    pub last_flush_lag: Option<String>,
    pub last_error: String,
    pub last_error_at: Option<String>,
    pub reconciled_at: Option<String>,
    pub last_reconcile: String,
}

pub struct BackfillRow {
    pub id: String,
    pub table: &'static str,
    pub range: String,
    pub chunk_size: i32,
    pub chunks_done: i32,
    pub rows_copied: i64,
    pub status: &'static str,
    pub started_at: String,
    pub finished_at: Option<String>,
}

#[derive(Template)]
#[template(path = "dashboard/replication.html")]
struct ReplicationPage {
    frame: Frame,
    health: Option<HealthView>,
    backfills: Vec<BackfillRow>,
    running: bool,
    /// A page of backfills other than the newest.
    paged: bool,
    /// The pager's links.
    newer: Option<String>,
    older: Option<String>,
}

/// The backfills list's keyset cursors (see `paging`).
#[derive(Debug, Default, serde::Deserialize)]
pub struct BackfillPage {
    #[serde(default)]
    after: String,
    #[serde(default)]
    before: String,
}

/// The page's URL starting after (older than) or before (newer than) `b`.
fn backfills_link(name: &str, b: &Backfill) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair(name, &paging::encode(&b.started_at, b.id));
    format!("/dashboard/replication?{}#backfills-title", q.finish())
}

/// Bytes as an operator reads them.
fn bytes(n: i64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn wal_view(w: &health::WalRetention) -> WalView {
    let percent = match (w.retained_bytes, w.bound_bytes) {
        (Some(r), Some(b)) if b > 0 => Some((i128::from(r) * 100 / i128::from(b)) as i64),
        _ => None,
    };
    WalView {
        bound: w.bound_bytes.map(bytes),
        percent,
        alert: w.alert.as_str(),
        badge: match w.alert {
            WalAlert::Ok => "succeeded",
            WalAlert::Warning | WalAlert::Unbounded => "queued",
            WalAlert::Critical | WalAlert::Lost => "failed",
        },
    }
}

fn health_view(h: ReplicationHealth, flushes: Vec<health::PendingFlush>) -> HealthView {
    let now = crate::clock::now();
    HealthView {
        wal: wal_view(&h.wal),
        generation: h.generation.map(|g| GenerationView {
            generation: g.generation,
            slot_created_at: g.slot_created_at.as_ref().map(iso),
            incomplete: g.incomplete.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", "),
        }),
        slot: h.slot.map(|s| SlotView {
            active: s.active,
            wal_status: s.wal_status.map(|w| w.as_str()).unwrap_or_default().to_string(),
            confirmed_lsn: s.confirmed_flush_lsn.unwrap_or_default(),
            retained: s.retained_wal_bytes.map(bytes).unwrap_or_default(),
            lag: s.lag_bytes.map(bytes).unwrap_or_default(),
            safe_wal: s.safe_wal_size.map(bytes),
        }),
        slot_name: h.slot_name,
        lease: h.lease_token,
        pending_flushes: h.pending_flushes,
        pending_rows: h.pending_rows,
        oldest_pending: h.oldest_pending_age_ms.map(charts::signed_millis_label),
        more_flushes: (flushes.len() as i64) < h.pending_flushes,
        flushes: flushes
            .into_iter()
            .map(|f| FlushRow {
                id: f.id.to_string(),
                created_at: iso(&f.created_at),
                age: charts::signed_millis_label((now - f.created_at).num_milliseconds()),
                rows: f.row_count,
                job: f.job_id.to_string(),
                attempts: f.attempts.unwrap_or_default(),
                error: f.last_error.unwrap_or_default(),
            })
            .collect(),
        last_flush_at: h.last_flush_at.as_ref().map(iso),
        last_flush_lag: h.last_flush_lag_ms.map(charts::signed_millis_label),
        last_error: h.last_error.unwrap_or_default(),
        last_error_at: h.last_error_at.as_ref().map(iso),
        reconciled_at: h.reconciled_at.as_ref().map(iso),
        last_reconcile: h.last_reconcile.unwrap_or_default(),
    }
}

fn backfill_row(b: &Backfill) -> BackfillRow {
    let range = match (b.created_from, b.created_to) {
        (None, None) => "every row".to_string(),
        (from, to) => format!(
            "created {} … {}",
            from.as_ref().map_or("the start".into(), iso),
            to.as_ref().map_or("now".into(), iso)
        ),
    };
    BackfillRow {
        id: b.id.to_string(),
        table: b.target.as_str(),
        range,
        chunk_size: b.chunk_size,
        chunks_done: b.chunks_done,
        rows_copied: b.rows_copied,
        status: b.status.as_str(),
        started_at: iso(&b.started_at),
        finished_at: b.completed_at.as_ref().map(iso),
    }
}

pub async fn show(
    State(db): State<PgPool>,
    State(redis): State<ConnectionManager>,
    State(ops): State<OpsSettings>,
    signed: Signed,
    Query(p): Query<BackfillPage>,
) -> PageResult<Response> {
    let at = paging::keyset(&p.after, &p.before)?;
    let health = match &ops.replication {
        Some(target) => {
            let h = health::status(&db, &redis, &target.redis_prefix, &target.slot)
                .await
                .map_err(|e| DashboardError::Internal(e.into()))?;
            let flushes = health::pending_flushes(&db, &target.slot, PAGE_SIZE as i64).await?;
            Some(health_view(h, flushes))
        }
        None => None,
    };
    let backfills = backfill::store::page(&db, at, PAGE_SIZE as i64 + 1).await?;
    let (backfills, more_older, more_newer) = at.arrange(backfills, PAGE_SIZE);
    // Of every backfill, not only this page's.
    let running = backfill::store::any_running(&db).await?;
    render(ReplicationPage {
        frame: Frame::new(&signed, "replication"),
        health,
        running,
        paged: at != Keyset::Newest,
        newer: backfills.first().filter(|_| more_newer).map(|b| backfills_link("before", b)),
        older: backfills.last().filter(|_| more_older).map(|b| backfills_link("after", b)),
        backfills: backfills.iter().map(backfill_row).collect(),
    })
}

/// Starts a full backfill of both tables, as `sessiond clickhouse backfill`
/// does (one [`backfill::start_by`]): the backfills, their first chunks' jobs
/// and the audit row commit together; the jobs are queued after the commit.
pub async fn start_backfill(
    State(db): State<PgPool>,
    State(jobs): State<Jobs>,
    Authorized(signed): Authorized,
) -> PageResult<Response> {
    let by = Actor::Operator(signed.operator.id);
    let backfills = backfill::start_by(&db, &jobs, &by, &backfill::full()).await?;
    let ids: Vec<String> = backfills.iter().map(|b| b.id.to_string()).collect();
    tracing::info!(operator = %signed.operator.email, ?ids, "operator started a backfill");
    Ok(Redirect::to("/dashboard/replication").into_response())
}
