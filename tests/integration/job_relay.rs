//! The job relay's stamps and sweep: a push stamps only the version of the
//! job it carried, a pending job whose task the queue lost is pushed again,
//! an attempt whose process died is closed as abandoned by the next one, a
//! job goes to the lane of its kind, and one of a kind unknown here fails.

use reqwest::StatusCode;
use sessiond::jobs::probe::Probe;
use sessiond::jobs::queue::JobQueue;
use sessiond::jobs::store::{self, AttemptStatus, JobStatus};
use sessiond::jobs::Lane;
use uuid::Uuid;

use crate::common::{eventually, TestApp};
use crate::dashboard::{with_operators, Operator, ADMIN};

async fn row(app: &TestApp, id: Uuid) -> store::JobRow {
    store::find(app.db(), id).await.unwrap().expect("job row")
}

/// A server with no cron whose start-up queue check is done, so that only the
/// relay loop (and the test) push the jobs a test writes.
async fn quiet_app() -> TestApp {
    let app = TestApp::spawn_without_sweeps().await;
    app.job_queue_ready().await;
    app
}

/// The interleaving that stranded a replication flush for good: the
/// lost-queue recovery reads a page while the job is running and pushes it;
/// the job fails for good and the copy, delivered then, is dropped; a revive
/// resets the job and stops before its own push; then the page's stamp lands.
/// The stamp belongs to the earlier version, so it must not mark the reset job
/// relayed: the relay loop pushes it, and it succeeds, well before the 10 s
/// sweep would step in.
#[tokio::test]
async fn a_stale_recovery_stamp_does_not_strand_a_retried_job() {
    let app = quiet_app().await;
    let queue = app.state.jobs.queue(Lane::Engine);
    // Fails its one attempt (as a flush does while ClickHouse is away), and
    // succeeds once retried.
    let job = store::insert(app.db(), &Probe { fail_first: 1 }, 1).await.unwrap().id();
    let attempt = store::begin_attempt(app.db(), job).await.unwrap().expect("the first attempt starts");
    assert_eq!(attempt.attempts, 1);

    // The recovery reads its page while the job runs.
    let page: Vec<store::Queued> =
        store::unfinished(app.db(), None, 500).await.unwrap().into_iter().filter(|q| q.id == job).collect();
    assert_eq!(page.len(), 1, "the running job is on the page");
    // The attempt fails for good; then the recovery's push is delivered and dropped.
    store::finish_attempt(app.db(), job, 1, Some("clickhouse away"), true).await.unwrap();
    let pushed = app.state.jobs.push_page(&page).await.unwrap();
    let task = pushed[0].task.clone();
    eventually(10, "the recovery's copy to be delivered and dropped", || async {
        queue.unheld(std::slice::from_ref(&task)).await.unwrap().contains(&task).then_some(())
    })
    .await;
    assert_eq!(row(&app, job).await.status, JobStatus::Failed, "the copy did not run the failed job");

    // The revive resets the job and is stopped before its push.
    let reset = store::reset_for_retry(app.db(), job).await.unwrap().expect("the failed job is reset");
    assert_eq!((reset.status, reset.relayed_at), (JobStatus::Pending, None));
    // The recovery's page stamp lands now.
    store::mark_relayed(app.db(), &pushed).await.unwrap();

    app.job_succeeded(8, "the retried job to be sent again and succeed", job).await;
    let done = row(&app, job).await;
    assert_ne!(done.task_id.as_deref(), Some(task.as_str()), "the stale push's task is not this version's");
    assert_eq!(done.generation, store::FIRST_GENERATION + 1);
    assert_eq!(done.attempts, 2);
}

