//! What a job is, as the ledger names it (`jobs.kind`), and which queue
//! carries it. The kinds are a closed list here; what each does belongs to
//! the domain that runs it (see `app::job_dispatch`).

use std::fmt;
use std::str::FromStr;

/// A kind of job. `jobs.kind` holds [`JobKind::as_str`]; rows are read back
/// with [`FromStr`], and a kind this build does not know (a newer server's)
/// fails its attempt rather than the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    TriggerRun,
    CancelRun,
    /// After a run replaced another: fence the channels to the new run.
    RunHandoff,
    RunSweep,
    SessionExpirySweep,
    /// Waitpoints drained from a channel's pending set by an append.
    WaitpointDrain,
    /// After a session closes (or expires): wake, refuse writes, expire.
    CloseChannels,
    WaitpointTimeoutSweep,
    /// Boots a run for `.in` records no run is known to read.
    InputBootSweep,
    /// One chunk of a ClickHouse backfill.
    Backfill,
    /// One replication batch into ClickHouse.
    ReplicationFlush,
    /// Compares ClickHouse with Postgres and repairs what differs.
    ReplicationReconcile,
    /// A test seam: fails its first attempts on purpose (see [`super::probe`];
    /// `test-faults` builds only).
    #[cfg(feature = "test-faults")]
    Probe,
}

impl JobKind {
    /// Every kind, in the order the dashboard's kind filter offers them.
    pub const ALL: &[JobKind] = &[
        JobKind::TriggerRun,
        JobKind::CancelRun,
        JobKind::RunHandoff,
        JobKind::RunSweep,
        JobKind::SessionExpirySweep,
        JobKind::WaitpointDrain,
        JobKind::CloseChannels,
        JobKind::WaitpointTimeoutSweep,
        JobKind::InputBootSweep,
        JobKind::Backfill,
        JobKind::ReplicationFlush,
        JobKind::ReplicationReconcile,
        #[cfg(feature = "test-faults")]
        JobKind::Probe,
    ];

    /// The name stored in `jobs.kind` (and in the payload's `kind` field).
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::TriggerRun => "trigger-run",
            JobKind::CancelRun => "cancel-run",
            JobKind::RunHandoff => "run-handoff",
            JobKind::RunSweep => "run-sweep",
            JobKind::SessionExpirySweep => "session-expiry-sweep",
            JobKind::WaitpointDrain => "waitpoint-drain",
            JobKind::CloseChannels => "close-channels",
            JobKind::WaitpointTimeoutSweep => "waitpoint-timeout-sweep",
            JobKind::InputBootSweep => "input-boot-sweep",
            JobKind::Backfill => "backfill",
            JobKind::ReplicationFlush => "replication-flush",
            JobKind::ReplicationReconcile => "replication-reconcile",
            #[cfg(feature = "test-faults")]
            JobKind::Probe => "probe",
        }
    }

    /// The queue that carries jobs of this kind.
    pub fn lane(self) -> Lane {
        match self {
            JobKind::Backfill | JobKind::ReplicationFlush | JobKind::ReplicationReconcile => Lane::Analytics,
            _ => Lane::Engine,
        }
    }

    /// Whether a cron schedule may enqueue it: a sweep, which takes no
    /// arguments (a schedule's name is its kind).
    pub fn scheduled(self) -> bool {
        matches!(
            self,
            JobKind::RunSweep
                | JobKind::SessionExpirySweep
                | JobKind::WaitpointTimeoutSweep
                | JobKind::InputBootSweep
                | JobKind::ReplicationReconcile
        )
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Written down (in audit details) by its stored name.
impl serde::Serialize for JobKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A `jobs.kind` this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job kind {0:?}")]
pub struct UnknownKind(pub String);

impl FromStr for JobKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobKind::ALL.iter().copied().find(|k| k.as_str() == s).ok_or_else(|| UnknownKind(s.to_string()))
    }
}

/// Which queue (and worker) carries a job. Copies into ClickHouse have a
/// lane of their own: at 500 creates/s the run engine's lane takes 500
/// trigger-run jobs a second, and a replication flush queued behind them
/// waited seconds (measured: 7.5 s on average) before it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Engine,
    Analytics,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Engine, Lane::Analytics];

    /// The lane of a kind read back from the ledger. A kind this build does
    /// not know goes to the engine's lane, where its attempt is logged and
    /// failed (as any job whose kind is unknown).
    pub fn of_stored(kind: &str) -> Lane {
        kind.parse::<JobKind>().map_or(Lane::Engine, JobKind::lane)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_name() {
        for &kind in JobKind::ALL {
            assert_eq!(kind.as_str().parse::<JobKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
        let mut names: Vec<&str> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), JobKind::ALL.len(), "every kind has a name of its own");
    }

    #[test]
    fn an_unknown_kind_is_an_error_on_the_engine_lane() {
        assert_eq!("nope".parse::<JobKind>(), Err(UnknownKind("nope".into())));
        assert_eq!(Lane::of_stored("nope"), Lane::Engine);
    }

    #[test]
    fn copies_into_clickhouse_have_their_own_lane() {
        let analytics: Vec<JobKind> = JobKind::ALL.iter().copied().filter(|k| k.lane() == Lane::Analytics).collect();
        assert_eq!(analytics, [JobKind::Backfill, JobKind::ReplicationFlush, JobKind::ReplicationReconcile]);
        assert_eq!(Lane::of_stored("backfill"), Lane::Analytics);
        #[cfg(feature = "test-faults")]
        assert_eq!(JobKind::Probe.lane(), Lane::Engine);
    }

    #[test]
    fn only_sweeps_are_scheduled() {
        let scheduled: Vec<&str> =
            JobKind::ALL.iter().copied().filter(|k| k.scheduled()).map(JobKind::as_str).collect();
        assert_eq!(
            scheduled,
            [
                "run-sweep",
                "session-expiry-sweep",
                "waitpoint-timeout-sweep",
                "input-boot-sweep",
                "replication-reconcile"
            ]
        );
    }
}
