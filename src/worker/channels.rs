//! Session channel I/O as a worker sees it. The HTTP implementation arrives with
//! the realtime streams; [`MemoryChannels`] serves tests and local experiments.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::retry;

/// One record on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[async_trait]
pub trait SessionChannels: Send + Sync {
    /// The next `.in` record after `after` (from the start if None), waiting up
    /// to `timeout`; None if nothing arrived.
    async fn next_input(&self, after: Option<u64>, timeout: Duration) -> anyhow::Result<Option<Record>>;
    /// Appends a record to `.out`.
    async fn append_output(&self, body: &str, headers: &[(String, String)]) -> anyhow::Result<()>;
    /// Every `.out` record so far (an agent reads it to resume where the last run stopped).
    async fn read_output(&self) -> anyhow::Result<Vec<Record>>;
    /// Is an `.in` record after `seq` already stored? (Without waiting.)
    async fn has_input_after(&self, seq: u64) -> anyhow::Result<bool>;
    /// A fresh public token for the session's clients (read and write on the
    /// session), handed out on each `turn-complete`. None where there is no
    /// server to mint one.
    async fn turn_token(&self) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
}

/// Makes the channels of the session a run serves.
pub trait ChannelFactory: Send + Sync {
    fn for_run(&self, run: &super::AssignedRun) -> std::sync::Arc<dyn SessionChannels>;
}

/// In-memory channels: one `.in` and one `.out` list.
#[derive(Default)]
pub struct MemoryChannels {
    input: Mutex<Vec<Record>>,
    output: Mutex<Vec<Record>>,
    arrived: Notify,
    token: Mutex<Option<String>>,
}

impl MemoryChannels {
    pub fn send_input(&self, body: &str, headers: &[(String, String)]) -> u64 {
        let seq = {
            let mut input = self.input.lock().unwrap_or_else(|e| e.into_inner());
            let seq = input.len() as u64;
            input.push(Record { seq, body: body.to_string(), headers: headers.to_vec() });
            seq
        };
        self.arrived.notify_waiters();
        seq
    }

    pub fn output(&self) -> Vec<Record> {
        self.output.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The token [`SessionChannels::turn_token`] hands out from now on.
    pub fn set_turn_token(&self, token: &str) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.to_string());
    }
}

