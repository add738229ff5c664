//! Closing a session, the one way: the API, the dashboard and any other
//! caller go through [`SessionCloser::close`], so every close is audited in
//! its own transaction, seals both channels before it is acknowledged and
//! clears this process's lookup cache (the dashboard's close once left the
//! sealing to a job and kept the cache).

use std::sync::Arc;

use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::lookup::SessionLookup;
use super::model::Session;
use super::store;
use crate::audit::{self, Actor, AuditAction};
use crate::db::StoreError;
use crate::jobs::Jobs;
use crate::waitpoints::{WaitError, Waitpoints};

#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    #[error("session not found")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Closed and committed, but the channels are not sealed yet (the job
    /// keeps trying); the cause stays in the chain so Redis away reads as
    /// unavailable.
    #[error("sealing the channels of closed session {session}")]
    Seal {
        session: String,
        #[source]
        source: WaitError,
    },
}

/// What closing a session uses.
#[derive(Clone)]
pub struct SessionCloser {
    pub db: PgPool,
    pub jobs: Jobs,
    pub lookup: Arc<SessionLookup>,
    pub waitpoints: Waitpoints,
}

impl SessionCloser {
    /// Closes session `id` of environment `env` once, by `by`.
    ///
    /// The close that wins writes the audit row and the `close-channels` job
    /// in its transaction; a repeated close changes nothing and returns the
    /// row as the first close left it. Either way the answer comes only once
    /// the channels are sealed, so no write lands after it: the seal marker,
    /// which the append script checks, stops appends on every server, whatever
    /// their lookup caches still say. A retry (closed, `channels_closed_at`
    /// still null) seals again before it answers.
    pub async fn close(
        &self,
        by: &Actor,
        env: Uuid,
        id: Uuid,
        reason: Option<&str>,
        calling_run: Option<&str>,
    ) -> Result<Session, CloseError> {
        let mut tx = crate::db::begin(&self.db).await.map_err(StoreError::from)?;
        let (closed, job) = match store::close_in(&mut tx, env, id, reason, calling_run).await? {
            Some((closed, job)) => {
                let target = format!("session:{}", closed.friendly_id);
                let detail = json!({ "job": job, "reason": reason, "callingRunId": calling_run });
                audit::record(&mut *tx, by, AuditAction::SessionClose, &target, detail).await?;
                tx.commit().await.map_err(StoreError::from)?;
                (closed, Some(job))
            }
            None => {
                tx.rollback().await.map_err(StoreError::from)?;
                (store::find_by_id(&self.db, env, id).await?.ok_or(CloseError::NotFound)?, None)
            }
        };
        self.lookup.forget(&closed);
        let sealed = match closed.channels_closed_at {
            Some(_) => Ok(()),
            None => {
                let notify_in = closed.close_wakes_in(calling_run);
                self.waitpoints.close_channels(closed.id, closed.closed_reason.as_deref(), notify_in).await
            }
        };
        if let Some(job) = job {
            self.jobs.relay(&[job]).await;
        }
        sealed.map_err(|err| CloseError::Seal { session: closed.friendly_id.clone(), source: err })?;
        Ok(closed)
    }
}
