//! `worker`: a task worker that talks to a server over HTTP only (no
//! database, no Redis).

use std::sync::Arc;

use clap::Args;
use tokio_util::sync::CancellationToken;

use sessiond::worker::{channels::HttpChannelFactory, echo, Worker, WorkerClient};

use super::serve::shutdown_signal;

#[derive(Args)]
pub struct WorkerArgs {
    /// Task identifier to serve (only `echo-agent` ships).
    #[arg(long, default_value = "echo-agent")]
    task: String,
    /// Server base URL.
    #[arg(long, env = "SESSIOND_URL", default_value = "http://127.0.0.1:3030")]
    url: String,
    /// Environment secret key.
    #[arg(long, env = "SESSIOND_SECRET_KEY", hide_env_values = true)]
    key: String,
    /// Runs handled at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let WorkerArgs { task, url, key, concurrency } = args;
    anyhow::ensure!(task == echo::TASK, "this binary ships one task, {}", echo::TASK);
    let agent = echo::EchoAgent { channels: Arc::new(HttpChannelFactory { base_url: url.clone() }) };
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });
    tracing::info!(%url, %task, "worker started");
    Worker::new(WorkerClient::new(&url, &key), vec![task], concurrency).run(Arc::new(agent), stop).await;
    Ok(())
}
