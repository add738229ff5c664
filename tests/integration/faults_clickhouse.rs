//! Fault cases on ClickHouse's side of replication, each under a load of
//! acknowledged creates and each printing one `FAULT <case>: ...` line of
//! figures: ClickHouse killed (SIGKILL) and restarted, and rows deleted from
//! the copy behind replication's back. Each ends with the copy equal to
//! Postgres row by row, no job stranded and no list answer missing an
//! acknowledged session.

use std::time::{Duration, Instant};

use sessiond::jobs::JobKind;

use crate::common::clickhouse::PrivateClickHouse;
use crate::common::faults::{assert_copy_equal, list_check, phase, report, stuck_jobs, CreateLoad};
use crate::common::{schedules_file, TestApp};
use crate::reconcile::{figure, seed_hours, seeded_ids, seeds_copied, UpdateLoad, PER_HOUR};
use crate::replication::{finish, ready, settled};

async fn pending_flushes(app: &TestApp) -> i64 {
    let slot = app.state.config.replication_slot_name();
    let h = sessiond::replication::health::status(app.db(), &app.state.redis, &app.state.config.redis_prefix, &slot)
        .await
        .unwrap();
    h.pending_flushes
}

/// ClickHouse is killed with SIGKILL for 15 s while sessions are created:
/// lists answer from Postgres meanwhile and miss nothing, the flushes wait,
/// and after ClickHouse restarts they all land and the copy is equal.
#[tokio::test]
async fn clickhouse_killed_under_load() {
    let began = Instant::now();
    let mut private = PrivateClickHouse::start().await;
    let url = private.url();
    let app = ready(move |c| c.clickhouse_url = url).await;
    let load = CreateLoad::start(&app.base, &app.a.key, 40, "ch-killed");
    tokio::time::sleep(phase(3.0)).await;

    private.kill9();
    let killed = Instant::now();
    let (mut checks, mut wrong, mut from_postgres, mut most_pending) = (0, 0, 0, 0);
    while killed.elapsed() < phase(15.0) {
        let expected = load.acked();
        let check = list_check(&app, &app.a.key, &expected).await;
        checks += 1;
        wrong += usize::from(check.wrong());
        from_postgres += usize::from(check.source == "postgres");
        most_pending = most_pending.max(pending_flushes(&app).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let outage = killed.elapsed();
    private.restart().await;
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, refused) = load.stop().await;
    // The backlog grows with the outage (and its flushes sit out retry
    // backoffs of up to 30 s): the soak variant's is ten times as long.
    settled_within(&app, 40 + outage.as_secs()).await;
    let catch_up = restarted.elapsed();
    let last = list_check(&app, &app.a.key, &acked).await;
    wrong += usize::from(last.wrong());
    let copy = assert_copy_equal(&app.state, 30).await;
    let stuck = stuck_jobs(app.db(), 30).await;
    report(
        "ClickHouse killed under load",
        &[
            ("outage_s", format!("{:.1}", outage.as_secs_f64())),
            ("creates_acked", acked.len().to_string()),
            ("creates_refused", refused.to_string()),
            ("flushes_pending_max", most_pending.to_string()),
            ("catch_up_s", format!("{:.1}", catch_up.as_secs_f64())),
            ("list_checks", checks.to_string()),
            ("lists_from_postgres", from_postgres.to_string()),
            ("wrong_lists", wrong.to_string()),
            ("copy_sessions", copy.sessions.to_string()),
            ("copy_runs", copy.runs.to_string()),
            ("stuck_jobs", stuck.to_string()),
            ("total_s", format!("{:.1}", began.elapsed().as_secs_f64())),
        ],
    );
    assert!(most_pending > 0, "no flush waited for ClickHouse");
    assert_eq!(wrong, 0, "list answers missed acknowledged sessions");
    assert_eq!(stuck, 0, "jobs stranded");
    assert_eq!(last.missing, 0);
    finish(app).await;
}

/// Waits up to `secs` for replication to settle ([`settled`] waits 20 s, too
/// short for a backlog).
async fn settled_within(app: &TestApp, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while pending_flushes(app).await > 0 {
        assert!(Instant::now() < deadline, "the backlog did not drain in {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settled(app).await;
}

/// Rows deleted from the copy with a mutation while sessions are created and
/// updated: one reconciliation finds them and copies their hour again, not
/// their month.
#[tokio::test]
async fn rows_deleted_in_clickhouse() {
    let began = Instant::now();
    let app = ready(|c| c.job_schedules_file = Some(schedules_file(&[]))).await;
    let hours = [1, 2, 3, 4];
    seed_hours(&app, &hours).await;
    seeds_copied(&app).await;
    let lost: Vec<String> = seeded_ids(&app, 3).await.into_iter().take(25).collect();
    // The updates leave the lost rows alone: an update would bring one back.
    let others: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM sessions WHERE NOT (id::text = ANY($1))")
        .bind(&lost)
        .fetch_all(app.db())
        .await
        .unwrap();
    let creates = CreateLoad::start(&app.base, &app.a.key, 30, "ch-deleted");
    let updates = UpdateLoad::start(app.db().clone(), others, 60);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let sql = format!(
        "ALTER TABLE sessions_v1 DELETE WHERE session_id IN ({})",
        lost.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(", ")
    );
    app.state.analytics.client().query(&sql).with_option("mutations_sync", "2").execute().await.unwrap();
    let took = Instant::now();
    let summary = app.sweep(JobKind::ReplicationReconcile).await;
    let took = took.elapsed();
    let (compared, copied) =
        (figure(&summary, "sessions", "rows compared"), figure(&summary, "sessions", "rows copied"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(updates);
    let (acked, _) = creates.stop().await;
    settled(&app).await;
    let wrong = usize::from(list_check(&app, &app.a.key, &acked).await.wrong());
    let copy = assert_copy_equal(&app.state, 30).await;
    let stuck = stuck_jobs(app.db(), 30).await;
    report(
        "rows deleted in ClickHouse",
        &[
            ("rows_deleted", lost.len().to_string()),
            ("rows_compared", compared.to_string()),
            ("hours_differ", figure(&summary, "sessions", "hours differ").to_string()),
            ("rows_copied", copied.to_string()),
            ("month_rows", (hours.len() as i64 * PER_HOUR).to_string()),
            ("reconcile_ms", took.as_millis().to_string()),
            ("wrong_lists", wrong.to_string()),
            ("copy_sessions", copy.sessions.to_string()),
            ("stuck_jobs", stuck.to_string()),
            ("total_s", format!("{:.1}", began.elapsed().as_secs_f64())),
        ],
    );
    // Rows changed after the cutoff (the updates on their way) are left out.
    assert!(compared >= hours.len() as i64 * PER_HOUR / 2, "{summary}");
    assert!((PER_HOUR..2 * PER_HOUR).contains(&copied), "the hour, not the month, is copied: {summary}");
    assert_eq!(wrong, 0);
    assert_eq!(stuck, 0);
    finish(app).await;
}
