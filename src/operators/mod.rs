//! Dashboard operators: accounts with a role, passwords hashed with argon2id,
//! signed-in browser sessions (their actions are in [`crate::audit`]).
//!
//! - [`store`]: SQL for `operators` and `operator_sessions`.
//! - [`sign_in`]: a sign-in attempt, throttled per client address and slowed
//!   per email.
//!
//! Password verification is argon2id, tens of milliseconds of CPU by design;
//! it runs on the blocking pool behind [`Verifier`]'s permits, never on the
//! async workers that serve every other request.

pub mod sign_in;
pub mod store;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::db::StoreError;

/// What an operator may do (`operators.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, clap::ValueEnum)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum Role {
    /// Sees everything and acts (retry, trigger, close, cancel).
    Admin,
    /// Sees everything, acts on nothing.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }

    pub fn can_act(self) -> bool {
        self == Role::Admin
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Operator {
    pub id: Uuid,
    pub email: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("{0}")]
    Invalid(&'static str),
    #[error("an operator with this email exists")]
    Exists,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Shortest password accepted for an operator account.
pub const MIN_PASSWORD_LEN: usize = 12;

/// Creates an operator. The email is kept lowercase, so sign-in ignores case.
pub async fn create(pool: &PgPool, email: &str, password: &str, role: Role) -> Result<Operator, OperatorError> {
    let email = normalise_email(email).ok_or(OperatorError::Invalid("email must look like name@host"))?;
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(OperatorError::Invalid("password must be at least 12 characters"));
    }
    let hash = hash_password(password)?;
    match store::insert(pool, &email, &hash, role).await {
        Err(StoreError::UniqueViolation(_)) => Err(OperatorError::Exists),
        other => Ok(other?),
    }
}

/// The operator these credentials belong to, or None, verified on a
/// verifier of its own (for tools; a server shares one, see [`sign_in`]).
pub async fn authenticate(pool: &PgPool, email: &str, password: &str) -> Result<Option<Operator>, OperatorError> {
    authenticate_with(pool, &Verifier::new(MAX_CONCURRENT_VERIFICATIONS), email, password).await
}

/// The operator these credentials belong to, or None. A wrong email costs a
/// hash verification too, so timing does not tell which accounts exist.
pub async fn authenticate_with(
    pool: &PgPool,
    verifier: &Verifier,
    email: &str,
    password: &str,
) -> Result<Option<Operator>, OperatorError> {
    authenticate_in_turn(pool, verifier.turn().await?, email, password).await
}

/// [`authenticate_with`] once the caller holds a verifier's turn.
pub async fn authenticate_in_turn(
    pool: &PgPool,
    turn: Turn,
    email: &str,
    password: &str,
) -> Result<Option<Operator>, OperatorError> {
    let found = match normalise_email(email) {
        Some(email) => store::find_with_hash(pool, &email).await?,
        None => None,
    };
    let hash = found.as_ref().map(|(_, h)| h.clone()).unwrap_or_else(|| DUMMY_HASH.to_string());
    let ok = turn.verify(password.to_string(), hash).await?;
    Ok(found.filter(|_| ok).map(|(op, _)| op))
}

/// Password verifications one server runs at once. Each takes a core for
/// tens of milliseconds; two leave the other cores (and the async workers)
/// to everyone else, however many sign-ins arrive.
pub const MAX_CONCURRENT_VERIFICATIONS: usize = 2;

/// Runs argon2 verifications on tokio's blocking pool, at most `permits` at
/// once; the rest wait their turn without holding a thread.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<VerifierInner>,
}

struct VerifierInner {
    permits: Arc<Semaphore>,
    running: AtomicUsize,
    waiting: AtomicUsize,
    peak_running: AtomicUsize,
    done: AtomicU64,
}

