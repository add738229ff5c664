//! Task runs: one execution of a task, triggered by a session.
//!
//! - [`store`]: the SQL that owns `task_runs`: inserts and every state transition.
//! - [`queue`]: per-(environment, task) run queues in Redis and the wake-up signal
//!   long-polling workers wait on.
//! - [`routes`]: the worker protocol (dequeue, heartbeat, complete, fail, cancel).
//! - [`cancel`]: a run's cancel as a durable job, for the API and the dashboard.
//! - [`jobs`]: the run engine's jobs (trigger, cancel, the run sweep).

pub mod cancel;
pub mod dispatch;
pub mod jobs;
pub mod queue;
pub mod routes;
pub mod store;

/// Lifecycle of a run. QUEUED → EXECUTING (⇄ WAITING) → one of the final states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    Queued,
    Executing,
    Waiting,
    Completed,
    Failed,
    Canceled,
    Crashed,
    Expired,
    TimedOut,
}

impl RunStatus {
    /// Every status, in lifecycle order (for filters).
    pub const ALL: [RunStatus; 9] = [
        RunStatus::Queued,
        RunStatus::Executing,
        RunStatus::Waiting,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Canceled,
        RunStatus::Crashed,
        RunStatus::Expired,
        RunStatus::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "QUEUED",
            RunStatus::Executing => "EXECUTING",
            RunStatus::Waiting => "WAITING",
            RunStatus::Completed => "COMPLETED",
            RunStatus::Failed => "FAILED",
            RunStatus::Canceled => "CANCELED",
            RunStatus::Crashed => "CRASHED",
            RunStatus::Expired => "EXPIRED",
            RunStatus::TimedOut => "TIMED_OUT",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "QUEUED" => RunStatus::Queued,
            "EXECUTING" => RunStatus::Executing,
            "WAITING" => RunStatus::Waiting,
            "COMPLETED" => RunStatus::Completed,
            "FAILED" => RunStatus::Failed,
            "CANCELED" => RunStatus::Canceled,
            "CRASHED" => RunStatus::Crashed,
            "EXPIRED" => RunStatus::Expired,
            "TIMED_OUT" => RunStatus::TimedOut,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Executing | RunStatus::Waiting)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Is a run alive, i.e. can it still serve its session? Queued runs are; executing
/// and waiting runs are while their heartbeat deadline is in the future.
pub fn is_alive(
    status: RunStatus,
    heartbeat_deadline: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
) -> bool {
    match status {
        RunStatus::Queued => true,
        RunStatus::Executing | RunStatus::Waiting => heartbeat_deadline.is_some_and(|d| d > now),
        _ => false,
    }
}

/// How a worker ended an attempt (`complete` or `fail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
}

impl Outcome {
    /// Does the run's row show that `attempt` (the run's current one when
    /// None) already ended with this outcome? Then a report of it is a repeat
    /// (its answer lost to a restart, say) and answers as the first did. A
    /// failed attempt that had attempts left sent the run back to QUEUED at the
    /// same attempt number, and only a failure does that, so a later attempt
    /// number also proves an earlier attempt failed.
    pub fn already_reported(self, status: RunStatus, current_attempt: i32, attempt: Option<i32>) -> bool {
        let attempt = attempt.unwrap_or(current_attempt);
        match self {
            Outcome::Completed => status == RunStatus::Completed && current_attempt == attempt,
            Outcome::Failed => {
                attempt >= 1
                    && ((current_attempt == attempt && matches!(status, RunStatus::Failed | RunStatus::Queued))
                        || current_attempt > attempt)
            }
        }
    }
}

/// Delay before retry `attempt` (1-based, the attempt that just failed):
/// exponential from `base_ms`, capped, with up to 25% jitter so retries of many
/// runs do not land together.
pub fn retry_delay_ms(attempt: i32, base_ms: u64, max_ms: u64) -> u64 {
    use rand::Rng;
    let exp = base_ms.saturating_mul(1u64 << attempt.clamp(1, 20).saturating_sub(1) as u32).min(max_ms);
    exp + rand::thread_rng().gen_range(0..=exp / 4)
}

use serde_json::{Map, Value};

/// Why a session triggered a run (the `session_runs.reason` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum TriggerReason {
    Initial,
    Continuation,
    Upgrade,
    Manual,
}

impl TriggerReason {
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerReason::Initial => "initial",
            TriggerReason::Continuation => "continuation",
            TriggerReason::Upgrade => "upgrade",
            TriggerReason::Manual => "manual",
        }
    }
}

/// The most runs one dequeue hands out. The worker library asks for no more
/// than this (its free slots may be many more); the server refuses more.
pub const MAX_DEQUEUE_RUNS: usize = 50;

/// A run handed to a worker: what to run, and the credentials to run it with.
/// The worker library deserialises the same type (`worker::AssignedRun`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DequeuedRun {
    pub id: String,
    pub task_identifier: String,
    pub session_id: Option<String>,
    pub payload: Value,
    pub attempt_number: i32,
    pub max_attempts: i32,
    pub max_duration_secs: Option<i32>,
    /// Bearer token for this run's heartbeats, results, session channels and waits.
    pub token: String,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
}

/// The run engine's clocks: how long a run may go without a heartbeat, and
/// how failed attempts back off.
#[derive(Debug, Clone, Copy)]
pub struct RunTimings {
    pub heartbeat_timeout_ms: u64,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
}

