//! Per-environment overrides of the route-class limits, set by an operator on
//! the dashboard (see [`store`](super::store) for the table).
//!
//! The limiter never asks Postgres or Redis for them on a request: each
//! process holds every override in memory and reloads the whole (small) set
//! in the background every [`REFRESH`], and at once after a change made
//! through this process. So a change applies on the process that took it
//! before its form's answer is sent, and on every other process within
//! [`REFRESH`] (plus a query's time); until then those keep the old limit.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use super::store;
use super::{RateLimits, RouteClass, Settings};
use crate::audit::{self, Actor, AuditAction};
use crate::db::StoreError;
use crate::tenancy::store as tenancy_store;

/// How often a process reloads the overrides: how long another process's
/// change may take to apply here.
pub const REFRESH: Duration = Duration::from_secs(5);

/// The largest override a form takes: far above any default, low enough
/// that a typo's extra zeros are refused rather than switching a limit off
/// in all but name. The table's check holds the same bound.
pub const MAX_PER_SECOND: u32 = 1_000_000;

/// The overrides in force in this process.
#[derive(Default)]
pub(super) struct OverrideMap(RwLock<Loaded>);

#[derive(Default)]
struct Loaded {
    /// Which reload this map came from: a reload that began before another
    /// (and so may have read older rows) never replaces the other's map.
    started: u64,
    next: u64,
    map: Arc<HashMap<(Uuid, RouteClass), u32>>,
}

impl OverrideMap {
    /// The hot path: one read lock, and a look-up only if any override exists.
    pub(super) fn get(&self, env: Uuid, class: RouteClass) -> Option<u32> {
        let loaded = self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        if loaded.map.is_empty() {
            return None;
        }
        loaded.map.get(&(env, class)).copied()
    }

    fn begin(&self) -> u64 {
        let mut loaded = self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        loaded.next += 1;
        loaded.next
    }

    fn install(&self, started: u64, map: HashMap<(Uuid, RouteClass), u32>) {
        let mut loaded = self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if started > loaded.started {
            loaded.started = started;
            loaded.map = Arc::new(map);
        }
    }
}

/// Why an override was refused (the dashboard shows the message).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OverrideError {
    #[error("`{0}` is not a route class (create, append, subscribe, list, mint)")]
    UnknownClass(String),
    #[error("`{0}` is given twice")]
    Repeated(&'static str),
    #[error("the limit of `{class}` must be a whole number of requests per second or `default`, not `{value}`")]
    NotANumber { class: &'static str, value: String },
    #[error("the limit of `{class}` must be between 1 and {MAX_PER_SECOND} requests per second, not {value}")]
    OutOfRange { class: &'static str, value: String },
    #[error("the form names no route class")]
    Empty,
}

/// One class's new setting: a limit of its own, or the server's default.
pub type Change = (RouteClass, Option<u32>);

/// Reads a form's `class = value` fields: a positive whole number, or blank
/// or `default` for the server's default. Any bad field refuses them all.
pub fn parse_changes<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Vec<Change>, OverrideError> {
    let mut changes: Vec<Change> = Vec::new();
    for (name, value) in fields {
        let class = RouteClass::parse(name).ok_or_else(|| OverrideError::UnknownClass(name.to_string()))?;
        if changes.iter().any(|(c, _)| *c == class) {
            return Err(OverrideError::Repeated(class.as_str()));
        }
        let value = value.trim();
        let limit = if value.is_empty() || value.eq_ignore_ascii_case("default") {
            None
        } else if !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(OverrideError::NotANumber { class: class.as_str(), value: value.chars().take(40).collect() });
        } else {
            match value.parse::<u32>() {
                Ok(n @ 1..=MAX_PER_SECOND) => Some(n),
                // Digits only, so any cut is on a character boundary.
                _ => {
                    return Err(OverrideError::OutOfRange {
                        class: class.as_str(),
                        value: value[..value.len().min(20)].to_string(),
                    })
                }
            }
        };
        changes.push((class, limit));
    }
    if changes.is_empty() {
        return Err(OverrideError::Empty);
    }
    Ok(changes)
}

/// Applies `changes` to environment `env`'s limits by `by`: the changes and
/// one audit row naming each class's old and new limit commit together
/// (nothing changed, nothing audited), then this process reloads its
/// overrides (others within [`REFRESH`]). False if there is no such
/// environment.
pub async fn set_by(
    db: &PgPool,
    limits: &RateLimits,
    by: &Actor,
    env: Uuid,
    changes: Vec<Change>,
) -> Result<bool, StoreError> {
    let mut tx = crate::db::begin(db).await?;
    // Locks the environment's row: two operators' saves apply one after the
    // other, each audited against the limits the other left.
    if tenancy_store::lock_key_hint(&mut tx, env).await?.is_none() {
        return Ok(false);
    }
    let before: HashMap<RouteClass, u32> =
        store::of_environment(&mut tx, env).await?.into_iter().map(|o| (o.class, o.per_second)).collect();
    let mut detail = serde_json::Map::new();
    for (class, limit) in changes {
        let old = before.get(&class).copied();
        if old == limit {
            continue;
        }
        store::set(&mut tx, env, class, limit).await?;
        // `null`: the server's default.
        detail.insert(class.as_str().to_string(), serde_json::json!({ "from": old, "to": limit }));
    }
    if !detail.is_empty() {
        let target = format!("environment:{env}");
        audit::record(&mut *tx, by, AuditAction::EnvironmentRateLimits, &target, serde_json::Value::Object(detail))
            .await?;
    }
    tx.commit().await?;
    if let Err(err) = limits.reload_overrides(db).await {
        // Committed all the same: the background refresh applies it.
        tracing::warn!(%err, "rate-limit overrides not reloaded after a change");
    }
    Ok(true)
}

/// A class's limit as it applies to one environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    pub class: RouteClass,
    /// Requests per second; 0: no limit.
    pub per_second: u32,
    pub overridden: bool,
}

