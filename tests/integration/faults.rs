//! The fault cases' shared verdicts checked on their own: a replicating
//! server on a private Postgres, a load of creates, then the three verdicts
//! (copy equal, no stuck job, no list answer missing a session), and proof
//! that the copy comparison sees a row ClickHouse lost.

use std::time::{Duration, Instant};

use sessiond::analytics::rows::SessionRow;

use crate::common::faults::{
    assert_copy_equal, copy_differences, list_check, report, stuck_jobs, CreateLoad, PrivatePostgres,
};
use crate::replication::ready;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_verdicts_pass_on_a_healthy_copy_and_catch_a_lost_row() {
    let started = Instant::now();
    let mut pg = PrivatePostgres::start(&[]).await;
    pg.create_database("sessiond").await;
    let url = pg.url("sessiond");
    let app = ready(|c| c.database_url = url).await;

    let load = CreateLoad::start(&app.base, &app.a.key, 40, "fault-harness");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (acked, refused) = load.stop().await;
    assert!(acked.len() >= 30, "the load created {} sessions", acked.len());
    assert_eq!(refused, 0, "a healthy server refused creates");

    let copy = assert_copy_equal(&app.state, 30).await;
    assert_eq!(copy.sessions, acked.len(), "every acknowledged create is in Postgres and in the copy");
    assert_eq!(stuck_jobs(app.db(), 30).await, 0);
    let listed = list_check(&app, &app.a.key, &acked).await;
    assert!(!listed.wrong(), "{listed:?}");
    assert_eq!(listed.listed, acked.len());

    // A row ClickHouse lost (a tombstone above any real version) is a difference.
    let lost = &acked[0];
    let mut row: SessionRow = app
        .state
        .analytics
        .client()
        .query("SELECT ?fields FROM sessions_v1 FINAL WHERE friendly_id = {f:String}")
        .param("f", lost)
        .fetch_one()
        .await
        .unwrap();
    row._version = u64::MAX / 2;
    row._is_deleted = 1;
    app.state.analytics.insert_rows("sessions_v1", &[row]).await.unwrap();
    let (_, problems) = copy_differences(&app.state).await;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("in Postgres but not in ClickHouse"), "{problems:?}");

    drop(app);
    // The private server survives a crash of itself.
    pg.restart().await;
    let pool = sqlx::PgPool::connect(&pg.url("sessiond")).await.unwrap();
    let sessions: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database").fetch_one(&pool).await.unwrap();
    assert!(sessions >= 3);
    pool.close().await;
    report(
        "harness",
        &[
            ("creates", acked.len().to_string()),
            ("copied_sessions", copy.sessions.to_string()),
            ("copied_runs", copy.runs.to_string()),
            ("stuck_jobs", "0".into()),
            ("wrong_lists", "0".into()),
            ("secs", format!("{:.1}", started.elapsed().as_secs_f64())),
        ],
    );
}
