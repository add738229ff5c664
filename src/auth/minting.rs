//! Who may mint which public token (`POST /api/v1/auth/public-tokens`, the
//! official client's `createPublicToken`).
//!
//! - A secret key may mint any well-formed scopes: it could sign the same
//!   token itself.
//! - A run's token (the one a worker gets with a run) may mint only `read` and
//!   `write` on its own session, for at most an hour: what an agent needs to
//!   hand the browser a fresh token at the end of a turn, and nothing its run
//!   could not already do.
//! - Any other public token mints nothing: a browser's session token must not
//!   outlive itself by minting a successor.
//! - A run's token mints only while its run still serves the session (its
//!   current run, alive), and what it mints names the run (`mintedBy`), so
//!   the run's hand-off fences the minted token's `.out` writes too.

use chrono::{DateTime, Utc};

use serde::{Deserialize, Deserializer};

use super::scopes;
use super::Principal;
use crate::runs::store::Run;
use crate::runs::RunStatus;
use crate::validation::{parse_duration_secs, ValidationError};

/// How long a minted token lives when the request names no expiration (the
/// SDK documents the same default).
pub const DEFAULT_TTL_SECS: i64 = 15 * 60;
/// The longest a run's token may make a token live.
pub const RUN_MAX_TTL_SECS: i64 = 3600;
/// The longest any minted token may live (a secret key included): a bound on
/// the arithmetic, not a policy.
pub const MAX_TTL_SECS: i64 = 366 * 24 * 3600;
/// Scopes in one request.
const MAX_SCOPES: usize = 32;

/// A request's `expirationTime`: Unix seconds, or a duration from now ("1h").
#[derive(Debug, Clone, PartialEq)]
pub enum Expiration {
    At(i64),
    In(String),
}

const EXPIRATION_FORMS: &str = "must be Unix seconds or a duration such as \"15m\" or \"1h\"";

impl<'de> Deserialize<'de> for Expiration {
    /// By hand rather than `untagged`, whose refusal names the Rust type.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => {
                n.as_i64().map(Expiration::At).ok_or_else(|| D::Error::custom(EXPIRATION_FORMS))
            }
            serde_json::Value::String(text) => Ok(Expiration::In(text)),
            _ => Err(D::Error::custom(EXPIRATION_FORMS)),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MintError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The caller's credential may not mint this (or any) token.
    #[error("{0}")]
    NotAllowed(String),
    /// The minting run no longer serves its session: another run (named)
    /// replaced it.
    #[error("Run was superseded by {0}: another run now serves its session and only it may mint tokens")]
    Superseded(String),
    /// The minting run ended (or is gone): nothing serves the session as it.
    #[error("Run is {}: only a live run may mint tokens", .0.map_or("gone", |s| s.as_str()))]
    RunNotLive(Option<RunStatus>),
}

/// What a granted request mints: its scopes and how long it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub scopes: Vec<String>,
    pub ttl_secs: i64,
}

fn invalid(field: &str, message: impl Into<String>) -> MintError {
    MintError::Invalid(ValidationError::new(field, message))
}

/// The seconds from `now` until `expiration`, checked to lie in the future
/// and within [`MAX_TTL_SECS`].
fn ttl_secs(expiration: Option<&Expiration>, now: DateTime<Utc>) -> Result<i64, MintError> {
    let secs = match expiration {
        None => DEFAULT_TTL_SECS,
        Some(Expiration::At(at)) => at.saturating_sub(now.timestamp()),
        Some(Expiration::In(text)) => parse_duration_secs(text)
            .ok_or_else(|| invalid("expirationTime", "must be Unix seconds or a duration such as \"15m\" or \"1h\""))?,
    };
    if secs <= 0 {
        return Err(invalid("expirationTime", "must be in the future"));
    }
    if secs > MAX_TTL_SECS {
        return Err(invalid("expirationTime", "may be at most a year away"));
    }
    Ok(secs)
}

/// A scope this server understands: `admin`, `read:all`, `write:all`, or
/// `read|write|admin:{resource}[:{id}]`.
fn well_formed(scope: &str) -> bool {
    let mut parts = scope.splitn(3, ':');
    let (action, resource, id) = (parts.next().unwrap_or(""), parts.next(), parts.next());
    let action_ok = matches!(action, "read" | "write" | "admin");
    match (resource, id) {
        (None, _) => action == "admin",
        (Some(r), id) => {
            action_ok
                && !r.is_empty()
                && r.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
                && id.is_none_or(|i| !i.is_empty() && i.len() <= 256 && !i.chars().any(char::is_control))
        }
    }
}

