//! What an append sets off once its record is durable: the waitpoints it drained
//! are completed (by a `waitpoint-drain` job), and a record on `.in` boots a run
//! if none is alive to read it.
//!
//! [`follow_up`] runs in a task of its own: the record is stored, so a client
//! that disconnects now must not stop this halfway (drained waitpoints would
//! be lost with the request).
//!
//! A process can still die between storing a `.in` record and booting its
//! run, and the SDK's chat clients do not retry appends. So the append script
//! notes a boot intent in the same atomic step as the record (see
//! `store::APPEND`); the follow-up drops it once a run is known to read the
//! record, and the `input-boot-sweep` job boots a run for any intent left
//! behind.

use std::sync::atomic::{AtomicBool, Ordering};

use uuid::Uuid;

use super::store::{Appended, Writer};
use super::{ChannelKey, Io};
use crate::app::AppState;
use crate::http::error::ApiError;
use crate::jobs::Job;
use crate::sessions::run_manager::{self, RunManagerError};

/// Faults tests inject into a live server, to show what recovers them.
#[derive(Debug, Default)]
pub struct Faults {
    /// Stop an `.in` append's follow-up after the record is stored and before
    /// the run boot, as a crash there would.
    pub stop_before_boot: AtomicBool,
}

/// Who appends, for the append script: a run token's run (fenced once that
/// run is superseded), and for `.in` the session's boot intent.
pub fn writer(env_id: Uuid, key: ChannelKey, acting_run: Option<&str>) -> Writer {
    Writer {
        run: acting_run.map(String::from),
        boot_intent: (key.io == Io::In).then(|| boot_intent(env_id, key.session_id)),
    }
}

/// A boot intent's member: `<env>:<session>`.
fn boot_intent(env_id: Uuid, session_id: Uuid) -> String {
    format!("{}:{}", env_id.simple(), session_id.simple())
}

fn parse_boot_intent(member: &str) -> Option<(Uuid, Uuid)> {
    let (env, session) = member.split_once(':')?;
    Some((Uuid::parse_str(env).ok()?, Uuid::parse_str(session).ok()?))
}

/// Makes sure a run will read `.in` up to `seq`, then drops the boot intent
/// that covers it. A closed or deleted session needs no run. Returns whether a
/// run was booted.
async fn boot_for_input(state: &AppState, env_id: Uuid, session_id: Uuid, seq: u64) -> Result<bool, RunManagerError> {
    let booted = match run_manager::ensure_run(state, env_id, session_id).await {
        Ok(ensured) => matches!(ensured, run_manager::Ensured::Triggered(_)),
        Err(RunManagerError::Closed) | Err(RunManagerError::NotFound) => false,
        Err(err) => return Err(err),
    };
    if let Err(err) = state.channels.clear_boot_intent(&boot_intent(env_id, session_id), seq).await {
        // Harmless: the sweep finds the run alive and drops it then.
        tracing::warn!(session = %session_id, %err, "could not drop a boot intent");
    }
    Ok(booted)
}

/// Most boot intents one sweep handles.
const BOOT_SWEEP_BATCH: usize = 500;

/// The `input-boot-sweep` job: ensures a run for every boot intent left behind.
/// Returns (runs booted, intents checked). Intents whose follow-up is still in
/// flight are checked too; `ensure_run` finds their run alive.
pub async fn boot_unread_input(state: &AppState) -> anyhow::Result<(usize, usize)> {
    let intents = state.channels.boot_intents(BOOT_SWEEP_BATCH).await?;
    let mut booted = 0;
    for (member, seq) in &intents {
        let Some((env_id, session_id)) = parse_boot_intent(member) else {
            tracing::warn!(%member, "dropping a malformed boot intent");
            state.channels.clear_boot_intent(member, u64::MAX).await?;
            continue;
        };
        match boot_for_input(state, env_id, session_id, *seq).await {
            Ok(true) => {
                tracing::info!(session = %session_id, seq, "booted a run for unread input");
                booted += 1;
            }
            Ok(false) => {}
            // The intent stays for the next sweep; the others still get theirs.
            Err(err) => tracing::warn!(session = %session_id, %err, "could not boot a run for unread input"),
        }
    }
    Ok((booted, intents.len()))
}

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
        let job = Job::DrainWaitpoints {
            session_id: key.session_id,
            io: key.io,
            seq_num: appended.seq_num,
            waitpoint_ids: drained.clone(),
        };
        if let Err(err) = state.jobs.submit(&job).await {
            // Taken off the pending set by the append: put them back, where a
            // retry of this append, the next one or the worker's long-poll
            // finds them.
            state.channels.put_back_waiters(key, &drained).await;
            return Err(err.into());
        }
    }
    if key.io == Io::In {
        if state.faults.stop_before_boot.load(Ordering::Relaxed) {
            return Err(ApiError::Internal(anyhow::anyhow!("injected fault: stopped before the run boot")));
        }
        // Also for a retry: the first attempt may have stored the record and
        // failed before the run boot.
        boot_for_input(state, env_id, key.session_id, appended.seq_num).await?;
    }
    Ok(())
}
