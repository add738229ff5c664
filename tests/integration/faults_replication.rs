//! Fault cases of replication's slot: dropped under load, and invalidated
//! past a 64 MB `max_slot_wal_keep_size`. Each heals by recreating the slot
//! (a new generation) and backfilling; the backfill is held by a test seam
//! (`backfill::hold_chunks`) so the window in which the copy misses the gap is
//! seconds long on any machine, and the list is checked again and again inside
//! it: no answer may leave out an acknowledged session (before the slot's
//! generation existed, lists answered from ClickHouse once the new slot's
//! flushes moved the watermark past the gap, leaving out what only the
//! backfill brings). Each case ends with the copy equal to Postgres row by
//! row, no stuck job and no wrong list answer, and prints its figures.

use std::time::{Duration, Instant};

use sessiond::analytics::backfill;
use sessiond::analytics::watermark::{self, Table};
use sessiond::replication::health::{self, WalAlert};
use sessiond::replication::slot;

use crate::common::faults::{
    assert_copy_equal, list_check, phase, report, stuck_jobs, CreateLoad, ListCheck, PrivatePostgres,
};
use crate::common::{eventually, TestApp};
use crate::dashboard::{with_operators, Operator, VIEWER};

/// Lists checked while a slot heals: how many, how many were wrong (a 200
/// leaving out an acknowledged session) and how many Postgres answered.
#[derive(Debug, Default)]
struct Lists {
    checks: usize,
    wrong: usize,
    from_postgres: usize,
    first_wrong: Option<ListCheck>,
}

impl Lists {
    /// Lists everything, expecting every create acknowledged before the call.
    async fn check(&mut self, app: &TestApp, load: &CreateLoad) -> ListCheck {
        self.check_ids(app, &load.acked()).await
    }

    async fn check_ids(&mut self, app: &TestApp, expected: &[String]) -> ListCheck {
        let c = list_check(app, &app.a.key, expected).await;
        self.checks += 1;
        if c.source == "postgres" {
            self.from_postgres += 1;
        }
        if c.wrong() {
            self.wrong += 1;
            self.first_wrong.get_or_insert(c.clone());
        }
        c
    }
}

/// A replicating server whose list trusts ClickHouse soon after a change
/// (a short overlay margin makes the healing window's wrong answers show
/// within a second rather than two), with its first backfill done.
async fn replicating_app(tweak: impl FnOnce(&mut sessiond::config::Config)) -> TestApp {
    crate::replication::ready(|c| {
        c.list_overlay_margin_ms = 300;
        tweak(c);
    })
    .await
}

async fn generation(app: &TestApp) -> slot::Generation {
    let name = app.state.config.replication_slot_name();
    slot::generation(app.db(), &name).await.unwrap().expect("the slot's generation")
}

/// Rows the current generation's backfills copied.
async fn rows_backfilled(app: &TestApp) -> i64 {
    let name = app.state.config.replication_slot_name();
    sqlx::query_scalar(
        "SELECT coalesce(sum(b.rows_copied), 0)::bigint FROM clickhouse_backfills b, replication_state s
         WHERE s.slot = $1 AND b.started_at >= s.slot_created_at",
    )
    .bind(&name)
    .fetch_one(app.db())
    .await
    .unwrap()
}

/// What a healing took, from the fault to the copy complete again.
struct Healed {
    detect: Duration,
    heal: Duration,
    lists: Lists,
}

