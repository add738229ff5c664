//! Running jobs: the apalis job worker, one cron worker per schedule, and the
//! outbox relay loop. `start` launches them all beside the HTTP server.
//!
//! What a job does is not known here: the runtime hands each job to a
//! [`Handler`], the dispatch table the composition root builds.

use std::future::Future;
use std::time::Duration;

use apalis::layers::retry::backoff::{ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use apalis::layers::retry::{HasherRng, RetryPolicy};
use apalis::prelude::{AbortError, BackendExt, BoxDynError, Data, Monitor, WorkerBuilder, WorkerBuilderExt};
use apalis_cron::{CronScheduler, Tick};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::task::{AbortHandle, JoinHandle};
use ulid::Ulid;

use super::queue::JobEnvelope;
use super::schedule::Schedule;
use super::{store, Job, Jobs, Lane};

/// What a job run did, for the attempt log.
pub type Outcome = anyhow::Result<String>;

/// Runs a job of any kind: the dispatch table, built where the domains are
/// (the composition root), so that this module knows none of them.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Runs `job`; `attempt` is this attempt's number, from 1 (it keeps
    /// counting across retries). A kind it does not handle is an error.
    fn execute(&self, job: &Job, attempt: u32) -> impl Future<Output = Outcome> + Send;
}

/// What the job runtime runs on, handed over by the composition root.
pub struct Runtime<H> {
    pub jobs: Jobs,
    pub handler: H,
    /// For the cron ticks' locks.
    pub redis: ConnectionManager,
    /// For the job queues' wake-ups.
    pub redis_client: redis::Client,
    pub redis_prefix: String,
    /// The first retry's delay (`JOB_RETRY_BASE_MS`); later ones grow
    /// exponentially (with jitter), to 30 s.
    pub retry_base: Duration,
    /// How long attempts under way may finish at shutdown (`SHUTDOWN_GRACE_MS`).
    pub grace: Duration,
    pub schedules: Vec<Schedule>,
}

/// What a job worker gives each attempt.
#[derive(Clone)]
struct Attempts<H> {
    handler: H,
    db: PgPool,
}

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
///
/// The attempt is registered in [`Running`] while it runs, so that a process
/// shutting down can hand back what is unfinished at the end of its grace.
async fn run_job<H: Handler>(
    envelope: JobEnvelope,
    ctx: Data<Attempts<H>>,
    running: Data<Running>,
) -> Result<(), BoxDynError> {
    let ctx = Attempts::clone(&ctx);
    let running = Running::clone(&running);
    let slot = running.enter(envelope.id);
    let task = {
        let running = running.clone();
        tokio::spawn(async move {
            let result = attempt(envelope.id, ctx, &running, slot).await;
            running.leave(slot);
            result
        })
    };
    running.set_abort(slot, task.abort_handle());
    task.await?
}

/// The job attempts running in this process: what a shutdown hands back
/// (see [`hand_back`]).
#[derive(Clone, Default)]
pub struct Running(Arc<Mutex<RunningInner>>);

#[derive(Default)]
struct RunningInner {
    next: u64,
    attempts: HashMap<u64, RunningAttempt>,
}

struct RunningAttempt {
    job: uuid::Uuid,
    /// Its number once begun (the ledger's `job_attempts.attempt`).
    attempt: Option<i32>,
    abort: Option<AbortHandle>,
}

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunningInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self, job: uuid::Uuid) -> u64 {
        let mut inner = self.lock();
        inner.next += 1;
        let slot = inner.next;
        inner.attempts.insert(slot, RunningAttempt { job, attempt: None, abort: None });
        slot
    }

    fn set_abort(&self, slot: u64, abort: AbortHandle) {
        if let Some(a) = self.lock().attempts.get_mut(&slot) {
            a.abort = Some(abort);
        }
    }

    fn begun(&self, slot: u64, attempt: i32) {
        if let Some(a) = self.lock().attempts.get_mut(&slot) {
            a.attempt = Some(attempt);
        }
    }

    fn leave(&self, slot: u64) {
        self.lock().attempts.remove(&slot);
    }

    fn is_empty(&self) -> bool {
        self.lock().attempts.is_empty()
    }

    /// Stops every attempt still running and returns the begun ones (job, attempt).
    fn abort_all(&self) -> Vec<(uuid::Uuid, i32)> {
        let mut inner = self.lock();
        inner
            .attempts
            .drain()
            .filter_map(|(_, a)| {
                if let Some(abort) = a.abort {
                    abort.abort();
                }
                Some((a.job, a.attempt?))
            })
            .collect()
    }
}

