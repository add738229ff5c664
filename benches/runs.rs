//! Run engine benchmark, loopback, one process (server, workers and triggering
//! clients share the machine's cores):
//! - trigger → dequeue latency: a session create (which triggers its first run)
//!   every 10 ms while 4 workers idle-poll; latency is from the create request's
//!   start to a worker holding the run.
//! - sustained runs/s through trigger → dequeue → complete: 16 clients create
//!   sessions while 4 workers dequeue (up to 10 at a time) and complete them;
//!   timed until the last run is completed (not until the idle workers' last
//!   long polls end).
//!
//! Run: `cargo bench --bench runs`. Prints figures; asserts nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sessiond::worker::WorkerClient;

mod common;

const WORKERS: usize = 4;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = common::BenchServer::start(|_| {}).await?;
    let (base, key) = (server.base.clone(), server.key.clone());
    let http = reqwest::Client::new();
    let tasks = vec!["bench-task".to_string()];
    let create = |ext: String| {
        http.post(format!("{base}/api/v1/sessions")).bearer_auth(&key).json(&json!({
            "type": "bench", "taskIdentifier": "bench-task", "externalId": ext,
            "triggerConfig": {"basePayload": {"ext": ext}}
        }))
    };

    println!("sessiond run-engine bench: {WORKERS} workers, loopback, one process");

    // --- latency -----------------------------------------------------------
    let started: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let lat: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let n = 500;
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (w, tasks, started, lat) = (WorkerClient::new(&base, &key), tasks.clone(), started.clone(), lat.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let runs = w.dequeue(&tasks, 1, Duration::from_secs(2)).await.expect("dequeue");
                let now = Instant::now();
                if runs.is_empty() && lat.lock().unwrap().len() >= n {
                    break;
                }
                for r in runs {
                    let ext = r.payload["ext"].as_str().unwrap_or_default().to_string();
                    if let Some(t) = started.lock().unwrap().get(&ext) {
                        lat.lock().unwrap().push(now - *t);
                    }
                    w.complete(&r, json!(null)).await.expect("complete");
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..n {
        let ext = format!("lat-{i}");
        started.lock().unwrap().insert(ext.clone(), Instant::now());
        let resp = create(ext).send().await?;
        anyhow::ensure!(resp.status().is_success(), "create failed: {}", resp.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for w in workers {
        w.await?;
    }
    let lat = lat.lock().unwrap().clone();
    if lat.len() < n {
        println!("trigger→dequeue: {} of {n} runs never reached a worker", n - lat.len());
    }
    common::summary(&format!("trigger→dequeue ({WORKERS} idle workers)"), "trigger_dequeue", lat);

    // --- throughput ----------------------------------------------------------
    let total = 4000;
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // When the last run was completed: the other workers may still sit in a
    // long poll then, which is not part of the work.
    let finished: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (w, tasks, done, finished) =
            (WorkerClient::new(&base, &key), tasks.clone(), done.clone(), finished.clone());
        workers.push(tokio::spawn(async move {
            while done.load(std::sync::atomic::Ordering::Relaxed) < total {
                let runs = w.dequeue(&tasks, 10, Duration::from_secs(1)).await.expect("dequeue");
                for r in runs {
                    w.complete(&r, json!(null)).await.expect("complete");
                    if done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == total {
                        let _ = finished.set(Instant::now());
                    }
                }
            }
        }));
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut creators = Vec::new();
    let fast = common::FastClient::new(&base, &key);
    for _ in 0..16 {
        let (next, fast) = (next.clone(), fast.clone());
        creators.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let ext = format!("tp-{i}");
                let body = json!({"type": "bench", "taskIdentifier": "bench-task", "externalId": ext,
                                  "triggerConfig": {"basePayload": {"ext": ext}}});
                let status =
                    fast.send(hyper::Method::POST, "/api/v1/sessions", body.to_string().into()).await.expect("create");
                assert!((200..300).contains(&status));
            }
        }));
    }
    for c in creators {
        c.await?;
    }
    for w in workers {
        w.await?;
    }
    let wall = finished.get().map_or_else(|| t0.elapsed(), |end| *end - t0);
    println!(
        "sustained        {total} runs triggered, dequeued and completed in {:.2}s  {:.0} runs/s ({WORKERS} workers)",
        wall.as_secs_f64(),
        total as f64 / wall.as_secs_f64()
    );
    common::figure("sustained.rate", total as f64 / wall.as_secs_f64(), "runs/s");

    server.finish().await
}
