//! Running jobs: the apalis job worker, one cron worker per schedule, and the
//! outbox relay loop. `start` launches them all beside the HTTP server.

use std::time::Duration;

use apalis::layers::retry::backoff::{ExponentialBackoffMaker, MakeBackoff};
use apalis::layers::retry::{HasherRng, RetryPolicy};
use apalis::prelude::{AbortError, BackendExt, BoxDynError, Data, Monitor, WorkerBuilder, WorkerBuilderExt};
use apalis_cron::{CronScheduler, Tick};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use ulid::Ulid;

use super::handlers::{self, JobContext};
use super::queue::JobEnvelope;
use super::schedule::Schedule;
use super::{store, Job, Jobs};
use crate::app::AppState;

/// How long a freshly written job may stay unrelayed before the relay loop
/// pushes it (the writer normally does it within milliseconds).
const RELAY_GRACE_MS: i64 = 2_000;

/// How often the relay loop checks that every quiet pending job's task is
/// still on the queue ([`Jobs::sweep_unheld`]).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Runs one job's attempt in a task of its own, so that it always ends and
/// is recorded. A worker that stops (its Redis lost or restarted empty: see
/// [`supervise_job_worker`]) can drop the futures it runs; an attempt cut off
/// so stayed `running`, and when it was the job's last, the job with it, which
/// nothing but the ten-minute abandonment rule would run again (seen in the
/// fault case of Redis restarted empty while ClickHouse was down: a flush
/// left `running` at attempt 5 of 5).
async fn run_job(envelope: JobEnvelope, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    let ctx = JobContext::clone(&ctx);
    tokio::spawn(attempt(envelope.id, ctx)).await?
}

/// One attempt: logs it, executes, logs the outcome. On the last allowed
/// attempt a failure is final (AbortError), so apalis stops retrying.
async fn attempt(id: uuid::Uuid, ctx: JobContext) -> Result<(), BoxDynError> {
    // Gone, or already succeeded (delivered twice, e.g. relayed again before a
    // crash was noticed): nothing to do.
    let Some(row) = store::begin_attempt(&ctx.db, id).await? else {
        return Ok(());
    };
    let attempt = row.attempts;
    let result = match row.job() {
        Ok(job) => handlers::execute(&ctx, &job, u32::try_from(attempt).unwrap_or_default()).await,
        Err(err) => Err(err.into()),
    };
    match result {
        Ok(summary) => {
            tracing::debug!(job = %row.id, kind = %row.kind, attempt, %summary, "job succeeded");
            store::finish_attempt(&ctx.db, row.id, attempt, None, false).await?;
            Ok(())
        }
        Err(err) => {
            let last = attempt >= row.max_attempts;
            let message = format!("{err:#}");
            tracing::warn!(job = %row.id, kind = %row.kind, attempt, last, error = %message, "job attempt failed");
            store::finish_attempt(&ctx.db, row.id, attempt, Some(&message), last).await?;
            let err: BoxDynError = err.into();
            if last {
                Err(Box::new(AbortError::new(err)))
            } else {
                Err(err)
            }
        }
    }
}

#[derive(Clone)]
struct CronCtx {
    redis: redis::aio::ConnectionManager,
    /// `<REDIS_PREFIX>:cron:<schedule>`; the tick's timestamp completes the lock key.
    lock_prefix: String,
    jobs: Jobs,
    job: Job,
}

/// One tick of a schedule. Every server ticks; the first to take the tick's lock
/// enqueues the sweep job.
///
/// Clock skew: apalis fires a tick by the host's clock, so a skewed process
/// ticks early or late by its skew, but the tick's timestamp (the lock key) is
/// the scheduled time, the same on every process. Skew under the lock's 60 s
/// is therefore tolerated (one enqueue per tick); beyond it a late process may
/// enqueue the tick again, which the sweeps absorb (they act on what is due by
/// Postgres' `now()`, so a repeat finds nothing more to do).
async fn cron_tick(tick: Tick, ctx: Data<CronCtx>) -> Result<(), BoxDynError> {
    let key = format!("{}:{}", ctx.lock_prefix, tick.get_timestamp());
    let mut conn = ctx.redis.clone();
    let won: Option<String> =
        redis::cmd("SET").arg(&key).arg(1).arg("NX").arg("PX").arg(60_000).query_async(&mut conn).await?;
    if won.is_some() {
        ctx.jobs.submit(&ctx.job).await?;
    }
    Ok(())
}

