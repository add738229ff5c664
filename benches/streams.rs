//! Session channel benchmark, loopback (clients share the machine's two cores
//! with the server, Postgres and Redis):
//! 1. append → SSE delivery latency with 100 subscribers at 1,000 appends/s
//!    (against the server running as its own process, like 4);
//! 2. sustained append throughput with 64 concurrent writers;
//! 3. append on `.in` → a waiting worker holds the data (waitpoint long-poll);
//! 4. server memory per idle SSE subscriber, 10,000 of them (the server runs as
//!    its own process so its RSS is measured alone).
//!
//! Run: `cargo bench --bench streams`. Prints figures; asserts nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sessiond::worker::channels::{ChannelFactory, HttpChannelFactory};
use sessiond::worker::WorkerClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

/// Only what the latency probe reads of a frame.
#[derive(serde::Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    records: Vec<Probe<'a>>,
}

#[derive(serde::Deserialize)]
struct Probe<'a> {
    body: &'a str,
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

async fn create_session(http: &reqwest::Client, base: &str, key: &str, ext: &str, task: &str) -> anyhow::Result<serde_json::Value> {
    Ok(http
        .post(format!("{base}/api/v1/sessions"))
        .bearer_auth(key)
        .json(&json!({"type": "bench", "taskIdentifier": task, "externalId": ext, "triggerConfig": {"basePayload": {}}}))
        .send()
        .await?
        .json()
        .await?)
}

