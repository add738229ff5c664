//! The analytics job: `backfill`, one chunk of a copy into ClickHouse. Its
//! payload ([`BackfillChunk`]) lives with the backfill that writes and runs
//! the chunks; this is the handler the dispatch table calls.

use sqlx::PgPool;

use super::backfill::{self, BackfillChunk};
use super::ClickHouse;
use crate::jobs::runtime::Outcome;
use crate::jobs::Jobs;

pub async fn backfill_chunk(db: &PgPool, ch: &ClickHouse, jobs: &Jobs, job: &BackfillChunk) -> Outcome {
    // None injected: only a test calls `run_chunk` with faults (and a
    // release build's `Faults` is empty, hence the lint).
    #[allow(clippy::default_constructed_unit_structs)]
    let faults = backfill::Faults::default();
    Ok(backfill::run_chunk(db, ch, jobs, job.backfill_id, job.chunk, faults).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{Job, Lane};
    use uuid::Uuid;

    #[test]
    fn a_chunk_is_stored_as_before_on_the_analytics_lane() {
        let id = Uuid::now_v7();
        let job = Job::new(&BackfillChunk { backfill_id: id, chunk: 3 }).unwrap();
        assert_eq!(job.to_stored(), serde_json::json!({ "kind": "backfill", "backfill_id": id, "chunk": 3 }));
        assert_eq!(job.kind().lane(), Lane::Analytics);
    }
}