/// Launches the job runtime. Everything stops when `shutdown` turns true; the
/// returned handle finishes once in-flight jobs are done.
pub fn start(
    state: &AppState,
    schedules: Vec<Schedule>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let backoff = ExponentialBackoffMaker::new(
        Duration::from_millis(state.config.job_retry_base_ms),
        Duration::from_secs(30),
        0.5,
        HasherRng::default(),
    )?
    .make_backoff();
    let retries = (super::DEFAULT_MAX_ATTEMPTS - 1) as usize;

    // One supervised worker per lane (see `Lane`), each polling its own queue.
    let mut lanes = Vec::new();
    for lane in super::Lane::ALL {
        let queue = state.jobs.queue(lane).clone();
        let job_ctx = state.job_context();
        let backoff = backoff.clone();
        let prefix = state.config.redis_prefix.clone();
        let lane_name = match lane {
            super::Lane::Engine => "jobs",
            super::Lane::Analytics => "analytics-jobs",
        };
        let job_worker = move || {
            // A new name each time: apalis registers a worker by name, and
            // refuses a name still fresh in its registry.
            let name = format!("{prefix}-{lane_name}-{}", Ulid::generate());
            let (queue, job_ctx, backoff) = (queue.clone(), job_ctx.clone(), backoff.clone());
            Monitor::new()
                .register(move |_| {
                    WorkerBuilder::new(name.clone())
                        .backend(queue.storage().poll_with_strategy(queue.poll_strategy(Duration::from_millis(250))))
                        .data(job_ctx.clone())
                        .concurrency(32)
                        .retry(RetryPolicy::retries(retries).with_backoff(backoff.clone()))
                        .build(run_job)
                })
                .shutdown_timeout(Duration::from_secs(10))
        };
        lanes.push(tokio::spawn(supervise_job_worker(job_worker, shutdown.clone())));
    }
    let mut monitor = Monitor::new();
    for schedule in schedules {
        let ctx = CronCtx {
            redis: state.redis.clone(),
            lock_prefix: format!("{}:cron:{}", state.config.redis_prefix, schedule.name),
            jobs: state.jobs.clone(),
            job: schedule.job.clone(),
        };
        let name = format!("{}-cron-{}-{}", state.config.redis_prefix, schedule.name, Ulid::generate());
        let cron = schedule.cron.clone();
        monitor = monitor.register(move |_| {
            WorkerBuilder::new(name.clone())
                .backend(CronScheduler::new(cron.clone()))
                .data(ctx.clone())
                .build(cron_tick)
        });
    }

    // Wake-ups for this process's own job workers. (What requests wait on,
    // the channel feed and the run queue, every process follows: see
    // `app::follow_wakeups`.)
    for lane in super::Lane::ALL {
        tokio::spawn(state.jobs.queue(lane).clone().listen(state.redis_client.clone()));
    }

    // The outbox relay: jobs whose writer could not push them, every
    // unfinished job again if Redis lost the queue, and (every 10 s) pending
    // jobs whose task the queue no longer holds.
    let relay_jobs = state.jobs.clone();
    let mut relay_stop = shutdown.clone();
    tokio::spawn(async move {
        // The first tick is at once, so the first check runs before this
        // process has submitted much: a fresh Redis (or key prefix) has no
        // marker yet, and every job found unfinished then is pushed again.
        let mut tick = tokio::time::interval(Duration::from_millis(1_000));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut swept_to = None;
        loop {
            tokio::select! {
                _ = relay_stop.changed() => break,
                _ = tick.tick() => {}
                _ = sweep.tick() => {
                    match relay_jobs.sweep_unheld(swept_to).await {
                        Ok((n, next)) => {
                            swept_to = next;
                            if n > 0 {
                                tracing::warn!(jobs = n, "pending jobs the queue no longer held were pushed again");
                            }
                        }
                        Err(err) => tracing::warn!(%err, "could not sweep the queue for pending jobs it lost"),
                    }
                    continue;
                }
            }
            match relay_jobs.recover_lost_queue().await {
                Ok(None) => {}
                Ok(Some(n)) => {
                    tracing::warn!(jobs = n, "the job queue was missing from Redis; unfinished jobs relayed again")
                }
                Err(err) => tracing::warn!(%err, "could not check the job queue for lost jobs"),
            }
            match relay_jobs.relay_pending(RELAY_GRACE_MS).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "relayed pending jobs"),
                Err(err) => tracing::warn!(%err, "outbox relay failed"),
            }
        }
    });

    let stop = shutdown;
    let monitor = monitor.shutdown_timeout(Duration::from_secs(10));
    Ok(tokio::spawn(async move {
        if let Err(err) = monitor.run_with_signal(stopped(stop)).await {
            tracing::error!(%err, "cron schedules stopped with an error");
        }
        for lane in lanes {
            let _ = lane.await;
        }
    }))
}

async fn stopped(mut stop: watch::Receiver<bool>) -> std::io::Result<()> {
    let _ = stop.wait_for(|s| *s).await;
    Ok(())
}

/// Runs the job worker until shutdown, starting a new one whenever it ends.
///
/// apalis ends a worker at the first error of its backend: Redis unreachable
/// for a moment, or restarted without its data, which also loses the worker's
/// registration, so that every later fetch fails. Left alone, the process
/// would run no job again. A fresh worker (a new name, registered anew) starts
/// after a pause, and picks up what the queue holds once Redis answers.
async fn supervise_job_worker(worker: impl Fn() -> Monitor, mut shutdown: watch::Receiver<bool>) {
    loop {
        let ended = worker().run_with_signal(stopped(shutdown.clone())).await;
        if *shutdown.borrow() {
            return;
        }
        match ended {
            Ok(()) => tracing::warn!("the job worker stopped; starting a new one"),
            Err(err) => tracing::warn!(%err, "the job worker failed; starting a new one"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