/// One attempt: logs it, executes, logs the outcome. On the last allowed
/// attempt a failure is final (AbortError), so apalis stops retrying.
async fn attempt<H: Handler>(
    id: uuid::Uuid,
    ctx: Attempts<H>,
    running: &Running,
    slot: u64,
) -> Result<(), BoxDynError> {
    // Gone, or already succeeded (delivered twice, e.g. relayed again before a
    // crash was noticed): nothing to do.
    let Some(row) = store::begin_attempt(&ctx.db, id).await? else {
        return Ok(());
    };
    let attempt = row.attempts;
    running.begun(slot, attempt);
    // A kind this build does not know (a newer server's) or a payload that is
    // not an object fails the attempt like any error, logged below.
    let result = match row.job() {
        Ok(job) => ctx.handler.execute(&job, u32::try_from(attempt).unwrap_or_default()).await,
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
pub fn start<H: Handler>(rt: Runtime<H>, shutdown: watch::Receiver<bool>) -> anyhow::Result<JoinHandle<()>> {
    let backoff = retry_backoff(rt.retry_base)?;
    let running = Running::default();
    let lanes = spawn_job_workers(&rt, backoff, &running, &shutdown);
    let cron = cron_schedules(&rt).shutdown_timeout(rt.grace);
    listen_for_wakeups(&rt);
    tokio::spawn(relay_loop(rt.jobs.clone(), shutdown.clone()));
    Ok(tokio::spawn(wind_down(cron, lanes, running, rt.jobs, rt.grace, shutdown)))
}

/// The delay before each retry of a failed attempt.
fn retry_backoff(base: Duration) -> anyhow::Result<ExponentialBackoff> {
    Ok(ExponentialBackoffMaker::new(base, Duration::from_secs(30), 0.5, HasherRng::default())?.make_backoff())
}

/// One supervised worker per lane (see [`Lane`]), each polling its own queue.
fn spawn_job_workers<H: Handler>(
    rt: &Runtime<H>,
    backoff: ExponentialBackoff,
    running: &Running,
    shutdown: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let retries = (super::DEFAULT_MAX_ATTEMPTS - 1) as usize;
    let grace = rt.grace;
    let mut lanes = Vec::new();
    for lane in Lane::ALL {
        let queue = rt.jobs.queue(lane).clone();
        let job_ctx = Attempts { handler: rt.handler.clone(), db: rt.jobs.pool.clone() };
        let backoff = backoff.clone();
        let prefix = rt.redis_prefix.clone();
        let lane_name = match lane {
            Lane::Engine => "jobs",
            Lane::Analytics => "analytics-jobs",
        };
        let running = running.clone();
        let job_worker = move || {
            // A new name each time: apalis registers a worker by name, and
            // refuses a name still fresh in its registry.
            let name = format!("{prefix}-{lane_name}-{}", Ulid::generate());
            let (queue, job_ctx, backoff, running) = (queue.clone(), job_ctx.clone(), backoff.clone(), running.clone());
            Monitor::new()
                .register(move |_| {
                    WorkerBuilder::new(name.clone())
                        .backend(queue.storage().poll_with_strategy(queue.poll_strategy(Duration::from_millis(250))))
                        .data(job_ctx.clone())
                        .data(running.clone())
                        .concurrency(32)
                        .retry(RetryPolicy::retries(retries).with_backoff(backoff.clone()))
                        .build(run_job::<H>)
                })
                .shutdown_timeout(grace)
        };
        lanes.push(tokio::spawn(supervise_job_worker(job_worker, shutdown.clone())));
    }
    lanes
}

/// One cron worker per schedule, in one monitor.
fn cron_schedules<H>(rt: &Runtime<H>) -> Monitor {
    let mut monitor = Monitor::new();
    for schedule in &rt.schedules {
        let ctx = CronCtx {
            redis: rt.redis.clone(),
            lock_prefix: format!("{}:cron:{}", rt.redis_prefix, schedule.name),
            jobs: rt.jobs.clone(),
            job: schedule.job(),
        };
        let name = format!("{}-cron-{}-{}", rt.redis_prefix, schedule.name, Ulid::generate());
        let cron = schedule.cron.clone();
        monitor = monitor.register(move |_| {
            WorkerBuilder::new(name.clone())
                .backend(CronScheduler::new(cron.clone()))
                .data(ctx.clone())
                .build(cron_tick)
        });
    }
    monitor
}

/// Wake-ups for this process's own job workers. (What requests wait on,
/// the channel feed and the run queue, every process follows: see
/// `app::follow_wakeups`.)
fn listen_for_wakeups<H>(rt: &Runtime<H>) {
    for lane in Lane::ALL {
        tokio::spawn(rt.jobs.queue(lane).clone().listen(rt.redis_client.clone()));
    }
}

/// The outbox relay: jobs whose writer could not push them, every
/// unfinished job again if Redis lost the queue, and (every 10 s) pending
/// jobs whose task the queue no longer holds.
async fn relay_loop(jobs: Jobs, mut stop: watch::Receiver<bool>) {
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
            _ = stop.changed() => break,
            _ = tick.tick() => relay_tick(&jobs).await,
            _ = sweep.tick() => swept_to = sweep_tick(&jobs, swept_to).await,
        }
    }
}

