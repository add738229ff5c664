//! The analytics job: `backfill`, one chunk of a copy into ClickHouse (see
//! [`super::backfill`]).

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use super::backfill;
use super::ClickHouse;
use crate::jobs::runtime::Outcome;
use crate::jobs::{JobKind, Jobs, Payload};

/// Copies chunk number `chunk` of backfill `backfill_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillChunk {
    pub backfill_id: Uuid,
    pub chunk: i32,
}

impl Payload for BackfillChunk {
    fn kind(&self) -> JobKind {
        JobKind::Backfill
    }
}

pub async fn backfill_chunk(db: &PgPool, ch: &ClickHouse, jobs: &Jobs, job: &BackfillChunk) -> Outcome {
    let faults = backfill::Faults::default();
    Ok(backfill::run_chunk(db, ch, jobs, job.backfill_id, job.chunk, faults).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{Job, Lane};

    #[test]
    fn a_chunk_is_stored_as_before_on_the_analytics_lane() {
        let id = Uuid::now_v7();
        let job = Job::new(&BackfillChunk { backfill_id: id, chunk: 3 }).unwrap();
        assert_eq!(job.to_stored(), serde_json::json!({ "kind": "backfill", "backfill_id": id, "chunk": 3 }));
        assert_eq!(job.kind().lane(), Lane::Analytics);
    }
}
