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
//! - [`replication`]: Postgres logical replication (pgoutput) decoded into ClickHouse rows.
//! - [`jobs`]: durable background jobs: the kinds, the outbox, apalis
//!   runtime, cron schedules. A leaf: each domain runs its own kinds (its
//!   `jobs` module), and `app::job_dispatch` maps every kind to its handler.
//! - [`worker`]: a small library for task workers and the example echo agent.
//! - [`db`], [`validation`], [`ids`], [`pubsub`]: the storage error and pool,
//!   shared field rules, friendly ids, the Redis pub/sub follower.

pub mod analytics;
pub mod app;
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
