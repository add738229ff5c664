//! Failed credentials are throttled per client address, and password checks
//! never stall the server: the dashboard's sign-in and the API's bearer
//! tokens (issue 24, item 1).
//!
//! Clients bind distinct loopback addresses (127.0.0.2, ...) to be distinct
//! clients to the server; a trusted-proxy test sends `X-Forwarded-For`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{COOKIE, LOCATION, RETRY_AFTER, SET_COOKIE};
use reqwest::{redirect, StatusCode};
use serde_json::Value;

use crate::common::{eventually, TestApp};
use crate::dashboard::{with_operators, ADMIN, VIEWER};

/// A client whose connections come from `ip` (a loopback address).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(redirect::Policy::none())
        .local_address(ip.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn login_cookie(resp: &reqwest::Response) -> String {
    resp.headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find_map(|pair| pair.strip_prefix("sessiond_login=").map(str::to_string))
        .expect("a login cookie")
}

/// The login form's cookie and CSRF token, fetched once.
async fn login_form(http: &reqwest::Client, base: &str) -> (String, String) {
    let form = http.get(format!("{base}/dashboard/login")).send().await.unwrap();
    let cookie = login_cookie(&form);
    let html = form.text().await.unwrap();
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + "name=\"csrf\" value=\"".len();
    (cookie, html[at..].split('"').next().unwrap().to_string())
}

async fn post_login(
    http: &reqwest::Client,
    base: &str,
    (cookie, csrf): &(String, String),
    email: &str,
    password: &str,
) -> reqwest::Response {
    http.post(format!("{base}/dashboard/login"))
        .header(COOKIE, format!("sessiond_login={cookie}"))
        .form(&[("email", email), ("password", password), ("csrf", csrf)])
        .send()
        .await
        .unwrap()
}

fn retry_after(resp: &reqwest::Response) -> u64 {
    resp.headers()
        .get(RETRY_AFTER)
        .unwrap_or_else(|| panic!("a {} without Retry-After", resp.status()))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_eleventh_wrong_password_from_an_address_waits_and_no_one_else_does() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let attacker = client_from("127.0.0.1");
    let form = login_form(&attacker, &app.base).await;
    for i in 1..=10 {
        let resp = post_login(&attacker, &app.base, &form, ADMIN.0, "wrong password!").await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "wrong password {i}");
    }
    let verified = app.state.dashboard.verifier().gauges().done;
    assert_eq!(verified, 10);

    // The 11th in the minute: a login page saying how long to wait, 429 with Retry-After.
    let resp = post_login(&attacker, &app.base, &form, ADMIN.0, "wrong password!").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait = retry_after(&resp);
    assert!((1..=60).contains(&wait), "the first block lasts a minute: {wait}");
    let page = resp.text().await.unwrap();
    assert!(page.contains("Too many failed sign-ins") && page.contains("name=\"password\""), "{page}");
    // The block holds for the right password too, and nothing is verified meanwhile.
    let resp = post_login(&attacker, &app.base, &form, ADMIN.0, ADMIN.1).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(app.state.dashboard.verifier().gauges().done, verified, "a blocked attempt was verified");

    // Another address signs in, as another operator and as the targeted one
    // (whose attempts are slowed a little, never refused).
    let other = client_from("127.0.0.2");
    let form = login_form(&other, &app.base).await;
    let resp = post_login(&other, &app.base, &form, VIEWER.0, VIEWER.1).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let third = client_from("127.0.0.3");
    let form = login_form(&third, &app.base).await;
    let resp = post_login(&third, &app.base, &form, ADMIN.0, ADMIN.1).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "the targeted operator is locked out");
    assert_eq!(resp.headers()[LOCATION], "/dashboard/sessions");
}

