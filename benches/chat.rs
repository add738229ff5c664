//! Chat turn latency through the official client: `AgentChat`
//! (`@trigger.dev/sdk`, tests/chat-client/bench.mjs) against the example agent
//! running in this process, on a server on loopback. From `sendMessage` to the
//! first text delta and to turn-complete, p50/p99 over 200 turns (target:
//! first delta p99 ≤ 25 ms). Needs `npm ci` in tests/chat-client.
//!
//! Run: `cargo bench --bench chat` (`TURNS=N` for another count). Prints
//! figures; asserts nothing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sessiond::worker::channels::HttpChannelFactory;
use sessiond::worker::echo::EchoAgent;
use sessiond::worker::{Worker, WorkerClient};
use tokio_util::sync::CancellationToken;

mod common;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chat-client");
    anyhow::ensure!(dir.join("node_modules/@trigger.dev/sdk").exists(), "run `npm ci` in tests/chat-client first");
    let server = common::BenchServer::start(|_| {}).await?;
    let (base, key) = (server.base.clone(), server.key.clone());
    println!("sessiond chat bench: AgentChat → echo agent, loopback, one server process");

    let stop = CancellationToken::new();
    let agent = EchoAgent { channels: Arc::new(HttpChannelFactory { base_url: base.clone() }) };
    let worker = tokio::spawn(
        Worker::new(WorkerClient::new(&base, &key), vec!["echo-agent".into()], 4).run(Arc::new(agent), stop.clone()),
    );

    let script = dir.join("bench.mjs");
    let output = tokio::process::Command::new("node")
        .arg(script)
        .env("TRIGGER_API_URL", &base)
        .env("TRIGGER_SECRET_KEY", &key)
        .env("TURNS", std::env::var("TURNS").unwrap_or_else(|_| "200".into()))
        .output()
        .await?;
    print!("{}", String::from_utf8_lossy(&output.stdout));
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    anyhow::ensure!(output.status.success(), "bench.mjs failed");

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), worker).await;
    server.finish().await
}
