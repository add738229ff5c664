//! Sessions: durable, task-bound rows that own two streams and manage their runs.
//!
//! - [`model`]: the session row, its derived status, and the wire view.
//! - [`validate`]: request bodies and the rules that turn them into domain input.
//! - [`store`]: the SQL that owns `sessions` and `session_runs`.
//! - [`lookup`]: a short-lived session cache for the realtime hot path.
//! - [`access`]: resolve a session and authorize the caller on it or its channels.
//! - [`list`]: list filters, opaque cursors, and the list repository.
//! - [`run_manager`]: one live run per session: ensure-run, hand-off, manual trigger, handoff retry.
//! - [`failed_handoffs`]: open sessions left with no run to serve them, for operators.
//! - [`close`]: the one close (API and dashboard), audited and sealed.
//! - [`playground`]: the operator playground's sessions, started and reopened.
//! - [`jobs`]: the hand-off job, the expiry sweep, and the replacement of crashed runs.
//! - [`routes`]: the control-plane HTTP handlers.

pub mod access;
pub mod close;
pub mod failed_handoffs;
pub mod jobs;
pub mod list;
pub mod lookup;
pub mod model;
pub mod playground;
pub mod routes;
pub mod run_manager;
pub mod store;
pub mod validate;

pub use model::{Session, SessionStatus};