/// The limits of an environment with `overrides`, class by class.
pub fn effective(settings: &Settings, overrides: &HashMap<RouteClass, u32>) -> Vec<Effective> {
    RouteClass::ALL
        .into_iter()
        .map(|class| match overrides.get(&class) {
            Some(&n) => Effective { class, per_second: n, overridden: true },
            None => Effective { class, per_second: settings.per_env(class), overridden: false },
        })
        .collect()
}

impl RateLimits {
    /// The configured defaults (and whether limits are on at all).
    pub fn settings(&self) -> Settings {
        self.0.settings
    }

    /// Reads every override from Postgres into this process's map: called
    /// at start, by the background refresh, and after a change is committed.
    pub async fn reload_overrides(&self, db: &PgPool) -> Result<(), StoreError> {
        let started = self.0.overrides.begin();
        let rows = super::store::all(db).await?;
        let map = rows.into_iter().map(|o| ((o.environment_id, o.class), o.per_second)).collect();
        self.0.overrides.install(started, map);
        Ok(())
    }

    /// Reloads the overrides every [`REFRESH`] until this limiter is dropped
    /// (a failed reload keeps the last map: limits stay as they were).
    pub fn spawn_override_refresh(&self, db: PgPool) {
        let weak = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                if let Err(err) = RateLimits(inner).reload_overrides(&db).await {
                    tracing::warn!(%err, "rate-limit overrides not reloaded; keeping the last ones");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_takes_positive_numbers_or_default_and_nothing_else() {
        let ok = parse_changes([("create", " 5 "), ("list", ""), ("mint", "Default")]).unwrap();
        assert_eq!(ok, vec![(RouteClass::Create, Some(5)), (RouteClass::List, None), (RouteClass::Mint, None)]);
        let err = |fields: &[(&str, &str)]| parse_changes(fields.iter().copied()).unwrap_err();
        assert_eq!(err(&[("create", "0")]), OverrideError::OutOfRange { class: "create", value: "0".into() });
        assert!(matches!(err(&[("create", "-3")]), OverrideError::NotANumber { .. }));
        assert!(matches!(err(&[("create", "2.5")]), OverrideError::NotANumber { .. }));
        assert!(matches!(err(&[("append", "1000001")]), OverrideError::OutOfRange { .. }));
        assert!(matches!(err(&[("append", &"9".repeat(400))]), OverrideError::OutOfRange { .. }));
        assert_eq!(err(&[("upload", "5")]), OverrideError::UnknownClass("upload".into()));
        assert_eq!(err(&[("list", "5"), ("list", "6")]), OverrideError::Repeated("list"));
        assert_eq!(err(&[]), OverrideError::Empty);
    }

    #[test]
    fn an_older_reload_never_replaces_a_newer_one() {
        let map = OverrideMap::default();
        let env = Uuid::now_v7();
        let (first, second) = (map.begin(), map.begin());
        map.install(second, HashMap::from([((env, RouteClass::List), 3)]));
        map.install(first, HashMap::new());
        assert_eq!(map.get(env, RouteClass::List), Some(3));
        assert_eq!(map.get(env, RouteClass::Create), None);
    }
}
