//! The overview page: an environment's headline counts and four charts over a
//! window (the last 24 hours by hour, or 7 days by day). Sessions and runs
//! come from ClickHouse ([`crate::analytics::overview`]), job failures from
//! the Postgres job ledger, the current lag from replication's health. With
//! ClickHouse away the page still renders: Postgres counts what it can
//! cheaply and the charts say analytics are unavailable.

use askama::Template;
use axum::extract::{Query, State};
use axum::response::Response;
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use super::auth::Signed;
use super::charts::{self, BarChart, Category, HBarChart, LineChart, Series};
use super::error::{DashboardError, PageResult};
use super::pages::{env_choices, pick_env, render, EnvChoice, Frame};
use super::OpsSettings;
use crate::analytics::overview::{self as analytics, Aggregates, Bucket};
use crate::analytics::ClickHouse;
use crate::jobs::store as job_store;
use crate::replication::health;
use crate::runs::RunStatus;
use crate::sessions::list::EnvScope;
use crate::sessions::store as session_store;
use crate::tenancy::store as tenancy_store;

/// The span the page covers, in whole buckets ending with the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Day,
    Week,
}

impl Window {
    pub fn parse(text: &str) -> PageResult<Self> {
        match text.trim() {
            "" | "24h" => Ok(Window::Day),
            "7d" => Ok(Window::Week),
            _ => Err(DashboardError::BadRequest("window must be 24h or 7d".into())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Day => "24h",
            Window::Week => "7d",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Window::Day => "last 24 hours",
            Window::Week => "last 7 days",
        }
    }

    fn bucket(self) -> Bucket {
        match self {
            Window::Day => Bucket::Hour,
            Window::Week => Bucket::Day,
        }
    }

    /// What one bucket is, in titles ("per hour").
    fn per(self) -> &'static str {
        match self {
            Window::Day => "hour",
            Window::Week => "day",
        }
    }

    fn buckets(self) -> i64 {
        match self {
            Window::Day => 24,
            Window::Week => 7,
        }
    }

    /// The start of the first bucket: the current bucket is the last.
    fn start(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let width = TimeDelta::seconds(self.bucket().seconds());
        let current = now.duration_trunc(width).unwrap_or(now);
        current - width * (self.buckets() - 1) as i32
    }

