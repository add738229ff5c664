//! The operator dashboard: server-rendered pages (askama templates in
//! `templates/dashboard/`, htmx from `static/`) under `/dashboard`.
//!
//! - [`auth`]: sign-in, the signed session cookie, CSRF, roles.
//! - [`overview`]: an environment's counts and charts over a window.
//! - [`charts`]: series into SVG geometry for the overview's charts.
//! - [`pages`]: the pages and actions, thin over the domain services.
//! - [`jobs`]: the job ledger's pages and the operator's retries and cancels.
//! - [`runs`]: the runs list, a run's page and its cancel.
//! - [`handoffs`]: failed handoffs and their retry.
//! - [`schedules`]: the cron sweeps, their next fire and last jobs.
//! - [`replication`]: replication health, backfills, and starting one.
//! - [`environments`]: environments, key hints, key rotation, and rate limits.
//! - [`playground`]: start or reopen a session and talk to its agent through
//!   the public realtime endpoints, with a token scoped to that session.
//! - [`paging`]: keyset cursors in the pages' URLs.
//! - [`live`]: a session channel's tail as server-sent HTML, for htmx.
//! - [`assets`]: the vendored static files, served from the binary.
//! - [`error`]: dashboard errors as pages, never a raw body.
//!
//! Every response carries a strict Content-Security-Policy: scripts and
//! styles from this origin only, no inline code, no framing.

pub mod assets;
pub mod auth;
pub mod charts;
pub mod environments;
pub mod error;
pub mod handoffs;
pub mod jobs;
pub mod live;
pub mod overview;
pub mod pages;
pub mod paging;
pub mod playground;
pub mod replication;
pub mod runs;
pub mod schedules;

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::app::AppState;
use crate::jobs::schedule::Schedule;

/// What the operations pages read of the server's configuration (see
/// `FromRef` in `app.rs`), so their handlers take that and the services they
/// use rather than the whole state.
#[derive(Debug, Clone)]
pub struct OpsSettings {
    /// How long a server keeps an authenticated environment (and so how long
    /// a rotated key lingers).
    pub auth_cache_ttl_ms: u64,
    /// The slot and Redis prefix of this deployment's replication, if on.
    pub replication: Option<ReplicationTarget>,
    /// The schedules file the server loaded (None: the built-in one).
    pub schedules_file: Option<String>,
    /// The schedules as loaded at start: what the cron runtime ticks, even
    /// after the file has changed.
    pub schedules: Arc<[Schedule]>,
    /// Whether this process runs the job workers and cron schedules.
    pub run_jobs: bool,
}

pub use crate::replication::ReplicationTarget;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(|| async { Redirect::to("/dashboard/overview") }))
        .route("/dashboard/login", get(auth::login_page).post(auth::login))
        .route("/dashboard/logout", post(auth::logout))
        .route("/dashboard/overview", get(overview::show))
        .route("/dashboard/sessions", get(pages::sessions))
        .route("/dashboard/sessions/{session}", get(pages::session))
        .route("/dashboard/sessions/{session}/close", post(pages::close_session))
        .route("/dashboard/sessions/{session}/trigger", post(pages::trigger_run))
        .route("/dashboard/sessions/{session}/{io}/tail", get(live::tail))
        .route("/dashboard/audit", get(pages::audit))
        // Jobs: the list, one job, and the operator's retries and cancels.
        .route("/dashboard/jobs", get(jobs::list))
        .route("/dashboard/jobs/retry-selected", post(jobs::retry_selected))
        .route("/dashboard/jobs/retry-matching", get(jobs::retry_matching_preview).post(jobs::retry_matching))
        .route("/dashboard/jobs/{job}", get(jobs::job))
        .route("/dashboard/jobs/{job}/{action}", post(jobs::act))
        .route("/dashboard/runs", get(runs::list))
        .route("/dashboard/runs/{run}", get(runs::show))
        .route("/dashboard/runs/{run}/cancel", post(runs::cancel))
        .route("/dashboard/handoffs", get(handoffs::list))
        .route("/dashboard/handoffs/{session}/retry", post(handoffs::retry))
        // Operations: schedules, replication and backfills, environments' keys.
        .route("/dashboard/schedules", get(schedules::list))
        .route("/dashboard/replication", get(replication::show))
        .route("/dashboard/replication/backfill", post(replication::start_backfill))
        .route("/dashboard/environments", get(environments::list))
        .route("/dashboard/environments/{env}/rotate-key", post(environments::rotate_key))
        .route("/dashboard/environments/{env}/rate-limits", post(environments::set_limits))
        // The agent playground: start or reopen a session, then talk to it.
        .route("/dashboard/playground", get(playground::index).post(playground::start))
        .route("/dashboard/playground/{session}", get(playground::conversation))
        .route("/dashboard/static/{file}", get(assets::serve))
        .layer(axum::middleware::from_fn(error::check_input))
        .layer(axum::middleware::from_fn(security_headers))
}

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    resp
}
