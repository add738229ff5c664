//! Cron schedules, read from `jobs/schedules.toml` (compiled in as the default).

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::Deserialize;

use super::{Job, JobKind};

pub const DEFAULT_SCHEDULES: &str = include_str!("../../jobs/schedules.toml");

#[derive(Debug, Deserialize)]
struct Entry {
    cron: String,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    pub cron: cron::Schedule,
    /// The sweep it enqueues: the kind its name names.
    pub kind: JobKind,
    /// The `#` lines inside the schedule's table, for the dashboard.
    pub comment: String,
}

/// Parses schedules; every name must be a known sweep and every expression valid.
pub fn parse(text: &str) -> anyhow::Result<Vec<Schedule>> {
    let entries: BTreeMap<String, Entry> = toml::from_str(text)?;
    let mut comments = comments(text);
    entries
        .into_iter()
        .map(|(name, e)| {
            let kind = name
                .parse::<JobKind>()
                .ok()
                .filter(|k| k.scheduled())
                .ok_or_else(|| anyhow::anyhow!("unknown schedule {name:?}"))?;
            let cron = cron::Schedule::from_str(&e.cron)
                .map_err(|err| anyhow::anyhow!("schedule {name:?}: bad cron {:?}: {err}", e.cron))?;
            let comment = comments.remove(&name).unwrap_or_default();
            Ok(Schedule { name, cron, kind, comment })
        })
        .collect()
}

/// The comment lines of each `[name]` table, joined. TOML parsers drop
/// comments; a line scan is enough for this file's flat format.
fn comments(text: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut table: Option<&str> = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = Some(name.trim());
        } else if let (Some(name), Some(c)) = (table, line.strip_prefix('#')) {
            let entry = out.entry(name.to_string()).or_default();
            if !entry.is_empty() {
                entry.push(' ');
            }
            entry.push_str(c.trim());
        }
    }
    out
}

impl Schedule {
    /// What one tick enqueues.
    pub fn job(&self) -> Job {
        Job::sweep(self.kind)
    }
}

/// The schedules in `path`, or the built-in defaults.
pub fn load(path: Option<&str>) -> anyhow::Result<Vec<Schedule>> {
    match path {
        Some(p) => parse(&std::fs::read_to_string(p)?),
        None => parse(DEFAULT_SCHEDULES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_schedules_parse() {
        let s = parse(DEFAULT_SCHEDULES).unwrap();
        let names: Vec<_> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "input-boot-sweep",
                "replication-reconcile",
                "run-sweep",
                "session-expiry-sweep",
                "waitpoint-timeout-sweep"
            ]
        );
    }

    #[test]
    fn comments_belong_to_their_table() {
        let s = parse(
            "# file\n[run-sweep]\n# one\n# two\ncron = \"* * * * * *\"\n[input-boot-sweep]\ncron = \"* * * * * *\"",
        )
        .unwrap();
        assert_eq!(s[0].name, "input-boot-sweep");
        assert_eq!(s[0].comment, "");
        assert_eq!(s[1].comment, "one two");
        assert_eq!(s[1].kind, JobKind::RunSweep);
    }

    #[test]
    fn bad_schedules_are_refused() {
        assert!(parse("[nope]\ncron = \"* * * * * *\"").is_err());
        // A kind, but not a sweep: it needs arguments no schedule has.
        assert!(parse("[trigger-run]\ncron = \"* * * * * *\"").is_err());
        assert!(parse("[run-sweep]\ncron = \"every minute\"").is_err());
    }
}
