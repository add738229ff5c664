//! Analytics benchmark: the session list served from ClickHouse over a large
//! environment, against the same list served by Postgres in the same process,
//! and the backfill's copy rate.
//!
//! Loads BENCH_SESSIONS sessions (default 1,000,000) into one environment with
//! `generate_series`, backfills them through the job runtime (rows/s), then
//! times list requests over HTTP, one at a time: the first page and a deep
//! cursor (90% down), with and without filters. Each is timed on a server
//! whose list ClickHouse serves and on one whose ClickHouse is unreachable, so
//! Postgres serves it; the ratio is the figure to compare across machines.
//! Every timed answer's `x-sessiond-list-source` is checked: one that another
//! store answered (a ClickHouse read that timed out, and the cool-down after
//! it) is left out of the figures and counted, per case, as a fallback.
//!
//! Run: `cargo bench --bench analytics` (release) with the ClickHouse dev
//! server up (`scripts/clickhouse.sh`); CLICKHOUSE_URL picks another one. Uses
//! its own Postgres schema and ClickHouse database and drops both.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use sessiond::analytics::backfill::{self, BackfillRequest, BackfillStatus};
use sessiond::analytics::watermark::Table;
use sessiond::sessions::list::{Cursor, Origin};
use sessiond::sessions::routes::LIST_SOURCE_HEADER as LIST_SOURCE;

mod common;

const REQUESTS: usize = 200;

