//! Dependencies failing fast: while Redis is down, channel routes answer 503
//! (with `Retry-After`) within 2 s instead of waiting out the client's
//! reconnect backoff; `/healthz` still answers and `/readyz` says not ready.
//! Runs its own `redis-server`, killed mid-test, so the shared one is untouched.

use std::time::{Duration, Instant};

use crate::common::redis_proc::{start_fresh, RedisProc, TempDir};
use crate::common::{eventually, session_body, TestApp};
use reqwest::header::RETRY_AFTER;
use reqwest::{RequestBuilder, StatusCode};
use serde_json::Value;

/// The spec's bound for answering while a dependency is down.
const FAIL_FAST: Duration = Duration::from_secs(2);

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    body: Value,
    took: Duration,
}

async fn send(req: RequestBuilder) -> Answer {
    let started = Instant::now();
    let resp = req.timeout(Duration::from_secs(20)).send().await.expect("request");
    let took = started.elapsed();
    let status = resp.status();
    let retry_after = resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).map(String::from);
    let body = serde_json::from_str(&resp.text().await.expect("response body")).unwrap_or(Value::Null);
    Answer { status, retry_after, body, took }
}

#[tokio::test]
async fn while_redis_is_down_channel_routes_answer_503_within_2s_and_readyz_is_503() {
    let dir = TempDir::new();
    let mut redis = start_fresh(&dir.0).await;
    let (url, port) = (redis.url(), redis.port);
    let app = TestApp::spawn_with(|c| c.redis_url = url).await;
    let key = app.a.key.clone();
    let session = app.create_session(session_body(Some("deps"))).await;
    let id = session["id"].as_str().unwrap().to_string();
    let channel = |io: &str, rest: &str| format!("{}/realtime/v1/sessions/{id}/{io}{rest}", app.base);
    let http = reqwest::Client::new();
    // (A subscription that wrongly succeeded would end with its window.)
    let subscribe = || http.get(channel("out", "")).bearer_auth(&key).header("timeout-seconds", "5");

    assert_eq!(app.append(&id, "out", &key, "before", &[]).await.0, 200);
    let ready = send(http.get(format!("{}/readyz", app.base))).await;
    assert_eq!((ready.status, ready.body["ready"].clone()), (StatusCode::OK, Value::Bool(true)));

    redis.kill9();

    let requests: Vec<(&str, RequestBuilder)> = vec![
        ("append .out", http.post(channel("out", "/append")).bearer_auth(&key).body("during")),
        ("append .in", http.post(channel("in", "/append")).bearer_auth(&key).body("during")),
        ("records", http.get(channel("out", "/records")).bearer_auth(&key)),
        ("subscribe", subscribe().header("accept", "text/event-stream")),
        ("subscribe from a cursor", subscribe().header("last-event-id", "0")),
        ("subscribe from the end", subscribe().header("x-trigger-stream-start", "latest")),
    ];
    for (what, req) in requests {
        let a = send(req).await;
        eprintln!("{what}: {} in {:?}", a.status, a.took);
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {}", a.body);
        assert!(a.took < FAIL_FAST, "{what} took {:?}", a.took);
        assert_eq!(a.retry_after.as_deref(), Some("1"), "{what}");
        let error = a.body["error"].as_str().unwrap_or_else(|| panic!("{what}: {}", a.body));
        assert!(!error.to_lowercase().contains("redis"), "{what} leaks internals: {error}");
    }

    let health = send(http.get(format!("{}/healthz", app.base))).await;
    assert_eq!(health.status, StatusCode::OK);
    let ready = send(http.get(format!("{}/readyz", app.base))).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{}", ready.body);
    assert!(ready.took < FAIL_FAST, "readyz took {:?}", ready.took);

    // Back on the same port: ready again, and appends work.
    let mut redis = RedisProc::spawn(&dir.0, port);
    assert!(redis.wait_ready(Duration::from_secs(10)).await, "redis did not come back:\n{}", redis.log());
    eventually(10, "ready again", || async {
        (send(http.get(format!("{}/readyz", app.base))).await.status == StatusCode::OK).then_some(())
    })
    .await;
    eventually(10, "appends again", || async {
        (app.append(&id, "out", &key, "after", &[]).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    drop(redis);
}
