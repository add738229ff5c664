//! The operator playground's sessions: starting one (a chat session of a
//! task, created as the API's create does, audited as the operator's) and
//! reopening one (audited too). The dashboard's page only renders them.

use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::model::Session;
use super::store::{self, CreateOutcome};
use super::validate::{self, CreateSessionBody};
use crate::audit::{self, Actor, AuditAction};
use crate::db::StoreError;
use crate::ids::id_problem;
use crate::jobs::Jobs;
use crate::tenancy::Environment;

/// The session type the official chat clients create.
const SESSION_TYPE: &str = "chat.agent";
/// Every playground session carries this tag, so the sessions list can tell
/// them from the customers'.
pub const TAG: &str = "playground";

#[derive(Debug, thiserror::Error)]
pub enum PlaygroundError {
    /// The task (or the session to reopen) is not a valid name.
    #[error("{0}")]
    Invalid(String),
    #[error("No session {0} in this environment; nothing was changed")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

fn target(session: &Session) -> String {
    format!("session:{}", session.friendly_id)
}

fn detail(env: &Environment, session: &Session) -> serde_json::Value {
    json!({ "environment": env.id, "task": session.task_identifier, "run": session.current_run_friendly_id })
}

/// Starts a chat session of `task` in `env` by `by`, as the API's create does
/// (the same validation, the same transaction with its first run, the
/// trigger job relayed), named by a fresh external id that also serves as the
/// chat id. The audit row commits in that transaction.
pub async fn start(
    db: &PgPool,
    jobs: &Jobs,
    by: &Actor,
    env: &Environment,
    task: &str,
) -> Result<Session, PlaygroundError> {
    let chat_id = format!("playground-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let body: CreateSessionBody = serde_json::from_value(json!({
        "type": SESSION_TYPE,
        "taskIdentifier": task,
        "externalId": chat_id,
        "triggerConfig": { "basePayload": { "chatId": chat_id } },
        "tags": [TAG],
    }))
    .map_err(anyhow::Error::from)?;
    let new = validate::create(body).map_err(|e| PlaygroundError::Invalid(e.to_string()))?;
    let mut tx = crate::db::begin(db).await.map_err(StoreError::from)?;
    match store::create_in(&mut tx, env, &new).await? {
        CreateOutcome::Created(session, job) => {
            let action = AuditAction::PlaygroundStart;
            audit::record(&mut *tx, by, action, &target(&session), detail(env, &session)).await?;
            tx.commit().await.map_err(StoreError::from)?;
            jobs.relay(&[job]).await;
            Ok(session)
        }
        // A fresh random external id: another session holding it is a bug.
        other => Err(anyhow::anyhow!("playground external id {chat_id} taken: {other:?}").into()),
    }
}

/// Reopens the session `key` (a session id or an external id) of `env` by
/// `by`, audited.
pub async fn reopen(db: &PgPool, by: &Actor, env: &Environment, key: &str) -> Result<Session, PlaygroundError> {
    if let Some(problem) = id_problem(key) {
        return Err(PlaygroundError::Invalid(format!("The session to reopen {problem}")));
    }
    let session = store::find(db, env.id, key).await?.ok_or_else(|| PlaygroundError::NotFound(key.to_string()))?;
    audit::record(db, by, AuditAction::PlaygroundReopen, &target(&session), detail(env, &session)).await?;
    Ok(session)
}