/// A pending job stamped with a task the queue does not hold (its copy was
/// lost, or dropped) is pushed again by the relay loop's sweep, and runs; one
/// whose task a worker holds is left alone.
#[tokio::test]
async fn the_sweep_pushes_again_a_pending_job_whose_task_is_gone() {
    let app = quiet_app().await;
    let stamped = |task: String| {
        let app = &app;
        async move {
            let job = store::insert(app.db(), &Probe { fail_first: 0 }, 5).await.unwrap().id();
            let stamp = store::Pushed { id: job, generation: store::FIRST_GENERATION, task };
            store::mark_relayed(app.db(), &[stamp]).await.unwrap();
            job
        }
    };
    let lost_task = ulid::Ulid::generate().to_string();
    let lost = stamped(lost_task.clone()).await;
    // The other's task sits in the inflight set of a live worker (its
    // heartbeat far ahead, so no one takes its tasks back).
    let kept_task = ulid::Ulid::generate().to_string();
    let kept = stamped(kept_task.clone()).await;
    let keys = apalis_redis::Config::default().queue(format!("{}:jobs", app.state.config.redis_prefix));
    let mut redis = app.state.redis.clone();
    let _: () = redis::cmd("ZADD")
        .arg(keys.workers_set())
        .arg(4_102_444_800u64)
        .arg("holder")
        .query_async(&mut redis)
        .await
        .unwrap();
    let inflight = format!("{}:holder", keys.inflight_jobs_set());
    let _: () = redis::cmd("SADD").arg(&inflight).arg(&kept_task).query_async(&mut redis).await.unwrap();
    // Both quiet for longer than the sweep waits.
    sqlx::query(
        "UPDATE jobs SET relayed_at = now() - interval '20 seconds', updated_at = now() - interval '20 seconds'
         WHERE id = ANY($1)",
    )
    .bind(vec![lost, kept])
    .execute(app.db())
    .await
    .unwrap();

    // One sweep every 10 s.
    app.job_succeeded(15, "the swept job to run", lost).await;
    let done = row(&app, lost).await;
    assert_ne!(done.task_id.as_deref(), Some(lost_task.as_str()), "stamped with the new push");
    assert_eq!(done.attempts, 1);
    let (pushed, _) = app.state.jobs.sweep_unheld(None).await.unwrap();
    assert_eq!(pushed, 0, "the held job is not pushed again");
    let kept_row = row(&app, kept).await;
    assert_eq!((kept_row.status, kept_row.task_id), (JobStatus::Pending, Some(kept_task)));
    let _: () = redis::cmd("DEL").arg(&inflight).query_async(&mut redis).await.unwrap();
    let _: () = redis::cmd("ZREM").arg(keys.workers_set()).arg("holder").query_async(&mut redis).await.unwrap();
}

/// `JobQueue::unheld` reads apalis-redis' layout: a task is held while it is
/// queued (the active list), scheduled (a retry or delayed push), or in a
/// registered worker's inflight set; done, it is not.
#[tokio::test]
async fn unheld_reads_where_apalis_keeps_a_task() {
    let app = quiet_app().await;
    let name = format!("{}:layout", app.state.config.redis_prefix);
    let queue = JobQueue::new(app.state.redis.clone(), &name, Lane::Engine);
    let keys = apalis_redis::Config::default().queue(format!("{name}:jobs"));
    let mut redis = app.state.redis.clone();
    let queued = queue.push(Uuid::now_v7()).await.unwrap();
    let gone = ulid::Ulid::generate().to_string();
    let unheld = |tasks: Vec<String>| {
        let queue = queue.clone();
        async move { queue.unheld(&tasks).await.unwrap() }
    };
    assert_eq!(unheld(vec![queued.clone(), gone.clone()]).await, vec![gone.clone()]);

    // apalis-redis files every push in the scheduled set (due now), and a
    // fetch moves what is due to the active list, then into the fetching
    // worker's inflight set.
    let schedule = keys.scheduled_jobs_set();
    let _: () = redis::cmd("ZREM").arg(&schedule).arg(&queued).query_async(&mut redis).await.unwrap();
    assert_eq!(unheld(vec![queued.clone()]).await, vec![queued.clone()], "held nowhere");
    let _: () = redis::cmd("RPUSH").arg(keys.active_jobs_list()).arg(&queued).query_async(&mut redis).await.unwrap();
    assert!(unheld(vec![queued.clone()]).await.is_empty(), "queued");
    let _: () =
        redis::cmd("LREM").arg(keys.active_jobs_list()).arg(0).arg(&queued).query_async(&mut redis).await.unwrap();
    let _: () = redis::cmd("ZADD").arg(keys.workers_set()).arg(1).arg("w1").query_async(&mut redis).await.unwrap();
    let inflight = format!("{}:w1", keys.inflight_jobs_set());
    let _: () = redis::cmd("SADD").arg(&inflight).arg(&queued).query_async(&mut redis).await.unwrap();
    assert!(unheld(vec![queued.clone()]).await.is_empty(), "inflight");

    // Waiting for a retry: in the scheduled set.
    let _: () = redis::cmd("SREM").arg(&inflight).arg(&queued).query_async(&mut redis).await.unwrap();
    let _: () = redis::cmd("ZADD").arg(&schedule).arg(1).arg(&queued).query_async(&mut redis).await.unwrap();
    assert!(unheld(vec![queued.clone()]).await.is_empty(), "scheduled");

    // Done: held nowhere.
    let _: () = redis::cmd("ZREM").arg(&schedule).arg(&queued).query_async(&mut redis).await.unwrap();
    assert_eq!(unheld(vec![queued.clone()]).await, vec![queued]);
}

