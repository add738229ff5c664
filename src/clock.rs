//! The process's wall clock: every wall-clock read of the server goes
//! through [`now`], so a test can play a host whose clock is off. What this
//! process decides by itself uses it — minting tokens (`iat`, `nbf`, `exp`)
//! and judging a token's `exp`/`nbf`, the expiry a mint request names in Unix
//! seconds, timestamps it only shows or logs.
//!
//! Time decisions about rows Postgres stores never use it: run heartbeat
//! deadlines, session expiry (in SQL, or against the row's `read_at`, the
//! Postgres time it was read at), waitpoint timeouts and idempotency-key
//! expiries (relative ones turned into timestamps by `now()` at insert),
//! job `updated_at`, operator sessions — all by Postgres' `now()`; the leases
//! Redis keeps (replication lease, run-queue and dedupe keys) by Redis TTLs.
//! So a skewed process cannot make them flap, fire early or late.
//!
//! Tests shift this clock to play a process on a host whose clock is off
//! (see [`crate::config::Config::test_clock_offset_ms`]); it is a
//! process-wide setting made once at `serve` start-up, never by the in-process
//! test servers, which share one process.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Duration, Utc};

static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Now, by this process's clock.
pub fn now() -> DateTime<Utc> {
    match OFFSET_MS.load(Ordering::Relaxed) {
        0 => Utc::now(),
        ms => Utc::now() + Duration::milliseconds(ms),
    }
}

/// Shifts this process's clock by `ms` (test mode only, in `test-faults`
/// builds; see the module docs).
#[cfg(feature = "test-faults")]
pub fn set_test_offset_ms(ms: i64) {
    OFFSET_MS.store(ms, Ordering::Relaxed);
}

/// The shift in effect (0 outside tests).
pub fn offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}
