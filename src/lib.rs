//! sessiond: durable agent sessions.
//!
//! Module map (each folder owns one part of the system):
//! - [`app`]: the composition root: connects once, builds the domain services,
//!   hands each handler and job only what it uses; `serve`.
//! - [`config`]: every setting, from flags or environment.
//! - [`http`]: router and layers, connection limits, `/readyz`, the API error
//!   type (every domain-error-to-status mapping), extractors.
//! - [`auth`]: secret keys, HS256 tokens, scopes, the `Authenticator` and the
//!   `Auth` extractor.
//! - [`tenancy`]: organizations, projects, environments and their keys.
//! - [`sessions`]: the session domain: validation, status, storage, list,
//!   access (resolve + authorize), the run manager, control-plane routes.
//! - [`runs`]: task runs: states, storage, run queues, dispatch to workers,
//!   the worker protocol.
//! - [`streams`]: session channels: the channel store (Redis Streams + Lua),
//!   group commit, appends and their follow-ups, fan-out hub, SSE, routes.
//! - [`limits`]: request-rate limits per environment and route class, and
//!   per public token, leased from Redis so requests only touch memory.
//! - [`waitpoints`]: runs waiting on a channel: the service, storage, routes.
//! - [`analytics`]: the ClickHouse copy of sessions and runs: schema, rows,
//!   backfill, digests on both sides (`source` is the Postgres side), the
//!   session list and the overview read from it.
//! - [`replication`]: Postgres logical replication (pgoutput) decoded into
//!   ClickHouse rows: it feeds the copy `analytics` owns.
//! - [`jobs`]: durable background jobs: the kinds, the outbox, apalis
//!   runtime, cron schedules. A leaf: each domain runs its own kinds (its
//!   `jobs` module), and `app::job_dispatch` maps every kind to its handler.
//! - [`worker`]: a small library for task workers and the example echo agent.
//! - [`dashboard`], [`operators`]: the operator dashboard and its accounts;
//!   [`audit`]: who did what (operators, API callers, runs, the CLI).
//! - [`db`], [`validation`], [`ids`], [`pubsub`]: the storage error, pool and
//!   keyset paging, shared field rules, friendly ids, the Redis pub/sub follower.
//!
//! The binary's commands live in `src/cli/` (beside `main.rs`, not in this
//! library).

pub mod analytics;
pub mod app;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod config;
pub mod dashboard;
pub mod db;
pub mod http;
pub mod ids;
pub mod jobs;
pub mod limits;
pub mod operators;
pub mod pubsub;
pub mod replication;
pub mod runs;
pub mod sessions;
pub mod shutdown;
pub mod streams;
pub mod tenancy;
pub mod validation;
pub mod waitpoints;
pub mod worker;