/// 1. Delivery latency: each record carries its send time; every subscriber
/// measures arrival minus send.
async fn fanout_latency(base: &String, key: &String, http: &reqwest::Client) -> anyhow::Result<()> {
    let s = create_session(http, base, key, "fanout", "none").await?;
    let sid = s["id"].as_str().unwrap_or_default().to_string();
    let samples: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let total = 3000usize;
    let mut subs = Vec::new();
    // Subscribers are raw sockets reading the chunked SSE body: the probe
    // should cost little next to the server it measures.
    let port: u16 = base.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let request = format!(
        "GET /realtime/v1/sessions/{sid}/out HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nTimeout-Seconds: 120\r\n\r\n"
    );
    for _ in 0..100 {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        conn.set_nodelay(true)?;
        conn.write_all(request.as_bytes()).await?;
        let samples = samples.clone();
        subs.push(tokio::spawn(async move {
            let mut buf = String::new();
            let mut raw = vec![0u8; 64 * 1024];
            let mut seen = 0;
            while seen < total {
                let Ok(n) = conn.read(&mut raw).await else { break };
                if n == 0 {
                    break;
                }
                let at = now_us();
                buf.push_str(&String::from_utf8_lossy(&raw[..n]));
                // Frames are found by their `data: ` lines; chunk-size lines of the
                // chunked encoding sit between frames and are skipped.
                while let Some(end) = buf.find("\n\n") {
                    let frame: String = buf.drain(..end + 2).collect();
                    let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
                    let Ok(batch) = serde_json::from_str::<Batch<'_>>(data) else { continue };
                    let mut local = Vec::with_capacity(batch.records.len());
                    for r in batch.records {
                        let sent: i64 = r.body.parse().unwrap_or(at);
                        local.push(Duration::from_micros((at - sent).max(0) as u64));
                        seen += 1;
                    }
                    samples.lock().unwrap().extend(local);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let writers = 8;
    let writer = common::FastClient::new(base, key);
    let next = Arc::new(AtomicUsize::new(0));
    let (tx, _) = tokio::sync::broadcast::channel::<()>(4096);
    let mut handles = Vec::new();
    for _ in 0..writers {
        let (client, path, next, mut rx) =
            (writer.clone(), format!("/realtime/v1/sessions/{sid}/out/append"), next.clone(), tx.subscribe());
        handles.push(tokio::spawn(async move {
            while rx.recv().await.is_ok() {
                if next.fetch_add(1, Ordering::Relaxed) >= total {
                    break;
                }
                let _ = client.send(hyper::Method::POST, &path, now_us().to_string().into()).await;
            }
        }));
    }
    for _ in 0..total {
        tick.tick().await;
        let _ = tx.send(());
    }
    drop(tx);
    for h in handles {
        h.await?;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    for s in subs {
        let _ = tokio::time::timeout(Duration::from_secs(30), s).await;
    }
    let samples = samples.lock().unwrap().clone();
    println!("append rate achieved: {rate:.0}/s");
    common::summary("append→SSE delivery (100 subscribers)", samples);
    Ok(())
}

/// 2. Throughput: 64 writers over 16 channels, as fast as they can.
async fn append_throughput(server: &common::BenchServer, http: &reqwest::Client) -> anyhow::Result<()> {
    let (base, key) = (&server.base, &server.key);
    let mut sessions = Vec::new();
    for i in 0..16 {
        sessions.push(create_session(http, base, key, &format!("tp-{i}"), "none").await?["id"].as_str().unwrap_or_default().to_string());
    }
    let total = 60_000usize;
    let next = Arc::new(AtomicUsize::new(0));
    let client = common::FastClient::new(base, key);
    let body = bytes::Bytes::from(json!({"data": {"type": "text-delta", "delta": "token "}, "id": "x"}).to_string());
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..64 {
        let (client, path, next, body) =
            (client.clone(), format!("/realtime/v1/sessions/{}/out/append", sessions[w % 16]), next.clone(), body.clone());
        writers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let _ = client.send(hyper::Method::POST, &path, body.clone()).await;
            }
        }));
    }
    for w in writers {
        w.await?;
    }
    let wall = started.elapsed();
    println!("{:<36} {total} records in {:.2}s  {:.0} records/s", "append throughput (64 writers)", wall.as_secs_f64(), total as f64 / wall.as_secs_f64());
    Ok(())
}

/// 3. A worker waiting on `.in` (through a waitpoint) gets a record.
async fn in_to_worker(server: &common::BenchServer, http: &reqwest::Client) -> anyhow::Result<()> {
    let (base, key) = (&server.base, &server.key);
    let s = create_session(http, base, key, "wake", "wake-task").await?;
    let sid = s["id"].as_str().unwrap_or_default().to_string();
    let worker = WorkerClient::new(base, key);
    let run = worker.dequeue(&["wake-task".to_string()], 1, Duration::from_secs(10)).await?.remove(0);
    let channels = HttpChannelFactory { base_url: base.clone() }.for_run(&run);
    let beat = {
        let (worker, run) = (worker.clone(), run.clone());
        tokio::spawn(async move {
            loop {
                let _ = worker.heartbeat(&run).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let mut samples = Vec::new();
    let mut last = None;
    for i in 0..200 {
        let ch = channels.clone();
        let waiting = tokio::spawn(async move { (ch.next_input(last, Duration::from_secs(30)).await, Instant::now()) });
        tokio::time::sleep(Duration::from_millis(15)).await;
        let sent = Instant::now();
        http.post(format!("{base}/realtime/v1/sessions/{sid}/in/append")).bearer_auth(key).body(format!("m{i}")).send().await?;
        let (got, at) = waiting.await?;
        let record = got?.ok_or_else(|| anyhow::anyhow!("no record"))?;
        last = Some(record.seq);
        samples.push(at - sent);
    }
    beat.abort();
    common::summary("append .in → waiting worker has it", samples);
    Ok(())
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// The server as its own process over the bench's schema: what the fan-out and
/// memory measurements run against, so the probes do not share its runtime.
struct ServerProcess {
    child: tokio::process::Child,
    pid: u32,
    port: u16,
    base: String,
}

async fn spawn_server(server: &common::BenchServer, http: &reqwest::Client) -> anyhow::Result<ServerProcess> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .arg("serve")
        .env("DATABASE_URL", common::database_url())
        .env("DATABASE_SCHEMA", &server.schema)
        .env("REDIS_PREFIX", format!("bench:{}:proc", server.schema))
        .env("SESSIOND_MASTER_KEY", &server.master_hex)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or(0);
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(ServerProcess { child, pid, port, base })
}

/// 4. Memory per idle subscriber, read from the server process's RSS.
async fn idle_memory(proc: &ServerProcess, key: &str, http: &reqwest::Client) -> anyhow::Result<()> {
    let (pid, port, base) = (proc.pid, proc.port, proc.base.clone());
    let s = create_session(http, &base, key, "idle", "none").await?;
    let sid = s["id"].as_str().unwrap_or_default().to_string();
    // Warm the server up with one subscriber, then measure.
    let request = format!(
        "GET /realtime/v1/sessions/{sid}/out HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nAccept: text/event-stream\r\nTimeout-Seconds: 600\r\n\r\n"
    );
    let open = |n: usize| {
        let request = request.clone();
        async move {
            let mut conns = Vec::with_capacity(n);
            for _ in 0..n {
                let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                c.write_all(request.as_bytes()).await?;
                let mut buf = [0u8; 512];
                let _ = c.read(&mut buf).await?;
                conns.push(c);
            }
            anyhow::Ok(conns)
        }
    };
    let warm = open(100).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kb(pid);
    let n = 10_000;
    let conns = open(n).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kb(pid);
    println!(
        "{:<36} {n} idle subscribers: RSS {} MB → {} MB, {:.1} KB per subscriber",
        "memory per idle SSE subscriber",
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) as f64 / n as f64
    );
    drop(conns);
    drop(warm);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = common::BenchServer::start(|_| {}).await?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    println!("sessiond streams bench: loopback, clients and server share the machine");
    let mut proc = spawn_server(&server, &http).await?;
    fanout_latency(&proc.base, &server.key, &http).await?;
    idle_memory(&proc, &server.key, &http).await?;
    let _ = proc.child.kill().await;
    append_throughput(&server, &http).await?;
    in_to_worker(&server, &http).await?;
    server.finish().await
}
