//! Draining: what a process does between SIGTERM and its exit, so that a
//! rolling restart loses nothing. `serve` begins the drain first thing; from
//! then on `/readyz` answers 503 (the load balancer stops sending traffic),
//! SSE responses end with an `event: error` frame (the official client treats
//! a clean end as final, an error as a reason to resume with `Last-Event-ID`),
//! and long polls answer at once as if their window had passed, so that the
//! connections they hold close within the grace instead of being cut.

use tokio_util::sync::CancellationToken;

/// The process-wide drain flag; clones share it.
#[derive(Clone, Default)]
pub struct Drain(CancellationToken);

impl Drain {
    /// Starts draining (idempotent).
    pub fn begin(&self) {
        self.0.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once draining has begun (at once if it has).
    pub async fn started(&self) {
        self.0.cancelled().await
    }

    /// [`Drain::started`] as a future to keep and poll again: a long-lived
    /// waiter (an SSE response) registers once, not once per frame.
    pub fn started_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.0.clone().cancelled_owned()
    }
}
