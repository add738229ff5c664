//! Sequence floors: a channel's numbers never go backwards, even when Redis
//! loses the channel (restarted empty, flushed).
//!
//! Redis assigns a channel's sequence numbers (the append script's counter),
//! and Postgres leases it blocks of them. Postgres keeps, per channel,
//! `reserved_upto`; Redis keeps a copy of the reservation next to the counter
//! (`:r` beside `:n`) and hands out numbers only below it. When a group of
//! appends would pass it, the script writes nothing and asks for more: the
//! appender raises the row by a block ([`block_for`]) in one atomic upsert,
//! which grants it the range `[max(stored, next), new)` ([`Lease`]) and no
//! other caller any part of it, then installs the lease in Redis and retries.
//! So `reserved_upto` is always above every number Redis ever acknowledged,
//! and Postgres is written once per block, not once per append (a channel of
//! 10,000 records: 5 writes, as blocks double with the channel up to a
//! million).
//!
//! A channel Redis has lost has neither key (the per-channel marker that
//! Redis still has it is the pair). Its counter restarts at the lease the next
//! appender is granted, which starts at or above the stored floor: every new
//! number is above every number acknowledged before the loss. A reader that
//! finds the channel lost first installs the stored floor as the counter (an
//! empty lease), so a resume from before the loss sees the channel end at
//! the floor, not at 0: it gets the gap signal up to there (`sse::gap_record`)
//! instead of a 400, and then only new numbers. The numbers between the last
//! one acknowledged and the floor are never used: a resume across the loss
//! skips at most one block.
//!
//! A lease must not be installed into a newer Redis than the one it was asked
//! for: granted before a loss and installed after it, it could restart the
//! counter below numbers acknowledged in between. So a global epoch key
//! (`<p>:seq-epoch`, a random value written when missing) is read before the
//! raise and checked by the install, which refuses a lease whose epoch is gone;
//! the caller then asks again.
//!
//! What this does not catch: a Redis brought back from an older snapshot (not
//! empty, but behind), whose epoch and counters come back with it; with the
//! project's `appendfsync always` a crash leaves none behind.

use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::PgPool;

use super::ChannelKey;

/// Smallest block a raise leases; more than the biggest append group
/// (`group_commit::MAX_BATCH_RECORDS`), so one raise always lets a group through.
pub const MIN_BLOCK: u64 = 1_000;
/// Largest block: the most numbers a loss can skip on a busy channel.
pub const MAX_BLOCK: u64 = 1_000_000;

/// How many numbers to lease when the channel's next number is `next`: as
/// many again as the channel has used (Postgres writes grow with the log of
/// a channel's length), within [`MIN_BLOCK`, `MAX_BLOCK`].
pub fn block_for(next: u64) -> u64 {
    next.clamp(MIN_BLOCK, MAX_BLOCK)
}

/// Numbers `from..upto`, leased to one caller: no other lease overlaps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub from: u64,
    pub upto: u64,
}

impl Lease {
    /// The lease a raise by `block` that moved the row to `upto` granted (the
    /// row went from `max(stored, next)` to that plus `block`, in one step).
    pub fn granted(upto: u64, block: u64) -> Lease {
        Lease { from: upto.saturating_sub(block), upto }
    }

    /// The empty lease a reader installs: the counter restarts at the floor,
    /// and the first append leases a block above it.
    pub fn at(floor: u64) -> Lease {
        Lease { from: floor, upto: floor }
    }
}