    /// The window's buckets as chart categories (UTC), labelled sparsely
    /// enough that the labels fit a phone.
    fn categories(self, start: DateTime<Utc>) -> Vec<Category> {
        let width = TimeDelta::seconds(self.bucket().seconds());
        (0..self.buckets())
            .map(|i| {
                let at = start + width * i as i32;
                let (axis, title) = match self {
                    Window::Day => (
                        (i % 6 == 0).then(|| at.format("%H:00").to_string()),
                        format!("{}–{} UTC", at.format("%d %b %H:00"), (at + width).format("%H:00")),
                    ),
                    Window::Week => (Some(at.format("%a %d").to_string()), at.format("%a %d %b (UTC)").to_string()),
                };
                Category { key: at.timestamp().to_string(), axis, title }
            })
            .collect()
    }
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct OverviewQuery {
    #[serde(default)]
    env: String,
    #[serde(default)]
    window: String,
}

/// A bar chart with what the page says around it.
pub struct BarCard {
    pub id: &'static str,
    pub title: String,
    pub desc: String,
    pub y_title: &'static str,
    pub x_title: &'static str,
    pub empty: &'static str,
    pub chart: BarChart,
    pub legend: bool,
}

/// The replication lag chart and its text alternative.
pub struct LagCard {
    pub desc: String,
    pub chart: LineChart,
}

/// Replication's lag now, as the counts show it.
pub struct LagNow {
    pub last_flush_lag: Option<String>,
    pub last_flush_at: Option<String>,
    pub pending_flushes: i64,
}

#[derive(Template)]
#[template(path = "dashboard/overview.html")]
struct OverviewPage {
    frame: Frame,
    envs: Vec<EnvChoice>,
    window: &'static str,
    window_label: &'static str,
    /// From ClickHouse, or counted by Postgres while ClickHouse is away.
    sessions_created: u64,
    failed_jobs: u64,
    /// None: replication is off.
    lag_now: Option<LagNow>,
    lag_off: bool,
    /// A new replication slot's backfill is still copying what it missed.
    healing: bool,
    /// None: ClickHouse could not answer; the page says so.
    analytics: Option<AnalyticsView>,
    failures: HBarChart,
    failures_desc: String,
    viewbox_width: f64,
    viewbox_height: f64,
}

impl OverviewPage {
    /// The lag chart, when ClickHouse answered and replication is on.
    fn lag_card(&self) -> Option<&LagCard> {
        self.analytics.as_ref().and_then(|a| a.lag.as_ref())
    }
}

pub async fn show(
    State(db): State<PgPool>,
    State(ch): State<ClickHouse>,
    State(redis): State<ConnectionManager>,
    State(ops): State<OpsSettings>,
    signed: Signed,
    Query(q): Query<OverviewQuery>,
) -> PageResult<Response> {
    let window = Window::parse(&q.window)?;
    let envs = tenancy_store::list(&db).await?;
    let scope = pick_env(&envs, &q.env)?;
    let env = scope.map(|s| s.environment_id.to_string()).unwrap_or_default();
    let now = crate::clock::now();
    let since = window.start(now);
    let slot = ops.replication.as_ref().map(|r| r.slot.as_str());

    // ClickHouse's reads and Postgres's at once: the page waits for the slower.
    let aggregates = async {
        match scope {
            Some(scope) => read_aggregates(&ch, scope, since, window.bucket(), slot).await,
            None => Some(Aggregates::default()),
        }
    };
    // A new slot generation whose backfill has not completed: the charts miss
    // what it has yet to copy, whatever the watermark says.
    let healing = async {
        match ops.replication {
            Some(_) => {
                crate::replication::slot::copy_incomplete(&db, crate::analytics::watermark::Table::Sessions).await
            }
            None => Ok(false),
        }
    };
    let (aggregates, failures, lag_now, healing) =
        tokio::join!(aggregates, job_store::failures_by_kind(&db, since), lag_now(&db, &redis, &ops), healing);
    let (failures, lag_now, healing) = (failures?, lag_now?, healing?);

    let categories = window.categories(since);
    let analytics = aggregates.map(|a| AnalyticsView::new(a, window, &categories));
    let sessions_created = match (&analytics, scope) {
        (Some(view), _) => view.sessions_created,
        // Postgres counts what an index range makes cheap; the rest waits for ClickHouse.
        (None, Some(scope)) => {
            session_store::count_created_since(&db, scope.environment_id, since).await?.max(0) as u64
        }
        (None, None) => 0,
    };
    let (failures, failures_desc) = failures_chart(failures, window);
    render(OverviewPage {
        frame: Frame::new(&signed, "overview"),
        envs: env_choices(&envs, &env),
        window: window.as_str(),
        window_label: window.label(),
        sessions_created,
        failed_jobs: failures.total,
        lag_now,
        lag_off: ops.replication.is_none(),
        healing,
        analytics,
        failures,
        failures_desc,
        viewbox_width: charts::WIDTH,
        viewbox_height: charts::HEIGHT,
    })
}

/// What the page draws from ClickHouse's aggregates.
pub struct AnalyticsView {
    pub sessions_created: u64,
    pub open_sessions: u64,
    /// Runs created in the window by current status, the empty ones left out.
    pub runs_by_status: Vec<(&'static str, u64)>,
    /// Sessions per bucket, then runs per bucket by status.
    pub bars: Vec<BarCard>,
    /// None: replication is off, so no samples were read.
    pub lag: Option<LagCard>,
    /// ClickHouse has never been fully backfilled: its charts may miss history.
    pub incomplete: bool,
}

impl AnalyticsView {
    fn new(a: Aggregates, window: Window, categories: &[Category]) -> Self {
        let sessions = Series {
            name: "sessions".into(),
            class: "s-sessions".into(),
            values: per_bucket(categories, a.sessions.iter().map(|c| (c.bucket, c.n))),
        };
        let runs: Vec<Series> = RunStatus::ALL
            .iter()
            .map(|status| Series {
                name: status.as_str().into(),
                class: format!("s-{}", status.as_str().to_lowercase()),
                values: per_bucket(
                    categories,
                    a.runs.iter().filter(|r| r.status == status.as_str()).map(|r| (r.bucket, r.n)),
                ),
            })
            .collect();
        let runs_by_status: Vec<(&'static str, u64)> = RunStatus::ALL
            .iter()
            .zip(&runs)
            .map(|(s, series)| (s.as_str(), series.values.iter().sum::<u64>()))
            .filter(|(_, n)| *n > 0)
            .collect();
        let sessions_chart = BarChart::stacked(categories, std::slice::from_ref(&sessions), "sessions");
        let runs_chart = BarChart::stacked(categories, &runs, "runs");
        let per = window.per();
        let bars = vec![
            BarCard {
                id: "sessions",
                title: format!("Sessions created per {per}"),
                desc: describe_bars(&sessions_chart, categories, "sessions created", window),
                y_title: "sessions",
                x_title: "time (UTC)",
                empty: "No sessions were created in this window.",
                chart: sessions_chart,
                legend: false,
            },
            BarCard {
                id: "runs",
                title: format!("Runs per {per}, by current status"),
                desc: format!(
                    "{} Current statuses: {}.",
                    describe_bars(&runs_chart, categories, "runs created", window),
                    runs_by_status.iter().map(|(s, n)| format!("{s} {n}")).collect::<Vec<_>>().join(", ")
                ),
                y_title: "runs",
                x_title: "time (UTC), by creation",
                empty: "No runs were created in this window.",
                chart: runs_chart,
                legend: true,
            },
        ];
        let lag = a.lag.map(|points| {
            let values = per_bucket_opt(categories, points.iter().map(|p| (p.bucket, p.max_lag_ms)));
            let chart = LineChart::new(categories, &values, charts::millis_label);
            let flushes: u64 = points.iter().map(|p| p.flushes).sum();
            let desc = if chart.empty {
                format!("No replication flushes in the {}.", window.label())
            } else {
                format!(
                    "Worst replication lag per {per} over the {}: at most {} across {flushes} flushes.",
                    window.label(),
                    charts::millis_label(chart.max)
                )
            };
            LagCard { desc, chart }
        });
        AnalyticsView {
            sessions_created: sessions.values.iter().sum(),
            open_sessions: a.open_sessions,
            runs_by_status,
            bars,
            lag,
            incomplete: !a.complete,
        }
    }
}

/// The failures chart (kinds, most first) and its text alternative.
fn failures_chart(failures: Vec<(String, i64)>, window: Window) -> (HBarChart, String) {
    let rows: Vec<(String, u64)> = failures.into_iter().map(|(kind, n)| (kind, n.max(0) as u64)).collect();
    let chart = HBarChart::new(&rows, "failed jobs");
    let desc = if chart.empty {
        format!("No job failed in the {}.", window.label())
    } else {
        format!(
            "{} jobs failed in the {}: {}.",
            chart.total,
            window.label(),
            rows.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
        )
    };
    (chart, desc)
}

/// Replication's lag now, from its health (None: replication is off).
async fn lag_now(db: &PgPool, redis: &ConnectionManager, ops: &OpsSettings) -> PageResult<Option<LagNow>> {
    let Some(target) = &ops.replication else { return Ok(None) };
    let h = health::status(db, redis, &target.redis_prefix, &target.slot)
        .await
        .map_err(|e| DashboardError::Internal(e.into()))?;
    Ok(Some(LagNow {
        last_flush_lag: h.last_flush_lag_ms.map(charts::signed_millis_label),
        last_flush_at: h.last_flush_at.as_ref().map(super::pages::iso),
        pending_flushes: h.pending_flushes,
    }))
}

/// The aggregates, or None when ClickHouse cannot answer now (logged): the
/// page renders without them. A recent failure skips ClickHouse altogether
/// (see [`ClickHouse::healthy`]), so an outage costs one timeout at most.
async fn read_aggregates(
    ch: &ClickHouse,
    scope: EnvScope,
    since: DateTime<Utc>,
    bucket: Bucket,
    slot: Option<&str>,
) -> Option<Aggregates> {
    if !ch.healthy() {
        return None;
    }
    match analytics::aggregates(ch, scope, since, bucket, slot).await {
        Ok(a) => Some(a),
        Err(err) => {
            tracing::warn!(error = %err, "clickhouse unavailable; the overview renders without its charts");
            None
        }
    }
}

/// Counts keyed by bucket start (Unix seconds) laid on the categories; a
/// bucket ClickHouse did not return is 0.
fn per_bucket(categories: &[Category], counts: impl Iterator<Item = (u32, u64)>) -> Vec<u64> {
    per_bucket_opt(categories, counts).into_iter().map(|v| v.unwrap_or(0)).collect()
}

fn per_bucket_opt(categories: &[Category], counts: impl Iterator<Item = (u32, u64)>) -> Vec<Option<u64>> {
    let mut values = vec![None; categories.len()];
    for (bucket, n) in counts {
        if let Some(i) = categories.iter().position(|c| c.key == bucket.to_string()) {
            *values[i].get_or_insert(0) += n;
        }
    }
    values
}

/// A bar chart's text alternative: the total and the busiest bucket.
fn describe_bars(chart: &BarChart, categories: &[Category], what: &str, window: Window) -> String {
    let busiest = chart.bars.iter().zip(categories).max_by_key(|(b, _)| b.total);
    match busiest {
        Some((bar, category)) if bar.total > 0 => {
            format!("{} {what} in the {}; the most, {}, in {}.", chart.total, window.label(), bar.total, category.title)
        }
        _ => format!("No {what} in the {}.", window.label()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_cover_whole_buckets_ending_now() {
        assert_eq!(Window::parse("").unwrap(), Window::Day);
        assert_eq!(Window::parse("7d").unwrap(), Window::Week);
        assert!(matches!(Window::parse("30d"), Err(DashboardError::BadRequest(_))));
        let now = DateTime::parse_from_rfc3339("2026-12-06T15:29:01Z").unwrap().to_utc();
        let day = Window::Day.start(now);
        assert_eq!(day, DateTime::parse_from_rfc3339("2026-12-05T16:00:00Z").unwrap().to_utc());
        let cats = Window::Day.categories(day);
        assert_eq!(cats.len(), 24);
        assert_eq!(cats.last().map(|c| c.key.clone()), Some("1796569200".to_string()));
        assert_eq!(cats.iter().filter(|c| c.axis.is_some()).count(), 4);
        let week = Window::Week.start(now);
        assert_eq!(week, DateTime::parse_from_rfc3339("2026-11-30T00:00:00Z").unwrap().to_utc());
        assert_eq!(Window::Week.categories(week)[0].axis.as_deref(), Some("Mon 30"));
    }

    #[test]
    fn counts_land_in_their_bucket_and_missing_buckets_are_zero() {
        let start = DateTime::parse_from_rfc3339("2026-12-05T16:00:00Z").unwrap().to_utc();
        let cats = Window::Day.categories(start);
        let first = start.timestamp() as u32;
        let values = per_bucket(&cats, [(first, 3), (first + 7_200, 5), (first + 7_200, 1)].into_iter());
        assert_eq!(&values[..4], &[3, 0, 6, 0]);
        // A bucket outside the window (an earlier hour) is not drawn.
        let values = per_bucket_opt(&cats, [(first - 3_600, 9)].into_iter());
        assert!(values.iter().all(Option::is_none));
    }
}
