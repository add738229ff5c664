//! Canceling a run, the one way: the API and the dashboard both go through
//! [`RunCanceller::cancel`], which writes a durable `cancel-run` job and the
//! audit row of whoever asked in one transaction. The job cancels the run if
//! it is not final by then; its worker learns from its next heartbeat.

use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::jobs::CancelRun;
use crate::audit::{self, Actor, AuditAction};
use crate::db::StoreError;
use crate::jobs::{self, Jobs};

/// What canceling a run uses.
#[derive(Clone)]
pub struct RunCanceller {
    pub db: PgPool,
    pub jobs: Jobs,
}

impl RunCanceller {
    /// Requests the cancel of run `run_id` (friendly id `run`) by `by`: the
    /// job and its audit row commit together, then the job is relayed.
    /// Returns the job's id.
    pub async fn cancel(&self, by: &Actor, run_id: Uuid, run: &str) -> Result<Uuid, StoreError> {
        let mut tx = crate::db::begin(&self.db).await?;
        let job = jobs::store::insert(&mut *tx, &CancelRun { run_id }, jobs::DEFAULT_MAX_ATTEMPTS).await?;
        audit::record(&mut *tx, by, AuditAction::RunCancel, &format!("run:{run}"), json!({ "job": job })).await?;
        tx.commit().await?;
        self.jobs.relay(&[job]).await;
        Ok(job.id())
    }
}
