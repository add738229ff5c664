//! Dashboard operators: accounts with a role, passwords hashed with argon2id,
//! signed-in browser sessions, and the audit log of their actions.
//!
//! - [`store`]: SQL for `operators` and `operator_sessions`.
//! - [`audit`]: SQL for `audit_log`, written inside the action's transaction.

pub mod audit;
pub mod store;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
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

/// The operator these credentials belong to, or None. A wrong email costs a
/// hash verification too, so timing does not tell which accounts exist.
pub async fn authenticate(pool: &PgPool, email: &str, password: &str) -> Result<Option<Operator>, OperatorError> {
    let found = match normalise_email(email) {
        Some(email) => store::find_with_hash(pool, &email).await?,
        None => None,
    };
    let hash = found.as_ref().map(|(_, h)| h.as_str()).unwrap_or(DUMMY_HASH);
    let ok = verify_password(password, hash);
    Ok(found.filter(|_| ok).map(|(op, _)| op))
}

fn normalise_email(email: &str) -> Option<String> {
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
