//! Control-plane benchmark: session create and retrieve through the real HTTP
//! stack against real Postgres, 32 concurrent clients, loopback.
//!
//! Run: `cargo bench --bench control_plane` (release profile). Uses its own
//! schema in DATABASE_URL and drops it afterwards. Prints figures; asserts nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

mod common;

const CLIENTS: usize = 32;

fn report(name: &str, mut lat: Vec<Duration>, wall: Duration) {
    lat.sort();
    println!(
        "{name:<10} {:>6} requests in {:>6.2}s  {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        common::pct_ms(&lat, 0.50),
        common::pct_ms(&lat, 0.99),
        lat.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0),
    );
}

/// Runs `total` requests split over CLIENTS workers; `make(i)` builds request i.
async fn drive<F>(total: usize, make: F) -> (Vec<Duration>, Duration)
where
    F: Fn(usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..CLIENTS {
        let (make, next) = (make.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                let resp = make(i).send().await.expect("request");
                let ok = resp.status().is_success();
                let _ = resp.bytes().await;
                assert!(ok, "request {i} failed");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(total);
    for h in handles {
        all.extend(h.await.expect("worker"));
    }
    (all, start.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = common::BenchServer::start(|_| {}).await?;
    let (base, key, pool) = (server.base.clone(), server.key.clone(), server.pool.clone());
    let client = reqwest::Client::builder().pool_max_idle_per_host(CLIENTS).build()?;

    println!("sessiond control-plane bench: {CLIENTS} concurrent clients, loopback, one process");
    // Warm-up: connections, caches, plans.
    {
        let (c, b, k) = (client.clone(), base.clone(), key.clone());
        drive(500, move |i| {
            c.post(format!("{b}/api/v1/sessions")).bearer_auth(&k).json(&json!({
                "type": "bench", "taskIdentifier": "echo", "externalId": format!("warm-{i}"),
                "triggerConfig": {"basePayload": {"i": i}}
            }))
        })
        .await;
    }

    let creates = 5000;
    let (c, b, k) = (client.clone(), base.clone(), key.clone());
    let (lat, wall) = drive(creates, move |i| {
        c.post(format!("{b}/api/v1/sessions")).bearer_auth(&k).json(&json!({
            "type": "bench", "taskIdentifier": "echo", "externalId": format!("chat-{i}"),
            "tags": ["bench"], "metadata": {"user": i},
            "triggerConfig": {"basePayload": {"chatId": i}, "maxAttempts": 3}
        }))
    })
    .await;
    report("create", lat, wall);

    let retrieves = 40_000;
    let (c, b, k) = (client.clone(), base.clone(), key.clone());
    let (lat, wall) = drive(retrieves, move |i| c.get(format!("{b}/api/v1/sessions/chat-{}", i % creates)).bearer_auth(&k)).await;
    report("retrieve", lat, wall);

    let lists = 5_000;
    let (c, b, k) = (client.clone(), base.clone(), key.clone());
    let (lat, wall) =
        drive(lists, move |_| c.get(format!("{b}/api/v1/sessions?page[size]=20&filter[type]=bench")).bearer_auth(&k)).await;
    report("list", lat, wall);

    let _ = pool;
    server.finish().await
}
