//! Dashboard benchmark: the overview and the sessions pages over a large
//! environment, against the API's session list in the same process.
//!
//! Loads BENCH_SESSIONS sessions (default 1,000,000) into one environment with
//! `generate_series`, created every 2.5 s back from now (a million span about
//! 29 days, so the 24 h window holds ~35,000 and the 7 d one ~240,000), one
//! finished run per session and a few hundred failed jobs; backfills sessions
//! and runs into ClickHouse; signs an operator in; then times, one request at
//! a time, BENCH_REQUESTS (default 100) of each page with the session cookie,
//! and the same number of `GET /api/v1/sessions` as the baseline. Prints
//! p50/p99/max and each p99 as a ratio of the baseline's (target: p99 ≤ 150
//! ms); then times each of the overview's ClickHouse reads alone, to show
//! where its time goes. Every timed answer is checked for who served it: one
//! that fell back to Postgres (a ClickHouse timeout, and the cool-down after
//! it) is counted as a fallback and left out of the figures.
//!
//! Run: `cargo bench --bench dashboard` (release) with the ClickHouse dev
//! server up (`scripts/clickhouse.sh`); CLICKHOUSE_URL picks another one. Uses
//! its own Postgres schema and ClickHouse database and drops both.

use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, COOKIE, LOCATION, SET_COOKIE};
use sessiond::analytics::backfill::{self, BackfillRequest, BackfillStatus};
use sessiond::analytics::overview::{self, Bucket};
use sessiond::analytics::watermark::Table;
use sessiond::operators::{self, Role};
use sessiond::sessions::list::EnvScope;

mod common;

const OPERATOR: (&str, &str) = ("bench@example.com", "bench operator password");

/// The value of cookie `name` set by a response.
fn cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find_map(|pair| pair.strip_prefix(&format!("{name}=")).map(str::to_string))
}

/// Signs the operator in as a browser would; returns the `Cookie` header.
async fn sign_in(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let form = http.get(format!("{base}/dashboard/login")).send().await?;
    let login = cookie(&form, "sessiond_login").ok_or_else(|| anyhow::anyhow!("no login cookie"))?;
    let html = form.text().await?;
    let marker = "name=\"csrf\" value=\"";
    let at = html.find(marker).ok_or_else(|| anyhow::anyhow!("no csrf field"))? + marker.len();
    let csrf = html[at..].split('"').next().unwrap_or_default().to_string();
    let resp = http
        .post(format!("{base}/dashboard/login"))
        .header(COOKIE, format!("sessiond_login={login}"))
        .form(&[("email", OPERATOR.0), ("password", OPERATOR.1), ("csrf", csrf.as_str())])
        .send()
        .await?;
    anyhow::ensure!(resp.headers().get(LOCATION).is_some(), "sign-in refused: {}", resp.status());
    let session = cookie(&resp, "sessiond_dashboard").ok_or_else(|| anyhow::anyhow!("no session cookie"))?;
    Ok(format!("sessiond_dashboard={session}"))
}

/// Who answered a page or the API list, from what it sent back: the list's
/// `x-sessiond-list-source` header, the sessions page's "Served by …" line,
/// and, for the overview, whether its charts came from ClickHouse (else it
/// shows "Analytics unavailable" in their place).
#[derive(Clone, Copy)]
enum Answer {
    ApiList,
    SessionsPage,
    Overview,
}

impl Answer {
    fn of(name: &str) -> Answer {
        if name.starts_with("overview") {
            Answer::Overview
        } else {
            Answer::SessionsPage
        }
    }