/// What a [`Verifier`] is doing, for tests and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifierGauges {
    /// Verifications on a blocking thread now.
    pub running: usize,
    /// Verifications waiting for a permit.
    pub waiting: usize,
    /// The most that ever ran at once.
    pub peak_running: usize,
    /// Verifications finished.
    pub done: u64,
}

/// Counts one waiter while alive (so a request dropped while it waits
/// leaves the count right).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::AcqRel);
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Verifier {
    pub fn new(permits: usize) -> Verifier {
        Verifier {
            inner: Arc::new(VerifierInner {
                permits: Arc::new(Semaphore::new(permits.max(1))),
                running: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                peak_running: AtomicUsize::new(0),
                done: AtomicU64::new(0),
            }),
        }
    }

    pub fn gauges(&self) -> VerifierGauges {
        let i = &self.inner;
        VerifierGauges {
            running: i.running.load(Ordering::Acquire),
            waiting: i.waiting.load(Ordering::Acquire),
            peak_running: i.peak_running.load(Ordering::Acquire),
            done: i.done.load(Ordering::Acquire),
        }
    }

    /// Waits for a turn to verify (counted as waiting meanwhile).
    pub async fn turn(&self) -> Result<Turn, OperatorError> {
        let _waiting = Waiting::new(&self.inner.waiting);
        let permit =
            self.inner.permits.clone().acquire_owned().await.map_err(|e| OperatorError::Hash(e.to_string()))?;
        Ok(Turn { permit, inner: self.inner.clone() })
    }

    /// Does `password` match `hash`? Waits for a turn, then verifies.
    pub async fn verify(&self, password: String, hash: String) -> Result<bool, OperatorError> {
        self.turn().await?.verify(password, hash).await
    }
}

/// A verifier's permit: one verification may run.
pub struct Turn {
    permit: tokio::sync::OwnedSemaphorePermit,
    inner: Arc<VerifierInner>,
}

impl Turn {
    /// Verifies on the blocking pool. The permit travels with the blocking
    /// task, so a verification whose request went away still holds its
    /// place until it has finished.
    pub async fn verify(self, password: String, hash: String) -> Result<bool, OperatorError> {
        let Turn { permit, inner } = self;
        let now_running = inner.running.fetch_add(1, Ordering::AcqRel) + 1;
        inner.peak_running.fetch_max(now_running, Ordering::AcqRel);
        tokio::task::spawn_blocking(move || {
            let ok = verify_password(&password, &hash);
            inner.running.fetch_sub(1, Ordering::AcqRel);
            inner.done.fetch_add(1, Ordering::AcqRel);
            drop(permit);
            ok
        })
        .await
        .map_err(|e| OperatorError::Hash(e.to_string()))
    }
}

pub(crate) fn normalise_email(email: &str) -> Option<String> {
    let email = email.trim().to_lowercase();
    let (name, host) = email.split_once('@')?;
    (!name.is_empty() && !host.is_empty() && email.len() <= 320 && !email.contains(char::is_whitespace))
        .then_some(email)
}

fn hash_password(password: &str) -> Result<String, OperatorError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| OperatorError::Hash(e.to_string()))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// An argon2id hash of a random password nobody knows, verified against when
/// the email is unknown.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2Vzc2lvbmRkdW1teXNhbHQ$3JtJ8pOYm1FQmcmhp5cL4XDfSCL1BuOHVoDhEv2ZP6M";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_differ_per_salt() {
        let a = hash_password("correct horse battery").unwrap();
        let b = hash_password("correct horse battery").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &a));
        assert!(!verify_password("wrong horse battery", &a));
        assert!(!verify_password("anything", "not a hash"));
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    #[test]
    fn emails_are_trimmed_and_lowercased() {
        assert_eq!(normalise_email("  Ops@Example.COM ").as_deref(), Some("ops@example.com"));
        assert_eq!(normalise_email("nope"), None);
        assert_eq!(normalise_email("@host"), None);
        assert_eq!(normalise_email("a b@host"), None);
    }
}
