//! Control-plane benchmark: session create, retrieve and list through the real
//! HTTP stack against real Postgres, 32 concurrent clients, loopback.
//!
//! Run: `cargo bench --bench control_plane` (release profile). Uses its own
//! schema in DATABASE_URL and drops it afterwards. Prints figures; asserts nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
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
    common::figure(&format!("{name}.rate"), lat.len() as f64 / wall.as_secs_f64(), "req/s");
    common::figure(&format!("{name}.p50"), common::pct_ms(&lat, 0.50), "ms");
    common::figure(&format!("{name}.p99"), common::pct_ms(&lat, 0.99), "ms");
}

/// Runs `total` requests split over CLIENTS workers; `make(i)` is request i.
async fn drive<F>(client: &common::FastClient, total: usize, make: F) -> (Vec<Duration>, Duration)
where
    F: Fn(usize) -> (Method, String, Bytes) + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..CLIENTS {
        let (make, next, client) = (make.clone(), next.clone(), client.clone());
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let (method, path, body) = make(i);
                let t = Instant::now();
                let status = client.send(method, &path, body).await.expect("request");
                assert!((200..300).contains(&status), "request {i} answered {status}");
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

fn create(ext: String, i: usize) -> (Method, String, Bytes) {
    let body = json!({
        "type": "bench", "taskIdentifier": "echo", "externalId": ext,
        "tags": ["bench"], "metadata": {"user": i},
        "triggerConfig": {"basePayload": {"chatId": i}, "maxAttempts": 3}
    });
    (Method::POST, "/api/v1/sessions".into(), Bytes::from(body.to_string()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = common::BenchServer::start(|_| {}).await?;
    let client = common::FastClient::new(&server.base, &server.key);
    println!("sessiond control-plane bench: {CLIENTS} concurrent clients, loopback, one process");

    // Warm-up: connections, caches, plans.
    drive(&client, 500, |i| create(format!("warm-{i}"), i)).await;

    let creates = 5000;
    let (lat, wall) = drive(&client, creates, |i| create(format!("chat-{i}"), i)).await;
    report("create", lat, wall);

    // Every create also queued a trigger-run job; let that backlog drain so the
    // read phases measure reads, and report how long the jobs took.
    let drain = Instant::now();
    let pending = loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status <> 'succeeded'").fetch_one(&server.pool).await?;
        if pending == 0 || drain.elapsed() > Duration::from_secs(120) {
            break pending;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if pending == 0 {
        println!(
            "{:<10} trigger-run jobs of all creates done {:.2}s after the last create",
            "jobs",
            drain.elapsed().as_secs_f64()
        );
        common::figure("jobs.drain", drain.elapsed().as_secs_f64(), "s");
    } else {
        println!("{:<10} {pending} trigger-run jobs still not done {:.0}s after the last create", "jobs", 120.0);
    }

    let (lat, wall) =
        drive(&client, 40_000, move |i| (Method::GET, format!("/api/v1/sessions/chat-{}", i % creates), Bytes::new()))
            .await;
    report("retrieve", lat, wall);

    // Steady state: Postgres has statistics for the table (autovacuum would
    // gather them within a minute; the bench does not wait that long).
    sqlx::query("ANALYZE sessions").execute(&server.pool).await?;
    let (lat, wall) = drive(&client, 5_000, |_| {
        (Method::GET, "/api/v1/sessions?page[size]=20&filter[type]=bench".into(), Bytes::new())
    })
    .await;
    report("list", lat, wall);

    server.finish().await
}
