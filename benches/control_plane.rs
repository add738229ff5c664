//! Control-plane benchmark: session create and retrieve through the real HTTP
//! stack against real Postgres, 32 concurrent clients, loopback.
//!
//! Run: `cargo bench --bench control_plane` (release profile). Uses its own
//! schema in DATABASE_URL and drops it afterwards. Prints figures; asserts nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sessiond::app::{self, AppState};
use sessiond::config::Config;
use sessiond::tenancy::keys::MasterKey;
use sessiond::tenancy::{store as tenancy, EnvType};

const CLIENTS: usize = 32;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1).min(sorted.len() - 1)]
}

fn report(name: &str, mut lat: Vec<Duration>, wall: Duration) {
    lat.sort();
    println!(
        "{name:<10} {:>6} requests in {:>6.2}s  {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
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
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/sessiond_test".into());
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let master = MasterKey::random();
    let mut config = Config::for_database(&url, Some(schema.clone()));
    config.redis_prefix = format!("bench:{schema}");
    config.database_max_connections = 32;
    let pool = sessiond::db::connect(&config).await?;
    sessiond::db::migrate(&pool).await?;
    let (_, key) = tenancy::create_environment(&pool, &master, "bench", "bench", EnvType::Prod).await?;
    let key = key.expose().to_string();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let state = AppState::connect(config, pool.clone(), master).await?;
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(app::serve(listener, state, stop_rx));
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

    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE")).execute(&pool).await?;
    Ok(())
}
