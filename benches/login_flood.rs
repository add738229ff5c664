//! Login flood benchmark (issue 24, item 1): `/healthz` latency idle and
//! while 16 clients send wrong dashboard passwords without pause (each for
//! a fresh email, so the per-email slowdown never holds an attempt back).
//!
//! Two floods: one with the per-address throttle lifted, so every attempt is
//! an argon2 verification and only the bounded verification pool stands
//! between the flood and the async workers (the worst case: a flood from
//! many addresses); and one with the default throttle (10 failures a minute
//! from the one address, then 429 unverified). Each phase times
//! BENCH_REQUESTS (default 500) `/healthz`, one at a time on one kept-alive
//! connection. Target: p99 ≤ 10 ms during the flood.
//!
//! Run: `cargo bench --bench login_flood` (release). The server, the flood
//! and the prober share this process and the machine's cores.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{COOKIE, SET_COOKIE};
use sessiond::operators::{self, Role};

mod common;

const OPERATOR: (&str, &str) = ("bench@example.com", "bench operator password");
const FLOOD_CLIENTS: usize = 16;

/// The login form's cookie and CSRF token.
async fn login_form(http: &reqwest::Client, base: &str) -> anyhow::Result<(String, String)> {
    let form = http.get(format!("{base}/dashboard/login")).send().await?;
    let cookie = form
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find_map(|pair| pair.strip_prefix("sessiond_login=").map(str::to_string))
        .ok_or_else(|| anyhow::anyhow!("no login cookie"))?;
    let html = form.text().await?;
    let marker = "name=\"csrf\" value=\"";
    let at = html.find(marker).ok_or_else(|| anyhow::anyhow!("no csrf field"))? + marker.len();
    Ok((cookie, html[at..].split('"').next().unwrap_or_default().to_string()))
}

/// Times `n` `/healthz`, one at a time, 5 ms apart (so the samples span
/// seconds of the flood, not a burst between two verifications); sorted.
async fn probe(http: &reqwest::Client, base: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let t = Instant::now();
        let resp = http.get(format!("{base}/healthz")).send().await?;
        let status = resp.status();
        resp.bytes().await?;
        lat.push(t.elapsed());
        anyhow::ensure!(status == 200, "/healthz answered {status}");
    }
    lat.sort();
    Ok(lat)
}

/// Starts 16 clients posting wrong passwords until `stop`; counts answers
/// by status (401 verified and refused, 429 throttled).
fn flood(base: &str, stop: Arc<AtomicBool>) -> (Vec<tokio::task::JoinHandle<()>>, Arc<[AtomicU64; 2]>) {
    let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let tasks = (0..FLOOD_CLIENTS)
        .map(|client| {
            let (base, stop, counts) = (base.to_string(), stop.clone(), counts.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let Ok((cookie, csrf)) = login_form(&http, &base).await else { return };
                let mut attempt = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // A fresh email each time (an unknown one costs a
                    // verification too): no per-email slowdown, so every
                    // attempt reaches the verification pool.
                    attempt += 1;
                    let email = format!("guess{client}-{attempt}@example.com");
                    let resp = http
                        .post(format!("{base}/dashboard/login"))
                        .header(COOKIE, format!("sessiond_login={cookie}"))
                        .form(&[("email", email.as_str()), ("password", "not the password"), ("csrf", csrf.as_str())])
                        .send()
                        .await;
                    match resp.map(|r| r.status().as_u16()) {
                        Ok(401) => counts[0].fetch_add(1, Ordering::Relaxed),
                        Ok(429) => counts[1].fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                }
            })
        })
        .collect();
    (tasks, counts)
}

async fn phase(name: &str, key: &str, throttled: bool, requests: usize) -> anyhow::Result<()> {
    let served = common::BenchServer::start(|c| {
        if !throttled {
            c.auth_failures_per_minute = u32::MAX;
        }
    })
    .await?;
    operators::create(&served.pool, OPERATOR.0, OPERATOR.1, Role::Admin).await?;
    let http = reqwest::Client::new();
    if !throttled {
        common::summary("/healthz with no flood", "healthz.idle", probe(&http, &served.base, requests).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (tasks, counts) = flood(&served.base, stop.clone());
    // Let the flood fill the verification queue first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let verifier = served.state.dashboard.verifier().clone();
    let (done_before, answered_before) =
        (verifier.gauges().done, counts[0].load(Ordering::Relaxed) + counts[1].load(Ordering::Relaxed));
    let started = Instant::now();
    let lat = probe(&http, &served.base, requests).await?;
    let secs = started.elapsed().as_secs_f64();
    let (done, answered) =
        (verifier.gauges().done - done_before, counts[0].load(Ordering::Relaxed) + counts[1].load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let g = served.state.dashboard.verifier().gauges();
    let (refused, throttled_n) = (counts[0].load(Ordering::Relaxed), counts[1].load(Ordering::Relaxed));
    common::summary(&format!("/healthz during {name}"), key, lat);
    println!(
        "  {name}: {refused} wrong passwords verified and refused (401), {throttled_n} throttled (429) in all; \
         while probing ({secs:.1} s): {:.0} attempts/s, {:.0} verifications/s, at most {} at once",
        (answered - answered_before) as f64 / secs,
        done as f64 / secs,
        g.peak_running
    );
    common::figure(&format!("{key}.verifications_per_s"), done as f64 / secs, "1/s");
    served.finish().await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let requests: usize = common::env_or("BENCH_REQUESTS", 500);
    // The three rows the note quotes: no flood, flood with the
    // throttle lifted, flood with the default throttle.
    phase("flood with throttle lifted (16 clients)", "healthz.flood_unthrottled", false, requests).await?;
    phase("flood with the default throttle (16 clients)", "healthz.flood_throttled", true, requests).await?;
    Ok(())
}
