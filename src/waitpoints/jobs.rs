//! The waitpoints' jobs: `waitpoint-drain` (complete the waits an append
//! drained), `close-channels` (after a session closes or expires) and the
//! `waitpoint-timeout-sweep`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Waitpoints;
use crate::jobs::runtime::Outcome;
use crate::jobs::{JobKind, Payload};
use crate::streams::Io;

/// Waitpoints drained from a channel's pending set by the append of `seq_num`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainWaitpoints {
    pub session_id: Uuid,
    pub io: Io,
    pub seq_num: u64,
    pub waitpoint_ids: Vec<Uuid>,
}

impl Payload for DrainWaitpoints {
    fn kind(&self) -> JobKind {
        JobKind::WaitpointDrain
    }
}

/// After a session closes (or expires): wake, refuse writes, expire, complete waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseChannels {
    pub session_id: Uuid,
    pub reason: Option<String>,
    pub notify_in: bool,
}

impl Payload for CloseChannels {
    fn kind(&self) -> JobKind {
        JobKind::CloseChannels
    }
}

pub async fn drain(waitpoints: &Waitpoints, job: &DrainWaitpoints) -> Outcome {
    let n = waitpoints.drain(job.session_id, job.io, job.seq_num, &job.waitpoint_ids).await?;
    Ok(format!("{n} waitpoints completed with record {}", job.seq_num))
}

pub async fn close_channels(waitpoints: &Waitpoints, job: &CloseChannels) -> Outcome {
    waitpoints.close_channels(job.session_id, job.reason.as_deref(), job.notify_in).await?;
    Ok(format!("channels of session {} closed", job.session_id))
}

pub async fn timeout_sweep(waitpoints: &Waitpoints) -> Outcome {
    Ok(format!("{} waitpoints timed out", waitpoints.time_out_due().await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::Job;

    #[test]
    fn waitpoint_jobs_are_stored_as_before() {
        let id = Uuid::now_v7();
        let drain = DrainWaitpoints { session_id: id, io: Io::In, seq_num: 3, waitpoint_ids: vec![id] };
        assert_eq!(
            Job::new(&drain).unwrap().to_stored(),
            serde_json::json!({ "kind": "waitpoint-drain", "session_id": id, "io": "in", "seq_num": 3, "waitpoint_ids": [id] })
        );
        let close = CloseChannels { session_id: id, reason: Some("done".into()), notify_in: true };
        let job = Job::new(&close).unwrap();
        assert_eq!(
            job.to_stored(),
            serde_json::json!({ "kind": "close-channels", "session_id": id, "reason": "done", "notify_in": true })
        );
        assert_eq!(job.payload::<CloseChannels>().unwrap(), close);
    }
}
