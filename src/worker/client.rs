//! HTTP client for the worker protocol. Dequeue uses the environment's secret
//! key; everything about one run uses the run's own scoped token.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A run handed to this worker: the server's dequeue answer, read back.
pub use crate::runs::DequeuedRun as AssignedRun;

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

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("server answered {status}: {body}")]
    Status { status: u16, body: String },
}

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

    async fn send<T: serde::de::DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let resp = req.send().await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(ClientError::Status { status: status.as_u16(), body });
        }
        Ok(resp.json().await?)
    }

    /// Long-polls for up to `max` runs of `tasks`; empty after `wait` with no work.
    pub async fn dequeue(&self, tasks: &[String], max: usize, wait: Duration) -> Result<Vec<AssignedRun>, ClientError> {
        #[derive(Deserialize)]
        struct Reply {
            runs: Vec<AssignedRun>,
        }
        let body = DequeueRequest { tasks, max_runs: max, wait_seconds: wait.as_secs(), worker_id: &self.worker_id };
        let req =
            self.http.post(format!("{}/api/v1/worker/dequeue", self.base)).bearer_auth(&self.secret_key).json(&body);
        Ok(self.send::<Reply>(req).await?.runs)
    }

    pub async fn heartbeat(&self, run: &AssignedRun) -> Result<HeartbeatReply, ClientError> {
        let req = self.http.post(format!("{}/api/v1/runs/{}/heartbeat", self.base, run.id)).bearer_auth(&run.token);
        self.send(req).await
    }

    pub async fn complete(&self, run: &AssignedRun, output: Value) -> Result<Value, ClientError> {
        let req = self
            .http
            .post(format!("{}/api/v1/runs/{}/complete", self.base, run.id))
            .bearer_auth(&run.token)
            .json(&json!({ "output": output }));
        self.send(req).await
    }

    pub async fn fail(&self, run: &AssignedRun, error: Value, retryable: bool) -> Result<Value, ClientError> {
        let req = self
            .http
            .post(format!("{}/api/v1/runs/{}/fail", self.base, run.id))
            .bearer_auth(&run.token)
            .json(&json!({ "error": error, "retryable": retryable }));
        self.send(req).await
    }

    /// Hands the run's session to a fresh run (e.g. to pick up a new version).
    pub async fn end_and_continue(&self, run: &AssignedRun, reason: &str) -> Result<Handoff, ClientError> {
        let session = run.session_id.as_deref().unwrap_or_default();
        let req = self
            .http
            .post(format!("{}/api/v1/sessions/{}/end-and-continue", self.base, session))
            .bearer_auth(&run.token)
            .json(&json!({ "callingRunId": run.id, "reason": reason }));
        self.send(req).await
    }
}
