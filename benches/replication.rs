//! Replication benchmark: how long a committed create takes to become a
//! visible row in ClickHouse, at a steady create rate, with the session list
//! served from ClickHouse throughout.
//!
//! A server in this process replicates its own schema through its own slot
//! (the defaults: batches of `REPLICATION_BATCH_ROWS` = 100 rows or
//! `REPLICATION_BATCH_MS` = 1 s; BENCH_BATCH_ROWS sets another size). Creates are sent at BENCH_RATE per second
//! (default 500) for BENCH_SECS seconds (default 20). A poller asks
//! ClickHouse every BENCH_POLL_MS for sessions of a higher version than it had seen 2 s before,
//! and a lister asks for the first list page every 250 ms, counting which
//! store answered. Latency runs from the create's request being sent (its
//! commit is before its answer, so this is an upper bound) to the poll that
//! first found its row, which adds up to one poll interval. Loss is not the
//! poller's to judge: after the load, a final query of the whole table
//! (waiting up to a minute, and for no flush to be pending) must find every
//! acknowledged create; those it does not find are reported lost.
//!
//! Run: `cargo bench --bench replication` with the ClickHouse dev server up
//! (`scripts/clickhouse.sh`). Drops its schema, slot and ClickHouse database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use serde_json::json;
use sessiond::analytics::watermark::{self, Table};

mod common;

