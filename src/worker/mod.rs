//! A small library for writing task workers in Rust, and the example
//! `echo-agent` built on it (`sessiond worker --task echo-agent`).
//!
//! A [`Worker`] long-polls for runs of its tasks, heartbeats each run while its
//! [`TaskHandler`] works, stops the handler when the server says cancel, and
//! reports the result. Channel I/O for session streams sits behind
//! [`channels::SessionChannels`]; [`chat`] speaks Trigger.dev's chat protocol
//! on top of it, so agents answer the official chat clients.

pub mod channels;
pub mod chat;
pub mod client;
pub mod echo;
pub mod retry;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use client::{AssignedRun, WorkerClient};

/// What a handler gets for one run.
pub struct RunContext {
    pub run: AssignedRun,
    /// Cancelled when the server cancels the run or the worker shuts down.
    pub cancel: CancellationToken,
    pub client: WorkerClient,
}

#[async_trait]
pub trait TaskHandler: Send + Sync + 'static {
    /// Runs one attempt; the value becomes the run's output, an error fails the attempt.
    async fn run(&self, ctx: RunContext) -> anyhow::Result<Value>;
}

pub struct Worker {
    pub client: WorkerClient,
    pub tasks: Vec<String>,
    pub concurrency: usize,
}

impl Worker {
    pub fn new(client: WorkerClient, tasks: Vec<String>, concurrency: usize) -> Self {
        Worker { client, tasks, concurrency: concurrency.max(1) }
    }

    /// Dequeues and runs until `stop` is cancelled, then waits for runs in flight.
    pub async fn run(self, handler: Arc<dyn TaskHandler>, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut in_flight = tokio::task::JoinSet::new();
        while !stop.is_cancelled() {
            let free = slots.available_permits();
            if free == 0 {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = in_flight.join_next() => continue,
                }
            }
            // The client asks for no more than the server hands out at once.
            let runs = tokio::select! {
                _ = stop.cancelled() => break,
                r = self.client.dequeue(&self.tasks, free, Duration::from_secs(10)) => r,
            };
            match runs {
                Ok(runs) => {
                    for run in runs {
                        let Ok(permit) = slots.clone().acquire_owned().await else { break };
                        let (client, handler, cancel) = (self.client.clone(), handler.clone(), stop.child_token());
                        in_flight.spawn(async move {
                            execute(client, handler, run, cancel).await;
                            drop(permit);
                        });
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "dequeue failed; backing off");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        while in_flight.join_next().await.is_some() {}
    }
}

/// Runs one assigned run: heartbeats beside the handler until the run has
/// ended, cancels the handler when the server says so, then reports
/// completion or failure (a handler's error or panic is a failure).
///
/// The heartbeat outlives the handler: it stops only once the final report
/// is acknowledged (or given up on), the server says the run is over, or the
/// worker shuts down, so a report retried through a server restart never
/// finds its run crashed for want of beats.
pub async fn execute(client: WorkerClient, handler: Arc<dyn TaskHandler>, run: AssignedRun, cancel: CancellationToken) {
    // Set when the server answers a beat with "stop": the run is final there.
    let server_stopped = CancellationToken::new();
    // Set once the run needs no more beats.
    let ended = CancellationToken::new();
    let beat =
        tokio::spawn(heartbeats(client.clone(), run.clone(), cancel.clone(), server_stopped.clone(), ended.clone()));
    let ctx = RunContext { run: run.clone(), cancel: cancel.clone(), client: client.clone() };
    // Its own task, so a panic is this attempt's failure, not the worker's.
    let result = match tokio::spawn(async move { handler.run(ctx).await }).await {
        Ok(result) => result,
        Err(err) => Err(anyhow::anyhow!("the handler stopped abnormally: {err}")),
    };
    if server_stopped.is_cancelled() || cancel.is_cancelled() {
        // The server already holds a final state (canceled, timed out), or we
        // are shutting down; the heartbeat deadline settles the latter.
        ended.cancel();
        let _ = beat.await;
        return;
    }
    let report = match result {
        Ok(output) => client.complete(&run, output).await.map(|_| ()),
        Err(err) => client.fail(&run, json!({ "message": format!("{err:#}") }), true).await.map(|_| ()),
    };
    ended.cancel();
    let _ = beat.await;
    if let Err(err) = report {
        tracing::warn!(run = %run.id, %err, "could not report the run's result");
    }
}

/// Beats every heartbeat interval until `ended`; when the server answers that
/// the run is over, says so (`server_stopped`) and cancels the handler.
async fn heartbeats(
    client: WorkerClient,
    run: AssignedRun,
    cancel: CancellationToken,
    server_stopped: CancellationToken,
    ended: CancellationToken,
) {
    let every = Duration::from_millis(run.heartbeat_interval_ms.max(10));
    loop {
        tokio::select! {
            _ = ended.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let beat = tokio::select! {
            _ = ended.cancelled() => return,
            beat = client.heartbeat(&run) => beat,
        };
        match beat {
            Ok(reply) if reply.cancel => {
                tracing::info!(run = %run.id, status = %reply.status, "server stopped the run");
                server_stopped.cancel();
                cancel.cancel();
                return;
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(run = %run.id, %err, "heartbeat failed"),
        }
    }
}