/// How a session's runs are set up: the run engine's view of the session's
/// trigger config (which is request input, owned by `sessions::validate`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSettings {
    pub base_payload: Map<String, Value>,
    pub queue: Option<String>,
    pub machine: Option<String>,
    pub tags: Vec<String>,
    pub max_attempts: i32,
    pub max_duration_secs: Option<i32>,
    pub ttl_secs: Option<i32>,
    pub lock_to_version: Option<String>,
    pub idle_timeout_secs: Option<i64>,
}

/// What a run that replaces another needs to pick up where that one stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    /// The replaced run's friendly id.
    pub previous_run_id: String,
    /// The `.in` seq the newest finished turn answered (its turn-complete
    /// record's `session-in-event-id`): the new run reads `.in` after it, so it
    /// neither answers a message twice nor skips one. None when no turn ended.
    pub resume_after_in_seq: Option<u64>,
}

/// A run's payload: the session's `basePayload` as the client gave it (its
/// `trigger`, e.g. AgentChat's `"preload"`, included: the SDK's agents read
/// it) with the server's runtime fields added (`sessionId`,
/// `idleTimeoutInSeconds` when the session sets one, and for a run replacing
/// another `continuation: true`, `previousRunId` and `resumeAfterInSeq`), so a
/// task tells a first run from a continuation the way the SDK's agents do. Why
/// the run exists (initial, continuation, upgrade, manual) is in the audit
/// table (`session_runs.reason`).
pub fn session_payload(
    base: &Map<String, Value>,
    session_friendly_id: &str,
    idle_timeout_secs: Option<i64>,
    continuation: Option<&Continuation>,
) -> Value {
    let mut payload = base.clone();
    payload.insert("sessionId".into(), Value::String(session_friendly_id.into()));
    if let Some(idle) = idle_timeout_secs {
        payload.insert("idleTimeoutInSeconds".into(), Value::from(idle));
    }
    if let Some(c) = continuation {
        payload.insert("continuation".into(), Value::Bool(true));
        payload.insert("previousRunId".into(), Value::String(c.previous_run_id.clone()));
        if let Some(seq) = c.resume_after_in_seq {
            payload.insert("resumeAfterInSeq".into(), Value::from(seq));
        }
    }
    Value::Object(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, Utc};
    use serde_json::json;

    #[test]
    fn liveness() {
        let now = Utc::now();
        assert!(is_alive(RunStatus::Queued, None, now));
        assert!(is_alive(RunStatus::Executing, Some(now + Duration::seconds(5)), now));
        assert!(!is_alive(RunStatus::Executing, Some(now - Duration::seconds(1)), now));
        assert!(is_alive(RunStatus::Waiting, Some(now + Duration::seconds(5)), now));
        assert!(!is_alive(RunStatus::Executing, None, now));
        for s in ["COMPLETED", "FAILED", "CANCELED", "CRASHED", "EXPIRED", "TIMED_OUT"] {
            let st = RunStatus::parse(s).unwrap();
            assert!(st.is_final() && !is_alive(st, Some(now + Duration::hours(1)), now));
            assert_eq!(st.as_str(), s);
        }
    }

    #[test]
    fn a_report_repeats_only_the_same_outcome_of_the_same_attempt() {
        use RunStatus::*;
        let done = Outcome::Completed;
        assert!(done.already_reported(Completed, 2, Some(2)) && done.already_reported(Completed, 2, None));
        assert!(!done.already_reported(Completed, 3, Some(2)), "another attempt completed");
        assert!(!done.already_reported(Failed, 2, Some(2)) && !done.already_reported(Crashed, 2, None));
        let failed = Outcome::Failed;
        assert!(failed.already_reported(Queued, 1, Some(1)) && failed.already_reported(Failed, 3, None));
        assert!(failed.already_reported(Executing, 2, Some(1)), "attempt 1 failed, attempt 2 runs");
        assert!(!failed.already_reported(Completed, 2, Some(2)) && !failed.already_reported(Canceled, 1, Some(1)));
        assert!(!failed.already_reported(Queued, 0, Some(1)), "a run not yet claimed reported nothing");
        assert!(!failed.already_reported(Queued, 0, None), "nor without an attempt number");
    }

    #[test]
    fn retry_delays_grow_and_cap() {
        for (attempt, lo) in [(1, 100), (2, 200), (3, 400)] {
            let d = retry_delay_ms(attempt, 100, 10_000);
            assert!(d >= lo && d <= lo + lo / 4, "{attempt}: {d}");
        }
        assert!(retry_delay_ms(30, 100, 1_000) <= 1_250);
    }

    #[test]
    fn payload_keeps_the_base_and_adds_runtime_fields() {
        let base = json!({"chatId": "c1", "trigger": "preload"});
        let p = session_payload(base.as_object().unwrap(), "session_x", None, None);
        assert_eq!(p, json!({"chatId": "c1", "trigger": "preload", "sessionId": "session_x"}));
        let p = session_payload(base.as_object().unwrap(), "session_x", Some(30), None);
        assert_eq!(p["idleTimeoutInSeconds"], 30);
        let takeover = Continuation { previous_run_id: "run_a".into(), resume_after_in_seq: Some(4) };
        let p = session_payload(base.as_object().unwrap(), "session_x", None, Some(&takeover));
        assert_eq!(
            p,
            json!({"chatId": "c1", "trigger": "preload", "sessionId": "session_x",
                   "continuation": true, "previousRunId": "run_a", "resumeAfterInSeq": 4})
        );
        let fresh = Continuation { previous_run_id: "run_a".into(), resume_after_in_seq: None };
        let p = session_payload(base.as_object().unwrap(), "session_x", None, Some(&fresh));
        assert!(p.get("resumeAfterInSeq").is_none() && p["continuation"] == true);
    }
}