/// After a fault at `fault_at` that costs the slot: waits for the consumer to
/// create the next generation (detection), keeps checking the list while the
/// held backfill cannot copy the gap for `held` (the window a wrong answer
/// would show in), then releases it and checks on until the copy is complete
/// and ClickHouse answers again.
async fn heal(
    app: &TestApp,
    load: &CreateLoad,
    hold: backfill::ChunkHold,
    before: i64,
    fault_at: Instant,
    viewer: &Operator,
) -> Healed {
    let mut lists = Lists::default();
    let detected = loop {
        let g = generation(app).await;
        if g.generation > before && g.slot_created_at.is_some() {
            break fault_at.elapsed();
        }
        assert!(fault_at.elapsed() < Duration::from_secs(20), "the consumer never recreated the slot: {g:?}");
        lists.check(app, load).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The new slot streams and its flushes move the watermark past the gap
    // (and the overlay's margin) while the backfill that would copy it is
    // held: from then on a list trusting the watermark leaves the gap out.
    // Checked until a few lists ran inside that window.
    let past = chrono::Utc::now() + chrono::Duration::milliseconds(500);
    let mut inside = 0;
    while inside < 3 {
        lists.check(app, load).await;
        let mark = watermark::read(&app.state.analytics, Table::Sessions).await.unwrap().unwrap();
        if mark > past {
            inside += 1;
        }
        assert!(
            fault_at.elapsed() < Duration::from_secs(55),
            "the new slot's flushes never moved the watermark ({mark}) past the slot's recreation: \
             the window this case checks never opened"
        );
    }
    assert!(!generation(app).await.incomplete.is_empty(), "the copy completed while its backfill was held");
    let (_, page) = viewer.get("/dashboard/replication").await;
    assert!(page.contains("badge queued\">healing"), "the replication page shows the copy healing: {page}");
    drop(hold);
    loop {
        lists.check(app, load).await;
        if generation(app).await.incomplete.is_empty() {
            break;
        }
        assert!(fault_at.elapsed() < Duration::from_secs(75), "the backfill never completed the copy");
    }
    let healed = fault_at.elapsed();
    // With the copy complete, ClickHouse answers again (the flag is cleared,
    // not stuck).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = lists.check(app, load).await;
        if c.source == "clickhouse" {
            break;
        }
        assert!(Instant::now() < deadline, "lists never went back to ClickHouse after the heal: {c:?}");
    }
    Healed { detect: detected, heal: healed, lists }
}

/// The end of every case: the copy equal to Postgres, no stuck job, no wrong
/// list answer; prints the figures.
async fn verdict(case: &str, app: &TestApp, load: CreateLoad, healed: Healed, wal_peak: i64) {
    let (acked, refused) = load.stop().await;
    let mut lists = healed.lists;
    lists.check_ids(app, &acked).await;
    let copy = assert_copy_equal(&app.state, 45).await;
    let stuck = stuck_jobs(app.db(), 30).await;
    report(
        case,
        &[
            ("detect_ms", healed.detect.as_millis().to_string()),
            ("heal_ms", healed.heal.as_millis().to_string()),
            ("rows_backfilled", rows_backfilled(app).await.to_string()),
            ("wrong_list_answers", lists.wrong.to_string()),
            ("list_checks", lists.checks.to_string()),
            ("postgres_answers", lists.from_postgres.to_string()),
            ("retained_wal_peak_bytes", wal_peak.to_string()),
            ("creates_acked", acked.len().to_string()),
            ("creates_refused", refused.to_string()),
            ("sessions", copy.sessions.to_string()),
            ("runs", copy.runs.to_string()),
            ("stuck_jobs", stuck.to_string()),
        ],
    );
    assert_eq!(lists.wrong, 0, "list answers left out acknowledged sessions; first: {:?}", lists.first_wrong);
    assert!(lists.from_postgres > 0, "no list answered from Postgres while the copy healed");
    assert_eq!(stuck, 0, "jobs stranded");
    assert_eq!(copy.sessions, acked.len(), "every acknowledged create is in Postgres and in the copy");
}

async fn retained(app: &TestApp) -> Option<i64> {
    let name = app.state.config.replication_slot_name();
    slot::status(app.db(), &name).await.unwrap().and_then(|s| s.retained_wal_bytes)
}

#[tokio::test]
async fn the_slot_dropped_under_load() {
    let started = Instant::now();
    let app = replicating_app(|_| {}).await;
    with_operators(&app).await;
    let viewer = Operator::login(&app, VIEWER).await;
    let load = CreateLoad::start(&app.base, &app.a.key, 15, "slot-dropped");
    tokio::time::sleep(phase(1.0)).await;
    let mut wal_peak = retained(&app).await.unwrap_or(0);
    let before = generation(&app).await.generation;
    let hold = backfill::hold_chunks(app.state.analytics.database());
    // Cut the stream and drop the slot before the consumer reconnects: what
    // was written since its last batch, and until the next slot exists, only
    // a backfill can bring.
    let fault_at = Instant::now();
    crate::replication::drop_slot_under(&app).await;
    let healed = heal(&app, &load, hold, before, fault_at, &viewer).await;
    wal_peak = wal_peak.max(retained(&app).await.unwrap_or(0));
    verdict("the slot dropped under load", &app, load, healed, wal_peak).await;
    crate::replication::finish(app).await;
    println!("the case took {:.1} s", started.elapsed().as_secs_f64());
}

