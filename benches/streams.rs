//! Session channel benchmark, loopback. The server runs as its own process
//! (this process only generates load and measures), but the two share the
//! machine's two cores with Postgres and Redis:
//! 1. append → SSE delivery latency with 100 subscribers at 1,000 appends/s;
//! 2. sustained append throughput with 64 concurrent writers;
//! 3. append on `.in` → a waiting worker holds the data (waitpoint long-poll);
//! 4. server memory per idle SSE subscriber, 10,000 of them (read from the
//!    server process's RSS);
//! 5. rate limits on against off (issue 24: on must keep ≥ 0.95× of off):
//!    append throughput and SSE fan-out deliveries, two server processes in
//!    the same run, their samples alternated.
//!
//! Run: `cargo bench --bench streams [-- fanout|memory|throughput|wake|limits ...]`.
//! `SESSIOND_BIN=<path>` measures another build of the server (A/B runs).
//! Prints figures; asserts nothing.

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

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

async fn create_session(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    ext: &str,
    task: &str,
) -> anyhow::Result<serde_json::Value> {
    Ok(http
        .post(format!("{base}/api/v1/sessions"))
        .bearer_auth(key)
        .json(
            &json!({"type": "bench", "taskIdentifier": task, "externalId": ext, "triggerConfig": {"basePayload": {}}}),
        )
        .send()
        .await?
        .json()
        .await?)
}