/// How often the poller asks ClickHouse (BENCH_POLL_MS, default 100): each
/// poll reads the whole table, so polling faster loads the dev server.
fn poll_every() -> Duration {
    Duration::from_millis(common::env_or("BENCH_POLL_MS", 100))
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct Seen {
    external_id: Option<String>,
    _version: u64,
}

/// One second of the WAL sampler: WAL written, sent, recorded in batches and
/// confirmed (bytes), the last flush's lag (ms), and the pending flushes.
type Sample = (i64, Option<i64>, Option<i64>, Option<i64>, Option<i64>, i64);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rate: u64 = common::env_or("BENCH_RATE", 500);
    let secs: u64 = common::env_or("BENCH_SECS", 20);
    let server = common::BenchServer::start(|c| {
        common::own_clickhouse(c);
        c.replication_enabled = true;
        if let Some(rows) = std::env::var("BENCH_BATCH_ROWS").ok().and_then(|v| v.parse().ok()) {
            c.replication_batch_rows = rows;
        }
        // The bench applies the schema itself, before the first backfill needs it.
        c.clickhouse_migrate_on_start = false;
    })
    .await?;
    let config = server.state.config.clone();
    println!(
        "replication: batches of {} rows or {} ms; list overlay margin {} ms, at most {} rows",
        config.replication_batch_rows,
        config.replication_batch_ms,
        config.list_overlay_margin_ms,
        config.list_overlay_max_rows
    );
    let ch = server.state.analytics.clone();
    sessiond::analytics::schema::migrate(&ch).await?;
    // The new slot's first backfill vouches for the copy.
    eprintln!("schema applied; waiting for the first backfill");
    let started = Instant::now();
    while watermark::read(&ch, Table::Sessions).await?.is_none() {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "no watermark after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let acked: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    // Stays set once set (a Notify would miss a task busy with a query).
    let stop = tokio_util::sync::CancellationToken::new();

    // The poller: rows of a higher version than the highest seen 2 s ago.
    // Flushes run concurrently, so a batch of lower versions can land after
    // one of higher versions; the look-back finds it.
    let poller = {
        let ch = ch.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seen: HashMap<String, Instant> = HashMap::new();
            let mut newest = 0u64;
            let mut history: std::collections::VecDeque<(Instant, u64)> = Default::default();
            let mut tick = tokio::time::interval(poll_every());
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return seen,
                }
                let rows: Vec<Seen> = match ch
                    .client()
                    .query("SELECT external_id, _version FROM sessions_v1 WHERE _version > {v:UInt64}")
                    .param("v", history.front().map_or(0, |(_, v)| *v))
                    .fetch_all()
                    .await
                {
                    Ok(rows) => rows,
                    Err(err) => {
                        eprintln!("poll failed: {err}");
                        continue;
                    }
                };
                let now = Instant::now();
                for row in rows {
                    newest = newest.max(row._version);
                    if let Some(ext) = row.external_id {
                        seen.entry(ext).or_insert(now);
                    }
                }
                history.push_back((now, newest));
                while history.len() > 1 && history[1].0.elapsed() >= Duration::from_secs(2) {
                    history.pop_front();
                }
            }
        })
    };

    // The lister: which store answers the first page while the load runs.
    let lister = {
        let base = server.base.clone();
        let key = server.key.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut sources: HashMap<String, u64> = HashMap::new();
            let mut took = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return (sources, took),
                }
                let t = Instant::now();
                let source =
                    match client.get(format!("{base}/api/v1/sessions?page[size]=20")).bearer_auth(&key).send().await {
                        Ok(resp) if resp.status().is_success() => resp
                            .headers()
                            .get("x-sessiond-list-source")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("none")
                            .to_string(),
                        Ok(resp) => format!("status {}", resp.status()),
                        Err(_) => "error".into(),
                    };
                if source == "clickhouse" {
                    took.push(t.elapsed());
                }
                *sources.entry(source).or_default() += 1;
            }
        })
    };

    // The WAL sampler: once a second, how far Postgres has written, how far
    // the slot's walsender has sent, how far the consumer has recorded
    // batches, and how far the slot confirmed. It tells a walsender that
    // cannot keep up from a consumer that cannot.
    let sampler = {
        let pool = server.pool.clone();
        let slot = config.replication_slot_name();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return samples,
                }
                let row: Result<Sample, _> = sqlx::query_as(
                    "SELECT (pg_current_wal_lsn() - '0/0')::bigint,
                            (SELECT (sent_lsn - '0/0')::bigint FROM pg_stat_replication WHERE application_name = $1),
                            (SELECT (max(end_lsn) - '0/0')::bigint FROM replication_flushes),
                            (SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $2),
                            (SELECT last_flush_lag_ms FROM replication_state WHERE slot = $2),
                            (SELECT count(*) FROM replication_flushes WHERE status = 'pending')",
                )
                .bind(sessiond::replication::consumer::application_name(&slot))
                .bind(&slot)
                .fetch_one(&pool)
                .await;
                if let Ok(row) = row {
                    samples.push(row);
                }
            }
        })
    };

    // The load: one create every 1/rate s, each on its own task.
    let client = common::FastClient::new(&server.base, &server.key);
    let total = rate * secs;
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    eprintln!("sending {total} creates");
    let load_started = Instant::now();
    let mut creates = Vec::with_capacity(total as usize);
    for i in 0..total {
        tick.tick().await;
        let client = client.clone();
        let (sent, acked) = (sent.clone(), acked.clone());
        creates.push(tokio::spawn(async move {
            let ext = format!("repl-{i}");
            let body = json!({
                "type": "bench", "taskIdentifier": "echo", "externalId": ext, "tags": ["bench"],
                "triggerConfig": {"basePayload": {"i": i}}
            });
            sent.lock().unwrap().insert(ext.clone(), Instant::now());
            match client.send(Method::POST, "/api/v1/sessions", Bytes::from(body.to_string())).await {
                Ok(201) => {
                    acked.lock().unwrap().insert(ext, Instant::now());
                }
                Ok(status) if i == 0 => eprintln!("the first create answered {status}"),
                Err(err) if i == 0 => eprintln!("the first create failed: {err}"),
                _ => {}
            }
        }));
    }
    for c in creates {
        c.await?;
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    eprintln!("load done in {load_secs:.1}s; waiting for every acknowledged create to arrive");

    // Loss is judged by a final query, not by the poller: its look-back
    // misses a row that lands more than 2 s behind a newer version, and it
    // cannot see a row that vanishes after it was seen. Wait until every
    // acknowledged create is in ClickHouse, or for a minute after the load
    // (and no flush still pending); what is missing then is lost.
    let acked_now = acked.lock().unwrap().clone();
    let slot = config.replication_slot_name();
    let waited = Instant::now();
    // Until a final query answers, every acknowledged create counts as missing.
    let mut missing: std::collections::HashSet<String> = acked_now.keys().cloned().collect();
    let pending_at_end = loop {
        let visible: Result<Vec<String>, _> = ch
            .client()
            .query("SELECT assumeNotNull(external_id) FROM sessions_v1 FINAL WHERE type = 'bench' AND external_id IS NOT NULL")
            .fetch_all()
            .await;
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM replication_flushes WHERE slot = $1 AND status = 'pending'")
                .bind(&slot)
                .fetch_one(&server.pool)
                .await?;
        match visible {
            Ok(visible) => {
                let visible: std::collections::HashSet<String> = visible.into_iter().collect();
                missing = acked_now.keys().filter(|ext| !visible.contains(*ext)).cloned().collect();
                if missing.is_empty() || (waited.elapsed() > Duration::from_secs(60) && pending == 0) {
                    break pending;
                }
            }
            Err(err) => eprintln!("final query failed: {err}"),
        }
        // Still behind after three minutes: report it (the clean-up below
        // must still run, or the slot would outlive the bench).
        if waited.elapsed() > Duration::from_secs(180) {
            eprintln!("replication still behind after 180 s");
            break pending;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    tokio::time::sleep(poll_every() * 3).await;
    stop.cancel();
    let seen = poller.await?;
    let (sources, list_took) = lister.await?;
    let samples = sampler.await?;

    let sent = sent.lock().unwrap().clone();
    let acked = acked.lock().unwrap().clone();
    let mut from_send = Vec::new();
    let mut from_ack = Vec::new();
    // Rows the final query found but the poller never saw have no latency to
    // report; they are counted, not lost.
    let mut unseen_by_poller = 0;
    for (ext, at) in &acked {
        match seen.get(ext) {
            Some(visible) => {
                from_send.push(visible.saturating_duration_since(sent[ext]));
                from_ack.push(visible.saturating_duration_since(*at));
            }
            None if !missing.contains(ext) => unseen_by_poller += 1,
            None => {}
        }
    }
    let lost = missing.len();
    let errors = total as usize - acked.len();
    anyhow::ensure!(!acked.is_empty(), "no create was acknowledged");
    println!(
        "{} creates in {load_secs:.1}s ({:.0}/s acknowledged), {errors} errors, {lost} acknowledged but missing from ClickHouse after the run ({pending_at_end} flushes pending then)",
        total,
        acked.len() as f64 / load_secs
    );
    if lost > 0 {
        let mut some: Vec<&String> = missing.iter().take(10).collect();
        some.sort();
        println!("  missing, for example: {some:?}");
    }
    println!(
        "{unseen_by_poller} acknowledged creates arrived but the poller's look-back missed them (no latency for them)"
    );
    common::figure("replication.unseen_by_poller", unseen_by_poller as f64, "rows");
    common::summary("create sent → visible in clickhouse", "replication.visible", from_send);
    common::summary("create answered → visible in clickhouse", "replication.visible_after_ack", from_ack);
    common::figure("replication.create_rate", acked.len() as f64 / load_secs, "creates/s");
    common::figure("replication.lost", lost as f64, "rows");
    let answered: u64 = sources.values().sum();
    let by_clickhouse = sources.get("clickhouse").copied().unwrap_or(0);
    println!("list answers during the load: {sources:?}");
    common::figure("replication.list_from_clickhouse", by_clickhouse as f64 / answered.max(1) as f64, "share");
    common::summary("list page from clickhouse under load", "replication.list", list_took);
    // Per second: WAL written (KiB/s) and how far behind it, in KiB, the
    // walsender's send, the consumer's recorded batches and the slot's
    // confirmed position are.
    println!("wal per second: written KiB/s | sent behind | recorded behind | confirmed behind (KiB) | last flush lag ms | pending flushes");
    let kib = |a: i64, b: Option<i64>| b.map_or("-".to_string(), |b| format!("{}", (a - b) / 1024));
    let mut peak_sent = 0;
    let mut peak_recorded = 0;
    for pair in samples.windows(2) {
        let ((prev, ..), (wal, sent, recorded, confirmed, lag, pending)) = (pair[0], pair[1]);
        peak_sent = peak_sent.max(sent.map_or(0, |s| wal - s));
        peak_recorded = peak_recorded.max(recorded.map_or(0, |r| wal - r));
        println!(
            "  {:>7} | {:>7} | {:>7} | {:>7} | {:>7} | {:>4}",
            (wal - prev) / 1024,
            kib(wal, sent),
            kib(wal, recorded),
            kib(wal, confirmed),
            lag.map_or("-".to_string(), |l| l.to_string()),
            pending
        );
    }
    let (flushes, attempts): (i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), sum(attempts)::bigint FROM jobs WHERE kind = 'replication-flush'")
            .fetch_one(&server.pool)
            .await?;
    println!("{flushes} replication flushes ({} attempts)", attempts.unwrap_or(0));
    // Where a flush's time goes once recorded: waiting for a worker, then
    // writing to ClickHouse.
    let (wait, run): (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM a.started_at - j.created_at) * 1000),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM a.finished_at - a.started_at) * 1000)
         FROM jobs j JOIN job_attempts a ON a.job_id = j.id AND a.attempt = 1 WHERE j.kind = 'replication-flush'",
    )
    .fetch_one(&server.pool)
    .await?;
    println!(
        "flush job p50: recorded → started {:.0} ms, started → finished {:.0} ms",
        wait.unwrap_or(0.0),
        run.unwrap_or(0.0)
    );
    common::figure("replication.walsender_behind_peak", peak_sent as f64 / 1024.0, "KiB");
    common::figure("replication.recorded_behind_peak", peak_recorded as f64 / 1024.0, "KiB");

    // Clean up: the server first (it holds the slot), then slot, copy and schema.
    let pool = server.pool.clone();
    let drop_db = format!("DROP DATABASE IF EXISTS {}", sessiond::analytics::schema::quote_ident(ch.database()));
    server.finish().await?;
    for _ in 0..50 {
        if sessiond::replication::slot::drop(&pool, &slot).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ch.server().query(&drop_db).execute().await?;
    Ok(())
}