#[async_trait]
impl SessionChannels for MemoryChannels {
    async fn next_input(&self, after: Option<u64>, timeout: Duration) -> anyhow::Result<Option<Record>> {
        let wanted = after.map(|a| a + 1).unwrap_or(0) as usize;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.input.lock().unwrap_or_else(|e| e.into_inner()).get(wanted) {
                return Ok(Some(r.clone()));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    async fn append_output(&self, body: &str, headers: &[(String, String)]) -> anyhow::Result<()> {
        let mut out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let seq = out.len() as u64;
        out.push(Record { seq, body: body.to_string(), headers: headers.to_vec() });
        Ok(())
    }

    async fn read_output(&self) -> anyhow::Result<Vec<Record>> {
        Ok(self.output())
    }

    async fn has_input_after(&self, seq: u64) -> anyhow::Result<bool> {
        Ok(self.input.lock().unwrap_or_else(|e| e.into_inner()).len() as u64 > seq.saturating_add(1))
    }

    async fn turn_token(&self) -> anyhow::Result<Option<String>> {
        Ok(self.token.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Channels over the server's HTTP API, with the run's own token: `.in` is read
/// through session-stream waitpoints (so the run shows as WAITING between turns),
/// `.out` is written with appends.
pub struct HttpChannels {
    http: reqwest::Client,
    base: String,
    run_id: String,
    session: String,
    token: String,
    /// How long each call keeps trying (see [`super::retry`]).
    budget: Duration,
}

/// How long the token handed out at the end of a turn lives: the longest a
/// run may mint.
const TURN_TOKEN_TTL: &str = "1h";

/// Makes [`HttpChannels`] for each run.
pub struct HttpChannelFactory {
    pub base_url: String,
}

impl ChannelFactory for HttpChannelFactory {
    fn for_run(&self, run: &super::AssignedRun) -> std::sync::Arc<dyn SessionChannels> {
        std::sync::Arc::new(HttpChannels {
            // Above the longest long-poll (30 s), so only a hung connection times out.
            http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap_or_default(),
            base: self.base_url.trim_end_matches('/').to_string(),
            run_id: run.id.clone(),
            session: run.session_id.clone().unwrap_or_default(),
            token: run.token.clone(),
            budget: super::client::run_budget(run),
        })
    }
}

impl HttpChannels {
    /// A GET on the server with the run's token.
    async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        Ok(retry::send_json(|| self.http.get(&url).bearer_auth(&self.token), self.budget).await?)
    }

    /// A POST of `body` on the server with the run's token; `body` makes it
    /// safe to repeat.
    async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        Ok(retry::send_json(|| self.http.post(&url).bearer_auth(&self.token).json(body), self.budget).await?)
    }
}

fn record_from_output(output: &serde_json::Value) -> Option<Record> {
    if output.get("sessionClosed").and_then(serde_json::Value::as_bool) == Some(true) {
        return Some(Record {
            seq: u64::MAX,
            body: String::new(),
            headers: vec![(crate::streams::CONTROL_HEADER.into(), crate::streams::SESSION_CLOSED.into())],
        });
    }
    Some(Record {
        seq: output.get("seqNum")?.as_u64()?,
        body: output.get("body")?.as_str()?.to_string(),
        headers: serde_json::from_value(output.get("headers")?.clone()).ok()?,
    })
}

#[async_trait]
impl SessionChannels for HttpChannels {
    async fn next_input(&self, after: Option<u64>, timeout: Duration) -> anyhow::Result<Option<Record>> {
        // One key for every try: a repeat whose first answer was lost returns
        // the same waitpoint instead of a second one.
        let key = format!("{}:{}", self.run_id, uuid::Uuid::new_v4().simple());
        let body = serde_json::json!({
            "session": self.session,
            "io": "in",
            "lastSeqNum": after.map(|a| a as i64).unwrap_or(-1),
            "timeout": format!("{}s", timeout.as_secs().max(1)),
            "idempotencyKey": key,
            // Only this call's tries share it.
            "idempotencyKeyTTL": "1h",
        });
        let created = self.post(&format!("/api/v1/runs/{}/session-streams/wait", self.run_id), &body).await?;
        let waitpoint = created["waitpointId"].as_str().unwrap_or_default().to_string();
        loop {
            let state =
                self.get(&format!("/api/v1/runs/{}/waitpoints/{waitpoint}?waitSeconds=30", self.run_id)).await?;
            match state["status"].as_str() {
                Some("WAITING") => continue,
                Some("COMPLETED") => return Ok(record_from_output(&state["output"])),
                _ => return Ok(None),
            }
        }
    }

    async fn append_output(&self, body: &str, headers: &[(String, String)]) -> anyhow::Result<()> {
        // One part id for every try: the server stores the record once.
        let part = uuid::Uuid::new_v4().simple().to_string();
        let headers = (!headers.is_empty()).then(|| serde_json::to_string(headers)).transpose()?;
        let url = format!("{}/realtime/v1/sessions/{}/out/append", self.base, self.session);
        let append = || {
            let req = self.http.post(&url).bearer_auth(&self.token).header("x-part-id", &part).body(body.to_string());
            match &headers {
                Some(h) => req.header("x-record-headers", h),
                None => req,
            }
        };
        retry::send(append, self.budget).await?;
        Ok(())
    }

    async fn has_input_after(&self, seq: u64) -> anyhow::Result<bool> {
        let page = self.get(&format!("/realtime/v1/sessions/{}/in/records?afterEventId={seq}", self.session)).await?;
        Ok(page["records"].as_array().is_some_and(|r| !r.is_empty()))
    }

    /// Minted with the run's own token, which may mint exactly this.
    async fn turn_token(&self) -> anyhow::Result<Option<String>> {
        let scopes = [format!("read:sessions:{}", self.session), format!("write:sessions:{}", self.session)];
        // Minting twice is harmless: the turn hands out the last one.
        let body = serde_json::json!({ "scopes": scopes, "expirationTime": TURN_TOKEN_TTL });
        let minted = self.post("/api/v1/auth/public-tokens", &body).await?;
        Ok(minted["token"].as_str().map(String::from))
    }

    async fn read_output(&self) -> anyhow::Result<Vec<Record>> {
        let mut out = Vec::new();
        loop {
            let after = out.last().map(|r: &Record| format!("?afterEventId={}", r.seq)).unwrap_or_default();
            let page = self.get(&format!("/realtime/v1/sessions/{}/out/records{after}", self.session)).await?;
            let records = page["records"].as_array().cloned().unwrap_or_default();
            if records.is_empty() {
                return Ok(out);
            }
            for r in records {
                out.push(Record {
                    seq: r["seqNum"].as_u64().unwrap_or(0),
                    // Only headers matter to readers of past output here.
                    body: String::new(),
                    headers: serde_json::from_value(r.get("headers").cloned().unwrap_or_default()).unwrap_or_default(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use axum::{Json, Router};

    use super::*;

    /// Part ids of the appends a fake server saw, per session.
    type Seen = Arc<Mutex<Vec<(String, String)>>>;

    /// `.out` appends: the first to session "flaky" answers 503; every one to
    /// "conflict" answers 409; the rest 200.
    async fn fake_append(
        State(seen): State<Seen>,
        Path(session): Path<String>,
        headers: HeaderMap,
    ) -> (StatusCode, Json<serde_json::Value>) {
        let part = headers.get("x-part-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let mut seen = seen.lock().unwrap();
        let first = !seen.iter().any(|(s, _)| *s == session);
        seen.push((session.clone(), part));
        match session.as_str() {
            "flaky" if first => (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "retry"}))),
            "conflict" => (StatusCode::CONFLICT, Json(serde_json::json!({"error": "superseded"}))),
            _ => (StatusCode::OK, Json(serde_json::json!({"ok": true}))),
        }
    }

    fn channels(base: &str, session: &str) -> HttpChannels {
        HttpChannels {
            http: reqwest::Client::new(),
            base: base.to_string(),
            run_id: "run_x".into(),
            session: session.into(),
            token: "t".into(),
            budget: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn an_append_is_tried_again_after_a_5xx_with_its_part_id_and_never_after_a_4xx() {
        let seen = Seen::default();
        let app = Router::new()
            .route("/realtime/v1/sessions/{session}/out/append", post(fake_append))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        channels(&base, "flaky").append_output("x", &[]).await.expect("the second try lands");
        let flaky: Vec<String> =
            seen.lock().unwrap().iter().filter(|(s, _)| s == "flaky").map(|(_, p)| p.clone()).collect();
        assert_eq!(flaky.len(), 2);
        assert_eq!(flaky[0], flaky[1], "one part id, so the server stores the record once");

        assert!(channels(&base, "conflict").append_output("x", &[]).await.is_err());
        assert_eq!(seen.lock().unwrap().iter().filter(|(s, _)| s == "conflict").count(), 1, "a 409 is final");
    }
}