/// Fan-out delivery latency: each record carries its send time and every
/// subscriber measures arrival minus send. Also prints how long the appends
/// themselves took to be acknowledged, and the CPU the server and this process
/// used meanwhile (both share the machine's two cores). An append that is not
/// acknowledged is an error, not a sample; a record a subscriber never
/// receives is reported as lost.
async fn fanout_latency(proc: &ServerProcess, key: &str, http: &reqwest::Client) -> anyhow::Result<()> {
    let base = &proc.base;
    let s = create_session(http, base, key, "fanout", "none").await?;
    let sid = s["id"].as_str().unwrap_or_default().to_string();
    let total = 3000usize;
    // How many records each subscriber waits for: every append until the
    // appends are done, then the acknowledged ones.
    let (expect_tx, expect_rx) = tokio::sync::watch::channel(usize::MAX);
    // Ends the subscribers that are still missing records.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut subs = Vec::new();
    // Subscribers are raw sockets reading the chunked SSE body: the probe
    // should cost little next to the server it measures.
    let port: u16 = base.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let n_subs: usize = common::env_or("BENCH_SUBSCRIBERS", 100);
    for _ in 0..n_subs {
        // Subscribed once the response head is here (the body follows).
        let (mut conn, mut buf) = subscribe_raw(port, &sid, key).await?;
        let (mut expect, mut stop) = (expect_rx.clone(), stop_rx.clone());
        subs.push(tokio::spawn(async move {
            let mut local = Vec::with_capacity(total);
            loop {
                // Frames end with a blank line; each carries one `data: ` line.
                // Chunk-size lines of the chunked encoding sit between frames.
                let at = now_us();
                let mut done = 0;
                while let Some(end) = find(&buf[done..], b"\n\n") {
                    let frame = &buf[done..done + end];
                    done += end + 2;
                    let Some(data) = data_line(frame) else { continue };
                    let Ok(batch) = serde_json::from_slice::<Batch<'_>>(data) else { continue };
                    for r in batch.records {
                        let sent: i64 = r.body.parse().unwrap_or(at);
                        local.push(Duration::from_micros((at - sent).max(0) as u64));
                    }
                }
                buf.drain(..done);
                if local.len() >= *expect.borrow_and_update() {
                    break;
                }
                tokio::select! {
                    read = conn.read_buf(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    _ = expect.changed() => {}
                    _ = stop.changed() => break,
                }
            }
            local
        }));
    }
    // Open loop: one append every millisecond whatever the answers do, each on
    // its own task (the pooled client keeps the connections warm).
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let writer = common::FastClient::new(base, key);
    let path: Arc<str> = format!("/realtime/v1/sessions/{sid}/out/append").into();
    let acks: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let errors = Arc::new(AtomicUsize::new(0));
    let last_ack: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut handles = Vec::with_capacity(total);
    tick.tick().await;
    let started = Instant::now();
    let cpu_before = cpu_ticks(proc.pid);
    let own_before = cpu_ticks(std::process::id());
    for _ in 0..total {
        tick.tick().await;
        let (client, path, acks, errors, last_ack) =
            (writer.clone(), path.clone(), acks.clone(), errors.clone(), last_ack.clone());
        handles.push(tokio::spawn(async move {
            let sent = now_us();
            match client.send(hyper::Method::POST, &path, sent.to_string().into()).await {
                Ok(200) => {
                    acks.lock().unwrap().push(Duration::from_micros((now_us() - sent).max(0) as u64));
                    *last_ack.lock().unwrap() = Some(Instant::now());
                }
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for h in handles {
        h.await?;
    }
    let elapsed = started.elapsed();
    let cpu = (cpu_ticks(proc.pid) - cpu_before) as f64 / clock_ticks_per_sec() / elapsed.as_secs_f64();
    let own = (cpu_ticks(std::process::id()) - own_before) as f64 / clock_ticks_per_sec() / elapsed.as_secs_f64();
    let acks = acks.lock().unwrap().clone();
    let errors = errors.load(Ordering::Relaxed);
    // Acknowledged appends per second, from the first send to the last acknowledgement.
    let ack_span = last_ack.lock().unwrap().map_or(elapsed, |t| t - started);
    let rate = acks.len() as f64 / ack_span.as_secs_f64();
    let _ = expect_tx.send(acks.len());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut samples = Vec::with_capacity(acks.len() * n_subs);
    for mut s in subs {
        // Past the deadline, the subscribers still waiting stop and hand in
        // what they have; what they miss is counted as lost.
        let local = tokio::select! {
            biased;
            local = &mut s => local?,
            _ = tokio::time::sleep_until(deadline) => {
                let _ = stop_tx.send(true);
                s.await?
            }
        };
        samples.extend(local);
    }
    let _ = stop_tx.send(true);
    let lost = (acks.len() * n_subs).saturating_sub(samples.len());
    println!(
        "append rate achieved: {rate:.0}/s acknowledged ({} of {total} appends, {errors} errors); CPU meanwhile: server {:.0}%, this bench {:.0}% of one core",
        acks.len(),
        cpu * 100.0,
        own * 100.0
    );
    println!("records lost: {lost} of {} deliveries ({n_subs} subscribers)", acks.len() * n_subs);
    common::figure("fanout.append_rate", rate, "appends/s");
    common::figure("fanout.append_errors", errors as f64, "appends");
    common::figure("fanout.lost", lost as f64, "deliveries");
    common::summary("append acknowledged (same run)", "fanout.ack", acks);
    common::summary(&format!("append→SSE delivery ({n_subs} subscribers)"), "fanout.delivery", samples);
    Ok(())
}

/// 16 sessions to write to.
async fn throughput_sessions(base: &str, key: &str, http: &reqwest::Client, tag: &str) -> anyhow::Result<Vec<String>> {
    let mut sessions = Vec::new();
    for i in 0..16 {
        sessions.push(
            create_session(http, base, key, &format!("tp-{tag}{i}"), "none").await?["id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    Ok(sessions)
}

/// What one run of [`write_flat_out`] got.
struct Written {
    ok: usize,
    /// Answered 429 (a rate limit refused them).
    limited: usize,
    /// Any other failure.
    failed: usize,
    wall: Duration,
}

/// `total` appends by `writers` writers spread over `sessions`' `.out`, each
/// on its own kept-alive connection, as fast as they are answered.
async fn write_flat_out(
    base: &str,
    key: &str,
    sessions: &[String],
    writers: usize,
    total: usize,
) -> anyhow::Result<Written> {
    let next = Arc::new(AtomicUsize::new(0));
    let (limited, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let body = json!({"data": {"type": "text-delta", "delta": "token "}, "id": "x"}).to_string();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut conn = common::RawConn::connect(base, key).await?;
        let (path, next, limited, failed, body) = (
            format!("/realtime/v1/sessions/{}/out/append", sessions[w % sessions.len()]),
            next.clone(),
            limited.clone(),
            failed.clone(),
            body.clone(),
        );
        tasks.push(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                match conn.post(&path, body.as_bytes()).await {
                    Ok(200) => {}
                    Ok(429) => {
                        limited.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let started = Instant::now();
    let tasks: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    for t in tasks {
        t.await?;
    }
    let wall = started.elapsed();
    let (limited, failed) = (limited.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    Ok(Written { ok: total - limited - failed, limited, failed, wall })
}

/// 2. Throughput: 64 writers over 16 channels, as fast as they can.
async fn append_throughput(base: &str, key: &str, http: &reqwest::Client) -> anyhow::Result<()> {
    let sessions = throughput_sessions(base, key, http, "").await?;
    let Written { ok, limited, failed, wall } = write_flat_out(base, key, &sessions, 64, 60_000).await?;
    let failed = failed + limited;
    println!(
        "{:<36} {ok} records in {:.2}s  {:.0} records/s  ({failed} failed)",
        "append throughput (64 writers)",
        wall.as_secs_f64(),
        ok as f64 / wall.as_secs_f64()
    );
    common::figure("throughput.rate", ok as f64 / wall.as_secs_f64(), "records/s");
    common::figure("throughput.errors", failed as f64, "appends");
    Ok(())
}

/// 3. A worker waiting on `.in` (through a waitpoint) gets a record.
async fn in_to_worker(base: &str, key: &str, http: &reqwest::Client) -> anyhow::Result<()> {
    let s = create_session(http, base, key, "wake", "wake-task").await?;
    let sid = s["id"].as_str().unwrap_or_default().to_string();
    let worker = WorkerClient::new(base, key);
    let run = worker.dequeue(&["wake-task".to_string()], 1, Duration::from_secs(10)).await?.remove(0);
    let channels = HttpChannelFactory { base_url: base.to_string() }.for_run(&run);
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
        let resp = http
            .post(format!("{base}/realtime/v1/sessions/{sid}/in/append"))
            .bearer_auth(key)
            .body(format!("m{i}"))
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "append .in answered {}", resp.status());
        let (got, at) = waiting.await?;
        let record = got?.ok_or_else(|| anyhow::anyhow!("no record"))?;
        last = Some(record.seq);
        samples.push(at - sent);
    }
    beat.abort();
    common::summary("append .in → waiting worker has it", "wake", samples);
    Ok(())
}

/// User + system CPU time of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn clock_ticks_per_sec() -> f64 {
    100.0 // USER_HZ on Linux
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
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

/// `env`: settings of this server beyond the bench's own (they win).
async fn spawn_server(
    server: &common::BenchServer,
    http: &reqwest::Client,
    env: &[(&str, &str)],
) -> anyhow::Result<ServerProcess> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    // SESSIOND_BIN runs another build of the server (A/B comparisons).
    let bin = std::env::var("SESSIOND_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sessiond").to_string());
    let child = tokio::process::Command::new(bin)
        .arg("serve")
        .env("DATABASE_URL", common::database_url())
        .env("DATABASE_SCHEMA", &server.schema)
        .env("REDIS_PREFIX", format!("bench:{}:proc", server.schema))
        .env("SESSIOND_MASTER_KEY", &server.master_hex)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        // The fan-out and memory figures hold up to 10,100 subscribers of one
        // session: above the per-session and per-environment caps.
        .env("SSE_MAX_PER_SESSION", "20000")
        .env("SSE_MAX_PER_ENVIRONMENT", "20000")
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or(0);
    let base = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..300 {
        if http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::ensure!(up, "the server process did not come up within 30 s");
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
    common::figure("memory.per_subscriber", (after.saturating_sub(before)) as f64 / n as f64, "KB");
    drop(conns);
    drop(warm);
    Ok(())
}

/// Only what the fan-out count reads of a frame: how many records it holds.
#[derive(serde::Deserialize)]
struct Count {
    records: Vec<serde::de::IgnoredAny>,
}

/// The value of an SSE frame's `data: ` line (each frame here has one).
fn data_line(frame: &[u8]) -> Option<&[u8]> {
    let data = &frame[find(frame, b"data: ")? + 6..];
    Some(&data[..find(data, b"\n").unwrap_or(data.len())])
}

/// Opens an SSE subscription to `sid`'s `.out` on a raw socket; answers it
/// with the response head read (and anything after it).
async fn subscribe_raw(port: u16, sid: &str, key: &str) -> anyhow::Result<(tokio::net::TcpStream, Vec<u8>)> {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    conn.set_nodelay(true)?;
    let request = format!(
        "GET /realtime/v1/sessions/{sid}/out HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nTimeout-Seconds: 120\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await?;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let head_end = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end + 4;
        }
        anyhow::ensure!(conn.read_buf(&mut buf).await? > 0, "subscriber closed before its response head");
    };
    anyhow::ensure!(buf.starts_with(b"HTTP/1.1 200"), "subscribe answered {:?}", String::from_utf8_lossy(&buf[..12]));
    buf.drain(..head_end);
    Ok((conn, buf))
}

/// What one fan-out sample got.
struct FannedOut {
    written: Written,
    /// Records all subscribers together received.
    delivered: usize,
    /// From the first append to the last subscriber's last record.
    wall: Duration,
}

/// One fan-out sample: `subscribers` on a fresh session's `.out`, `writers`
/// appending `total` records to it as fast as they are answered; done when
/// every subscriber has every acknowledged record (or 30 s after the writes).
async fn fan_out_sample(
    proc: &ServerProcess,
    key: &str,
    http: &reqwest::Client,
    tag: &str,
    (subscribers, writers, total): (usize, usize, usize),
) -> anyhow::Result<FannedOut> {
    let s = create_session(http, &proc.base, key, &format!("fan-{tag}"), "none").await?;
    let sid = s["id"].as_str().unwrap_or_default().to_string();
    let (expect_tx, expect_rx) = tokio::sync::watch::channel(usize::MAX);
    let mut subs = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let (mut conn, mut buf) = subscribe_raw(proc.port, &sid, key).await?;
        let mut expect = expect_rx.clone();
        subs.push(tokio::spawn(async move {
            let (mut got, mut last) = (0usize, None);
            loop {
                let mut done = 0;
                while let Some(end) = find(&buf[done..], b"\n\n") {
                    let frame = &buf[done..done + end];
                    done += end + 2;
                    let Some(data) = data_line(frame) else { continue };
                    if let Ok(batch) = serde_json::from_slice::<Count>(data) {
                        got += batch.records.len();
                        last = Some(Instant::now());
                    }
                }
                buf.drain(..done);
                if got >= *expect.borrow_and_update() {
                    break;
                }
                tokio::select! {
                    read = conn.read_buf(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    changed = expect.changed() => if changed.is_err() { break },
                }
            }
            (got, last)
        }));
    }
    let started = Instant::now();
    let written = write_flat_out(&proc.base, key, std::slice::from_ref(&sid), writers, total).await?;
    let _ = expect_tx.send(written.ok);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut delivered, mut end) = (0, started);
    for sub in subs {
        let (got, last) = match tokio::time::timeout_at(deadline, sub).await {
            Ok(joined) => joined?,
            Err(_) => (0, None),
        };
        delivered += got;
        end = end.max(last.unwrap_or(started));
    }
    Ok(FannedOut { written, delivered, wall: end - started })
}

/// The median of `values` (NaN if none).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Part 5, rate limits on against off: two server processes, each over its own
/// schema, alike but for `RATE_LIMITS_ENABLED`; the "on" one keeps the
/// default limits (20,000 appends/s and 2,000 subscriptions/s per
/// environment), which these loads stay under, so what differs is the cost
/// of admitting (the local budget, the leases from Redis). Each round takes
/// one sample of each kind from each server, in alternating order, so the
/// machine's noise (it is shared) falls on both; every sample is printed
/// with its label, then the medians, their ratio (on / off) and the median
/// of the rounds' own ratios. A sample
/// with any 429 says so: the ratio then measures refusals, not overhead.
async fn limits_on_off(http: &reqwest::Client) -> anyhow::Result<()> {
    const LABELS: [&str; 2] = ["on", "off"];
    let rounds: usize = common::env_or("BENCH_LIMIT_ROUNDS", 10);
    let appends: usize = common::env_or("BENCH_LIMIT_APPENDS", 10_000);
    let fan: (usize, usize, usize) = (common::env_or("BENCH_LIMIT_SUBSCRIBERS", 50), 8, 4_000);
    let mut servers = Vec::new();
    for enabled in ["true", "false"] {
        let server = common::BenchServer::prepare(|_| {}).await?;
        let proc = spawn_server(&server, http, &[("RATE_LIMITS_ENABLED", enabled)]).await?;
        let sessions = throughput_sessions(&proc.base, &server.key, http, "").await?;
        // Warm-up, not counted: connections, caches, the first leases.
        write_flat_out(&proc.base, &server.key, &sessions, 64, appends / 4).await?;
        servers.push((server, proc, sessions));
    }
    println!(
        "rate limits on vs off: {rounds} rounds; throughput: {appends} appends by 64 writers over 16 sessions; \
         fan-out: {} subscribers on one session, {} writers appending {} records",
        fan.0, fan.1, fan.2
    );
    // Per label: throughput (records/s), fan-out (deliveries/s).
    let mut rates: [[Vec<f64>; 2]; 2] = Default::default();
    for round in 0..rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (server, proc, sessions) = &servers[i];
            let w = write_flat_out(&proc.base, &server.key, sessions, 64, appends).await?;
            let rate = w.ok as f64 / w.wall.as_secs_f64();
            println!(
                "  round {} limits {:<3} throughput {rate:>8.0} records/s  ({} ok, {} refused 429, {} failed)",
                round + 1,
                LABELS[i],
                w.ok,
                w.limited,
                w.failed
            );
            rates[i][0].push(rate);
        }
        for i in order {
            let (server, proc, _) = &servers[i];
            let tag = format!("{}-{round}", LABELS[i]);
            let f = fan_out_sample(proc, &server.key, http, &tag, fan).await?;
            let rate = f.delivered as f64 / f.wall.as_secs_f64();
            println!(
                "  round {} limits {:<3} fan-out    {rate:>8.0} deliveries/s  ({} of {} delivered; appends: {} ok, {} refused 429, {} failed)",
                round + 1,
                LABELS[i],
                f.delivered,
                f.written.ok * fan.0,
                f.written.ok,
                f.written.limited,
                f.written.failed
            );
            rates[i][1].push(rate);
        }
    }
    for (k, (what, unit)) in [("throughput", "records/s"), ("fanout", "deliveries/s")].into_iter().enumerate() {
        let (on, off) = (median(rates[0][k].clone()), median(rates[1][k].clone()));
        // Each round's two samples ran back to back: their ratio is the
        // least exposed to the machine's slower and faster spells.
        let paired: Vec<f64> = rates[0][k].iter().zip(&rates[1][k]).map(|(on, off)| on / off).collect();
        let listed: Vec<String> = paired.iter().map(|r| format!("{r:.3}")).collect();
        let paired = median(paired);
        println!(
            "limits {what:<10} median on {on:>8.0} {unit}, off {off:>8.0} {unit}: on/off {:.3}; \
             per round [{}], median {paired:.3} (target ≥ 0.95)",
            on / off,
            listed.join(" ")
        );
        common::figure(&format!("limits.{what}.on"), on, unit);
        common::figure(&format!("limits.{what}.off"), off, unit);
        common::figure(&format!("limits.{what}.ratio"), on / off, "x");
        common::figure(&format!("limits.{what}.paired_ratio"), paired, "x");
    }
    for (server, mut proc, _) in servers {
        let _ = proc.child.kill().await;
        server.finish().await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Only the schema and a key here: the server under test is its own process.
    let server = common::BenchServer::prepare(|_| {}).await?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    println!("sessiond streams bench: loopback, clients and server share the machine");
    // `cargo bench --bench streams -- fanout throughput` runs only those parts.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wants = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let mut proc = spawn_server(&server, &http, &[]).await?;
    if wants("fanout") {
        fanout_latency(&proc, &server.key, &http).await?;
    }
    if wants("throughput") {
        append_throughput(&proc.base, &server.key, &http).await?;
    }
    if wants("wake") {
        in_to_worker(&proc.base, &server.key, &http).await?;
    }
    if wants("memory") {
        idle_memory(&proc, &server.key, &http).await?;
    }
    let _ = proc.child.kill().await;
    if wants("limits") {
        limits_on_off(&http).await?;
    }
    server.finish().await
}
