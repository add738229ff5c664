//! sessiond: durable agent sessions.
//!
//! Module map (each folder owns one part of the system):
//! - [`http`]: router assembly, the API error type, extractors shared by routes.
//! - [`auth`]: secret keys, HS256 tokens, scopes, and the `Auth` extractor.
//! - [`tenancy`]: organizations, projects, environments and their keys.
//! - [`sessions`]: the session domain: validation, status, storage, list, routes.
//! - [`runs`]: task runs and their storage.
//! - [`db`]: the Postgres pool, migrations and the storage error type.

pub mod app;
pub mod auth;
pub mod config;
pub mod db;
pub mod http;
pub mod ids;
pub mod jobs;
pub mod pubsub;
pub mod runs;
pub mod sessions;
pub mod streams;
pub mod tenancy;
pub mod validation;
pub mod waitpoints;
pub mod worker;
