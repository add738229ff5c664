//! Postgres logical replication into the ClickHouse copy.
//!
//! A logical slot with the `pgoutput` plugin streams every committed change of
//! the published tables (`sessions`, `task_runs`). The transport (the
//! replication connection, keepalives, standby status) hands over raw
//! XLogData payloads; this module turns them into rows:
//!
//! - [`pgoutput`]: one payload → one typed [`pgoutput::Message`] (protocol
//!   version 1, text-format tuples). Pure and strict.
//! - [`decode`]: the message stream → [`decode::Event`]s: transaction
//!   boundaries and one `SessionRow` / `RunRow` per row change, versioned
//!   with the commit LSN.

pub mod decode;
pub mod pgoutput;