/// An attempt whose process died stays `running` until the job's next attempt
/// starts, which closes it as `abandoned`; the job's page shows it so.
#[tokio::test]
async fn a_dead_attempt_is_closed_as_abandoned_by_the_next() {
    let app = quiet_app().await;
    with_operators(&app).await;
    let job = store::insert(app.db(), &Probe { fail_first: 0 }, 5).await.unwrap().id();
    let stamp = store::Pushed { id: job, generation: store::FIRST_GENERATION, task: "held-by-the-test".into() };
    store::mark_relayed(app.db(), &[stamp]).await.unwrap();
    // Attempt 1's process dies mid-attempt; ten minutes on, a redelivery runs
    // the job again.
    store::begin_attempt(app.db(), job).await.unwrap().expect("attempt 1");
    sqlx::query("UPDATE jobs SET updated_at = now() - interval '11 minutes' WHERE id = $1")
        .bind(job)
        .execute(app.db())
        .await
        .unwrap();
    let second = store::begin_attempt(app.db(), job).await.unwrap().expect("attempt 2");
    assert_eq!(second.attempts, 2);
    store::finish_attempt(app.db(), job, 2, None, false).await.unwrap();
    assert_eq!(row(&app, job).await.status, JobStatus::Succeeded);
    let attempts = store::attempts(app.db(), job).await.unwrap();
    let statuses: Vec<AttemptStatus> = attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![AttemptStatus::Abandoned, AttemptStatus::Succeeded]);
    assert!(attempts[0].finished_at.is_some(), "an abandoned attempt is closed");

    let admin = Operator::login(&app, ADMIN).await;
    let (status, html) = admin.get(&format!("/dashboard/jobs/{job}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains(r#"<span class="badge abandoned">abandoned</span>"#), "{html}");
    assert!(html.contains("its process stopped before it ended"), "{html}");
}

/// Two copies of a job running at once (a duplicate delivery): the second's
/// start closes the first as abandoned, and the first, ending after all,
/// records how it went over that.
#[tokio::test]
async fn an_attempt_that_ends_after_all_records_its_outcome() {
    let app = quiet_app().await;
    let job = store::insert(app.db(), &Probe { fail_first: 0 }, 5).await.unwrap().id();
    let stamp = store::Pushed { id: job, generation: store::FIRST_GENERATION, task: "held-by-the-test".into() };
    store::mark_relayed(app.db(), &[stamp]).await.unwrap();
    store::begin_attempt(app.db(), job).await.unwrap().expect("attempt 1");
    store::begin_attempt(app.db(), job).await.unwrap().expect("attempt 2");
    store::finish_attempt(app.db(), job, 1, Some("boom"), false).await.unwrap();
    store::finish_attempt(app.db(), job, 2, None, false).await.unwrap();
    let statuses: Vec<AttemptStatus> = store::attempts(app.db(), job).await.unwrap().iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![AttemptStatus::Failed, AttemptStatus::Succeeded]);
}

