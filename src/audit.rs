//! The audit log: one row per action someone took on purpose (an operator on
//! the dashboard, an API caller, a run, the command line), written with the
//! action's own statements in one transaction, so an action and its record
//! stand or fall together. Each action's domain service writes its row
//! through [`record`], whoever acted.

use std::fmt;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::db::StoreError;

/// Who took an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A dashboard operator.
    Operator(Uuid),
    /// An API caller with an environment's secret key.
    SecretKey { env: Uuid },
    /// An API caller with a public token of an environment.
    PublicToken { env: Uuid },
    /// A run, through the worker protocol (its friendly id).
    Run(String),
    /// Someone at the `sessiond` command line (the shell's user; no identity).
    Cli,
}

impl Actor {
    fn kind(&self) -> &'static str {
        match self {
            Actor::Operator(_) => "operator",
            Actor::SecretKey { .. } => "secret-key",
            Actor::PublicToken { .. } => "public-token",
            Actor::Run(_) => "run",
            Actor::Cli => "cli",
        }
    }

    fn operator(&self) -> Option<Uuid> {
        match self {
            Actor::Operator(id) => Some(*id),
            _ => None,
        }
    }

    fn name(&self) -> Option<String> {
        match self {
            Actor::SecretKey { env } | Actor::PublicToken { env } => Some(env.to_string()),
            Actor::Run(run) => Some(run.clone()),
            Actor::Operator(_) | Actor::Cli => None,
        }
    }
}

/// What was done. The text (`as_str`) is what `audit_log.action` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    SessionClose,
    SessionTrigger,
    HandoffRetry,
    RunCancel,
    JobRetry,
    JobCancel,
    JobRetrySelected,
    JobRetryMatching,
    EnvironmentRotateKey,
    ClickhouseBackfill,
    PlaygroundStart,
    PlaygroundReopen,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::SessionClose => "session.close",
            AuditAction::SessionTrigger => "session.trigger",
            AuditAction::HandoffRetry => "handoff.retry",
            AuditAction::RunCancel => "run.cancel",
            AuditAction::JobRetry => "job.retry",
            AuditAction::JobCancel => "job.cancel",
            AuditAction::JobRetrySelected => "job.retry_selected",
            AuditAction::JobRetryMatching => "job.retry_matching",
            AuditAction::EnvironmentRotateKey => "environment.rotate_key",
            AuditAction::ClickhouseBackfill => "clickhouse.backfill",
            AuditAction::PlaygroundStart => "playground.start",
            AuditAction::PlaygroundReopen => "playground.reopen",
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: Uuid,
    /// The operator's email, else who acted (`secret-key <env>`, `run <id>`, `cli`).
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: Value,
    pub created_at: DateTime<Utc>,
}

/// Writes the audit row of `action` by `actor` on `target`; run it on the
/// action's own transaction.
pub async fn record(
    conn: impl PgExecutor<'_>,
    actor: &Actor,
    action: AuditAction,
    target: &str,
    detail: Value,
) -> Result<Uuid, StoreError> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO audit_log (id, operator_id, actor_kind, actor, action, target, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(actor.operator())
    .bind(actor.kind())
    .bind(actor.name())
    .bind(action.as_str())
    .bind(target)
    .bind(detail)
    .execute(conn)
    .await?;
    Ok(id)
}

/// A page of the log, newest first, after the `(created_at, id)` cursor.
pub async fn page(
    pool: &PgPool,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<AuditEntry>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT a.id, a.action, a.target, a.detail, a.created_at,
                COALESCE(o.email, a.actor_kind || COALESCE(' ' || a.actor, '')) AS actor
         FROM audit_log a LEFT JOIN operators o ON o.id = a.operator_id
         WHERE ($1::timestamptz IS NULL OR (a.created_at, a.id) < ($1, $2))
         ORDER BY a.created_at DESC, a.id DESC LIMIT $3",
    )
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
