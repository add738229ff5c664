//! The integration tests, one module per area, in one test binary: on a
//! two-core machine linking one binary instead of one per file is most of the
//! build. Each test still starts its own server on its own Postgres schema and
//! Redis key prefix (see `common`), so they run in parallel safely.
//!
//! `tests/flood.rs` stays a binary of its own: it lowers the process's
//! file-descriptor limit, which every test in the same process would share.

#[path = "../common/mod.rs"]
mod common;

mod analytics;
mod auth;
mod browser;
mod chat;
mod chat_clients;
mod cli;
mod clickhouse_dev;
mod dashboard;
mod dashboard_browser;
mod dashboard_input;
mod dashboard_jobs;
mod dashboard_ops;
mod dashboard_overview;
mod dashboard_playground;
mod dashboard_runs;
mod dependencies;
mod durability;
mod echo_agent;
mod faults;
mod faults_clickhouse;
mod faults_clock;
mod faults_jobs;
mod faults_lease;
mod faults_postgres;
mod faults_processes;
mod faults_replication;
mod faults_sse;
mod faults_streams;
mod faults_worker;
mod handoff;
mod job_relay;
mod limits;
mod limits_overrides;
mod limits_probe;
mod login_throttle;
mod official_client;
mod quotas;
mod rate_limits;
mod reconcile;
mod replication;
mod replication_decode;
mod robustness;
mod runs;
mod sessions_api;
mod shutdown;
mod streams;
mod transactions;
mod unavailable;
mod waitpoints;
mod wakeups;