/// Decides what `principal` may mint of `requested`, expiring at `expiration`.
pub fn grant(
    principal: &Principal,
    requested: &[String],
    expiration: Option<&Expiration>,
    now: DateTime<Utc>,
) -> Result<Grant, MintError> {
    if requested.is_empty() {
        return Err(invalid("scopes", "must name at least one scope"));
    }
    if requested.len() > MAX_SCOPES {
        return Err(invalid("scopes", format!("may hold at most {MAX_SCOPES} scopes")));
    }
    if let Some(bad) = requested.iter().find(|s| !well_formed(s)) {
        return Err(invalid("scopes", format!("{bad:?} is not a scope (action:resource[:id])")));
    }
    let ttl_secs = ttl_secs(expiration, now)?;
    let held = match principal {
        Principal::SecretKey => return Ok(Grant { scopes: requested.to_vec(), ttl_secs }),
        Principal::PublicToken { scopes, .. } => scopes,
    };
    if scopes::acting_run(held).is_none() {
        return Err(MintError::NotAllowed("Only a secret key or a run's token may mint public tokens".into()));
    }
    for scope in requested {
        // Exactly a session scope the run's own token holds: never a super
        // scope, a run scope or another session.
        let own_session = (scope.starts_with("read:sessions:") || scope.starts_with("write:sessions:"))
            && held.iter().any(|h| h == scope);
        if !own_session {
            return Err(MintError::NotAllowed(format!(
                "A run's token may mint only read and write on its own session, not {scope:?}"
            )));
        }
    }
    if ttl_secs > RUN_MAX_TTL_SECS {
        return Err(invalid("expirationTime", "may be at most 1 hour away for a token minted by a run"));
    }
    Ok(Grant { scopes: requested.to_vec(), ttl_secs })
}

/// May `run` (the run a token acts as; `None` if no such run exists) still
/// mint, given its session's current run? Only the current run, alive by
/// Postgres' clock: a superseded run is fenced off its session's channels,
/// and a token it minted would carry no fence.
pub fn run_may_mint(run: Option<&Run>, current_run: Option<&str>) -> Result<(), MintError> {
    let run = run.ok_or(MintError::RunNotLive(None))?;
    if let Some(by) = &run.superseded_by {
        return Err(MintError::Superseded(by.clone()));
    }
    if !run.alive() {
        return Err(MintError::RunNotLive(Some(run.status)));
    }
    match current_run {
        Some(current) if current == run.friendly_id => Ok(()),
        other => Err(MintError::Superseded(other.unwrap_or("another run").to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    fn run_token() -> Principal {
        Principal::PublicToken {
            scopes: v(&["read:runs:run_1", "write:runs:run_1", "read:sessions:session_a", "write:sessions:session_a"]),
            minted_by: None,
        }
    }

    #[test]
    fn a_secret_key_mints_what_it_asks_for() {
        let now = Utc::now();
        let g = grant(&Principal::SecretKey, &v(&["read:sessions", "admin"]), None, now).unwrap();
        assert_eq!(g, Grant { scopes: v(&["read:sessions", "admin"]), ttl_secs: DEFAULT_TTL_SECS });
        let at = Expiration::At(now.timestamp() + 7200);
        assert_eq!(grant(&Principal::SecretKey, &v(&["read:all"]), Some(&at), now).unwrap().ttl_secs, 7200);
        let two_days = Expiration::In("2d".into());
        assert_eq!(grant(&Principal::SecretKey, &v(&["read:all"]), Some(&two_days), now).unwrap().ttl_secs, 172_800);
    }

    #[test]
    fn a_run_mints_only_its_own_session_for_an_hour_at_most() {
        let now = Utc::now();
        let hour = Expiration::In("1h".into());
        let g = grant(&run_token(), &v(&["read:sessions:session_a", "write:sessions:session_a"]), Some(&hour), now);
        assert_eq!(g.unwrap().ttl_secs, 3600);
        for scopes in [
            v(&["read:sessions:session_b"]),
            v(&["read:sessions"]),
            v(&["read:all"]),
            v(&["admin"]),
            v(&["admin:sessions:session_a"]),
            v(&["write:runs:run_1"]),
            v(&["read:sessions:session_a", "read:sessions:session_b"]),
        ] {
            assert!(matches!(grant(&run_token(), &scopes, None, now), Err(MintError::NotAllowed(_))), "{scopes:?}");
        }
        let long = Expiration::In("2h".into());
        assert!(matches!(
            grant(&run_token(), &v(&["read:sessions:session_a"]), Some(&long), now),
            Err(MintError::Invalid(e)) if e.field == "expirationTime"
        ));
    }

    #[test]
    fn other_tokens_mint_nothing() {
        let scopes = v(&["read:sessions:session_a", "write:sessions:session_a"]);
        let browser = Principal::PublicToken { scopes, minted_by: Some("run_1".into()) };
        let got = grant(&browser, &v(&["read:sessions:session_a"]), None, Utc::now());
        assert!(matches!(got, Err(MintError::NotAllowed(_))));
    }

    #[test]
    fn bad_requests_are_refused_with_their_field() {
        let now = Utc::now();
        let field = |r: Result<Grant, MintError>| match r {
            Err(MintError::Invalid(e)) => e.field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(grant(&Principal::SecretKey, &[], None, now)), "scopes");
        for bad in ["", "read", "read:", "delete:sessions", "read:Sessions", "read:sessions:", "read:sessions:a\nb"] {
            assert_eq!(field(grant(&Principal::SecretKey, &v(&[bad]), None, now)), "scopes", "{bad:?}");
        }
        let many: Vec<String> = (0..33).map(|i| format!("read:sessions:s{i}")).collect();
        assert_eq!(field(grant(&Principal::SecretKey, &many, None, now)), "scopes");
        for exp in [
            Expiration::In("soon".into()),
            Expiration::At(now.timestamp() - 1),
            Expiration::At(i64::MAX),
            Expiration::At(i64::MIN),
            Expiration::In("400d".into()),
        ] {
            assert_eq!(field(grant(&Principal::SecretKey, &v(&["read:all"]), Some(&exp), now)), "expirationTime");
        }
    }
}
