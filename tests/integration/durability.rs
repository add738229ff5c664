//! Acknowledged channel records survive a Redis crash (SIGKILL) and restart
//! when Redis runs with `appendonly yes` + `appendfsync always`.
//!
//! Runs its own `redis-server` on a free loopback port with a fresh data
//! directory, so the shared Redis on 6379 that other tests use is never touched.
//! A SIGKILL is a process crash: it shows that what Redis acknowledged was in
//! its append-only file and is replayed on start. (Power loss, the case that
//! separates `always` from `everysec`, cannot be simulated here; the test
//! checks the server really runs with `appendfsync always`.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::redis_proc::{start_fresh, RedisProc, TempDir};
use redis::aio::ConnectionManager;
use sessiond::streams::store::{ChannelError, ChannelStore};
use sessiond::streams::{ChannelKey, Io};
use uuid::Uuid;

const RECORDS: u64 = 500;
const TASKS: u64 = 10;

/// What an acknowledged append stored: timestamp, body, headers.
type Acked = (i64, String, Vec<(String, String)>);

async fn store_on(redis: &RedisProc, db: &sqlx::PgPool) -> ChannelStore {
    let client = redis::Client::open(redis.url()).expect("redis url");
    let conn = ConnectionManager::new(client).await.expect("connect to private redis");
    ChannelStore::new(conn, db.clone(), "durtest", 60_000)
}

/// A Postgres schema of its own, for the channels' sequence floors.
async fn floor_db() -> sqlx::PgPool {
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let config = sessiond::config::Config::for_database(&crate::common::database_url(), Some(schema));
    let pool = sessiond::db::connect(&config).await.expect("connect to Postgres");
    sessiond::db::migrate(&pool).await.expect("migrate");
    pool
}

fn record_headers(task: u64, i: u64) -> Vec<(String, String)> {
    vec![("x-task".to_string(), task.to_string()), ("x-i".to_string(), format!("{i} \"quoted\" ünïcode"))]
}

