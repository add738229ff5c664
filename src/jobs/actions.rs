//! What people do to jobs: retry or cancel one, retry the ones they ticked,
//! retry every one a filter matches. One service for the dashboard and the
//! command line: each action and its audit row (as whoever asked) commit in
//! one transaction, and a retried job is relayed once that commits.

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use super::store::{self, JobFilter};
use super::Jobs;
use crate::audit::{self, Actor, AuditAction};
use crate::db::StoreError;

/// What is done to one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OneJob {
    /// A failed or canceled job runs again with a fresh attempt budget.
    Retry,
    /// A pending job will not start.
    Cancel,
}

impl OneJob {
    fn audit_action(self) -> AuditAction {
        match self {
            OneJob::Retry => AuditAction::JobRetry,
            OneJob::Cancel => AuditAction::JobCancel,
        }
    }
}

impl Jobs {
    /// Applies `what` to job `id` by `by`; the job's kind, or None if the job
    /// is not there or not in a state `what` applies to (nothing changed).
    pub async fn act_on(&self, by: &Actor, id: Uuid, what: OneJob) -> Result<Option<String>, StoreError> {
        let mut tx = crate::db::begin(&self.pool).await?;
        let kind = match what {
            OneJob::Retry => store::reset_for_retry(&mut *tx, id).await?.map(|row| row.kind),
            OneJob::Cancel => store::cancel_pending(&mut *tx, id).await?,
        };
        let Some(kind) = kind else { return Ok(None) };
        audit::record(&mut *tx, by, what.audit_action(), &format!("job:{id}"), json!({ "kind": kind })).await?;
        tx.commit().await?;
        if what == OneJob::Retry {
            self.relay_retried(&[(id, kind.clone())]).await;
        }
        Ok(Some(kind))
    }

    /// Retries those of `ids` that are failed or canceled, by `by`; the
    /// retried ones (none: nothing changed, nothing audited).
    pub async fn retry_selected_by(&self, by: &Actor, ids: &[Uuid]) -> Result<Vec<(Uuid, String)>, StoreError> {
        let mut tx = crate::db::begin(&self.pool).await?;
        let retried = store::retry_selected(&mut *tx, ids).await?;
        if retried.is_empty() {
            return Ok(retried);
        }
        let detail = json!({ "jobs": retried.iter().map(|(id, _)| id).collect::<Vec<_>>(), "count": retried.len() });
        audit::record(&mut *tx, by, AuditAction::JobRetrySelected, "jobs:selected", detail).await?;
        tx.commit().await?;
        self.relay_retried(&retried).await;
        Ok(retried)
    }

    /// Retries every job `filter` matches whose failure a preview saw (as of
    /// `as_of`, in snapshot `seen`; see [`store::retry_matching`]), by `by`,
    /// audited with the filter (`summary` names it in the target) and the count.
    pub async fn retry_matching_by(
        &self,
        by: &Actor,
        filter: &JobFilter,
        summary: &str,
        as_of: DateTime<Utc>,
        seen: &str,
    ) -> Result<Vec<(Uuid, String)>, StoreError> {
        let mut tx = crate::db::begin(&self.pool).await?;
        let retried = store::retry_matching(&mut *tx, filter, as_of, seen).await?;
        if retried.is_empty() {
            return Ok(retried);
        }
        let detail = json!({
            "filter": { "kind": filter.kind, "status": filter.status, "q": filter.search },
            "as_of": as_of.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "count": retried.len(),
        });
        audit::record(&mut *tx, by, AuditAction::JobRetryMatching, &format!("jobs:{summary}"), detail).await?;
        tx.commit().await?;
        self.relay_retried(&retried).await;
        Ok(retried)
    }

    /// Committed retries are relayed now if Redis answers; if not, the relay
    /// loop pushes them later, so a failure here is only logged.
    async fn relay_retried(&self, retried: &[(Uuid, String)]) {
        if let Err(err) = self.relay_kinds(retried).await {
            tracing::warn!(%err, jobs = retried.len(), "could not relay retried jobs; the relay loop will");
        }
    }
}
