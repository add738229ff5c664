//! Canceling a run: a durable `cancel-run` job, written by the API and by the
//! dashboard alike. The job cancels the run if it is not final by then; its
//! worker learns from its next heartbeat.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::jobs::CancelRun;
use crate::db::StoreError;
use crate::jobs::{self, NewJob};

/// Writes the cancel job for `run_id` in the caller's transaction (an
/// operator's cancel writes its audit row in the same one), so the request
/// and its record commit together. Relay the returned job after the commit.
pub async fn request(conn: impl PgExecutor<'_>, run_id: Uuid) -> Result<NewJob, StoreError> {
    jobs::store::insert(conn, &CancelRun { run_id }, jobs::DEFAULT_MAX_ATTEMPTS).await
}