#[tokio::test]
async fn acknowledged_records_survive_redis_sigkill_and_restart() {
    let started = Instant::now();
    let dir = TempDir::new();
    let mut redis = start_fresh(&dir.0).await;
    let port = redis.port;
    let db = floor_db().await;
    let store = store_on(&redis, &db).await;

    {
        let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let fsync: Vec<String> =
            redis::cmd("CONFIG").arg("GET").arg("appendfsync").query_async(&mut conn).await.unwrap();
        assert_eq!(fsync, vec!["appendfsync".to_string(), "always".to_string()]);
    }

    let key = ChannelKey { session_id: Uuid::new_v4(), io: Io::Out };
    let closed_key = ChannelKey { session_id: Uuid::new_v4(), io: Io::In };

    // Concurrent appends; each Ok is an acknowledgement we hold Redis to.
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..RECORDS / TASKS {
                let body = format!(r#"{{"task":{task},"i":{i},"pad":"{}"}}"#, "x".repeat((i as usize * 37) % 300));
                let headers = record_headers(task, i);
                let part = format!("t{task}-{i}");
                let a = store.append(key, &body, &headers, Some(&part)).await.expect("append acknowledged");
                assert!(!a.duplicate);
                acked.push((a.seq_num, a.timestamp, body, headers));
            }
            acked
        }));
    }
    let mut acked: BTreeMap<u64, Acked> = BTreeMap::new();
    for t in tasks {
        for (seq, ts, body, headers) in t.await.expect("append task") {
            assert!(acked.insert(seq, (ts, body, headers)).is_none(), "seq {seq} acknowledged twice");
        }
    }
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (0..RECORDS).collect::<Vec<_>>(),
        "acknowledged seqs are dense"
    );

    // A second channel: a few records, then closed (marker kept for 10 min).
    for i in 0..3 {
        store.append(closed_key, &format!("c{i}"), &[], None).await.expect("append to channel before close");
    }
    store.close(closed_key, 600_000).await.expect("close");
    assert!(matches!(store.append(closed_key, "late", &[], None).await, Err(ChannelError::Closed)));

    // Crash: SIGKILL, no clean shutdown.
    drop(store);
    redis.kill9();
    let pre_log = redis.log();
    drop(redis);

    // Restart on the same data directory and port.
    let mut redis = RedisProc::spawn(&dir.0, port);
    if !redis.wait_ready(Duration::from_secs(10)).await {
        panic!(
            "redis-server did not come back on port {port}; log:\n{pre_log}\n--- after restart ---\n{}",
            redis.log()
        );
    }
    let store = store_on(&redis, &db).await;

    let records = store.read_after(key, None, 10_000).await.expect("read after restart");
    assert_eq!(records.len() as u64, RECORDS, "every acknowledged record is back");
    for r in &records {
        let (ts, body, headers) = acked.get(&r.seq_num).unwrap_or_else(|| panic!("unexpected seq {}", r.seq_num));
        assert_eq!(&r.body, body, "body of seq {}", r.seq_num);
        assert_eq!(&r.headers, headers, "headers of seq {}", r.seq_num);
        assert_eq!(r.timestamp, *ts, "timestamp of seq {}", r.seq_num);
    }
    assert_eq!(records.iter().map(|r| r.seq_num).collect::<Vec<_>>(), (0..RECORDS).collect::<Vec<_>>());

    // The counter survived too: the sequence continues densely.
    assert_eq!(store.next_seq(key).await.unwrap(), RECORDS);
    let next = store.append(key, "after restart", &[], None).await.expect("append after restart");
    assert_eq!(next.seq_num, RECORDS);
    assert!(!next.duplicate);

    // A retried part id from before the crash is still recognised.
    let retry = store.append(key, "retry", &record_headers(0, 0), Some("t0-0")).await.unwrap();
    assert!(retry.duplicate);
    let first_of_task0 = acked.iter().find(|(_, (_, _, h))| *h == record_headers(0, 0)).map(|(s, _)| *s).unwrap();
    assert_eq!(retry.seq_num, first_of_task0);

    // The closed marker survived: appends are still refused, records kept.
    assert!(matches!(store.append(closed_key, "after restart", &[], None).await, Err(ChannelError::Closed)));
    let closed_records = store.read_after(closed_key, None, 100).await.unwrap();
    assert_eq!(closed_records.iter().map(|r| r.body.as_str()).collect::<Vec<_>>(), vec!["c0", "c1", "c2"]);

    drop(store);
    drop(redis);
    eprintln!("durability test took {:?}", started.elapsed());
}

/// Redis restarted without its data (here: flushed) takes the job queue with
/// it, while the ledger still shows the jobs as relayed. The first server to
/// notice (its queue marker is gone) relays every unfinished job again.
#[tokio::test]
async fn jobs_lost_with_the_queue_are_relayed_again() {
    use crate::common::{dequeue_one, session_body, TestApp};
    let dir = TempDir::new();
    let redis = start_fresh(&dir.0).await;
    let url = redis.url();
    // A server that writes and relays jobs but runs none: they wait on the queue.
    let writer = TestApp::spawn_with(|c| {
        c.redis_url = url;
        c.run_jobs = false;
    })
    .await;
    let s = writer.create_session(session_body(Some("lost-queue"))).await;
    let run_id = s["runId"].as_str().expect("runId").to_string();
    let job: Uuid = crate::common::eventually(10, "the trigger-run job to be marked relayed", || async {
        sqlx::query_scalar("SELECT id FROM jobs WHERE kind = 'trigger-run' AND relayed_at IS NOT NULL")
            .fetch_optional(writer.db())
            .await
            .unwrap()
    })
    .await;

    redis.flush_all().await;

    // A server that runs jobs finds the queue gone and relays the job again.
    let runner = writer.peer(|c| c.run_jobs = true).await;
    runner.job_succeeded(15, "the lost job to run", job).await;
    let run = dequeue_one(&runner.worker()).await;
    assert_eq!(run.id, run_id);
}
