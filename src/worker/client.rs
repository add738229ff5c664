//! HTTP client for the worker protocol. Dequeue uses the environment's secret
//! key; everything about one run uses the run's own scoped token.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::retry;

/// A run handed to this worker: the server's dequeue answer, read back.
pub use crate::runs::DequeuedRun as AssignedRun;
/// The most runs one dequeue may ask for (the server refuses more).
pub use crate::runs::MAX_DEQUEUE_RUNS;

/// How long a dequeue keeps trying through a server restart before the
/// worker's loop pauses and asks again.
const DEQUEUE_BUDGET: Duration = Duration::from_secs(30);

/// How long a call about `run` keeps trying: its heartbeat timeout, past which
/// the server has declared the run crashed.
pub fn run_budget(run: &AssignedRun) -> Duration {
    Duration::from_millis(run.heartbeat_timeout_ms.max(1))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatReply {
    pub ok: bool,
    pub status: String,
    pub cancel: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Handoff {
    pub run_id: String,
    pub swapped: bool,
}

pub use super::retry::ClientError;

#[derive(Clone)]
pub struct WorkerClient {
    http: reqwest::Client,
    base: String,
    secret_key: String,
    worker_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DequeueRequest<'a> {
    tasks: &'a [String],
    max_runs: usize,
    wait_seconds: u64,
    worker_id: &'a str,
    /// One per logical dequeue, the same on each retry of it: a retry after an
    /// answer lost to a restart or a cut connection gets the runs the first
    /// try claimed, rather than leaving them to crash unheard of.
    request_id: &'a str,
}

impl WorkerClient {
    pub fn new(base_url: &str, secret_key: &str) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap_or_default();
        WorkerClient {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            secret_key: secret_key.to_string(),
            worker_id: format!("worker-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Long-polls for up to `max` runs of `tasks`; empty after `wait` with no work.
    pub async fn dequeue(&self, tasks: &[String], max: usize, wait: Duration) -> Result<Vec<AssignedRun>, ClientError> {
        #[derive(Deserialize)]
        struct Reply {
            runs: Vec<AssignedRun>,
        }
        // Never more than the server allows: it refuses the whole request otherwise.
        let max_runs = max.clamp(1, MAX_DEQUEUE_RUNS);
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let body = DequeueRequest {
            tasks,
            max_runs,
            wait_seconds: wait.as_secs(),
            worker_id: &self.worker_id,
            request_id: &request_id,
        };
        let url = format!("{}/api/v1/worker/dequeue", self.base);
        let reply: Reply =
            retry::send_json(|| self.http.post(&url).bearer_auth(&self.secret_key).json(&body), DEQUEUE_BUDGET).await?;
        Ok(reply.runs)
    }

    pub async fn heartbeat(&self, run: &AssignedRun) -> Result<HeartbeatReply, ClientError> {
        let url = format!("{}/api/v1/runs/{}/heartbeat", self.base, run.id);
        retry::send_json(|| self.http.post(&url).bearer_auth(&run.token), run_budget(run)).await
    }

    /// Reports the attempt's output. Carries the attempt number, so a repeat
    /// (its answer lost to a restart) answers as the first did.
    pub async fn complete(&self, run: &AssignedRun, output: Value) -> Result<Value, ClientError> {
        let url = format!("{}/api/v1/runs/{}/complete", self.base, run.id);
        let body = json!({ "output": output, "attemptNumber": run.attempt_number });
        retry::send_json(|| self.http.post(&url).bearer_auth(&run.token).json(&body), run_budget(run)).await
    }

    /// Reports the attempt as failed; idempotent by attempt like [`Self::complete`].
    pub async fn fail(&self, run: &AssignedRun, error: Value, retryable: bool) -> Result<Value, ClientError> {
        let url = format!("{}/api/v1/runs/{}/fail", self.base, run.id);
        let body = json!({ "error": error, "retryable": retryable, "attemptNumber": run.attempt_number });
        retry::send_json(|| self.http.post(&url).bearer_auth(&run.token).json(&body), run_budget(run)).await
    }

    /// Hands the run's session to a fresh run (e.g. to pick up a new version).
    pub async fn end_and_continue(&self, run: &AssignedRun, reason: &str) -> Result<Handoff, ClientError> {
        let session = run.session_id.as_deref().unwrap_or_default();
        let url = format!("{}/api/v1/sessions/{}/end-and-continue", self.base, session);
        let body = json!({ "callingRunId": run.id, "reason": reason });
        retry::send_json(|| self.http.post(&url).bearer_auth(&run.token).json(&body), run_budget(run)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::{Json, Router};

    use super::*;

    type Bodies = Arc<Mutex<Vec<Value>>>;

    /// Records every dequeue body; answers 503 to every first try of a
    /// request id (as if the server died before answering), 200 to a repeat.
    async fn flaky_dequeue(State(bodies): State<Bodies>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
        let mut seen = bodies.lock().unwrap();
        let repeat = seen.iter().any(|b| b["requestId"] == body["requestId"]);
        seen.push(body);
        if repeat {
            (StatusCode::OK, Json(json!({ "runs": [] })))
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": "restarting" })))
        }
    }

    #[tokio::test]
    async fn a_dequeue_sends_one_request_id_on_every_retry_and_a_new_one_per_call() {
        let bodies = Bodies::default();
        let app = Router::new().route("/api/v1/worker/dequeue", post(flaky_dequeue)).with_state(bodies.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let client = WorkerClient::new(&base, "tr_dev_test");
        let tasks = vec!["t".to_string()];
        for _ in 0..2 {
            let runs = client.dequeue(&tasks, 1, Duration::from_secs(1)).await.expect("the retry lands");
            assert!(runs.is_empty());
        }
        let seen = bodies.lock().unwrap();
        let ids: Vec<&str> = seen.iter().map(|b| b["requestId"].as_str().expect("a requestId")).collect();
        assert_eq!(ids.len(), 4, "two calls, each tried twice: {ids:?}");
        assert_eq!(ids[0], ids[1], "a retry repeats its call's key");
        assert_eq!(ids[2], ids[3], "a retry repeats its call's key");
        assert_ne!(ids[0], ids[2], "each call has its own key");
        assert!(!ids[0].is_empty());
    }
}