/// Times REQUESTS list requests, one at a time, each filed under the store
/// its `x-sessiond-list-source` header names: only those `meant` answered
/// count towards its figures (see [`common::Labelled`]).
async fn time_list(client: &common::FastClient, path: &str, meant: &str) -> anyhow::Result<common::Labelled> {
    let mut lat = common::Labelled::default();
    for _ in 0..REQUESTS {
        let t = Instant::now();
        let (status, source) = client.send_reading(Method::GET, path, Bytes::new(), Some(LIST_SOURCE)).await?;
        let took = t.elapsed();
        anyhow::ensure!(status == 200, "{path} answered {status}");
        lat.push(meant, source.as_deref().unwrap_or("none"), took);
    }
    Ok(lat.sorted())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: i64 = common::env_or("BENCH_SESSIONS", 1_000_000);
    let served = common::BenchServer::start(common::own_clickhouse).await?;
    let env = served.env_ids().await?;
    sessiond::analytics::schema::migrate(&served.state.analytics).await?;

    let t = Instant::now();
    sqlx::query(
        "INSERT INTO sessions (id, friendly_id, type, task_identifier, trigger_config, tags, organization_id,
             project_id, runtime_environment_id, environment_type, external_id, closed_at, expires_at, created_at,
             updated_at)
         SELECT gen_random_uuid(), 'session_b' || i, (ARRAY['chat', 'job'])[1 + i % 2],
             (ARRAY['agent-a', 'agent-b', 'agent-c'])[1 + i % 3], '{}'::jsonb,
             ARRAY[(ARRAY['red', 'blue', 'green', 'amber', 'violet'])[1 + i % 5]], $1, $2, $3, 'PRODUCTION',
             CASE WHEN i % 10 = 0 THEN 'ext-' || i END,
             CASE WHEN i % 7 = 0 THEN now() - interval '3 hours' END,
             CASE WHEN i % 11 = 0 THEN now() - interval '1 hour' END,
             timestamptz '2026-01-01 00:00:00+00' + i * interval '10 seconds',
             now() - interval '2 hours'
         FROM generate_series(1, $4) i",
    )
    .bind(env.0)
    .bind(env.1)
    .bind(env.2)
    .bind(n)
    .execute(&served.pool)
    .await?;
    sqlx::query("ANALYZE sessions").execute(&served.pool).await?;
    println!("loaded {n} sessions into Postgres in {:.1}s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let req = BackfillRequest { tables: vec![Table::Sessions], from: None, to: None, chunk_size: 10_000 };
    let id = backfill::start(&served.pool, &served.state.jobs, &req).await?[0].id;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let b = backfill::store::find(&served.pool, id).await?.ok_or_else(|| anyhow::anyhow!("backfill gone"))?;
        if b.status == BackfillStatus::Completed {
            break;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!("backfilled {n} sessions in {secs:.1}s ({:.0} rows/s)", n as f64 / secs);
    common::figure("backfill.rows_per_sec", n as f64 / secs, "rows/s");

    // The baseline: a second server on the same schema whose ClickHouse is
    // unreachable, so its list comes from Postgres.
    let fallback = {
        let mut config = served.state.config.clone();
        config.clickhouse_url = "http://127.0.0.1:9".into();
        config.clickhouse_retry_after_ms = 3_600_000;
        config.run_jobs = false;
        let master = sessiond::app::master_key(&config)?;
        let state = sessiond::app::AppState::connect(config, served.pool.clone(), master).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (_stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(sessiond::app::serve(listener, state, rx));
        (base, _stop)
    };

    // A cursor 90% of the way down (newest first).
    let (deep_at, deep_id): (chrono::DateTime<chrono::Utc>, uuid::Uuid) = sqlx::query_as(&format!(
        "SELECT created_at, id FROM sessions ORDER BY created_at DESC, id DESC OFFSET {} LIMIT 1",
        n * 9 / 10
    ))
    .fetch_one(&served.pool)
    .await?;
    let deep = Cursor { created_at: deep_at, id: deep_id, origin: Origin::default() }.encode();
    let filter = "filter[tags]=red&filter[status]=ACTIVE&filter[type]=chat";
    let cases = [
        ("first", "/api/v1/sessions?page[size]=20".to_string()),
        ("deep", format!("/api/v1/sessions?page[size]=20&page[after]={deep}")),
        ("first_filtered", format!("/api/v1/sessions?page[size]=20&{filter}")),
        ("deep_filtered", format!("/api/v1/sessions?page[size]=20&{filter}&page[after]={deep}")),
    ];
    let ch_client = common::FastClient::new(&served.base, &served.key);
    let pg_client = common::FastClient::new(&fallback.0, &served.key);
    let mut fallbacks = 0;
    for (name, path) in &cases {
        // Warm both, then alternate rounds so drift hits both alike. Every
        // sample's source is checked, so a ClickHouse timeout mid-round is
        // counted as a fallback, not timed as ClickHouse.
        time_list(&ch_client, path, "clickhouse").await?;
        time_list(&pg_client, path, "postgres").await?;
        let ch = time_list(&ch_client, path, "clickhouse").await?;
        let pg = time_list(&pg_client, path, "postgres").await?;
        let (ch50, ch99) = (common::pct_ms(&ch.kept, 0.5), common::pct_ms(&ch.kept, 0.99));
        let (pg50, pg99) = (common::pct_ms(&pg.kept, 0.5), common::pct_ms(&pg.kept, 0.99));
        println!(
            "list {name:<15} clickhouse p50 {ch50:>7.2} ms p99 {ch99:>7.2} ms | postgres p50 {pg50:>7.2} ms p99 {pg99:>7.2} ms | p99 ratio {:.2}",
            ch99 / pg99
        );
        println!("     {name:<15} clickhouse {} | postgres {}", ch.describe(), pg.describe());
        common::figure(&format!("list.{name}.clickhouse.fallbacks"), ch.fallbacks() as f64, "requests");
        common::figure(&format!("list.{name}.postgres.mislabelled"), pg.fallbacks() as f64, "requests");
        fallbacks += ch.fallbacks() + pg.fallbacks();
        // Figures from no sample at all would be NaN, not a time: left out.
        if !ch.kept.is_empty() {
            common::figure(&format!("list.{name}.clickhouse.p99"), ch99, "ms");
        }
        if !pg.kept.is_empty() {
            common::figure(&format!("list.{name}.postgres.p99"), pg99, "ms");
        }
        if !ch.kept.is_empty() && !pg.kept.is_empty() {
            common::figure(&format!("list.{name}.p99_ratio"), ch99 / pg99, "x");
        }
    }
    println!("{fallbacks} timed list requests were answered by another store than their label's, and left out of its figures");

    let ch = served.state.analytics.clone();
    let drop = format!("DROP DATABASE IF EXISTS {}", sessiond::analytics::schema::quote_ident(ch.database()));
    ch.server().query(&drop).execute().await?;
    served.finish().await
}
