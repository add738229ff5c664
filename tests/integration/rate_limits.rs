//! Request-rate limits (issue 24 item 10): per environment and route class,
//! per public token, shared by processes through Redis leases, and never a
//! Redis round trip per append.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::redis_proc::{free_port, RedisProc, TempDir};
use crate::common::{session_body, TestApp};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = serde_json::from_str(&resp.text().await.expect("body")).unwrap_or(Value::Null);
    Answer { status, headers, body }
}

async fn create(app: &TestApp, key: &str, ext: &str) -> Answer {
    let req = app.client.post(format!("{}/api/v1/sessions", app.base)).bearer_auth(key).json(&session_body(Some(ext)));
    send(req).await
}

fn header_i64(a: &Answer, name: &str) -> i64 {
    let v = a.headers.get(name).unwrap_or_else(|| panic!("no {name} on the 429: {:?}", a.headers));
    v.to_str().unwrap().parse().unwrap_or_else(|_| panic!("{name} is not an integer: {v:?}"))
}

/// A 429 from a limit of `limit` requests a window: the four headers, with
/// values a client can act on, and the API's error shape with its `code`.
fn assert_rate_limited(a: &Answer, limit: i64, sent_at_ms: i64, window_ms: i64) {
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert_eq!(a.body["code"], json!("rate_limited"), "{}", a.body);
    assert!(a.body["error"].as_str().is_some_and(|e| e.contains("Rate limit")), "{}", a.body);
    assert_eq!(header_i64(a, "x-ratelimit-limit"), limit);
    assert_eq!(header_i64(a, "x-ratelimit-remaining"), 0);
    let reset = header_i64(a, "x-ratelimit-reset");
    // Epoch ms (not seconds, not a delta): after the request was sent, within a window.
    assert!(reset >= sent_at_ms && reset <= now_ms() + window_ms, "x-ratelimit-reset {reset}, sent at {sent_at_ms}");
    let retry_after = header_i64(a, "retry-after");
    assert!((1..=window_ms / 1000 + 1).contains(&retry_after), "Retry-After {retry_after}");
}

#[tokio::test]
async fn creates_over_the_environment_limit_answer_429_and_another_environment_is_unaffected() {
    let app = TestApp::spawn_with(|c| c.rate_limit_create_per_sec = 5).await;
    let key = app.a.key.clone();
    let mut accepted = 0;
    let mut refused = None;
    for i in 0..60 {
        let sent_at = now_ms();
        let a = create(&app, &key, &format!("rl-{i}")).await;
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some((a, sent_at));
            break;
        }
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        accepted += 1;
    }
    let (answer, sent_at) = refused.expect("60 creates in a row at 5 a second were all accepted");
    assert!(accepted >= 5, "refused after {accepted} creates, under the limit of 5");
    assert_rate_limited(&answer, 5, sent_at, 1_000);
    // Environment B has its own count: its create is accepted at once.
    let b = create(&app, &app.b.key, "rl-b").await;
    assert_eq!(b.status, StatusCode::CREATED, "{}", b.body);
    // The limit is a rate: A is admitted again once its window slides on.
    let reset = header_i64(&answer, "x-ratelimit-reset");
    tokio::time::sleep(Duration::from_millis((reset - now_ms()).max(0) as u64 + 50)).await;
    let again = create(&app, &key, "rl-again").await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
}

