//! Reconciliation of ClickHouse's copy with Postgres (`replication::reconcile`)
//! on real Postgres and the ClickHouse dev server, through each test's own
//! replication slot: an equal copy under a load of updates re-copies nothing,
//! and a damaged hour is repaired by re-copying that hour only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sessiond::analytics::rows::SessionRow;
use sessiond::jobs::JobKind;

use crate::common::{eventually, schedules_file, TestApp};
use crate::replication::{finish, ready, settled};

/// Rows each seeded hour holds.
pub const PER_HOUR: i64 = 150;

/// Writes [`PER_HOUR`] sessions into environment A with SQL for each of the
/// hours `hours_ago` (0 is the current hour), created and last changed ten
/// minutes into that hour, a second apart; they replicate as any insert.
pub async fn seed_hours(app: &TestApp, hours_ago: &[i32]) {
    let env = &app.a.env;
    for &k in hours_ago {
        sqlx::query(
            "INSERT INTO sessions (id, friendly_id, type, task_identifier, trigger_config, tags, metadata,
                 organization_id, project_id, runtime_environment_id, environment_type, created_at, updated_at)
             SELECT gen_random_uuid(), 'session_h' || $4 || '_' || i, 'chat.agent', 'echo-agent', '{}'::jsonb,
                 ARRAY['seed'], jsonb_build_object('i', i), $1, $2, $3, 'DEVELOPMENT', t, t
             FROM generate_series(1, $5) i,
                  LATERAL (SELECT least(date_trunc('hour', now()) - make_interval(hours => $4)
                                        + interval '10 minutes' + i * interval '1 second',
                                        now() - interval '1 minute') AS t) at",
        )
        .bind(env.organization_id)
        .bind(env.project_id)
        .bind(env.id)
        .bind(k)
        .bind(PER_HOUR as i32)
        .execute(app.db())
        .await
        .unwrap();
    }
}

/// Waits until the copy holds as many sessions as Postgres, then for
/// replication to settle. Seeded rows are older than the watermark, so
/// [`settled`] alone does not wait for them.
pub async fn seeds_copied(app: &TestApp) {
    eventually(20, "the seeded sessions to replicate", || async {
        let pg: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions").fetch_one(app.db()).await.unwrap();
        let ch: u64 =
            app.state.analytics.client().query("SELECT count() FROM sessions_v1 FINAL").fetch_one().await.unwrap();
        (ch == pg as u64).then_some(())
    })
    .await;
    settled(app).await;
}

/// The ids of the sessions seeded `hours_ago`.
pub async fn seeded_ids(app: &TestApp, hours_ago: i32) -> Vec<String> {
    sqlx::query_scalar("SELECT id::text FROM sessions WHERE friendly_id LIKE 'session_h' || $1 || '\\_%' ORDER BY id")
        .bind(hours_ago)
        .fetch_all(app.db())
        .await
        .unwrap()
}

/// A figure of one table's part of a reconciliation summary, e.g.
/// `figure(s, "sessions", "rows copied")`.
pub fn figure(summary: &str, table: &str, name: &str) -> i64 {
    let part = summary
        .split("; ")
        .find(|p| p.starts_with(&format!("{table}:")))
        .unwrap_or_else(|| panic!("no {table} part in {summary:?}"));
    let at = part.find(&format!(" {name}")).unwrap_or_else(|| panic!("no {name:?} in {part:?}"));
    let number = part[..at].rsplit([' ', ':']).next().unwrap();
    number.parse().unwrap_or_else(|_| panic!("{name:?} in {part:?} is not a number"))
}

/// Ranged backfills written so far (a reconciliation used to queue one per
/// month that differed).
pub async fn ranged_backfills(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM clickhouse_backfills WHERE created_from IS NOT NULL")
        .fetch_one(app.db())
        .await
        .unwrap()
}

