//! Postgres logical replication into the ClickHouse copy.
//!
//! A logical slot with the `pgoutput` plugin streams every committed change of
//! the published tables (`sessions`, `task_runs`). The transport (the
//! replication connection, keepalives, standby status) is the
//! `pgwire-replication` crate; it hands over raw XLogData payloads, which this
//! module turns into rows and carries to ClickHouse at least once:
//!
//! - [`pgoutput`]: one payload → one typed [`pgoutput::Message`] (protocol
//!   version 1, text-format tuples). Pure and strict.
//! - [`decode`]: the message stream → [`decode::Event`]s: transaction
//!   boundaries and one `SessionRow` / `RunRow` per row change, versioned
//!   with the commit LSN.
//! - [`slot`]: the publication and the slot (created if missing; a new slot
//!   means a full backfill), and the slot's status.
//! - [`lease`]: one consumer per slot across processes.
//! - [`flush`]: batches as durable `replication-flush` jobs, and how far the
//!   slot may confirm.
//! - [`consumer`]: the loop that ties them together.
//! - [`reconcile`]: the scheduled comparison of ClickHouse with Postgres,
//!   repairing the ranges that differ.
//! - [`health`]: lag, retained WAL, pending flushes and the last error, as
//!   data for operators.
//! - [`jobs`]: the flush and reconcile jobs.

pub mod consumer;
pub mod decode;
pub mod flush;
pub mod health;
pub mod jobs;
pub mod lease;
pub mod pgoutput;
pub mod reconcile;
pub mod slot;

/// Where this deployment replicates: its slot (and publication), and the
/// Redis prefix its lease lives under. Operators' pages and `/readyz` read
/// the slot's health through it.
#[derive(Debug, Clone)]
pub struct ReplicationTarget {
    pub slot: String,
    pub redis_prefix: String,
}

impl ReplicationTarget {
    /// The target of a deployment with replication on; None with it off.
    pub fn of(config: &crate::config::Config) -> Option<ReplicationTarget> {
        config.replication_enabled.then(|| ReplicationTarget {
            slot: config.replication_slot_name(),
            redis_prefix: config.redis_prefix.clone(),
        })
    }
}
