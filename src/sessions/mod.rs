//! Sessions: durable, task-bound rows that own two streams and manage their runs.
//!
//! - [`model`]: the session row, its derived status, and the wire view.
//! - [`validate`]: request bodies and the rules that turn them into domain input.
//! - [`store`]: the SQL that owns `sessions` and `session_runs`.
//! - [`list`]: list filters, opaque cursors, and the list repository.
//! - [`routes`]: the control-plane HTTP handlers.

pub mod list;
pub mod model;
pub mod routes;
pub mod store;
pub mod validate;

pub use model::{Session, SessionStatus};