/// One tick of the relay: restores a lost queue, then pushes what is
/// still unrelayed.
async fn relay_tick(jobs: &Jobs) {
    match jobs.recover_lost_queue().await {
        Ok(None) => {}
        Ok(Some(n)) => {
            tracing::warn!(jobs = n, "the job queue was missing from Redis; unfinished jobs relayed again")
        }
        Err(err) => tracing::warn!(%err, "could not check the job queue for lost jobs"),
    }
    match jobs.relay_pending(RELAY_GRACE_MS).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(jobs = n, "relayed pending jobs"),
        Err(err) => tracing::warn!(%err, "outbox relay failed"),
    }
}

/// One page of the sweep for pending jobs the queue lost; returns where the
/// next one goes on (kept where it was if this one failed).
async fn sweep_tick(jobs: &Jobs, from: Option<uuid::Uuid>) -> Option<uuid::Uuid> {
    match jobs.sweep_unheld(from).await {
        Ok((n, next)) => {
            if n > 0 {
                tracing::warn!(jobs = n, "pending jobs the queue no longer held were pushed again");
            }
            next
        }
        Err(err) => {
            tracing::warn!(%err, "could not sweep the queue for pending jobs it lost");
            from
        }
    }
}

/// Runs the cron schedules until shutdown, then gives the job workers'
/// attempts the rest of the grace and hands back what is unfinished.
async fn wind_down(
    cron: Monitor,
    lanes: Vec<JoinHandle<()>>,
    running: Running,
    jobs: Jobs,
    grace: Duration,
    stop: watch::Receiver<bool>,
) {
    let mut stop_at = stop.clone();
    let cron = async {
        if let Err(err) = cron.run_with_signal(stopped(stop)).await {
            tracing::error!(%err, "cron schedules stopped with an error");
        }
    };
    let deadline = async {
        let _ = stop_at.wait_for(|s| *s).await;
        tokio::time::Instant::now() + grace
    };
    let ((), deadline) = tokio::join!(cron, deadline);
    // The workers take no new task once stopped; attempts under way get
    // the rest of the grace (apalis may have let go of them already: each
    // runs in a task of its own), then are handed back.
    for mut lane in lanes {
        if tokio::time::timeout_at(deadline, &mut lane).await.is_err() {
            // No retry of a cut-off attempt may start behind the hand-back.
            lane.abort();
        }
    }
    while !running.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hand_back(&jobs, &running).await;
}

/// Hands back the job attempts still running at the end of the grace: each
/// is stopped, logged `abandoned` with a budget of attempts one larger (the
/// cut-off attempt does not count against the job), left `pending` and
/// pushed again, so that another process runs it at once instead of after
/// apalis' recovery of this worker's tasks (heartbeat × missed).
async fn hand_back(jobs: &Jobs, running: &Running) {
    let cut = running.abort_all();
    if cut.is_empty() {
        return;
    }
    let mut handed = Vec::new();
    for (job, attempt) in cut {
        match store::hand_back_attempt(&jobs.pool, job, attempt).await {
            Ok(Some(kind)) => handed.push((job, kind)),
            Ok(None) => {}
            Err(err) => tracing::warn!(%job, attempt, %err, "could not hand back a job attempt"),
        }
    }
    tracing::info!(jobs = handed.len(), "job attempts unfinished at shutdown handed back");
    if let Err(err) = jobs.relay_kinds(&handed).await {
        // Left unrelayed: the relay loop of another process pushes them.
        tracing::warn!(%err, "could not push handed-back jobs; the relay will");
    }
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
