//! The dashboard's overview page: counts and server-rendered SVG charts of one
//! environment over a window, read from ClickHouse (sessions, runs, lag
//! samples) and Postgres (failed jobs, replication health); the page without
//! ClickHouse; and the page in a browser at desktop and phone widths.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::DurationRound;

use reqwest::header::LOCATION;
use reqwest::StatusCode;
use sessiond::analytics::backfill::{self, BackfillRequest, BackfillStatus};
use sessiond::analytics::overview::{self, Bucket};
use sessiond::analytics::watermark::Table;
use uuid::Uuid;

use crate::browser;
use crate::common::{eventually, schedules_file, session_body, TestApp};
use crate::dashboard::{with_operators, Operator, ADMIN, VIEWER};
use crate::replication::{finish, replicating};

/// Every `attr="value"` of the elements that open with `open` (say
/// `<g class="bar"`), in page order.
fn elements(page: &str, open: &str) -> Vec<BTreeMap<String, String>> {
    page.match_indices(open)
        .map(|(at, _)| {
            let tag = &page[at + open.len()..];
            let tag = &tag[..tag.find('>').unwrap()];
            let mut attrs = BTreeMap::new();
            let mut rest = tag;
            while let Some(eq) = rest.find("=\"") {
                let name = rest[..eq].rsplit(' ').next().unwrap().to_string();
                let value_start = eq + 2;
                let len = rest[value_start..].find('"').unwrap();
                attrs.insert(name, rest[value_start..value_start + len].to_string());
                rest = &rest[value_start + len + 1..];
            }
            attrs
        })
        .collect()
}

/// The `data-value` of the count named `name`, if the page knows it.
fn count(page: &str, name: &str) -> Option<u64> {
    elements(page, "<div class=\"count")
        .into_iter()
        .find(|a| a.get("data-count").map(String::as_str) == Some(name))
        .and_then(|a| a.get("data-value").map(|v| v.parse().unwrap()))
}

/// The chart section `id`'s markup.
fn section<'a>(page: &'a str, id: &str) -> &'a str {
    let at = page.find(&format!("<section class=\"chart-card\" id=\"{id}\"")).unwrap_or_else(|| panic!("{id}"));
    let rest = &page[at..];
    &rest[..rest.find("</section>").unwrap()]
}

/// Bars of a bar chart: bucket (Unix seconds) → total, only the non-empty.
fn bars(page: &str, chart: &str) -> BTreeMap<i64, u64> {
    elements(section(page, chart), "<g class=\"bar\"")
        .into_iter()
        .map(|a| (a["data-bucket"].parse().unwrap(), a["data-total"].parse().unwrap()))
        .filter(|(_, total)| *total > 0)
        .collect()
}

/// What Postgres says the chart should show: rows of `table` in the
/// environment created since the window's start, per `unit` (hour, day).
async fn expected(app: &TestApp, table: &str, env: Uuid, unit: &str, since: &str) -> BTreeMap<i64, u64> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(&format!(
        "SELECT extract(epoch FROM date_trunc('{unit}', created_at AT TIME ZONE 'UTC'))::bigint, count(*)
         FROM {table} WHERE runtime_environment_id = $1
           AND created_at >= (date_trunc('{unit}', now() AT TIME ZONE 'UTC') - {since}) AT TIME ZONE 'UTC'
         GROUP BY 1"
    ))
    .bind(env)
    .fetch_all(app.db())
    .await
    .unwrap();
    rows.into_iter().map(|(b, n)| (b, n as u64)).collect()
}

async fn fail_job(app: &TestApp, kind: &str, ago: &str) {
    sqlx::query(&format!(
        "INSERT INTO jobs (id, kind, payload, status, attempts, max_attempts, last_error, relayed_at, updated_at)
         VALUES ($1, $2, '{{}}', 'failed', 1, 1, 'failed on purpose', now(), now() - interval '{ago}')"
    ))
    .bind(Uuid::now_v7())
    .bind(kind)
    .execute(app.db())
    .await
    .unwrap();
}

