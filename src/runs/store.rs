//! SQL that owns `task_runs`.

use sqlx::PgConnection;
use uuid::Uuid;

use super::{session_payload, TriggerReason};
use crate::db::StoreError;
use crate::ids;
use crate::sessions::validate::TriggerConfig;

/// A run about to be inserted, built from a session's trigger config.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: Uuid,
    pub friendly_id: String,
    pub organization_id: Uuid,
    pub project_id: Uuid,
    pub runtime_environment_id: Uuid,
    pub task_identifier: String,
    pub session_id: Option<Uuid>,
    pub payload: serde_json::Value,
    pub queue: Option<String>,
    pub machine: Option<String>,
    pub tags: Vec<String>,
    pub max_attempts: i32,
    pub max_duration_secs: Option<i32>,
    pub ttl_secs: Option<i32>,
    pub lock_to_version: Option<String>,
}

/// Scoping and identity of the session a run is for.
pub struct RunOwner<'a> {
    pub organization_id: Uuid,
    pub project_id: Uuid,
    pub runtime_environment_id: Uuid,
    pub session_id: Uuid,
    pub session_friendly_id: &'a str,
    pub task_identifier: &'a str,
}

impl NewRun {
    pub fn for_session(owner: RunOwner<'_>, config: &TriggerConfig, reason: TriggerReason) -> Self {
        let clamp = |v: i64| i32::try_from(v).unwrap_or(i32::MAX);
        NewRun {
            id: Uuid::now_v7(),
            friendly_id: ids::new_run_id(),
            organization_id: owner.organization_id,
            project_id: owner.project_id,
            runtime_environment_id: owner.runtime_environment_id,
            task_identifier: owner.task_identifier.to_string(),
            session_id: Some(owner.session_id),
            payload: session_payload(&config.base_payload, owner.session_friendly_id, reason),
            queue: config.queue.clone(),
            machine: config.machine.clone(),
            tags: config.tags.clone().unwrap_or_default(),
            max_attempts: config.max_attempts.map(clamp).unwrap_or(1),
            max_duration_secs: config.max_duration.map(clamp),
            ttl_secs: config.ttl_secs().map(clamp),
            lock_to_version: config.lock_to_version.clone(),
        }
    }
}

pub async fn insert(conn: &mut PgConnection, run: &NewRun) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO task_runs (id, friendly_id, organization_id, project_id, runtime_environment_id,
            task_identifier, session_id, payload, queue, machine, tags, max_attempts, max_duration_secs,
            ttl_secs, lock_to_version)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(run.id)
    .bind(&run.friendly_id)
    .bind(run.organization_id)
    .bind(run.project_id)
    .bind(run.runtime_environment_id)
    .bind(&run.task_identifier)
    .bind(run.session_id)
    .bind(&run.payload)
    .bind(&run.queue)
    .bind(&run.machine)
    .bind(&run.tags)
    .bind(run.max_attempts)
    .bind(run.max_duration_secs)
    .bind(run.ttl_secs)
    .bind(&run.lock_to_version)
    .execute(conn)
    .await?;
    Ok(())
}
