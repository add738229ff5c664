//! The process's wall clock: what "now" means for what this process decides
//! by itself — minting tokens (`iat`, `nbf`, `exp`) and judging a token's
//! `exp`/`nbf`, and the expiry a mint request names in Unix seconds.
//!
//! Everything that compares against a time Postgres wrote (run heartbeat
//! deadlines, session expiry in SQL, job `updated_at`, waitpoint timeouts in
//! the sweeps, operator sessions) is judged by Postgres' `now()` instead, and
//! the leases Redis keeps (replication lease, run-queue and dedupe keys) by
//! Redis TTLs: no process clock enters those, so a skewed process cannot
//! make them flap.
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

/// Shifts this process's clock by `ms` (test mode only; see the module docs).
pub fn set_test_offset_ms(ms: i64) {
    OFFSET_MS.store(ms, Ordering::Relaxed);
}

/// The shift in effect (0 outside tests).
pub fn offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}