/// What a raise stores: the row's value after it, as the upsert computes it.
pub fn raised(stored: Option<u64>, next: u64, block: u64) -> u64 {
    stored.unwrap_or(0).max(next) + block
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FloorError {
    #[error("postgres: {0}")]
    Db(#[source] std::sync::Arc<sqlx::Error>),
    #[error("sequence number out of range: {0}")]
    Range(u64),
}

impl From<sqlx::Error> for FloorError {
    fn from(err: sqlx::Error) -> Self {
        FloorError::Db(std::sync::Arc::new(err))
    }
}

fn to_db(n: u64) -> Result<i64, FloorError> {
    i64::try_from(n).map_err(|_| FloorError::Range(n))
}

/// The `channel_seq_floors` table.
pub struct SeqFloors {
    db: PgPool,
    writes: AtomicU64,
}

impl SeqFloors {
    pub fn new(db: PgPool) -> Self {
        SeqFloors { db, writes: AtomicU64::new(0) }
    }

    /// Leases the next block of `key`'s numbers, starting no lower than `next`
    /// (the counter Redis holds, 0 when it holds none) nor than anything leased
    /// before. Atomic against concurrent raises from any process: the upsert
    /// holds the row.
    pub async fn raise(&self, key: ChannelKey, next: u64) -> Result<Lease, FloorError> {
        let block = block_for(next);
        let upto: i64 = sqlx::query_scalar(
            "INSERT INTO channel_seq_floors (session_id, io, reserved_upto) VALUES ($1, $2, $3 + $4)
             ON CONFLICT (session_id, io) DO UPDATE
                SET reserved_upto = GREATEST(channel_seq_floors.reserved_upto, $3) + $4, updated_at = now()
             RETURNING reserved_upto",
        )
        .bind(key.session_id)
        .bind(key.io)
        .bind(to_db(next)?)
        .bind(to_db(block)?)
        .fetch_one(&self.db)
        .await?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(Lease::granted(upto.max(0) as u64, block))
    }

    /// The channel's floor: above every number it ever acknowledged (0 when
    /// it never leased any, so never acknowledged any).
    pub async fn floor(&self, key: ChannelKey) -> Result<u64, FloorError> {
        let upto: Option<i64> =
            sqlx::query_scalar("SELECT reserved_upto FROM channel_seq_floors WHERE session_id = $1 AND io = $2")
                .bind(key.session_id)
                .bind(key.io)
                .fetch_optional(&self.db)
                .await?;
        Ok(upto.unwrap_or(0).max(0) as u64)
    }

    /// Raises made since start (each one Postgres write).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_grow_with_the_channel_within_bounds() {
        assert_eq!(block_for(0), MIN_BLOCK);
        assert_eq!(block_for(999), MIN_BLOCK);
        assert_eq!(block_for(4_000), 4_000);
        assert_eq!(block_for(u64::MAX / 2), MAX_BLOCK);
        assert!(MIN_BLOCK as usize > super::super::group_commit::MAX_BATCH_RECORDS, "one raise lets any group through");
    }

    #[test]
    fn a_new_channel_leases_from_zero() {
        let upto = raised(None, 0, block_for(0));
        assert_eq!(Lease::granted(upto, block_for(0)), Lease { from: 0, upto: 1_000 });
    }

    #[test]
    fn a_raise_never_grants_below_what_was_stored_or_the_counter() {
        // The counter caught up with the reservation: the next block follows it.
        assert_eq!(Lease::granted(raised(Some(1_000), 1_000, 1_000), 1_000), Lease { from: 1_000, upto: 2_000 });
        // Redis lost the channel (counter 0): the lease starts at the floor.
        assert_eq!(Lease::granted(raised(Some(5_000), 0, 1_000), 1_000), Lease { from: 5_000, upto: 6_000 });
        // A channel from before floors existed (counter 700, no row).
        assert_eq!(Lease::granted(raised(None, 700, 1_000), 1_000), Lease { from: 700, upto: 1_700 });
    }

    #[test]
    fn ten_thousand_appends_take_a_handful_of_raises() {
        let (mut stored, mut next, mut raises) = (None, 0u64, 0);
        let mut reserved = 0;
        while next < 10_000 {
            if next >= reserved {
                let block = block_for(next);
                let upto = raised(stored, next, block);
                stored = Some(upto);
                reserved = upto;
                raises += 1;
            }
            next += 1;
        }
        assert_eq!(raises, 5, "1k, 2k, 4k, 8k, 16k");
    }

    /// A model of the Redis side (the append script and the install script)
    /// and of the Postgres row, driven through appends, raises from several
    /// processes interleaved, and losses of everything Redis holds, including
    /// a loss between a raise and its install: every acknowledged number is
    /// above every one acknowledged before it.
    #[test]
    fn numbers_never_go_backwards_across_losses_and_interleaved_raises() {
        #[derive(Default)]
        struct Redis {
            n: Option<u64>,
            r: Option<u64>,
            epoch: Option<u64>,
        }
        impl Redis {
            fn install(&mut self, epoch: u64, lease: Lease) -> bool {
                if self.epoch != Some(epoch) {
                    return false;
                }
                match (self.n, self.r) {
                    (Some(_), Some(r)) => self.r = Some(r.max(lease.upto)),
                    (n, r) => {
                        self.n = Some(lease.from.max(n.unwrap_or(0)).max(r.unwrap_or(0)));
                        self.r = Some(lease.upto.max(r.unwrap_or(0)));
                    }
                }
                true
            }
        }
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next_rand = |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        let (mut redis, mut pg, mut epochs) = (Redis::default(), None::<u64>, 0);
        // Raises in flight: (epoch read before, lease granted).
        let mut pending: Vec<(u64, Lease)> = Vec::new();
        let mut acked: Vec<u64> = Vec::new();
        for _ in 0..200_000 {
            match next_rand(100) {
                0 => redis = Redis::default(),
                1..=10 => {
                    // A process asks for a lease (reads the epoch, raises the row).
                    let epoch = *redis.epoch.get_or_insert_with(|| {
                        epochs += 1;
                        epochs
                    });
                    let next = redis.n.unwrap_or(0);
                    let block = block_for(next) / 100 + 1; // small blocks: many raises
                    let upto = raised(pg, next, block);
                    pg = Some(upto);
                    pending.push((epoch, Lease::granted(upto, block)));
                }
                11..=20 if !pending.is_empty() => {
                    let i = next_rand(pending.len() as u64) as usize;
                    let (epoch, lease) = pending.swap_remove(i);
                    redis.install(epoch, lease);
                }
                _ => {
                    if let (Some(n), Some(r)) = (redis.n, redis.r) {
                        if n < r {
                            redis.n = Some(n + 1);
                            assert!(acked.last().is_none_or(|&last| n > last), "{n} after {acked:?}");
                            assert!(n < pg.unwrap_or(0), "acknowledged {n} at or above the floor");
                            acked.push(n);
                        }
                    }
                }
            }
        }
        assert!(acked.len() > 10_000, "the model appended: {}", acked.len());
    }
}
