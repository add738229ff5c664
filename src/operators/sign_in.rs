//! A dashboard sign-in attempt, with what keeps a flood of them from costing
//! the server or an operator their account:
//!
//! - The password is verified on the bounded [`Verifier`] (at most
//!   [`MAX_CONCURRENT_VERIFICATIONS`] at once, off the async workers).
//! - Per client address: `AUTH_FAILURES_PER_MINUTE` failed attempts a minute
//!   (10 by default); then every attempt from that address, right or wrong,
//!   is refused unverified (429 with the wait) for 1 min, doubling per
//!   repeat up to 15 min ([`Policy::per_address`]). Refusing the right
//!   password too is what makes the block hold: otherwise the answer would
//!   still tell a guesser when it guessed right.
//! - Per email: once an email has drawn [`EMAIL_FREE_FAILURES`] failures in
//!   15 minutes, from anywhere, each attempt for it waits a little before
//!   it is verified, doubling from 100 ms to at most 2 s. A slowdown, never a
//!   refusal: an attacker who knows an operator's email cannot lock them
//!   out, and the right password from an address that is not blocked still
//!   signs in (after that short wait).
//!
//! Both counts live in Redis (see [`crate::auth::throttle`]): shared by every
//! process, written on failures only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use sqlx::PgPool;

use super::{authenticate_in_turn, normalise_email, Operator, OperatorError, Verifier, MAX_CONCURRENT_VERIFICATIONS};
use crate::auth::throttle::{Policy, Throttle};
use crate::http::client::ClientAddr;

/// Failures an email may draw in [`EMAIL_WINDOW`] before its attempts slow.
pub const EMAIL_FREE_FAILURES: u64 = 5;
pub const EMAIL_WINDOW: Duration = Duration::from_secs(15 * 60);
const EMAIL_FIRST_DELAY: Duration = Duration::from_millis(100);
pub const EMAIL_MAX_DELAY: Duration = Duration::from_secs(2);
/// Past this many emails the local counts start over.
const MAX_EMAILS: usize = 10_000;

/// What an attempt came to.
#[derive(Debug)]
pub enum Outcome {
    SignedIn(Operator),
    /// Wrong email or password.
    Refused,
    /// This address spent its failures; try again after this long.
    Throttled(Duration),
}

#[derive(Clone)]
pub struct SignIn {
    db: PgPool,
    verifier: Verifier,
    by_address: Throttle,
    by_email: Throttle,
    /// Email → (recent failures, when last counted, ms): what this process
    /// last heard from Redis, to slow attempts without asking it.
    email_failures: Arc<Mutex<HashMap<String, (u64, i64)>>>,
}

impl SignIn {
    pub fn new(db: PgPool, redis: ConnectionManager, redis_prefix: &str, failures_per_minute: u32) -> SignIn {
        SignIn {
            db,
            verifier: Verifier::new(MAX_CONCURRENT_VERIFICATIONS),
            by_address: Throttle::new(
                redis.clone(),
                redis_prefix,
                "login-addr",
                Policy::per_address(failures_per_minute),
            ),
            by_email: Throttle::new(redis, redis_prefix, "login-email", Policy::count_only(EMAIL_WINDOW)),
            email_failures: Arc::default(),
        }
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Tries `email` and `password` from `client` (None: a request with no
    /// known peer, as built in-process; it is not throttled by address).
    pub async fn attempt(
        &self,
        client: Option<ClientAddr>,
        email: &str,
        password: &str,
    ) -> Result<Outcome, OperatorError> {
        let address = client.map(|c| c.to_string());
        if let Some(wait) = address.as_deref().and_then(|a| self.by_address.blocked(a)) {
            return Ok(Outcome::Throttled(wait));
        }
        let email_key = normalise_email(email).unwrap_or_else(|| email.trim().to_lowercase());
        if let Some(delay) = self.email_delay(&email_key) {
            tokio::time::sleep(delay).await;
        }
        // Asked again once the turn comes: attempts queued behind a flood
        // from this address are refused, not verified, once it is blocked.
        let turn = self.verifier.turn().await?;
        if let Some(wait) = address.as_deref().and_then(|a| self.by_address.blocked(a)) {
            return Ok(Outcome::Throttled(wait));
        }
        if let Some(operator) = authenticate_in_turn(&self.db, turn, email, password).await? {
            return Ok(Outcome::SignedIn(operator));
        }
        let by_address = async {
            match &address {
                Some(a) => self.by_address.fail(a).await.blocked_for,
                None => None,
            }
        };
        let (blocked, by_email) = tokio::join!(by_address, self.by_email.fail(&email_key));
        self.note_email(email_key, by_email.count);
        if let Some(wait) = blocked {
            tracing::warn!(client = ?address, block_secs = wait.as_secs(), "failed sign-ins: address blocked");
        }
        Ok(Outcome::Refused)
    }

    /// How long an attempt for this email waits first, if it is under attack.
    fn email_delay(&self, email: &str) -> Option<Duration> {
        let now = crate::clock::now().timestamp_millis();
        let failures = self.email_failures.lock().unwrap_or_else(|e| e.into_inner());
        let &(count, at) = failures.get(email)?;
        if now - at > EMAIL_WINDOW.as_millis() as i64 || count < EMAIL_FREE_FAILURES {
            return None;
        }
        let doublings = (count - EMAIL_FREE_FAILURES).min(16) as u32;
        Some((EMAIL_FIRST_DELAY * 2u32.pow(doublings)).min(EMAIL_MAX_DELAY))
    }

    fn note_email(&self, email: String, count: u64) {
        let now = crate::clock::now().timestamp_millis();
        let mut failures = self.email_failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_EMAILS {
            failures.clear();
        }
        failures.insert(email, (count, now));
    }
}
