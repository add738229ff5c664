//! Fault cases for the job queue: Redis killed (it runs with an AOF) and
//! restarted empty under a create load, with and without ClickHouse down
//! first. Each server replicates into a private ClickHouse through its own
//! slot (dropped at the end), uses a private Redis, and each case ends with
//! the shared checks: Postgres == ClickHouse row by row, no stuck job, no
//! acknowledged session missing from the list. Each prints its `FAULT` line.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sessiond::analytics::watermark::{self, Table};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::common::clickhouse::PrivateClickHouse;
use crate::common::faults::{assert_copy_equal, list_check, stuck_jobs};
use crate::common::redis_proc::{start_fresh, RedisProc, TempDir};
use crate::common::{eventually, session_body, TestApp};
use crate::replication::{finish, replicating};

/// Creates a second the load makes: modest, as the cases ask.
const CREATES_PER_SEC: u64 = 25;

/// A create load in the background: the friendly ids of the sessions whose
/// create was acknowledged, and how many creates were refused (Redis away).
struct Load {
    acked: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<usize>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Load {
    fn start(app: &TestApp, tag: &str) -> Load {
        let (stop, mut stopped) = watch::channel(false);
        let acked = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        // A client of its own with a short timeout: a create that hangs while
        // Redis is away counts as refused, and the load goes on.
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        let (url, key, tag) = (format!("{}/api/v1/sessions", app.base), app.a.key.clone(), tag.to_string());
        let (acked_in, refused_in) = (acked.clone(), refused.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1_000 / CREATES_PER_SEC));
            for i in 0.. {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tick.tick() => {}
                }
                let sent = http.post(&url).bearer_auth(&key).json(&session_body(Some(&format!("{tag}-{i}")))).send();
                let id = match sent.await {
                    Ok(resp) if resp.status() == StatusCode::CREATED => {
                        resp.json::<serde_json::Value>().await.ok().and_then(|v| v["id"].as_str().map(String::from))
                    }
                    _ => None,
                };
                match id {
                    Some(id) => acked_in.lock().unwrap().push(id),
                    None => *refused_in.lock().unwrap() += 1,
                }
            }
        });
        Load { acked, refused, stop, task }
    }

    /// Stops the load; returns the acknowledged ids and the refused count.
    async fn stop(self) -> (Vec<String>, usize) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let acked = self.acked.lock().unwrap().clone();
        let refused = *self.refused.lock().unwrap();
        (acked, refused)
    }
}

/// A replicating server on a private Redis and a private ClickHouse, its
/// first backfill done (the watermark exists).
async fn replicating_app(redis: &RedisProc, clickhouse: &PrivateClickHouse) -> TestApp {
    let (redis_url, ch_url) = (redis.url(), clickhouse.url());
    let app = TestApp::spawn_with(move |c| {
        replicating(c);
        c.redis_url = redis_url;
        c.clickhouse_url = ch_url;
    })
    .await;
    app.clickhouse_ready().await;
    eventually(30, "the first backfill's watermark", || async {
        watermark::read(&app.state.analytics, Table::Sessions).await.ok().flatten()
    })
    .await;
    app
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

/// The checks every case ends with; returns (stuck jobs, wrong list answers,
/// sessions and runs compared).
async fn heal_checks(app: &TestApp, acked: &[String]) -> (i64, usize, u64, u64) {
    let copy = assert_copy_equal(&app.state, 45).await;
    let stuck = stuck_jobs(app.db(), 30).await;
    let list = list_check(app, &app.a.key, acked).await;
    (stuck, list.missing, copy.sessions as u64, copy.runs as u64)
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
    let load = Load::start(&app, "redis-empty");
    tokio::time::sleep(Duration::from_secs(4)).await;

    let before = tasks(&app).await;
    restart_empty(&mut redis, &empty_dir).await;
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (acked, refused) = load.stop().await;

    let (stuck, missing, sessions, runs) = heal_checks(&app, &acked).await;
    let heal_ms = restarted.elapsed().as_millis();
    let repushed = repushed(&app, &before).await;
    println!(
        "FAULT redis-restarted-empty: creates={} refused={refused} jobs_repushed={repushed} heal_ms={heal_ms} \
         stuck_jobs={stuck} wrong_list_answers={missing} sessions={sessions} runs={runs} total_ms={}",
        acked.len(),
        started.elapsed().as_millis()
    );
    assert_eq!(stuck, 0, "stuck jobs");
    assert_eq!(missing, 0, "acknowledged sessions missing from the list");
    assert!(repushed > 0, "the recovery pushed the unfinished jobs again");
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
    let load = Load::start(&app, "ch-down-redis-empty");
    tokio::time::sleep(Duration::from_secs(2)).await;

    clickhouse.stop().await;
    // Flushes fail, spend their attempts (50 ms backoff: about a second) and
    // are revived with a fresh budget every 2 s.
    let revived_before = eventually(30, "a flush to spend its attempts and be revived", || async {
        let revived: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'replication-flush' AND generation > 0")
                .fetch_one(app.db())
                .await
                .unwrap();
        (revived > 0).then_some(revived)
    })
    .await;
    let before = tasks(&app).await;
    restart_empty(&mut redis, &empty_dir).await;
    // The recovery pushes while revives keep resetting failed flushes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    clickhouse.restart().await;
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, refused) = load.stop().await;

    let (stuck, missing, sessions, runs) = heal_checks(&app, &acked).await;
    let heal_ms = back.elapsed().as_millis();
    let repushed = repushed(&app, &before).await;
    let revived: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'replication-flush' AND generation > 0")
            .fetch_one(app.db())
            .await
            .unwrap();
    println!(
        "FAULT redis-restarted-empty-clickhouse-down: creates={} refused={refused} flushes_revived={revived} \
         revived_before_redis_loss={revived_before} jobs_repushed={repushed} heal_ms={heal_ms} stuck_jobs={stuck} \
         wrong_list_answers={missing} sessions={sessions} runs={runs} total_ms={}",
        acked.len(),
        started.elapsed().as_millis()
    );
    assert_eq!(stuck, 0, "stuck jobs");
    assert_eq!(missing, 0, "acknowledged sessions missing from the list");
    finish(app).await;
}
