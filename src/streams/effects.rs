//! Appending to a session's channel, and what an append sets off once its
//! record is durable: the waitpoints it drained are completed (by a
//! `waitpoint-drain` job), and a record on `.in` boots a run if none is alive
//! to read it.
//!
//! The follow-up runs in a task of its own: the record is stored, so a client
//! that disconnects now must not stop this halfway (drained waitpoints would
//! be lost with the request).
//!
//! A process can still die between storing a `.in` record and booting its
//! run, and the SDK's chat clients do not retry appends. So the append script
//! notes a boot intent in the same atomic step as the record (see
//! `store::APPEND`); the follow-up drops it once a run is known to read the
//! record, and the `input-boot-sweep` job boots a run for any intent left
//! behind.

#[cfg(feature = "test-faults")]
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(feature = "test-faults")]
use std::sync::Arc;

use uuid::Uuid;

use super::store::{client_part, Appended, ChannelError, ChannelStore, Writer};
use super::{ChannelKey, Io};
use crate::db::StoreError;
use crate::jobs::Jobs;
use crate::sessions::run_manager::{Ensured, RunManager, RunManagerError};
use crate::sessions::Session;
use crate::waitpoints::jobs::DrainWaitpoints;

/// Faults tests inject into a live server, to show what recovers them
/// (`test-faults` builds only).
#[cfg(feature = "test-faults")]
#[derive(Debug, Default)]
pub struct Faults {
    /// Stop an `.in` append's follow-up after the record is stored and before
    /// the run boot, as a crash there would.
    pub stop_before_boot: AtomicBool,
}

/// Why a follow-up did not finish. The record is stored either way; a retry of
/// the append (same part id) runs the follow-up again.
#[derive(Debug, thiserror::Error)]
pub enum EffectError {
    #[error("could not queue the waitpoint drain: {0}")]
    Drain(#[from] StoreError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("could not boot a run: {0}")]
    Boot(#[from] RunManagerError),
    #[error("the follow-up task ended early: {0}")]
    Task(String),
    #[error("injected fault: stopped before the run boot")]
    Injected,
}

/// Why an append was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The session takes no writes (closed or expired).
    #[error("{0}")]
    Refused(&'static str),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Effect(#[from] EffectError),
}

/// One record for a channel, as a client or a run sends it.
pub struct NewAppend<'a> {
    pub io: Io,
    pub body: &'a str,
    pub headers: &'a [(String, String)],
    /// The client's `X-Part-Id`, if any.
    pub part_id: Option<&'a str>,
    /// The run whose token writes it (fenced once that run is superseded).
    pub acting_run: Option<&'a str>,
}

/// Appends to sessions' channels, with what the follow-ups use: the channel
/// store, the job outbox (drains) and the run manager (boots).
#[derive(Clone)]
pub struct Appender {
    channels: ChannelStore,
    jobs: Jobs,
    runs: RunManager,
    #[cfg(feature = "test-faults")]
    faults: Arc<Faults>,
}

/// A boot intent's member: `<env>:<session>`.
fn boot_intent(env_id: Uuid, session_id: Uuid) -> String {
    format!("{}:{}", env_id.simple(), session_id.simple())
}

fn parse_boot_intent(member: &str) -> Option<(Uuid, Uuid)> {
    let (env, session) = member.split_once(':')?;
    Some((Uuid::parse_str(env).ok()?, Uuid::parse_str(session).ok()?))
}

/// Most boot intents one sweep handles.
const BOOT_SWEEP_BATCH: usize = 500;

impl Appender {
    pub fn new(channels: ChannelStore, jobs: Jobs, runs: RunManager) -> Self {
        Appender {
            channels,
            jobs,
            runs,
            #[cfg(feature = "test-faults")]
            faults: Arc::default(),
        }
    }

    /// Test seam (`test-faults` builds): stop every `.in` append's follow-up
    /// after the record is stored and before the run boot, while `on`.
    #[cfg(feature = "test-faults")]
    pub fn stop_before_boot(&self, on: bool) {
        self.faults.stop_before_boot.store(on, Ordering::Relaxed);
    }