/// Copies every session and run into ClickHouse and waits for it.
async fn backfilled(app: &TestApp) {
    let req = BackfillRequest { tables: vec![Table::Sessions, Table::Runs], from: None, to: None, chunk_size: 1_000 };
    backfill_done(app, &req).await;
}

/// Runs the backfills `req` asks for and waits for them to complete.
async fn backfill_done(app: &TestApp, req: &BackfillRequest) {
    let started = backfill::start(app.db(), &app.state.jobs, req).await.unwrap();
    eventually(30, "the backfills to complete", || async {
        for b in &started {
            let b = backfill::store::find(app.db(), b.id).await.unwrap().unwrap();
            if b.status != BackfillStatus::Completed {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// Sessions (and their first runs) in the test's environments: `a_now` now
/// and `a_earlier` three hours ago (one closed) in A, two in B; one of A's runs
/// FAILED; failed jobs now and three days ago. All copied to ClickHouse.
async fn seeded(app: &TestApp, tag: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..5 {
        let s = app.create_session(session_body(Some(&format!("{tag}-a-{i}")))).await;
        ids.push(s["id"].as_str().unwrap().to_string());
    }
    for i in 0..2 {
        let (status, _) = app.post("/api/v1/sessions", &app.b.key, session_body(Some(&format!("{tag}-b-{i}")))).await;
        assert!(status == StatusCode::CREATED || status == StatusCode::OK, "create in B: {status}");
    }
    // Two of A's sessions and their runs three hours back; one of them closed.
    for id in &ids[3..] {
        sqlx::query(
            "WITH s AS (UPDATE sessions SET created_at = created_at - interval '3 hours' WHERE friendly_id = $1
                        RETURNING id)
             UPDATE task_runs SET created_at = created_at - interval '3 hours' WHERE session_id IN (SELECT id FROM s)",
        )
        .bind(id)
        .execute(app.db())
        .await
        .unwrap();
    }
    sqlx::query("UPDATE sessions SET closed_at = now(), closed_reason = 'test' WHERE friendly_id = $1")
        .bind(&ids[4])
        .execute(app.db())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE task_runs SET status = 'FAILED' WHERE id = (SELECT current_run_id FROM sessions WHERE friendly_id = $1)",
    )
    .bind(&ids[0])
    .execute(app.db())
    .await
    .unwrap();
    fail_job(app, "probe", "1 minute").await;
    fail_job(app, "probe", "2 hours").await;
    fail_job(app, "backfill", "5 minutes").await;
    fail_job(app, "trigger-run", "3 days").await;
    backfilled(app).await;
    ids
}

#[tokio::test]
async fn signed_out_goes_to_sign_in_and_the_dashboard_opens_on_the_overview() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = http.get(format!("{}/dashboard/overview", app.base)).send().await.unwrap();
    assert!(resp.status().is_redirection());
    assert_eq!(resp.headers()[LOCATION], "/dashboard/login");

    let viewer = Operator::login(&app, VIEWER).await;
    let (status, _) = viewer.get("/dashboard").await;
    assert!(status.is_redirection());
    let resp = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/dashboard", app.base))
        .header(reqwest::header::COOKIE, format!("sessiond_dashboard={}", viewer.cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()[LOCATION], "/dashboard/overview");

    // A viewer sees it; the nav names it first and current.
    let (status, page) = viewer.get("/dashboard/overview").await;
    assert_eq!(status, StatusCode::OK);
    let nav = &page[page.find("<nav>").unwrap()..];
    assert!(nav.find("/dashboard/overview").unwrap() < nav.find("/dashboard/sessions").unwrap());
    assert!(page.contains("href=\"/dashboard/overview\" aria-current=\"page\""));

    // Bad input: each its one status and its own sentence. Malformed input is
    // a 400; a well-formed id of no environment is a 404, like any missing thing.
    let unknown = format!("env={}", Uuid::new_v4());
    let cases = [
        ("window=30d", StatusCode::BAD_REQUEST, "window must be 24h or 7d"),
        ("window=%3Cscript%3E", StatusCode::BAD_REQUEST, "window must be 24h or 7d"),
        (unknown.as_str(), StatusCode::NOT_FOUND, "No such environment"),
        ("env=nope", StatusCode::BAD_REQUEST, "env must be an environment id"),
    ];
    for (bad, want, says) in cases {
        let (status, page) = viewer.get(&format!("/dashboard/overview?{bad}")).await;
        assert_eq!(status, want, "{bad}");
        assert!(page.contains(says), "{bad}: {page}");
        assert!(!page.contains("<script>"), "{bad}");
    }
}

#[tokio::test]
async fn the_overview_counts_and_charts_one_environment_from_clickhouse() {
    let app = TestApp::spawn().await;
    app.clickhouse_ready().await;
    with_operators(&app).await;
    seeded(&app, "ov").await;
    let admin = Operator::login(&app, ADMIN).await;
    let a = app.a.env.id;

    let (status, page) = admin.get(&format!("/dashboard/overview?env={a}")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(count(&page, "sessions-created"), Some(5), "B's two are not A's");
    assert_eq!(count(&page, "open-sessions"), Some(4), "one of A's five is closed");
    assert_eq!(count(&page, "failed-jobs"), Some(3), "the one three days ago is outside 24 h");
    let statuses: BTreeMap<String, u64> = elements(&page, "<span class=\"status-count\"")
        .into_iter()
        .map(|a| (a["data-status"].clone(), a["data-value"].parse().unwrap()))
        .collect();
    assert_eq!(statuses.get("FAILED"), Some(&1), "{statuses:?}");
    assert_eq!(statuses.values().sum::<u64>(), 5, "{statuses:?}");
    assert!(page.contains("replication off"));
    assert!(!page.contains("overview-incomplete"), "backfilled: the copy is complete");

    // Sessions per hour: 24 bars, two of them filled as Postgres says.
    let sessions = section(&page, "chart-sessions");
    assert_eq!(sessions.matches("<g class=\"bar\"").count(), 24);
    assert!(sessions.contains("role=\"img\"") && sessions.contains("<desc id=\"sessions-desc\">5 sessions created"));
    let want = expected(&app, "sessions", a, "hour", "interval '23 hours'").await;
    assert_eq!(bars(&page, "chart-sessions"), want);
    assert_eq!(want.values().copied().collect::<Vec<_>>(), vec![2, 3]);
    // Taller bars for more sessions: the 3 is 1.5 times the 2.
    let heights: Vec<f64> =
        elements(sessions, "<rect class=\"s-sessions\"").iter().map(|a| a["height"].parse().unwrap()).collect();
    assert_eq!(heights.len(), 2);
    assert!((heights[1] / heights[0] - 1.5).abs() < 0.02, "{heights:?}");
    assert!(sessions.contains("<title>") && sessions.contains(": 3 sessions</title>"));

    // Runs by status, stacked: the same buckets, a FAILED segment, a legend.
    assert_eq!(bars(&page, "chart-runs"), expected(&app, "task_runs", a, "hour", "interval '23 hours'").await);
    let runs = section(&page, "chart-runs");
    // The bar's segment (the legend's swatch has the class too, without data).
    let failed: Vec<_> =
        elements(runs, "<rect class=\"s-failed\"").into_iter().filter(|a| a.contains_key("data-series")).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!((failed[0]["data-series"].as_str(), failed[0]["data-value"].as_str()), ("FAILED", "1"));
    assert!(runs.contains("<ul class=\"legend\"") && runs.contains("FAILED <span class=\"muted\">1</span>"));

    // Job failures by kind, most first.
    let kinds: Vec<(String, String)> = elements(section(&page, "chart-failures"), "<g class=\"hbar\"")
        .into_iter()
        .map(|a| (a["data-kind"].clone(), a["data-value"].clone()))
        .collect();
    assert_eq!(kinds, vec![("probe".to_string(), "2".to_string()), ("backfill".to_string(), "1".to_string())]);
    assert!(section(&page, "chart-lag").contains("chart-off"), "replication is off");
    // CSP: no inline styles anywhere.
    assert!(!page.contains("style="));

    // Seven days, by day: seven bars; the failure three days ago counts.
    let (status, week) = admin.get(&format!("/dashboard/overview?env={a}&window=7d")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(section(&week, "chart-sessions").matches("<g class=\"bar\"").count(), 7);
    assert_eq!(bars(&week, "chart-sessions"), expected(&app, "sessions", a, "day", "interval '6 days'").await);
    assert_eq!(count(&week, "failed-jobs"), Some(4));
    assert!(week.contains("<option value=\"7d\" selected>"));

    // Environment B: its own two sessions only.
    let (_, b) = admin.get(&format!("/dashboard/overview?env={}", app.b.env.id)).await;
    assert_eq!(count(&b, "sessions-created"), Some(2));
    assert_eq!(count(&b, "open-sessions"), Some(2));
    assert_eq!(bars(&b, "chart-sessions").values().sum::<u64>(), 2);
}

/// Until a full backfill vouches for ClickHouse's copy (the sessions
/// watermark), the page charts what ClickHouse holds and says it may miss
/// rows. A ranged backfill copies rows but vouches for nothing; a full one
/// clears the notice.
#[tokio::test]
async fn before_a_full_backfill_the_overview_says_its_charts_may_miss_rows() {
    let app = TestApp::spawn().await;
    app.clickhouse_ready().await;
    with_operators(&app).await;
    for i in 0..2 {
        app.create_session(session_body(Some(&format!("unvouched-{i}")))).await;
    }
    let viewer = Operator::login(&app, VIEWER).await;
    let path = format!("/dashboard/overview?env={}", app.a.env.id);

    // ClickHouse answers (charts, not "unavailable") with what it holds: nothing.
    let (status, page) = viewer.get(&path).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("<p class=\"notice\" id=\"overview-incomplete\">"), "{page}");
    assert!(!section(&page, "chart-sessions").contains("Analytics unavailable"));
    assert_eq!(count(&page, "sessions-created"), Some(0), "nothing copied yet");

    // Both sessions copied by a ranged backfill: the charts show them, and
    // the notice stays, since nothing vouches for the rest of the history.
    let now = chrono::Utc::now();
    let ranged = BackfillRequest {
        tables: vec![Table::Sessions, Table::Runs],
        from: Some(now - chrono::Duration::hours(1)),
        to: Some(now + chrono::Duration::hours(1)),
        chunk_size: 100,
    };
    backfill_done(&app, &ranged).await;
    let (_, page) = viewer.get(&path).await;
    assert_eq!(count(&page, "sessions-created"), Some(2), "the ranged copy is charted");
    assert!(page.contains("id=\"overview-incomplete\""), "a ranged backfill vouches for nothing");

    backfilled(&app).await;
    let (_, page) = viewer.get(&path).await;
    assert_eq!(count(&page, "sessions-created"), Some(2));
    assert!(!page.contains("overview-incomplete"), "a full backfill vouches for the copy");
}

/// A ClickHouse that is not one: it accepts connections and holds them
/// without a word (`silent`) or closes them at once, and notes each one it
/// accepted, so a test counts what reached it instead of timing answers.
struct FakeClickHouse {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
    /// The test's own marker connections (see [`Self::connections`]).
    markers: Mutex<Vec<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeClickHouse {
    async fn start(silent: bool) -> FakeClickHouse {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let noted = accepted.clone();
        let task = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, peer)) = listener.accept().await {
                noted.lock().unwrap().push(peer);
                if silent {
                    open.push(socket);
                }
            }
        });
        FakeClickHouse { addr, accepted, markers: Mutex::new(Vec::new()), task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The connections sessiond opened so far, all of them: the test opens a
    /// marker connection of its own and waits until it is accepted. The
    /// kernel hands out connections in the order they were established, so
    /// every connection opened before the marker has been accepted by then.
    async fn connections(&self) -> usize {
        let marker = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let at = marker.local_addr().unwrap();
        self.markers.lock().unwrap().push(at);
        eventually(10, "the marker connection to be accepted", || async {
            self.accepted.lock().unwrap().contains(&at).then_some(())
        })
        .await;
        let markers = self.markers.lock().unwrap();
        self.accepted.lock().unwrap().iter().filter(|peer| !markers.contains(peer)).count()
    }
}

impl Drop for FakeClickHouse {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a failed ClickHouse is left alone in the cases below: long
/// enough that the page read right after the failure is surely inside it.
const COOL_DOWN_MS: u64 = 5_000;

/// The page with ClickHouse at `url`, which fails or never answers in time:
/// three page reads, one failing on ClickHouse, one inside the cool-down
/// after it, one after the cool-down. `fake`, when ClickHouse is one, counts
/// the connections that reach it: none during the cool-down, and at least one
/// again after it. With nothing listening there is nothing to count; the
/// handle's own memory of the failure shows the cool-down instead.
async fn overview_without_clickhouse(url: String, fake: Option<&FakeClickHouse>) {
    let app = TestApp::spawn_with(|c| {
        c.clickhouse_url = url;
        c.clickhouse_timeout_ms = 500;
        c.clickhouse_retry_after_ms = COOL_DOWN_MS;
        // No sweep reaches for ClickHouse between the page reads.
        c.job_schedules_file = Some(schedules_file(&[]));
    })
    .await;
    with_operators(&app).await;
    for i in 0..3 {
        app.create_session(session_body(Some(&format!("no-ch-{i}")))).await;
    }
    fail_job(&app, "probe", "1 minute").await;
    let ch = &app.state.analytics;
    let cooled = || async {
        eventually(COOL_DOWN_MS / 1_000 + 10, "the cool-down to end", || async { ch.healthy().then_some(()) }).await
    };
    // Signing in lands on the sessions list, which tries ClickHouse too: its
    // failure's cool-down passes before the overview's first read.
    let viewer = Operator::login(&app, VIEWER).await;
    cooled().await;
    let mut reached = match fake {
        Some(fake) => fake.connections().await,
        None => 0,
    };
    for round in 0..3 {
        if round == 2 {
            // The cool-down ends on its clock; then ClickHouse is tried again.
            cooled().await;
        }
        let (status, page) = viewer.get("/dashboard/overview").await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(!ch.healthy(), "round {round}: ClickHouse is cooling down after a failure");
        if let Some(fake) = fake {
            let now = fake.connections().await;
            match round {
                0 => assert!(now > reached, "the first page tried ClickHouse"),
                1 => assert_eq!(now, reached, "no connection reached ClickHouse during the cool-down"),
                _ => assert!(now > reached, "after the cool-down ClickHouse is tried again"),
            }
            reached = now;
        }
        assert_eq!(count(&page, "sessions-created"), Some(3), "counted by Postgres");
        assert_eq!(count(&page, "open-sessions"), None);
        assert_eq!(count(&page, "failed-jobs"), Some(1));
        assert!(section(&page, "chart-sessions").contains("Analytics unavailable"));
        assert!(section(&page, "chart-runs").contains("Analytics unavailable"));
        assert!(section(&page, "chart-lag").contains("chart-off"));
        assert!(section(&page, "chart-failures").contains("data-kind=\"probe\""), "Postgres still charts failures");
    }
}

#[tokio::test]
async fn with_clickhouse_down_the_overview_still_renders_what_postgres_knows() {
    // Nothing listens on the discard port: every connection is refused.
    overview_without_clickhouse("http://127.0.0.1:9".into(), None).await;
}

#[tokio::test]
async fn with_clickhouse_closing_connections_the_overview_still_renders() {
    let fake = FakeClickHouse::start(false).await;
    overview_without_clickhouse(fake.url(), Some(&fake)).await;
}

#[tokio::test]
async fn with_clickhouse_silent_the_overview_renders_after_the_read_timeout() {
    let fake = FakeClickHouse::start(true).await;
    overview_without_clickhouse(fake.url(), Some(&fake)).await;
}

#[tokio::test]
async fn a_replication_flush_records_its_lag_and_the_overview_charts_it() {
    let app = TestApp::spawn_with(replicating).await;
    app.clickhouse_ready().await;
    with_operators(&app).await;
    let slot = app.state.config.replication_slot_name();
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    app.create_session(session_body(Some("lagged"))).await;
    let points = eventually(20, "a flush's lag sample", || async {
        let points = overview::lag_points(&app.state.analytics, &slot, since, Bucket::Hour).await.unwrap();
        (!points.is_empty()).then_some(points)
    })
    .await;
    let flushes: u64 = points.iter().map(|p| p.flushes).sum();
    assert!(flushes >= 1);
    // The lag of a flush a moment after its commit: under the test's patience.
    assert!(points.iter().all(|p| p.max_lag_ms < 20_000), "{points:?}");
    // Each sample is the figure replication's health records for its flush:
    // the newest sample is the newest flush's lag, exactly. Read while no
    // flush moved the health (the same row before and after the sample), and
    // once that flush's sample is in (it is written after the health, so it
    // is sampled no earlier than the flush was noted).
    let (recorded, newest_sample) = eventually(20, "the newest flush's sample", || async {
        let before = last_flush(&app, &slot).await;
        let sample = newest_lag_sample(&app, &slot).await;
        let after = last_flush(&app, &slot).await;
        let (at, lag) = before?;
        let (sampled_at, lag_ms) = sample?;
        (Some((at, lag)) == after && sampled_at >= at.duration_trunc(chrono::TimeDelta::milliseconds(1)).unwrap())
            .then_some((lag, lag_ms))
    })
    .await;
    assert_eq!(newest_sample, u64::try_from(recorded).unwrap(), "the sample is the lag replication recorded");
    // Another slot's samples are not this one's.
    assert!(overview::lag_points(&app.state.analytics, "another-slot", since, Bucket::Hour).await.unwrap().is_empty());

    let viewer = Operator::login(&app, VIEWER).await;
    // The page draws each hour's worst sample: read between two equal reads
    // of the samples, so no flush landed while it rendered.
    let (page, points) = eventually(20, "a page read while the samples stood still", || async {
        let before = overview::lag_points(&app.state.analytics, &slot, since, Bucket::Hour).await.unwrap();
        let (status, page) = viewer.get("/dashboard/overview").await;
        assert_eq!(status, StatusCode::OK);
        let after = overview::lag_points(&app.state.analytics, &slot, since, Bucket::Hour).await.unwrap();
        (before == after).then_some((page, after))
    })
    .await;
    let lag = section(&page, "chart-lag");
    let drawn = elements(lag, "<circle class=\"lag-point\"");
    assert_eq!(drawn.len(), points.len(), "one point per hour with samples: {lag}");
    let newest = points.last().unwrap();
    assert!(newest.max_lag_ms >= newest_sample, "the newest sample's hour holds it");
    let point = drawn.iter().find(|p| p["data-bucket"] == newest.bucket.to_string()).expect("the sample's hour");
    assert_eq!(point["data-value"].parse::<u64>().unwrap(), newest.max_lag_ms);
    assert!(lag.contains("<polyline class=\"lag-line\""));
    assert!(!page.contains("replication off"));
    assert!(page.contains("data-count=\"replication-lag\""));
    assert!(!page.contains("overview-healing"), "the copy is complete");
    // As after the slot was recreated: until a full backfill started since
    // completes, the page says the charts may miss rows.
    sqlx::query("UPDATE replication_state SET slot_created_at = now() WHERE slot = $1")
        .bind(&slot)
        .execute(app.db())
        .await
        .unwrap();
    let (_, healing) = viewer.get("/dashboard/overview").await;
    assert!(healing.contains("id=\"overview-healing\""), "{healing}");

    // An environment with nothing in the window: empty states, not empty axes.
    let (status, empty) = viewer.get(&format!("/dashboard/overview?env={}", app.b.env.id)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(count(&empty, "sessions-created"), Some(0));
    assert!(section(&empty, "chart-sessions").contains("No sessions were created in this window."));
    assert!(section(&empty, "chart-runs").contains("No runs were created in this window."));
    assert!(section(&empty, "chart-failures").contains("No job failed in the last 24 hours."));
    assert!(!section(&empty, "chart-sessions").contains("<svg"));
    finish(app).await;
}

/// Replication's health for `slot`: when it noted its last flush, and that
/// flush's lag (None until a flush).
async fn last_flush(app: &TestApp, slot: &str) -> Option<(chrono::DateTime<chrono::Utc>, i64)> {
    let row: Option<(Option<chrono::DateTime<chrono::Utc>>, Option<i64>)> =
        sqlx::query_as("SELECT last_flush_at, last_flush_lag_ms FROM replication_state WHERE slot = $1")
            .bind(slot)
            .fetch_optional(app.db())
            .await
            .unwrap();
    row.and_then(|(at, lag)| at.zip(lag))
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct LagSample {
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    sampled_at: chrono::DateTime<chrono::Utc>,
    lag_ms: u64,
}

/// The newest lag sample of `slot`: when it was sampled and its lag.
async fn newest_lag_sample(app: &TestApp, slot: &str) -> Option<(chrono::DateTime<chrono::Utc>, u64)> {
    let sample: Option<LagSample> = app
        .state
        .analytics
        .client()
        .query("SELECT ?fields FROM replication_lag_v1 WHERE slot = {slot:String} ORDER BY sampled_at DESC LIMIT 1")
        .param("slot", slot)
        .fetch_optional()
        .await
        .unwrap();
    sample.map(|s| (s.sampled_at, s.lag_ms))
}

/// Checks the script runs; update with the script.
const CHECKS: usize = 5;

#[tokio::test]
async fn the_overview_in_a_browser() {
    // Replicating, so the lag chart has samples too.
    let app = TestApp::spawn_with(replicating).await;
    app.clickhouse_ready().await;
    with_operators(&app).await;
    seeded(&app, "browser").await;
    let slot = app.state.config.replication_slot_name();
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    eventually(20, "a flush's lag sample", || async {
        let points = overview::lag_points(&app.state.analytics, &slot, since, Bucket::Hour).await.unwrap();
        (!points.is_empty()).then_some(())
    })
    .await;
    let shots = browser::screenshots("overview");
    let env = [
        ("ADMIN_EMAIL", ADMIN.0.to_string()),
        ("ADMIN_PASSWORD", ADMIN.1.to_string()),
        ("ENV_ID", app.a.env.id.to_string()),
        ("SESSIONS_CREATED", "5".to_string()),
    ];
    browser::run("overview.mjs", &app.base, &env, &shots, CHECKS, Duration::from_secs(90), |_| async {}).await;
    let pngs = browser::screenshot_count(&shots);
    assert!(pngs >= 4, "a screenshot at each width ({pngs} found)");
    finish(app).await;
}
