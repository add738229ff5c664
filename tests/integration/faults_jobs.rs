//! Fault cases for the job queue: Redis killed (it runs with an AOF) and
//! restarted empty under a create load, with and without ClickHouse down
//! first. Each server replicates into a private ClickHouse through its own
//! slot (dropped at the end), uses a private Redis, and each case ends with
//! the shared checks: Postgres == ClickHouse row by row, no stuck job, no
//! acknowledged session missing from the list. Each prints its `FAULT` line:
//! creates acknowledged and refused, jobs pushed again (their stamped task
//! changed), `requeued_ms` (Redis back until the queue's marker is restored,
//! every unfinished job pushed), `heal_ms` (the last service back until every
//! check passed, the load's last seconds included), stuck jobs and wrong list
//! answers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::common::clickhouse::PrivateClickHouse;
use crate::common::faults::{assert_copy_equal, list_check, phase, report, stuck_jobs, CreateLoad};
use crate::common::redis_proc::{start_fresh, RedisProc, TempDir};
use crate::common::{eventually, TestApp};
use crate::replication::finish;

/// Creates a second the load makes: modest, as the cases ask.
const CREATES_PER_SEC: u32 = 25;

/// A replicating server on a private Redis and a private ClickHouse, its
/// first backfill done (the watermark exists).
async fn replicating_app(redis: &RedisProc, clickhouse: &PrivateClickHouse) -> TestApp {
    let (redis_url, ch_url) = (redis.url(), clickhouse.url());
    crate::replication::ready(move |c| {
        c.redis_url = redis_url;
        c.clickhouse_url = ch_url;
    })
    .await
}

