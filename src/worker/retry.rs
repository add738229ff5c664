//! The one retry policy every worker-library call goes through (dequeue,
//! heartbeat, complete, fail, wait creation and reads, channel appends and
//! reads). A server restart or failover, or a 503 while Redis is slow, must not
//! end a run that is otherwise fine: a call is tried again after a transport
//! error, a 5xx or a 429 (waiting at least its `Retry-After`), with jittered
//! exponential backoff capped at a second ([`MAX_DELAY`] and its jitter), for as long as it can still
//! matter: a run's calls for its heartbeat timeout (past it the server has
//! declared the run crashed anyway). Any other 4xx is the server's final word
//! and is never repeated. Callers make requests that are safe to repeat (an
//! append carries its part id, a wait its idempotency key, complete and fail
//! their attempt).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::RETRY_AFTER;
use reqwest::{RequestBuilder, StatusCode};

/// The first pause after a failed try.
pub const FIRST_DELAY: Duration = Duration::from_millis(50);
/// The longest pause between two tries before jitter (which adds up to as much
/// again): a restarted server is noticed within a second.
pub const MAX_DELAY: Duration = Duration::from_millis(500);
/// The longest `Retry-After` honoured: beyond it the server is asking for more
/// than a run can give.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Tries made again in this process, for operators and tests.
static RETRIES: AtomicU64 = AtomicU64::new(0);

/// How many calls were tried again so far in this process.
pub fn retries() -> u64 {
    RETRIES.load(Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("server answered {status}: {body}")]
    Status { status: u16, body: String, retry_after: Option<Duration> },
    #[error("server answered with an unreadable body: {0}")]
    Decode(#[from] serde_json::Error),
}

impl ClientError {
    /// Worth another try: the server may answer differently once it is back.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport(_) => true,
            ClientError::Status { status, .. } => *status >= 500 || *status == StatusCode::TOO_MANY_REQUESTS.as_u16(),
            ClientError::Decode(_) => false,
        }
    }

    /// The HTTP status the server answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// One try: the response body of a 2xx, or the error.
async fn try_once(req: RequestBuilder) -> Result<axum::body::Bytes, ClientError> {
    let resp = req.send().await?;
    let status = resp.status();
    if status.is_success() {
        // Read inside the try: a connection cut mid-body is tried again too.
        return Ok(resp.bytes().await?);
    }
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    let body = resp.text().await.unwrap_or_default();
    Err(ClientError::Status { status: status.as_u16(), body, retry_after })
}

/// Sends the request `make` builds (afresh for each try) until it succeeds, it
/// fails for good, or the pauses between tries would pass `budget`. Returns
/// the 2xx body.
pub async fn send(make: impl Fn() -> RequestBuilder, budget: Duration) -> Result<axum::body::Bytes, ClientError> {
    let policy = ExponentialBuilder::default()
        .with_min_delay(FIRST_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(budget));
    (|| try_once(make()))
        .retry(policy)
        .sleep(tokio::time::sleep)
        .when(ClientError::is_transient)
        // A pause the backoff still allows is stretched to the server's Retry-After.
        .adjust(|err, pause| pause.map(|p| err.retry_after().map_or(p, |after| after.max(p))))
        .notify(|err, pause| {
            RETRIES.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%err, ?pause, "worker call failed; trying again");
        })
        .await
}

/// [`send`], with the body read as JSON.
pub async fn send_json<T: serde::de::DeserializeOwned>(
    make: impl Fn() -> RequestBuilder,
    budget: Duration,
) -> Result<T, ClientError> {
    let body = send(make, budget).await?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Instant;

    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use axum::Router;

    use super::*;

    /// `/{status}/{fails}`: answers `status` to the first `fails` tries, then 200.
    async fn flaky(
        State(tries): State<Arc<AtomicUsize>>,
        Path((status, fails)): Path<(u16, usize)>,
    ) -> impl IntoResponse {
        let n = tries.fetch_add(1, Ordering::SeqCst);
        let mut headers = HeaderMap::new();
        if n < fails {
            if status == 429 {
                headers.insert("retry-after", HeaderValue::from_static("1"));
            }
            return (StatusCode::from_u16(status).unwrap(), headers, "no".to_string());
        }
        (StatusCode::OK, headers, "\"yes\"".to_string())
    }

    async fn fake() -> (String, Arc<AtomicUsize>) {
        let tries = Arc::new(AtomicUsize::new(0));
        let app = Router::new().route("/{status}/{fails}", get(flaky)).with_state(tries.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (base, tries)
    }

    #[tokio::test]
    async fn five_hundreds_are_tried_again_and_other_4xx_never() {
        let http = reqwest::Client::new();
        let (base, tries) = fake().await;
        let got: String = send_json(|| http.get(format!("{base}/503/3")), Duration::from_secs(5))
            .await
            .expect("the fourth try lands");
        assert_eq!((got.as_str(), tries.load(Ordering::SeqCst)), ("yes", 4));

        let (base, tries) = fake().await;
        let err = send(|| http.get(format!("{base}/409/3")), Duration::from_secs(5)).await.unwrap_err();
        assert_eq!((err.status(), tries.load(Ordering::SeqCst)), (Some(409), 1), "a 409 is final");
    }

    #[tokio::test]
    async fn a_429_waits_its_retry_after() {
        let http = reqwest::Client::new();
        let (base, tries) = fake().await;
        let started = Instant::now();
        send(|| http.get(format!("{base}/429/1")), Duration::from_secs(5)).await.expect("the second try lands");
        assert_eq!(tries.load(Ordering::SeqCst), 2);
        assert!(started.elapsed() >= Duration::from_secs(1), "waited {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_server_that_stays_away_is_given_up_on_after_the_budget() {
        let http = reqwest::Client::new();
        // A port nobody listens on: every try is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let started = Instant::now();
        let err =
            send(|| http.get(format!("http://127.0.0.1:{port}/")), Duration::from_millis(1500)).await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, ClientError::Transport(_)), "{err}");
        assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(4), "gave up after {took:?}");
    }

    #[tokio::test]
    async fn a_server_that_comes_back_within_the_budget_is_reached() {
        let http = reqwest::Client::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        // Down for 700 ms, then up.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let app = Router::new().route("/", get(|| async { "\"up\"" }));
            axum::serve(listener, app).await.unwrap();
        });
        let got: String = send_json(|| http.get(format!("http://{addr}/")), Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, "up");
    }
}
