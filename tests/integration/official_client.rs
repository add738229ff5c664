//! The official Trigger.dev client (`@trigger.dev/core@4.8.3`'s ApiClient) drives
//! a running server: the control plane, and the realtime session channels
//! against the in-process echo worker. Node dependencies are installed by
//! scripts/test.sh.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::common::node::{self, assert_all_passed};
use crate::common::TestApp;
use sessiond::worker::channels::HttpChannelFactory;
use sessiond::worker::echo::EchoAgent;
use sessiond::worker::Worker;
use tokio_util::sync::CancellationToken;

fn client_dir() -> PathBuf {
    node::client_dir("official-client", &["@trigger.dev/core"])
}

/// How many checks each script runs; update with the scripts.
const CONTROL_PLANE_CHECKS: usize = 19;
const REALTIME_CHECKS: usize = 23;

#[tokio::test]
async fn official_client_control_plane() {
    let dir = client_dir();
    let app = TestApp::spawn().await;
    let output = node::run_script(&app, dir, "control-plane.mjs", &[]).await;
    assert_all_passed(&output, CONTROL_PLANE_CHECKS);
}

/// The client retries a 429 after `x-ratelimit-reset` (epoch ms), which it
/// reads before any backoff of its own: a burst over a low create limit
/// passes whole (see tests/official-client/rate-limit.mjs).
#[tokio::test]
async fn official_client_waits_out_rate_limits() {
    let dir = client_dir();
    let app = TestApp::spawn_with(|c| c.rate_limit_create_per_sec = 2).await;
    let output = node::run_script(&app, dir, "rate-limit.mjs", &[]).await;
    assert_all_passed(&output, 1);
}

#[tokio::test]
async fn official_client_realtime() {
    let dir = client_dir();
    let app = TestApp::spawn().await;
    let stop = CancellationToken::new();
    let agent = EchoAgent { channels: Arc::new(HttpChannelFactory { base_url: app.base.clone() }) };
    let worker =
        tokio::spawn(Worker::new(app.worker(), vec!["echo-agent".into()], 4).run(Arc::new(agent), stop.clone()));

    let output = node::run_script(&app, dir, "realtime.mjs", &[]).await;

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker).await.expect("worker stops").unwrap();
    assert_all_passed(&output, REALTIME_CHECKS);
}