/// Every job's last stamped task, to count afterwards the ones pushed again.
async fn tasks(app: &TestApp) -> HashMap<Uuid, Option<String>> {
    sqlx::query_as::<_, (Uuid, Option<String>)>("SELECT id, task_id FROM jobs")
        .fetch_all(app.db())
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// How many of the jobs stamped in `before` carry another task now: pushed
/// again (by the lost-queue recovery, the sweep, or a retry).
async fn repushed(app: &TestApp, before: &HashMap<Uuid, Option<String>>) -> usize {
    let now = tasks(app).await;
    before.iter().filter(|(id, task)| task.is_some() && now.get(id).is_some_and(|t| t != *task)).count()
}

/// Kills Redis (SIGKILL; its AOF stays behind in the old directory) and
/// starts it again on the same port in a new, empty directory.
async fn restart_empty(redis: &mut RedisProc, dir: &TempDir) {
    let port = redis.port;
    redis.kill9();
    let mut fresh = RedisProc::spawn(&dir.0, port);
    assert!(fresh.wait_ready(Duration::from_secs(10)).await, "redis did not come back: {}", fresh.log());
    *redis = fresh;
}

/// Waits until the server has put the ledger's unfinished jobs back on the
/// emptied queue (it writes the queue's marker last); returns how long it took.
/// The figure is what the case reports; the 60 s bound only catches "never"
/// (20 s ran out once at a load of 9 on two cores, with the Redis client's
/// reconnect backoff on top of the relay's tick).
async fn requeued(app: &TestApp, since: Instant) -> Duration {
    let queue = app.state.jobs.queue(sessiond::jobs::Lane::Engine);
    eventually(60, "the lost queue to be restored", || async { queue.intact().await.unwrap_or(false).then_some(()) })
        .await;
    since.elapsed()
}

/// What the checks every case ends with found.
struct Healed {
    stuck: i64,
    wrong_lists: usize,
    sessions: usize,
    runs: usize,
}

/// A job under way: id, kind, status, attempts, budget, generation, task, and its attempts.
type UnfinishedJob = (Uuid, String, String, i32, i32, i32, Option<String>, Option<String>);

/// The unfinished jobs and their attempts, for a failure's message.
async fn unfinished(app: &TestApp) -> String {
    let rows: Vec<UnfinishedJob> = sqlx::query_as(
        "SELECT j.id, j.kind, j.status, j.attempts, j.max_attempts, j.generation, j.task_id,
                (SELECT string_agg(a.attempt || ':' || a.status || '@' || a.started_at::text, ' ' ORDER BY a.attempt)
                 FROM job_attempts a WHERE a.job_id = j.id)
         FROM jobs j WHERE j.status IN ('pending', 'running') ORDER BY j.id",
    )
    .fetch_all(app.db())
    .await
    .unwrap();
    rows.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>().join("\n")
}

/// The checks every case ends with: no job left unfinished, the copy equal
/// row by row, and every acknowledged session listed.
async fn heal_checks(app: &TestApp, acked: &[String]) -> Healed {
    let stuck = stuck_jobs(app.db(), 30).await;
    if stuck > 0 {
        eprintln!("stuck jobs:\n{}", unfinished(app).await);
    }
    let copy = assert_copy_equal(&app.state, 45).await;
    let list = list_check(app, &app.a.key, acked).await;
    assert!(list.failed.is_none(), "the list refused: {list:?}");
    Healed { stuck, wrong_lists: usize::from(list.wrong()), sessions: copy.sessions, runs: copy.runs }
}

/// Redis killed under load and restarted empty: the ledger puts every
/// unfinished job back on the queue, and nothing is lost or left stuck.
#[tokio::test]
async fn redis_restarted_empty_under_load() {
    let started = Instant::now();
    let (dir, empty_dir) = (TempDir::new(), TempDir::new());
    let mut redis = start_fresh(&dir.0).await;
    let clickhouse = PrivateClickHouse::start().await;
    let app = replicating_app(&redis, &clickhouse).await;
    let load = CreateLoad::start(&app.base, &app.a.key, CREATES_PER_SEC, "redis-empty");
    tokio::time::sleep(phase(4.0)).await;

    let before = tasks(&app).await;
    restart_empty(&mut redis, &empty_dir).await;
    let restarted = Instant::now();
    let requeued = requeued(&app, restarted).await;
    tokio::time::sleep(phase(4.0)).await;
    let (acked, refused) = load.stop().await;

    let healed = heal_checks(&app, &acked).await;
    let heal_ms = restarted.elapsed().as_millis();
    let repushed = repushed(&app, &before).await;
    report(
        "redis-restarted-empty",
        &[
            ("creates", acked.len().to_string()),
            ("refused", refused.to_string()),
            ("jobs_repushed", repushed.to_string()),
            ("requeued_ms", requeued.as_millis().to_string()),
            ("heal_ms", heal_ms.to_string()),
            ("stuck_jobs", healed.stuck.to_string()),
            ("wrong_list_answers", healed.wrong_lists.to_string()),
            ("sessions", healed.sessions.to_string()),
            ("runs", healed.runs.to_string()),
            ("total_ms", started.elapsed().as_millis().to_string()),
        ],
    );
    assert_eq!(healed.stuck, 0, "stuck jobs");
    assert_eq!(healed.wrong_lists, 0, "acknowledged sessions missing from the list");
    finish(app).await;
}

/// ClickHouse down until the flush jobs spend their attempts and the
/// consumer revives them (again and again), then Redis restarted empty, then
/// ClickHouse back: the interleaving that once stranded a flush for good
/// (a recovery's stamp landing on a revived flush). Every flush must land.
#[tokio::test]
async fn redis_restarted_empty_while_clickhouse_is_down() {
    let started = Instant::now();
    let (dir, empty_dir) = (TempDir::new(), TempDir::new());
    let mut redis = start_fresh(&dir.0).await;
    let mut clickhouse = PrivateClickHouse::start().await;
    let app = replicating_app(&redis, &clickhouse).await;
    let load = CreateLoad::start(&app.base, &app.a.key, CREATES_PER_SEC, "ch-down-redis-empty");
    tokio::time::sleep(Duration::from_secs(2)).await;

    clickhouse.stop().await;
    // Flushes fail, spend their attempts (50 ms backoff: about a second) and
    // are revived with a fresh budget every 2 s.
    let revived_before = eventually(30, "a flush to spend its attempts and be revived", || async {
        let revived = revived_flushes(&app).await;
        (revived > 0).then_some(revived)
    })
    .await;
    let before = tasks(&app).await;
    restart_empty(&mut redis, &empty_dir).await;
    let requeued = requeued(&app, Instant::now()).await;
    // The recovery has pushed while revives keep resetting failed flushes.
    tokio::time::sleep(phase(3.0)).await;
    clickhouse.restart().await;
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, refused) = load.stop().await;

    let healed = heal_checks(&app, &acked).await;
    let heal_ms = back.elapsed().as_millis();
    let repushed = repushed(&app, &before).await;
    report(
        "redis-restarted-empty-clickhouse-down",
        &[
            ("creates", acked.len().to_string()),
            ("refused", refused.to_string()),
            ("flushes_revived", revived_flushes(&app).await.to_string()),
            ("revived_before_redis_loss", revived_before.to_string()),
            ("jobs_repushed", repushed.to_string()),
            ("requeued_ms", requeued.as_millis().to_string()),
            ("heal_ms", heal_ms.to_string()),
            ("stuck_jobs", healed.stuck.to_string()),
            ("wrong_list_answers", healed.wrong_lists.to_string()),
            ("sessions", healed.sessions.to_string()),
            ("runs", healed.runs.to_string()),
            ("total_ms", started.elapsed().as_millis().to_string()),
        ],
    );
    assert_eq!(healed.stuck, 0, "stuck jobs");
    assert_eq!(healed.wrong_lists, 0, "acknowledged sessions missing from the list");
    finish(app).await;
}

/// Flush jobs the consumer revived: a retry gives a fresh budget on top of the default.
async fn revived_flushes(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'replication-flush' AND max_attempts > 5")
        .fetch_one(app.db())
        .await
        .unwrap()
}
