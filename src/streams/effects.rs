//! What an append sets off once its record is durable: the waitpoints it drained
//! are completed (by a `waitpoint-drain` job), and a record on `.in` boots a run
//! if none is alive to read it.
//!
//! [`follow_up`] runs in a task of its own: the record is stored, so a client
//! that disconnects now must not stop this halfway (drained waitpoints would
//! be lost with the request).

use uuid::Uuid;

use super::store::Appended;
use super::{ChannelKey, Io};
use crate::app::AppState;
use crate::http::error::ApiError;
use crate::jobs::Job;
use crate::sessions::run_manager::{self, RunManagerError};

/// Follows up on `appended` (see the module docs), to completion even if the
/// caller stops waiting.
pub async fn follow_up(state: &AppState, env_id: Uuid, key: ChannelKey, appended: Appended) -> Result<(), ApiError> {
    // The common case (a token on `.out`) has nothing to follow up.
    if key.io == Io::Out && !appended.duplicate && appended.drained_waitpoints.is_empty() {
        return Ok(());
    }
    let state = state.clone();
    tokio::spawn(async move { run(&state, env_id, key, appended).await })
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("append follow-up task failed: {e}")))?
}

async fn run(state: &AppState, env_id: Uuid, key: ChannelKey, appended: Appended) -> Result<(), ApiError> {
    let drained = if appended.duplicate {
        // A retry. Its first attempt may have failed after storing the record,
        // leaving waitpoints put back in the pending set: drain them now (the
        // job leaves any still waiting for a later record where it found them).
        state.channels.take_waiters(key).await?
    } else {
        appended.drained_waitpoints
    };
    if !drained.is_empty() {
        let job =
            Job::DrainWaitpoints { session_id: key.session_id, io: key.io, seq_num: appended.seq_num, waitpoint_ids: drained.clone() };
        if let Err(err) = state.jobs.submit(&job).await {
            // Taken off the pending set by the append: put them back, where a
            // retry of this append, the next one or the worker's long-poll
            // finds them.
            state.channels.put_back_waiters(key, &drained).await;
            return Err(err.into());
        }
    }
    if key.io == Io::In {
        // Also for a retry: the first attempt may have stored the record and
        // failed before the run boot.
        match run_manager::ensure_run(state, env_id, key.session_id).await {
            Ok(_) | Err(RunManagerError::Closed) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}