#[tokio::test]
async fn a_64_mb_wal_bound_exceeded() {
    let started = Instant::now();
    let pg = PrivatePostgres::start(&[("max_slot_wal_keep_size", "64MB")]).await;
    pg.create_database("sessiond").await;
    let url = pg.url("sessiond");
    let app = replicating_app(|c| c.database_url = url).await;
    with_operators(&app).await;
    let viewer = Operator::login(&app, VIEWER).await;
    let name = app.state.config.replication_slot_name();
    let load = CreateLoad::start(&app.base, &app.a.key, 15, "wal-bound");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let summary = health::summary(app.db(), &name).await.unwrap();
    assert_eq!(summary.wal.bound_bytes, Some(64 << 20), "{summary:?}");
    assert_eq!(summary.wal.alert, WalAlert::Ok, "{summary:?}");
    assert!(summary.copy_complete, "{summary:?}");
    let (_, page) = viewer.get("/dashboard/replication").await;
    assert!(page.contains("64.0 MiB") && page.contains("data-wal-alert=\"ok\""), "the bound on the page: {page}");
    let before = generation(&app).await.generation;

    // An open transaction with a change pins the slot's restart position
    // (decoding must start before it), as a stalled consumer would; each WAL
    // switch after a small write then adds a 16 MB segment the slot retains.
    sqlx::query("CREATE TABLE wal_pin (n int)").execute(app.db()).await.unwrap();
    let mut pin = sessiond::db::begin(app.db()).await.unwrap();
    sqlx::query("INSERT INTO wal_pin VALUES (1)").execute(&mut *pin).await.unwrap();
    let hold = backfill::hold_chunks(app.state.analytics.database());
    let mut alerts = Vec::new();
    let mut wal_peak = 0;
    for _ in 0..7 {
        sqlx::query("INSERT INTO wal_pin VALUES (2)").execute(app.db()).await.unwrap();
        sqlx::query("SELECT pg_switch_wal()").execute(app.db()).await.unwrap();
        // The health the dashboard, /readyz and `replication status` show.
        let s = health::summary(app.db(), &name).await.unwrap();
        wal_peak = wal_peak.max(s.wal.retained_bytes.unwrap_or(0));
        if alerts.last() != Some(&s.wal.alert) {
            alerts.push(s.wal.alert);
        }
    }
    assert!(
        alerts.contains(&WalAlert::Warning) && alerts.contains(&WalAlert::Critical),
        "the health should warn at 50% and 80% of the bound; saw {alerts:?} up to {wal_peak} bytes"
    );
    let (_, page) = viewer.get("/dashboard/replication").await;
    assert!(page.contains("data-wal-alert=\"critical\""), "the page warns past 80% of the bound: {page}");
    // /readyz reports it too, and stays ready: the server still serves.
    // Its read of the slot has a second; on a loaded machine it may answer
    // "unknown" instead (readiness never waits on it), so ask until it read.
    let ready = eventually(30, "/readyz to read the slot's health", || async {
        let ready = app.client.get(format!("{}/readyz", app.base)).send().await.unwrap();
        assert_eq!(ready.status(), reqwest::StatusCode::OK);
        let ready: serde_json::Value = ready.json().await.unwrap();
        ready["replication"].get("unknown").is_none().then_some(ready)
    })
    .await;
    assert_eq!(ready["replication"]["wal"]["alert"], "critical", "{ready}");
    assert_eq!(ready["replication"]["wal"]["bound_bytes"], 64 << 20, "{ready}");
    // The checkpoint removes what the slot needs and invalidates it, ending
    // its stream; the pin ends so the next slot can be created.
    let fault_at = Instant::now();
    sqlx::query("CHECKPOINT").execute(app.db()).await.unwrap();
    pin.rollback().await.unwrap();
    let lost = eventually(10, "the slot to be invalidated", || async {
        let s = slot::status(app.db(), &name).await.unwrap();
        match s {
            Some(s) if s.lost() => Some(true),
            // Already dropped and recreated by the consumer.
            _ if generation(&app).await.generation > before => Some(false),
            _ => None,
        }
    })
    .await;
    let healed = heal(&app, &load, hold, before, fault_at, &viewer).await;
    let after = health::summary(app.db(), &name).await.unwrap();
    assert!(after.copy_complete && after.wal.alert == WalAlert::Ok, "{after:?}");
    println!("slot seen lost before its recreation: {lost}");
    verdict("a 64 MB WAL bound exceeded", &app, load, healed, wal_peak).await;
    drop(app);
    drop(pg);
    println!("the case took {:.1} s", started.elapsed().as_secs_f64());
}