#[tokio::test]
async fn a_public_token_is_limited_on_its_own() {
    // A long window, so the count cannot drain while the test runs.
    let app = TestApp::spawn_with(|c| {
        c.rate_limit_public_token_per_sec = 5;
        c.rate_limit_window_ms = 60_000;
    })
    .await;
    let first = app.create_session(session_body(Some("tok-1"))).await;
    let second = app.create_session(session_body(Some("tok-2"))).await;
    let (s1, pat1) = (first["id"].as_str().unwrap(), first["publicAccessToken"].as_str().unwrap());
    let (s2, pat2) = (second["id"].as_str().unwrap(), second["publicAccessToken"].as_str().unwrap());
    let append = |s: &str, token: &str| {
        let req =
            app.client.post(format!("{}/realtime/v1/sessions/{s}/in/append", app.base)).bearer_auth(token).body("hi");
        send(req)
    };
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..30 {
        let sent_at = now_ms();
        let a = append(s1, pat1).await;
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some((a, sent_at));
            break;
        }
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        accepted += 1;
    }
    let (answer, sent_at) = refused.expect("30 appends with one browser token at 5 a window were all accepted");
    // One process: at most the limit plus its credit of one lease (1).
    assert!((5..=6).contains(&accepted), "{accepted} appends accepted from a token limited to 5");
    assert_rate_limited(&answer, 5, sent_at, 60_000);
    // Another browser token, and the secret key, are not held by that token's count.
    assert_eq!(append(s2, pat2).await.status, StatusCode::OK);
    assert_eq!(append(s1, &app.a.key).await.status, StatusCode::OK);
    // Append answers keep their own shape: `{ok: false, error, code}`.
    assert_eq!(answer.body["ok"], json!(false), "{}", answer.body);
}

async fn mint(app: &TestApp) -> Answer {
    let req = app
        .client
        .post(format!("{}/api/v1/auth/public-tokens", app.base))
        .bearer_auth(&app.a.key)
        .json(&json!({"scopes": ["read:sessions:x"], "expirationTime": "1h"}));
    send(req).await
}

/// `rounds` of four concurrent mints: (accepted, refused).
async fn mint_burst(app: &TestApp, rounds: usize) -> (usize, usize) {
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..rounds {
        for a in futures::future::join_all((0..4).map(|_| mint(app))).await {
            match a.status {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => limited += 1,
                other => panic!("mint: {other} {}", a.body),
            }
        }
    }
    (ok, limited)
}

/// Two processes of one deployment share an environment's limit: together
/// they admit at most the limit plus two leases each (a lease is a tenth of
/// the limit), however the burst is spread over them.
#[tokio::test]
async fn two_processes_share_the_environment_limit_within_the_lease_slack() {
    const LIMIT: usize = 40;
    let lease = LIMIT / 10;
    let one = TestApp::spawn_with(|c| {
        c.rate_limit_mint_per_sec = LIMIT as u32;
        c.rate_limit_window_ms = 60_000;
    })
    .await;
    let two = one.peer(|_| {}).await;
    let ((ok1, lim1), (ok2, lim2)) = tokio::join!(mint_burst(&one, 3 * LIMIT / 8), mint_burst(&two, 3 * LIMIT / 8));
    let accepted = ok1 + ok2;
    assert!(lim1 + lim2 > 0, "{} mints at a limit of {LIMIT} were all accepted", 3 * LIMIT);
    assert!(accepted >= LIMIT - 2 * lease, "only {accepted} of {LIMIT} admitted");
    assert!(accepted <= LIMIT + 2 * 2 * lease, "{accepted} admitted by two processes at a limit of {LIMIT}");
}