    fn source(self, headers: &reqwest::header::HeaderMap, body: &str) -> String {
        match self {
            Answer::ApiList => headers
                .get(sessiond::sessions::routes::LIST_SOURCE_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string(),
            Answer::SessionsPage => ["clickhouse", "postgres"]
                .into_iter()
                .find(|s| body.contains(&format!("Served by {s}")))
                .unwrap_or("none")
                .to_string(),
            Answer::Overview if body.contains("chart-unavailable") => "postgres".into(),
            Answer::Overview => "clickhouse".into(),
        }
    }
}

/// Times `n` GETs of `path`, one at a time, each read whole; every answer's
/// source is checked, and only those ClickHouse served are kept (see
/// [`common::Labelled`]).
async fn time_get(
    http: &reqwest::Client,
    url: &str,
    header: (reqwest::header::HeaderName, &str),
    answer: Answer,
    n: usize,
) -> anyhow::Result<common::Labelled> {
    let mut lat = common::Labelled::default();
    for _ in 0..n {
        let t = Instant::now();
        let resp = http.get(url).header(header.0.clone(), header.1).send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await?;
        let took = t.elapsed();
        anyhow::ensure!(status == 200, "{url} answered {status}");
        anyhow::ensure!(!body.is_empty(), "{url} answered nothing");
        lat.push("clickhouse", &answer.source(&headers, &String::from_utf8_lossy(&body)), took);
    }
    Ok(lat.sorted())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: i64 = common::env_or("BENCH_SESSIONS", 1_000_000);
    let requests: usize = common::env_or("BENCH_REQUESTS", 100);
    let served = common::BenchServer::start(common::own_clickhouse).await?;
    let env = served.env_ids().await?;
    sessiond::analytics::schema::migrate(&served.state.analytics).await?;

    let t = Instant::now();
    sqlx::query(
        "INSERT INTO sessions (id, friendly_id, type, task_identifier, trigger_config, tags, organization_id,
             project_id, runtime_environment_id, environment_type, external_id, closed_at, expires_at, created_at,
             updated_at)
         SELECT gen_random_uuid(), 'session_d' || i, (ARRAY['chat', 'job'])[1 + i % 2],
             (ARRAY['agent-a', 'agent-b', 'agent-c'])[1 + i % 3], '{}'::jsonb,
             ARRAY[(ARRAY['red', 'blue', 'green', 'amber', 'violet'])[1 + i % 5]], $1, $2, $3, 'PRODUCTION',
             CASE WHEN i % 10 = 0 THEN 'ext-' || i END,
             CASE WHEN i % 7 = 0 THEN now() - i * interval '2.5 seconds' + interval '10 minutes' END,
             CASE WHEN i % 11 = 0 THEN now() - i * interval '2.5 seconds' + interval '1 day' END,
             now() - i * interval '2.5 seconds',
             now() - i * interval '2.5 seconds'
         FROM generate_series(1, $4) i",
    )
    .bind(env.0)
    .bind(env.1)
    .bind(env.2)
    .bind(n)
    .execute(&served.pool)
    .await?;
    // One finished run per session, created with it; terminal statuses only,
    // so the engine's sweeps leave them alone.
    sqlx::query(
        "INSERT INTO task_runs (id, friendly_id, organization_id, project_id, runtime_environment_id,
             task_identifier, session_id, payload, status, attempt_number, created_at, updated_at, started_at,
             completed_at)
         SELECT gen_random_uuid(), 'run_' || s.friendly_id, s.organization_id, s.project_id,
             s.runtime_environment_id, s.task_identifier, s.id, '{}'::jsonb,
             CASE WHEN h < 80 THEN 'COMPLETED' WHEN h < 90 THEN 'FAILED' WHEN h < 95 THEN 'CANCELED'
                  WHEN h < 98 THEN 'CRASHED' ELSE 'TIMED_OUT' END,
             1, s.created_at, s.created_at + interval '30 seconds', s.created_at + interval '1 second',
             s.created_at + interval '30 seconds'
         FROM (SELECT *, abs(hashtext(friendly_id)) % 100 AS h FROM sessions) s",
    )
    .execute(&served.pool)
    .await?;
    // Failed jobs over the last week, a few kinds.
    sqlx::query(
        "INSERT INTO jobs (id, kind, payload, status, attempts, max_attempts, last_error, relayed_at, created_at,
             updated_at, finished_at)
         SELECT gen_random_uuid(), (ARRAY['trigger-run', 'backfill', 'replication-flush', 'close-channels'])[1 + i % 4],
             '{}'::jsonb, 'failed', 5, 5, 'failed in the benchmark', now(), now() - i * interval '20 minutes',
             now() - i * interval '20 minutes', now() - i * interval '20 minutes'
         FROM generate_series(1, 500) i",
    )
    .execute(&served.pool)
    .await?;
    sqlx::query("ANALYZE sessions").execute(&served.pool).await?;
    sqlx::query("ANALYZE task_runs").execute(&served.pool).await?;
    sqlx::query("ANALYZE jobs").execute(&served.pool).await?;
    println!("loaded {n} sessions and {n} runs into Postgres in {:.1}s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let req = BackfillRequest { tables: vec![Table::Sessions, Table::Runs], from: None, to: None, chunk_size: 20_000 };
    let started = backfill::start(&served.pool, &served.state.jobs, &req).await?;
    for b in started {
        loop {
            let now = backfill::store::find(&served.pool, b.id).await?.ok_or_else(|| anyhow::anyhow!("gone"))?;
            if now.status == BackfillStatus::Completed {
                break;
            }
            anyhow::ensure!(now.status == BackfillStatus::Running, "backfill {}: {:?}", b.id, now.status);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!("backfilled {n} sessions and {n} runs in {:.1}s", t.elapsed().as_secs_f64());

    operators::create(&served.pool, OPERATOR.0, OPERATOR.1, Role::Viewer).await?;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let signed = sign_in(&http, &served.base).await?;
    let bearer = format!("Bearer {}", served.key);
    let env_id = env.2;

    let baseline_path = "/api/v1/sessions?page[size]=25";
    let cases = [
        ("overview_24h", format!("/dashboard/overview?env={env_id}")),
        ("overview_7d", format!("/dashboard/overview?env={env_id}&window=7d")),
        ("sessions_first", format!("/dashboard/sessions?env={env_id}")),
        ("sessions_filtered", format!("/dashboard/sessions?env={env_id}&status=ACTIVE&type=chat&tag=red")),
    ];
    // The pages must be served from ClickHouse, with their charts: every
    // timed answer is checked, and one that fell back is counted, not timed.
    let baseline_url = format!("{}{baseline_path}", served.base);
    time_get(&http, &baseline_url, (AUTHORIZATION, &bearer), Answer::ApiList, requests / 5 + 1).await?;
    let baseline = time_get(&http, &baseline_url, (AUTHORIZATION, &bearer), Answer::ApiList, requests).await?;
    let mut fallbacks = baseline.fallbacks();
    let base99 = common::pct_ms(&baseline.kept, 0.99);
    println!("api list (baseline): {}", baseline.describe());
    common::figure("dashboard.api_list.fallbacks", baseline.fallbacks() as f64, "requests");
    common::summary("api list (baseline)", "dashboard.api_list", baseline.kept);
    for (name, path) in &cases {
        let url = format!("{}{path}", served.base);
        let answer = Answer::of(name);
        time_get(&http, &url, (COOKIE, &signed), answer, requests / 5 + 1).await?;
        let lat = time_get(&http, &url, (COOKIE, &signed), answer, requests).await?;
        fallbacks += lat.fallbacks();
        println!("page {name}: {}", lat.describe());
        common::figure(&format!("dashboard.{name}.fallbacks"), lat.fallbacks() as f64, "requests");
        if lat.kept.is_empty() {
            println!("  {name}: every answer fell back; no ClickHouse figure");
            continue;
        }
        let p99 = common::pct_ms(&lat.kept, 0.99);
        common::summary(&format!("page {name}"), &format!("dashboard.{name}"), lat.kept);
        println!(
            "  {name}: p99 {p99:.2} ms = {:.2} x the API list's; target 150 ms: {}",
            p99 / base99,
            if p99 <= 150.0 { "met" } else { "MISSED" }
        );
        if base99.is_finite() {
            common::figure(&format!("dashboard.{name}.p99_ratio"), p99 / base99, "x");
        }
    }
    println!("{fallbacks} timed requests were answered without ClickHouse and left out of the figures");

    // Where the overview's time goes: each of its ClickHouse reads alone.
    let ch = served.state.analytics.clone();
    let scope = EnvScope { organization_id: env.0, project_id: env.1, environment_id: env.2 };
    let now = chrono::Utc::now();
    for (window, since, bucket) in
        [("24h", now - chrono::Duration::hours(24), Bucket::Hour), ("7d", now - chrono::Duration::days(7), Bucket::Day)]
    {
        let mut sessions = Vec::new();
        let mut runs = Vec::new();
        for _ in 0..requests {
            let t = Instant::now();
            overview::sessions_per_bucket(&ch, scope, since, bucket).await?;
            sessions.push(t.elapsed());
            let t = Instant::now();
            overview::runs_per_bucket(&ch, scope, since, bucket).await?;
            runs.push(t.elapsed());
        }
        common::summary(
            &format!("clickhouse sessions per bucket {window}"),
            &format!("dashboard.ch.sessions_{window}"),
            sessions,
        );
        common::summary(&format!("clickhouse runs per bucket {window}"), &format!("dashboard.ch.runs_{window}"), runs);
    }
    let mut open = Vec::new();
    for _ in 0..requests {
        let t = Instant::now();
        overview::open_sessions(&ch, scope).await?;
        open.push(t.elapsed());
    }
    common::summary("clickhouse open sessions", "dashboard.ch.open_sessions", open);

    let drop = format!("DROP DATABASE IF EXISTS {}", sessiond::analytics::schema::quote_ident(ch.database()));
    ch.server().query(&drop).execute().await?;
    served.finish().await
}
