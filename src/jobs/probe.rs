//! The `probe` job, a test seam: it fails its first `fail_first` attempts on
//! purpose, then succeeds. It checks the job pipeline (attempts, backoff, the
//! failed state) and the dashboard's retry end to end, without breaking
//! anything real (`sessiond jobs probe`). It belongs to no domain, so it
//! lives with the pipeline it probes.

use serde::{Deserialize, Serialize};

use super::runtime::Outcome;
use super::{JobKind, Payload};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub fail_first: u32,
}

impl Payload for Probe {
    fn kind(&self) -> JobKind {
        JobKind::Probe
    }
}

/// Fails attempts 1 to `fail_first`, then succeeds.
pub fn run(probe: &Probe, attempt: u32) -> Outcome {
    let fail_first = probe.fail_first;
    if attempt <= fail_first {
        anyhow::bail!("probe: failing attempt {attempt} of {fail_first} on purpose");
    }
    Ok(format!("probe: succeeded on attempt {attempt}, after {fail_first} failed on purpose"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_fails_its_first_attempts_then_succeeds() {
        let probe = Probe { fail_first: 2 };
        assert_eq!(run(&probe, 1).unwrap_err().to_string(), "probe: failing attempt 1 of 2 on purpose");
        assert_eq!(run(&probe, 2).unwrap_err().to_string(), "probe: failing attempt 2 of 2 on purpose");
        assert!(run(&probe, 3).is_ok());
        assert!(run(&Probe { fail_first: 0 }, 1).is_ok());
    }

    #[test]
    fn a_probe_is_stored_as_before() {
        let job = super::super::Job::new(&Probe { fail_first: 2 }).unwrap();
        assert_eq!(job.to_stored(), serde_json::json!({ "kind": "probe", "fail_first": 2 }));
        assert_eq!(job.kind().lane(), super::super::Lane::Engine);
    }
}