/// Reads `INFO commandstats` of a private Redis: calls per command.
async fn command_calls(url: &str) -> std::collections::HashMap<String, u64> {
    let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

fn total(calls: &std::collections::HashMap<String, u64>) -> u64 {
    calls.iter().filter(|(name, _)| !name.starts_with("info")).map(|(_, n)| n).sum()
}

/// `APPENDS` appends through `app`: the Redis commands they cost in all, and
/// the `INCRBY`s among them (only the limiter's lease script sends those).
async fn append_cost(app: &TestApp, s: &str, key: &str, url: &str) -> (u64, u64) {
    // Warm: the first append of a process loads scripts, caches the session.
    assert_eq!(app.append(s, "out", key, "warm", &[]).await.0, StatusCode::OK);
    let before = command_calls(url).await;
    for i in 0..APPENDS {
        let (status, body) = app.append(s, "out", key, &format!("r{i}"), &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let after = command_calls(url).await;
    let delta = |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    (total(&after) - total(&before), delta("incrby"))
}

const APPENDS: u64 = 200;

/// Appends spend a budget held in memory: over many appends the limiter asks
/// Redis for a lease about once per half lease, and the Redis commands an
/// append costs are the same with the limits on as with them off.
#[tokio::test]
async fn appends_take_no_redis_round_trip_for_the_limit() {
    let dir = TempDir::new();
    let mut redis = RedisProc::spawn(&dir.0, free_port());
    assert!(redis.wait_ready(Duration::from_secs(10)).await, "private redis: {}", redis.log());
    let url = redis.url();
    // No job runtime: nothing but the requests talks to this Redis.
    let on = TestApp::spawn_with(|c| {
        c.redis_url = url.clone();
        c.run_jobs = false;
        c.rate_limit_append_per_sec = 1_000;
    })
    .await;
    let off = on.peer(|c| c.rate_limits_enabled = false).await;
    let session = on.create_session(session_body(Some("rt"))).await;
    let s = session["id"].as_str().unwrap().to_string();
    let key = on.a.key.clone();
    let (off_total, off_leases) = append_cost(&off, &s, &key, &url).await;
    let (on_total, on_leases) = append_cost(&on, &s, &key, &url).await;
    assert_eq!(off_leases, 0, "a process with the limits off leased");
    // A lease is 100 appends, asked for at 50 left: about 4 leases for 200.
    assert!((1..=APPENDS / 50 + 2).contains(&on_leases), "{on_leases} leases for {APPENDS} appends");
    // Each lease is one script call (EVALSHA plus the commands inside it: GET, GET, INCRBY, PEXPIRE).
    let slack = on_leases * 5 + 4;
    assert!(
        on_total <= off_total + slack,
        "{APPENDS} appends cost {on_total} Redis commands with the limits on, {off_total} with them off"
    );
}

/// Builds one request of a route under test.
type Request<'a> = Box<dyn Fn() -> reqwest::RequestBuilder + 'a>;

/// Each limited route class is wired: list, SSE connect and a channel's
/// initialize (a write-token mint) answer 429 `rate_limited` past their limit.
#[tokio::test]
async fn list_subscribe_and_initialize_are_limited() {
    let app = TestApp::spawn_with(|c| {
        c.rate_limit_list_per_sec = 2;
        c.rate_limit_subscribe_per_sec = 2;
        c.rate_limit_mint_per_sec = 2;
        c.rate_limit_window_ms = 60_000;
    })
    .await;
    let session = app.create_session(session_body(Some("classes"))).await;
    let s = session["id"].as_str().unwrap().to_string();
    let key = app.a.key.clone();
    let channel = format!("{}/realtime/v1/sessions/{s}/out", app.base);
    let routes: [(&str, Request); 3] = [
        ("list", Box::new(|| app.client.get(format!("{}/api/v1/sessions", app.base)).bearer_auth(&key))),
        ("subscribe", Box::new(|| app.client.get(&channel).bearer_auth(&key).header("timeout-seconds", "1"))),
        ("initialize", Box::new(|| app.client.put(&channel).bearer_auth(&key))),
    ];
    for (name, request) in routes {
        let mut admitted = 0;
        let refused = loop {
            assert!(admitted <= 3, "{name}: {admitted} admitted at a limit of 2");
            // Headers only: a subscription's stream is dropped unread.
            let resp = request().send().await.expect("request");
            if resp.status() == StatusCode::TOO_MANY_REQUESTS {
                break resp;
            }
            assert!(resp.status().is_success(), "{name}: {}", resp.status());
            admitted += 1;
        };
        assert!(admitted >= 2, "{name}: refused after {admitted}, under the limit of 2");
        assert_eq!(refused.headers()["x-ratelimit-limit"], "2", "{name}");
        let body: Value = refused.json().await.expect("json");
        assert_eq!(body["code"], json!("rate_limited"), "{name}: {body}");
    }
}
