//! The replication jobs: `replication-flush` (one batch into ClickHouse, see
//! [`super::flush`], which writes it with its payload) and the scheduled
//! `replication-reconcile` (see [`super::reconcile`]).

use std::time::Duration;

use sqlx::PgPool;

use super::flush::ReplicationFlush;
use crate::analytics::ClickHouse;
use crate::jobs::runtime::Outcome;
use crate::jobs::Jobs;

pub async fn flush(db: &PgPool, ch: &ClickHouse, job: &ReplicationFlush) -> Outcome {
    Ok(super::flush::execute(db, ch, job.flush_id).await?)
}

/// Compares ClickHouse with Postgres and repairs the months that differ,
/// while replication is on (`slot`: this process's replication slot); it
/// means nothing otherwise. `margin` is the list's overlay margin, which the
/// cutoff leaves to changes still on their way.
pub async fn reconcile(db: &PgPool, ch: &ClickHouse, jobs: &Jobs, slot: Option<&str>, margin: Duration) -> Outcome {
    let Some(slot) = slot else {
        return Ok("replication is off; nothing to reconcile".into());
    };
    let summary = super::reconcile::run(db, ch, jobs, margin).await?;
    super::health::record_reconcile(db, slot, &summary).await?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{Job, Lane};
    use uuid::Uuid;

    #[test]
    fn a_flush_is_stored_as_before_on_the_analytics_lane() {
        let id = Uuid::now_v7();
        let job = Job::new(&ReplicationFlush { flush_id: id }).unwrap();
        assert_eq!(job.to_stored(), serde_json::json!({ "kind": "replication-flush", "flush_id": id }));
        assert_eq!(job.kind().lane(), Lane::Analytics);
    }
}