/// Updates random sessions of `ids` in the background, about `per_sec` a
/// second, as the API's updates do (`updated_at = now()`), until dropped.
pub struct UpdateLoad {
    pub updates: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl UpdateLoad {
    pub fn start(db: sqlx::PgPool, ids: Vec<uuid::Uuid>, per_sec: u32) -> UpdateLoad {
        let updates = Arc::new(AtomicU64::new(0));
        let counter = updates.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1))));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                n += 1;
                // A stride through the ids reaches every row, old and new.
                let id = ids[(n.wrapping_mul(7919) % ids.len() as u64) as usize];
                let done = sqlx::query("UPDATE sessions SET metadata = jsonb_build_object('u', $2::bigint), updated_at = now() WHERE id = $1")
                    .bind(id)
                    .bind(n as i64)
                    .execute(&db)
                    .await;
                if done.is_ok() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        UpdateLoad { updates, task }
    }
}

impl Drop for UpdateLoad {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server that replicates with no cron (the test runs each reconciliation
/// itself) and the list's default overlay margin.
async fn quiet() -> TestApp {
    ready(|c| c.job_schedules_file = Some(schedules_file(&[]))).await
}

async fn in_clickhouse(app: &TestApp, ids: &[String]) -> Vec<SessionRow> {
    app.state
        .analytics
        .client()
        .query("SELECT ?fields FROM sessions_v1 FINAL WHERE session_id IN ?")
        .bind(ids)
        .fetch_all()
        .await
        .unwrap()
}

/// Under a steady load of updates to old and new rows, whose newest versions
/// are always on their way to ClickHouse, an equal copy is found equal: no
/// row is copied and no backfill queued, while the digests covered the rows.
/// (Whole months were re-copied here: a row changed after the cutoff changed
/// its month's digest in Postgres before the copy had the change.)
#[tokio::test]
async fn an_equal_copy_under_concurrent_updates_copies_nothing() {
    let app = quiet().await;
    seed_hours(&app, &[0, 1, 2]).await;
    seeds_copied(&app).await;
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM sessions").fetch_all(app.db()).await.unwrap();
    let load = UpdateLoad::start(app.db().clone(), ids, 150);
    let job = JobKind::ReplicationReconcile;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let summary = app.sweep(job).await;
        assert_eq!(ranged_backfills(&app).await, 0, "a backfill was queued for an equal copy: {summary}");
        assert_eq!(figure(&summary, "sessions", "rows copied"), 0, "{summary}");
        assert_eq!(figure(&summary, "sessions", "rows marked deleted"), 0, "{summary}");
        assert!(figure(&summary, "sessions", "rows compared") > 0, "{summary}");
    }
    let updates = load.updates.load(Ordering::Relaxed);
    drop(load);
    assert!(updates > 100, "the load made {updates} updates");
    finish(app).await;
}

/// Rows deleted from the copy behind replication's back (a mutation on
/// ClickHouse) are found, and only their hour is copied again.
#[tokio::test]
async fn rows_lost_from_the_copy_are_restored_by_copying_their_hour() {
    let app = quiet().await;
    seed_hours(&app, &[1, 2, 3, 4]).await;
    seeds_copied(&app).await;
    let lost: Vec<String> = seeded_ids(&app, 3).await.into_iter().take(12).collect();
    let sql = format!(
        "ALTER TABLE sessions_v1 DELETE WHERE session_id IN ({})",
        lost.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(", ")
    );
    app.state.analytics.client().query(&sql).with_option("mutations_sync", "2").execute().await.unwrap();
    assert!(in_clickhouse(&app, &lost).await.is_empty(), "the mutation deleted the rows");

    let job = JobKind::ReplicationReconcile;
    let found = app.sweep(job).await;
    assert_eq!(ranged_backfills(&app).await, 0, "{found}");
    assert_eq!(figure(&found, "sessions", "hours differ"), 1, "{found}");
    assert_eq!(figure(&found, "sessions", "rows copied"), PER_HOUR, "only the hour is copied: {found}");
    assert!(figure(&found, "sessions", "rows compared") >= 4 * PER_HOUR - 12, "{found}");
    assert_eq!(in_clickhouse(&app, &lost).await.len(), lost.len(), "the lost rows are back");
    let again = app.sweep(job).await;
    assert_eq!(figure(&again, "sessions", "hours differ"), 0, "{again}");
    assert_eq!(figure(&again, "sessions", "rows copied"), 0, "{again}");
    finish(app).await;
}

/// Rows the copy holds but Postgres does not (a lost delete) are marked
/// deleted, and their hour is copied again.
#[tokio::test]
async fn rows_postgres_lacks_are_marked_deleted_in_the_copy() {
    use sessiond::analytics::rows::parse_lsn;
    let app = quiet().await;
    seed_hours(&app, &[1, 2]).await;
    seeds_copied(&app).await;
    let template = in_clickhouse(&app, &seeded_ids(&app, 2).await[..1]).await.remove(0);
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(app.db()).await.unwrap();
    let ghosts: Vec<SessionRow> = (0..5)
        .map(|i| SessionRow {
            session_id: uuid::Uuid::new_v4().to_string(),
            friendly_id: format!("session_ghost{i}"),
            _version: parse_lsn(&lsn).unwrap(),
            ..template.clone()
        })
        .collect();
    let ghost_ids: Vec<String> = ghosts.iter().map(|g| g.session_id.clone()).collect();
    app.state.analytics.insert_rows("sessions_v1", &ghosts).await.unwrap();

    let found = app.sweep(JobKind::ReplicationReconcile).await;
    assert_eq!(figure(&found, "sessions", "hours differ"), 1, "{found}");
    assert_eq!(figure(&found, "sessions", "rows marked deleted"), 5, "{found}");
    assert_eq!(figure(&found, "sessions", "rows copied"), PER_HOUR, "{found}");
    assert!(in_clickhouse(&app, &ghost_ids).await.is_empty(), "the ghosts are gone");
    let again = app.sweep(JobKind::ReplicationReconcile).await;
    assert_eq!(figure(&again, "sessions", "hours differ"), 0, "{again}");
    finish(app).await;
}

/// While a new slot generation's backfill has not completed the copy, the
/// watermark runs ahead of what the copy holds: a reconciliation then compares
/// nothing (it would queue repairs of the very gap that backfill copies), and
/// compares again once the copy is complete.
#[tokio::test]
async fn a_copy_still_healing_is_not_reconciled() {
    let app = quiet().await;
    seed_hours(&app, &[1, 2]).await;
    seeds_copied(&app).await;
    let lost: Vec<String> = seeded_ids(&app, 2).await.into_iter().take(3).collect();
    let sql = format!(
        "ALTER TABLE sessions_v1 DELETE WHERE session_id IN ({})",
        lost.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(", ")
    );
    app.state.analytics.client().query(&sql).with_option("mutations_sync", "2").execute().await.unwrap();
    // As after a slot was recreated: no full backfill has started since.
    let slot = app.state.config.replication_slot_name();
    let created: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("UPDATE replication_state SET slot_created_at = now() WHERE slot = $1 RETURNING now()")
            .bind(&slot)
            .fetch_one(app.db())
            .await
            .unwrap();

    let healing = app.sweep(JobKind::ReplicationReconcile).await;
    assert!(healing.contains("sessions: copy healing"), "{healing}");
    assert!(healing.contains("runs: copy healing"), "{healing}");
    assert_eq!(ranged_backfills(&app).await, 0, "{healing}");
    assert!(in_clickhouse(&app, &lost).await.is_empty(), "nothing was copied: {healing}");

    // The copy complete again (its slot older than its last full backfill):
    // the next reconciliation compares and repairs.
    sqlx::query("UPDATE replication_state SET slot_created_at = $2 - interval '1 day' WHERE slot = $1")
        .bind(&slot)
        .bind(created)
        .execute(app.db())
        .await
        .unwrap();
    let found = app.sweep(JobKind::ReplicationReconcile).await;
    assert_eq!(figure(&found, "sessions", "hours differ"), 1, "{found}");
    assert_eq!(in_clickhouse(&app, &lost).await.len(), lost.len(), "the lost rows are back: {found}");
    finish(app).await;
}