async fn api_get(http: &reqwest::Client, base: &str, token: Option<&str>, xff: Option<&str>) -> reqwest::Response {
    let mut req = http.get(format!("{base}/api/v1/sessions"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(x) = xff {
        req = req.header("x-forwarded-for", x);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn failed_bearer_tokens_are_throttled_per_address_and_good_ones_pass() {
    let app = TestApp::spawn().await;
    let attacker = client_from("127.0.0.1");
    let forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIwMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDAifQ.c2ln";
    for i in 1..=10 {
        // Unknown secret keys and forged tokens count alike.
        let token = if i % 2 == 0 { forged.to_string() } else { format!("tr_dev_guess{i:020}") };
        let resp = api_get(&attacker, &app.base, Some(&token), None).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "failed token {i}");
    }
    let resp = api_get(&attacker, &app.base, Some("tr_dev_guess_eleven"), None).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait = retry_after(&resp);
    assert!((1..=60).contains(&wait), "{wait}");
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("Too many failed API keys or tokens"), "{body}");
    // A claimed address is not believed from a peer that is no trusted proxy.
    let resp = api_get(&attacker, &app.base, Some(forged), Some("198.51.100.1")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    // A good key from the same address passes; no token at all is a plain 401.
    assert_eq!(api_get(&attacker, &app.base, Some(&app.a.key), None).await.status(), StatusCode::OK);
    assert_eq!(api_get(&attacker, &app.base, None, None).await.status(), StatusCode::UNAUTHORIZED);
    // Another address has its own budget.
    let other = client_from("127.0.0.2");
    assert_eq!(api_get(&other, &app.base, Some(forged), None).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(api_get(&other, &app.base, Some(&app.a.key), None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_the_client() {
    let app = TestApp::spawn_with(|c| c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()]).await;
    let proxy = client_from("127.0.0.1");
    // The client's own claim (left) is skipped; the proxy's entry (right) counts.
    for i in 1..=10 {
        let resp = api_get(&proxy, &app.base, Some("tr_dev_nope"), Some(&format!("10.9.9.{i}, 203.0.113.7"))).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "failed token {i}");
    }
    let blocked = api_get(&proxy, &app.base, Some("tr_dev_nope"), Some("203.0.113.7")).await;
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
    // Other clients of the same proxy are not.
    let resp = api_get(&proxy, &app.base, Some("tr_dev_nope"), Some("203.0.113.8")).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

/// 16 clients send wrong passwords without pause. The server's async
/// workers (two, as on the two-core machines this runs on) must stay free:
/// `/healthz` answers while verifications wait their turn, at most two
/// verify at once, and while a `/healthz` is in flight verifications hardly
/// finish (it is not stuck behind them). Counts, not wall-clock bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_flood_does_not_stall_the_server() {
    let app = TestApp::spawn_with(|c| c.auth_failures_per_minute = 100_000).await;
    with_operators(&app).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..16 {
        let (base, stop) = (app.base.clone(), stop.clone());
        flood.push(tokio::spawn(async move {
            let http = client_from("127.0.0.1");
            let form = login_form(&http, &base).await;
            let mut refused = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let resp = post_login(&http, &base, &form, ADMIN.0, "wrong password!").await;
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
                refused += 1;
            }
            refused
        }));
    }
    let verifier = app.state.dashboard.verifier().clone();
    eventually(30, "the flood's verifications under way", || async {
        let g = verifier.gauges();
        (g.waiting + g.running >= 10).then_some(())
    })
    .await;

    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let (mut queued_while_answered, mut finished_during) = (0, Vec::new());
    for _ in 0..20 {
        let before = verifier.gauges().done;
        let resp = http.get(format!("{}/healthz", app.base)).send().await.expect("healthz answered");
        let after = verifier.gauges();
        assert_eq!(resp.status(), StatusCode::OK);
        finished_during.push(after.done - before);
        if after.waiting > 0 {
            queued_while_answered += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut refused = 0;
    for f in flood {
        refused += f.await.unwrap();
    }
    let gauges = verifier.gauges();
    finished_during.sort_unstable();
    let median = finished_during[finished_during.len() / 2];
    eprintln!(
        "flood: {refused} wrong passwords; healthz answered 20/20, {queued_while_answered} with verifications queued; \
         verifications finished during a healthz: median {median}, all {finished_during:?}; peak running {}",
        gauges.peak_running
    );
    assert!(gauges.peak_running <= 2, "{} verifications ran at once", gauges.peak_running);
    assert!(queued_while_answered >= 10, "healthz answered only after the queue drained: {queued_while_answered}/20");
    assert_eq!(median, 0, "healthz waited for verifications to finish: {finished_during:?}");
}