    /// Appends `new` to `session`'s channel and follows up (see the module
    /// docs). The record is durable once this returns Ok; a duplicate part id
    /// answers the earlier record (even after a close, so a retry still gets
    /// its acknowledgement).
    pub async fn append(&self, env_id: Uuid, session: &Session, new: NewAppend<'_>) -> Result<Appended, AppendError> {
        let key = ChannelKey { session_id: session.id, io: new.io };
        let part_id = new.part_id.map(client_part);
        if let Some(refusal) = session.write_refusal() {
            if let Some(part) = &part_id {
                if let Some(seq_num) = self.channels.part_seq(key, part).await? {
                    return Ok(Appended { seq_num, timestamp: 0, duplicate: true, drained_waitpoints: Vec::new() });
                }
            }
            return Err(AppendError::Refused(refusal));
        }
        let writer = Writer {
            run: new.acting_run.map(String::from),
            boot_intent: (key.io == Io::In).then(|| boot_intent(env_id, key.session_id)),
            counted: true,
        };
        let appended = self.channels.append_as(key, new.body, new.headers, part_id.as_deref(), &writer).await?;
        self.follow_up(env_id, key, appended.clone()).await?;
        Ok(appended)
    }

    /// Follows up on `appended`, to completion even if the caller stops waiting.
    async fn follow_up(&self, env_id: Uuid, key: ChannelKey, appended: Appended) -> Result<(), EffectError> {
        // The common case (a token on `.out`) has nothing to follow up.
        if key.io == Io::Out && !appended.duplicate && appended.drained_waitpoints.is_empty() {
            return Ok(());
        }
        let this = self.clone();
        tokio::spawn(async move { this.run_follow_up(env_id, key, appended).await })
            .await
            .map_err(|e| EffectError::Task(e.to_string()))?
    }

    async fn run_follow_up(&self, env_id: Uuid, key: ChannelKey, appended: Appended) -> Result<(), EffectError> {
        let drained = if appended.duplicate {
            // A retry. Its first attempt may have failed after storing the record,
            // leaving waitpoints put back in the pending set: drain them now (the
            // job leaves any still waiting for a later record where it found them).
            self.channels.take_waiters(key).await?
        } else {
            appended.drained_waitpoints
        };
        if !drained.is_empty() {
            let job = DrainWaitpoints {
                session_id: key.session_id,
                io: key.io,
                seq_num: appended.seq_num,
                waitpoint_ids: drained.clone(),
            };
            if let Err(err) = self.jobs.submit(&job).await {
                // Taken off the pending set by the append: put them back, where a
                // retry of this append, the next one or the worker's long-poll
                // finds them.
                self.channels.put_back_waiters(key, &drained).await;
                return Err(err.into());
            }
        }
        if key.io == Io::In {
            #[cfg(feature = "test-faults")]
            if self.faults.stop_before_boot.load(Ordering::Relaxed) {
                return Err(EffectError::Injected);
            }
            // Also for a retry: the first attempt may have stored the record and
            // failed before the run boot.
            self.boot_for_input(env_id, key.session_id, appended.seq_num).await?;
        }
        Ok(())
    }

    /// Makes sure a run will read `.in` up to `seq`, then drops the boot intent
    /// that covers it. A closed or deleted session needs no run. Returns whether a
    /// run was booted.
    async fn boot_for_input(&self, env_id: Uuid, session_id: Uuid, seq: u64) -> Result<bool, RunManagerError> {
        let booted = match self.runs.ensure_run(env_id, session_id).await {
            Ok(ensured) => matches!(ensured, Ensured::Triggered(_)),
            Err(RunManagerError::Closed) | Err(RunManagerError::NotFound) => false,
            Err(err) => return Err(err),
        };
        if let Err(err) = self.channels.clear_boot_intent(&boot_intent(env_id, session_id), seq).await {
            // Harmless: the sweep finds the run alive and drops it then.
            tracing::warn!(session = %session_id, %err, "could not drop a boot intent");
        }
        Ok(booted)
    }

    /// The `input-boot-sweep` job: ensures a run for every boot intent left behind.
    /// Returns (runs booted, intents checked). Intents whose follow-up is still in
    /// flight are checked too; `ensure_run` finds their run alive.
    pub async fn boot_unread_input(&self) -> Result<(usize, usize), EffectError> {
        let intents = self.channels.boot_intents(BOOT_SWEEP_BATCH).await?;
        let mut booted = 0;
        for (member, seq) in &intents {
            let Some((env_id, session_id)) = parse_boot_intent(member) else {
                tracing::warn!(%member, "dropping a malformed boot intent");
                self.channels.clear_boot_intent(member, u64::MAX).await?;
                continue;
            };
            match self.boot_for_input(env_id, session_id, *seq).await {
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
}