/// A pending job with every attempt spent (a duplicate copy's failure landed
/// after the last attempt began, whose process then died) can never start
/// again: the sweep ends it `failed`, where a retry can reach it, rather than
/// push it for ever. One whose last attempt still runs is left alone.
#[tokio::test]
async fn the_sweep_fails_a_pending_job_with_no_attempt_left() {
    let app = quiet_app().await;
    let spent = store::insert(app.db(), &Probe { fail_first: 0 }, 2).await.unwrap().id();
    let running = store::insert(app.db(), &Probe { fail_first: 0 }, 2).await.unwrap().id();
    for job in [spent, running] {
        let stamp = store::Pushed { id: job, generation: store::FIRST_GENERATION, task: "gone".into() };
        store::mark_relayed(app.db(), &[stamp]).await.unwrap();
        store::begin_attempt(app.db(), job).await.unwrap().expect("attempt 1");
        store::begin_attempt(app.db(), job).await.unwrap().expect("attempt 2, the last");
        store::finish_attempt(app.db(), job, 1, Some("boom"), false).await.unwrap();
    }
    // The spent job's last attempt died long ago (and was closed); the other's runs.
    sqlx::query("UPDATE job_attempts SET status = 'abandoned', finished_at = now() WHERE job_id = $1")
        .bind(spent)
        .execute(app.db())
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET updated_at = now() - interval '20 seconds' WHERE id = ANY($1)")
        .bind(vec![spent, running])
        .execute(app.db())
        .await
        .unwrap();
    assert!(store::begin_attempt(app.db(), spent).await.unwrap().is_none(), "no delivery can start it");
    app.state.jobs.sweep_unheld(None).await.unwrap();
    assert_eq!(row(&app, spent).await.status, JobStatus::Failed);
    assert_eq!(row(&app, running).await.status, JobStatus::Pending);
    assert!(app.state.jobs.retry(spent).await.unwrap().is_some(), "a failed job can be retried");
    app.job_succeeded(10, "the retried job", spent).await;
}

/// A row of a kind this build does not know (written by a newer server) is
/// relayed like any job, and its attempt is logged and failed: the worker
/// neither panics nor stops, and runs the next job.
#[tokio::test]
async fn a_job_of_an_unknown_kind_fails_its_attempt_and_the_worker_goes_on() {
    let app = quiet_app().await;
    let unknown = Uuid::now_v7();
    sqlx::query("INSERT INTO jobs (id, kind, payload, max_attempts) VALUES ($1, $2, $3, 1)")
        .bind(unknown)
        .bind("from-a-newer-server")
        .bind(serde_json::json!({ "kind": "from-a-newer-server", "run_id": Uuid::now_v7() }))
        .execute(app.db())
        .await
        .unwrap();
    let failed = eventually(15, "the unknown kind's attempt failed", || async {
        let r = row(&app, unknown).await;
        (r.status == JobStatus::Failed).then_some(r)
    })
    .await;
    let error = failed.last_error.unwrap_or_default();
    assert!(error.contains(r#"unknown job kind "from-a-newer-server""#), "{error}");
    let attempts = store::attempts(app.db(), unknown).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, AttemptStatus::Failed);

    let next = app.state.jobs.submit(&Probe { fail_first: 0 }).await.unwrap();
    app.job_succeeded(15, "a job after the unknown one", next).await;
}

/// Inserting a job hands back the lane of its kind, which the relay pushes it
/// onto: a backfill chunk goes to the analytics queue, a run's job to the engine's.
#[tokio::test]
async fn an_inserted_job_carries_the_lane_of_its_kind() {
    let app = quiet_app().await;
    let chunk = sessiond::analytics::backfill::BackfillChunk { backfill_id: Uuid::now_v7(), chunk: 0 };
    let copy = store::insert(app.db(), &chunk, 1).await.unwrap();
    assert_eq!(copy.lane(), Lane::Analytics);
    let cancel = store::insert(app.db(), &sessiond::runs::jobs::CancelRun { run_id: Uuid::now_v7() }, 1).await.unwrap();
    assert_eq!(cancel.lane(), Lane::Engine);
    assert_eq!(row(&app, copy.id()).await.kind, "backfill");
    app.state.jobs.relay(&[copy, cancel]).await;
    // A chunk of a backfill that does not exist has nothing to copy.
    app.job_succeeded(15, "the chunk ran", copy.id()).await;
    app.job_succeeded(15, "the cancel ran", cancel.id()).await;
}
