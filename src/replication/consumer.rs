//! The replication consumer: while it holds the lease, it streams the slot,
//! decodes each transaction into ClickHouse rows, and hands complete
//! transactions to durable `replication-flush` jobs in batches (at
//! `REPLICATION_BATCH_ROWS` rows or `REPLICATION_BATCH_MS` after a batch's
//! first row). The slot's confirmed position follows the flushed batches, so
//! a crash anywhere replays from the first batch not yet in ClickHouse.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::sync::watch;

use super::decode::{Decoder, Event};
use super::flush::{self, Batch};
use super::lease::{Lease, Waiter};
use super::pgoutput::{self, Begin, Commit, Message};
use super::slot;
use crate::analytics::backfill::{self, BackfillRequest, DEFAULT_CHUNK_SIZE};
use crate::analytics::ClickHouse;
use crate::config::Config;
use crate::jobs::Jobs;

/// Everything the consumer uses.
#[derive(Clone)]
pub struct Replicator {
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub jobs: Jobs,
    pub analytics: ClickHouse,
    pub database_url: String,
    pub schema: String,
    pub slot: String,
    pub redis_prefix: String,
    pub batch_rows: usize,
    pub batch_age: Duration,
    pub lease_ttl: Duration,
    /// Rows read from the slot into the open batch, not yet handed to a
    /// flush: what a crash right now would leave to the slot's replay. A
    /// test kills the consumer once this shows rows, rather than guessing
    /// when the stream has read them.
    open_rows: std::sync::Arc<watch::Sender<usize>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication stream: {0}")]
    Stream(#[from] pgwire_replication::PgWireError),
    #[error("replication slot {0}; recreating it")]
    SlotLost(String),
    #[error("pgoutput: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("decoding a change: {0}")]
    Change(#[from] super::decode::ChangeError),
    #[error(transparent)]
    Flush(#[from] flush::FlushError),
    #[error(transparent)]
    Analytics(#[from] crate::analytics::AnalyticsError),
    #[error(transparent)]
    Store(#[from] crate::db::StoreError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("replication: {0}")]
    Helper(String),
    #[error("DATABASE_URL cannot be used for replication: {0}")]
    Url(String),
}

impl Replicator {
    pub fn new(config: &Config, db: PgPool, redis: ConnectionManager, jobs: Jobs, analytics: ClickHouse) -> Self {
        Replicator {
            db,
            redis,
            jobs,
            analytics,
            database_url: config.database_url.clone(),
            schema: config.database_schema.clone().unwrap_or_else(|| "public".into()),
            slot: config.replication_slot_name(),
            redis_prefix: config.redis_prefix.clone(),
            batch_rows: config.replication_batch_rows.max(1),
            batch_age: Duration::from_millis(config.replication_batch_ms),
            lease_ttl: Duration::from_millis(config.replication_lease_ms.max(300)),
            open_rows: std::sync::Arc::new(watch::channel(0).0),
        }
    }

    /// Follows how many rows the open batch holds (see `open_rows`).
    pub fn open_rows(&self) -> watch::Receiver<usize> {
        self.open_rows.subscribe()
    }

    /// Runs until `shutdown`: waits for the lease, consumes while holding it,
    /// and starts over after any failure.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(200);
        let mut waiter =
            Waiter::new(self.db.clone(), self.redis.clone(), &self.redis_prefix, &self.slot, self.lease_ttl);
        // A dropped sender stops it too (a server torn down without a signal).
        while !*shutdown.borrow() && shutdown.has_changed().is_ok() {
            let lease = match waiter.poll().await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    sleep_or_stop(waiter.next_poll_in(), &mut shutdown).await;
                    continue;
                }
                Err(err) => {
                    tracing::warn!(%err, "replication lease unavailable");
                    sleep_or_stop(Duration::from_secs(1), &mut shutdown).await;
                    continue;
                }
            };
            tracing::info!(slot = %self.slot, token = lease.token, "replication lease taken");
            match self.consume(lease, &mut shutdown).await {
                Ok(()) => backoff = Duration::from_millis(200),
                // Another process holds the slot now: not a failure, and
                // nothing to back off from.
                Err(ReplicationError::Flush(flush::FlushError::Superseded { token, current })) => {
                    tracing::warn!(slot = %self.slot, token, current, "replication lease taken over; stopped");
                }
                Err(err) => {
                    tracing::warn!(slot = %self.slot, error = %err, retry_in = ?backoff, "replication stopped");
                    if let Err(e) = super::health::record_error(&self.db, &self.slot, &err.to_string()).await {
                        tracing::warn!(error = %e, "could not record the replication error");
                    }
                    sleep_or_stop(backoff, &mut shutdown).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn consume(&self, mut lease: Lease, shutdown: &mut watch::Receiver<bool>) -> Result<(), ReplicationError> {
        // A failure before the stream starts (Postgres refusing the slot,
        // ClickHouse away for a new slot's backfill, no free slot) releases
        // the lease at once: held, it would keep every other process waiting
        // out its whole term for a holder that streams nothing.
        let mut client = match self.connect(&lease).await {
            Ok(client) => client,
            Err(err) => {
                lease.release().await;
                return Err(err);
            }
        };
        // The steps above can take a while on a busy database: the stream
        // starts with a lease renewed now, not one already two thirds gone.
        if !lease.renew().await? {
            client.stop();
            return Ok(());
        }
        tracing::debug!(slot = %self.slot, token = lease.token, "replication stream started");
        let result = self.stream(&mut client, &mut lease, shutdown).await;
        client.stop();
        lease.release().await;
        result
    }

    /// Readies the slot (recreated if lost, a new generation backfilled) and
    /// opens the replication stream to it.
    async fn connect(&self, lease: &Lease) -> Result<ReplicationClient, ReplicationError> {
        if slot::status(&self.db, &self.slot).await?.is_none() {
            // A new slot starts with a full backfill, which needs the copy's
            // tables: otherwise its chunks could spend their attempts on a
            // ClickHouse that `serve` is still migrating. (An existing slot
            // streams even while ClickHouse is away: its batches wait in
            // Postgres, not in the slot's WAL.)
            crate::analytics::schema::migrate(&self.analytics).await?;
        }
        if slot::drop_if_lost(&self.db, &self.slot).await? {
            tracing::error!(slot = %self.slot, "replication slot lost its WAL; recreating it and backfilling");
        }
        if slot::ensure(&self.db, &self.slot, &self.schema).await? {
            // Changes before the slot's creation never reach the stream.
            tracing::info!(slot = %self.slot, "replication slot created; starting a full backfill");
        }
        self.start_generation_backfill().await?;
        // A superseded holder paused with the slot still streaming to it.
        // (If it cannot be ended, the stream below fails and is retried.)
        match lease.evict_superseded(&self.db).await {
            Ok(0) => {}
            Ok(_) => tracing::warn!(slot = %self.slot, token = lease.token, "ended a superseded holder's stream"),
            Err(err) => tracing::warn!(slot = %self.slot, error = %err, "could not end a superseded holder's stream"),
        }
        Ok(ReplicationClient::connect(self.stream_config()?).await?)
    }

    fn stream_config(&self) -> Result<ReplicationConfig, ReplicationError> {
        let url = reqwest::Url::parse(&self.database_url).map_err(|e| ReplicationError::Url(e.to_string()))?;
        let decode = |s: &str| percent_decode(s).ok_or_else(|| ReplicationError::Url("bad percent-encoding".into()));
        let host = url.host_str().unwrap_or("127.0.0.1").to_string();
        let database = decode(url.path().trim_start_matches('/'))?;
        let user = decode(url.username())?;
        let password = decode(url.password().unwrap_or(""))?;
        Ok(ReplicationConfig::new(host, user, password, database, self.slot.clone(), self.slot.clone())
            .with_port(url.port().unwrap_or(5432))
            // Feedback soon after the confirmed position moves, so the slot
            // releases WAL and operators see a current confirmed LSN.
            .with_status_interval(Duration::from_millis(500))
            .with_wakeup_interval(Duration::from_secs(2))
            .with_application_name(application_name(&self.slot)))
    }

    /// Streams the slot in three parts, so that no slow write holds up the
    /// reading of the stream:
    ///
    /// - this loop reads and decodes ([`Replicator::on_event`]), and closes a
    ///   batch at `batch_rows` rows or `batch_age` after its first row
    ///   ([`Reading::close`]);
    /// - the recorder writes closed batches to Postgres with their flush jobs
    ///   ([`Replicator::record_batches`]); batches that queued up while it was
    ///   writing go out merged into one, so under load a flush carries more
    ///   rows rather than the stream falling behind (measured: at 500
    ///   creates/s the loop recording inline fell ~1 MB of WAL further behind
    ///   every second);
    /// - the confirmer moves the slot and the list's watermark behind the
    ///   flushed batches ([`Replicator::confirm_flushed`]), and revives failed
    ///   copies.
    ///
    /// If either helper fails, the stream stops with its error; batches it had
    /// not recorded are replayed by the slot on the next start.
    async fn stream(
        &self,
        client: &mut ReplicationClient,
        lease: &mut Lease,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ReplicationError> {
        let progress = SharedProgress::default();
        self.open_rows.send_replace(0);
        let (batches, queued) = tokio::sync::mpsc::channel::<Batch>(RECORD_QUEUE);
        let (confirmed_tx, mut confirmed_rx) = watch::channel(0u64);
        let token = lease.token;
        let mut recorder = AbortOnDrop(tokio::spawn(self.clone().record_batches(queued, progress.clone(), token)));
        let mut confirmer =
            AbortOnDrop(tokio::spawn(self.clone().confirm_flushed(progress.clone(), confirmed_tx, token)));

        let mut reading = Reading::new(self.schema.clone());
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut renew = tokio::time::interval(lease.renew_every());
        renew.tick().await;
        let mut watch_slot = tokio::time::interval(SLOT_CHECK_EVERY);
        watch_slot.tick().await;
        loop {
            let mut close = false;
            tokio::select! {
                event = client.recv() => {
                    let Some(event) = event? else { return Ok(()) };
                    close = self.on_event(&mut reading, event, &progress)?;
                }
                _ = tick.tick() => close = reading.aged(self.batch_age),
                changed = confirmed_rx.changed() => {
                    if changed.is_ok() {
                        client.update_applied_lsn(Lsn::from_u64(*confirmed_rx.borrow_and_update()));
                    }
                }
                ended = &mut recorder.0 => return Err(helper_ended("recorder", ended)),
                ended = &mut confirmer.0 => return Err(helper_ended("confirmer", ended)),
                _ = renew.tick() => {
                    if !lease.renew().await.unwrap_or(false) || !lease.held() {
                        tracing::warn!(slot = %self.slot, "replication lease lost; stopping");
                        return Ok(());
                    }
                }
                _ = watch_slot.tick() => self.check_slot().await?,
                _ = shutdown.changed() => return Ok(()),
            }
            if close {
                reading.close(&progress, &batches).await?;
            }
            self.publish_open(&reading, &progress);
            if !lease.held() {
                tracing::warn!(slot = %self.slot, "replication lease not renewed in time; stopping");
                return Ok(());
            }
        }
    }

    /// One message of the stream: decoded, its changes added to the open
    /// batch, a commit closing the transaction in it. Returns whether the
    /// batch is now full. A transaction with no rows for the copy (or a
    /// keepalive between transactions with nothing buffered) tells the
    /// confirmer the WAL up to it is quiet.
    fn on_event(
        &self,
        reading: &mut Reading,
        event: ReplicationEvent,
        progress: &SharedProgress,
    ) -> Result<bool, ReplicationError> {
        let Reading { decoder, batch, first_row_at } = reading;
        match event {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                let commit_time = pgoutput::timestamp(commit_time_micros)?;
                decoder.decode(Message::Begin(Begin { final_lsn: final_lsn.as_u64(), commit_time, xid }))?;
            }
            ReplicationEvent::XLogData { data, .. } => match decoder.decode(pgoutput::decode(&data)?)? {
                Some(Event::Change(change)) => {
                    first_row_at.get_or_insert_with(Instant::now);
                    batch.push(change);
                }
                Some(Event::Rekeyed(old, new)) => {
                    first_row_at.get_or_insert_with(Instant::now);
                    batch.push(old);
                    batch.push(new);
                }
                Some(Event::Truncate(tables)) => {
                    // No per-row deletes follow a TRUNCATE; ClickHouse keeps the rows
                    // until an operator rebuilds the copy.
                    tracing::error!(slot = %self.slot, ?tables, "tables truncated in Postgres; the clickhouse copy needs rebuilding");
                }
                _ => {}
            },
            ReplicationEvent::Commit { lsn, end_lsn, commit_time_micros } => {
                let commit_time = pgoutput::timestamp(commit_time_micros)?;
                let commit = Commit { flags: 0, commit_lsn: lsn.as_u64(), end_lsn: end_lsn.as_u64(), commit_time };
                decoder.decode(Message::Commit(commit))?;
                if batch.rows() > 0 {
                    batch.commit(lsn.as_u64(), end_lsn.as_u64(), commit_time);
                    return Ok(batch.rows() >= self.batch_rows);
                }
                progress.lock().quiet(end_lsn.as_u64());
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if batch.rows() == 0 && !decoder.in_transaction() {
                    progress.lock().quiet(wal_end.as_u64());
                }
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(false)
    }

    /// Tells the confirmer whether rows are buffered, and the test hook how
    /// many (see `open_rows`).
    fn publish_open(&self, reading: &Reading, progress: &SharedProgress) {
        let rows = reading.batch.rows();
        progress.lock().buffering = rows > 0;
        self.open_rows.send_if_modified(|open| std::mem::replace(open, rows) != rows);
    }

    /// The recorder: writes closed batches with their flush jobs, in stream
    /// order, merging what queued up meanwhile (up to `MERGE_ROWS_FACTOR`
    /// batches' worth of rows per flush).
    async fn record_batches(
        self,
        mut queued: tokio::sync::mpsc::Receiver<Batch>,
        progress: SharedProgress,
        token: u64,
    ) -> Result<(), ReplicationError> {
        let most = self.batch_rows.saturating_mul(MERGE_ROWS_FACTOR);
        let mut carry: Option<Batch> = None;
        loop {
            let mut merged = match carry.take() {
                Some(b) => b,
                None => match queued.recv().await {
                    Some(b) => b,
                    None => return Ok(()),
                },
            };
            let mut count = 1;
            while merged.rows() < most {
                match queued.try_recv() {
                    Ok(next) if merged.rows() + next.rows() <= most => {
                        merged.append(next);
                        count += 1;
                    }
                    Ok(next) => {
                        carry = Some(next);
                        break;
                    }
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            flush::record(&self.db, &self.jobs, &self.slot, token, &merged).await?;
            tracing::debug!(slot = %self.slot, rows = merged.rows(), batches = count, took = ?started.elapsed(), "replication batch recorded");
            progress.lock().queued -= count;
        }
    }

    /// The confirmer: every 100 ms moves the slot's confirmed position as far
    /// as ClickHouse holds every change (handing it to the stream, which owns
    /// the connection), and the list's watermark with it; every 2 s revives
    /// failed copies.
    async fn confirm_flushed(
        self,
        progress: SharedProgress,
        confirmed_tx: watch::Sender<u64>,
        token: u64,
    ) -> Result<(), ReplicationError> {
        let mut state = Confirmation::default();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut revive = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = revive.tick() => {
                    self.revive_failed_copies().await?;
                    continue;
                }
            }
            // Read before the database is asked: quiet WAL seen by now had
            // every change before it handed to a batch, and a batch counted
            // as recorded here is in `replication_flushes` below.
            let seen = *progress.lock();
            let mut next = state.confirmed;
            if let Some((lsn, at)) = flush::confirmable(&self.db, &self.slot, token).await? {
                next = next.max(lsn);
                state.flushed(lsn, at);
            }
            // The watermark follows; a failed move is tried again next tick (the
            // rows are in ClickHouse, only the list's overlay stays larger).
            if let Some((lsn, at)) = state.mark {
                match flush::advance_watermarks(&self.analytics, lsn, at).await {
                    Ok(()) => state.watermark_moved(lsn),
                    Err(err) => tracing::warn!(error = %err, "could not move the clickhouse watermark; will retry"),
                }
            }
            // Past the last change with nothing buffered, queued or pending,
            // the slot may confirm the quiet WAL too (so it retains none of it).
            if !seen.buffering
                && seen.queued == 0
                && seen.quiet_lsn > next
                && flush::pending(&self.db, &self.slot).await? == 0
            {
                next = seen.quiet_lsn;
            }
            if next > state.confirmed {
                // Noted (and fenced) before the slot is told.
                flush::confirm(&self.db, &self.slot, token, next).await?;
                state.confirmed = next;
                let _ = confirmed_tx.send(next);
            }
        }
    }

    /// Starts a full backfill of the tables the slot's current generation has
    /// yet to copy, unless one is running: right after the slot is created,
    /// and again if the process died before starting it or an operator
    /// canceled it (until one completes, lists answer from Postgres).
    async fn start_generation_backfill(&self) -> Result<(), ReplicationError> {
        let tables = slot::backfill_needed(&self.db, &self.slot).await?;
        if !tables.is_empty() {
            tracing::info!(slot = %self.slot, ?tables, "the slot's generation needs a full backfill; starting it");
            let req = BackfillRequest { tables, from: None, to: None, chunk_size: DEFAULT_CHUNK_SIZE };
            backfill::start(&self.db, &self.jobs, &req).await?;
        }
        Ok(())
    }

    /// Checked while streaming: a slot invalidated for its WAL (`lost`, past
    /// `max_slot_wal_keep_size`) or dropped ends the stream with an error, and
    /// the next start drops, recreates and backfills it. Postgres usually ends
    /// the stream of a slot it invalidates itself; this catches the rest
    /// without waiting for a read to fail.
    async fn check_slot(&self) -> Result<(), ReplicationError> {
        match slot::status(&self.db, &self.slot).await? {
            Some(s) if !s.lost() => Ok(()),
            Some(_) => Err(ReplicationError::SlotLost(format!("{} lost its WAL", self.slot))),
            None => Err(ReplicationError::SlotLost(format!("{} was dropped", self.slot))),
        }
    }

    /// A flush never gives up: a batch whose job used up its attempts (say,
    /// ClickHouse was down for a while) gets a fresh budget. Until it lands,
    /// the slot does not move past it, and its age is what operators watch.
    ///
    /// So does a running backfill's chunk: the first backfill of a slot is
    /// what vouches for the copy, and without it the list never leaves
    /// Postgres.
    async fn revive_failed_copies(&self) -> Result<(), ReplicationError> {
        for job in flush::pending_jobs(&self.db, &self.slot).await? {
            if self.jobs.retry(job).await?.is_some() {
                tracing::warn!(slot = %self.slot, %job, "replication flush failed every attempt; retrying it");
            }
        }
        for job in crate::analytics::backfill::store::failed_chunk_jobs(&self.db).await? {
            if self.jobs.retry(job).await?.is_some() {
                tracing::warn!(%job, "a backfill chunk failed every attempt; retrying it");
            }
        }
        Ok(())
    }
}

/// What the stream has read and not yet handed on: the decoder (mid
/// transaction, perhaps) and the batch it fills.
struct Reading {
    decoder: Decoder,
    batch: Batch,
    /// When the open batch got its first row.
    first_row_at: Option<Instant>,
}

impl Reading {
    fn new(schema: String) -> Self {
        Reading { decoder: Decoder::new(schema), batch: Batch::default(), first_row_at: None }
    }

    /// Whether the open batch holds a committed transaction and its first
    /// row is `batch_age` old: time to close it, however few rows it has.
    fn aged(&self, batch_age: Duration) -> bool {
        self.batch.commit_time.is_some() && self.first_row_at.is_some_and(|t| t.elapsed() >= batch_age)
    }

    /// Hands the open batch to the recorder and starts an empty one. Rows of
    /// a transaction still open may leave with it: the batch's end stays at
    /// its last commit, so a replay after a crash starts before that
    /// transaction.
    async fn close(
        &mut self,
        progress: &SharedProgress,
        batches: &tokio::sync::mpsc::Sender<Batch>,
    ) -> Result<(), ReplicationError> {
        let full = std::mem::take(&mut self.batch);
        self.first_row_at = None;
        progress.lock().queued += 1;
        // A full queue holds the stream here (the slot keeps the WAL)
        // until the recorder catches up.
        if batches.send(full).await.is_err() {
            return Err(helper_ended("recorder", Ok(Ok(()))));
        }
        Ok(())
    }
}

/// The confirmer's own progress: how far the slot is confirmed, and how far
/// the list's watermark has followed. The two are kept apart: a batch flushed
/// between the confirmer's `confirmable` and `pending` queries lets the slot
/// confirm the quiet WAL past it before `confirmable` ever returns it, and
/// judged against the slot's position its commit time would never reach the
/// watermark (seen in CI: the watermark stayed behind a test's last write).
#[derive(Debug, Default)]
struct Confirmation {
    confirmed: u64,
    /// The end of the last batch the watermark was moved to.
    watermarked: u64,
    /// A flushed batch's end and commit time the watermark has yet to reach.
    mark: Option<(u64, DateTime<Utc>)>,
}

impl Confirmation {
    /// The highest flushed batch with none pending below it.
    fn flushed(&mut self, lsn: u64, at: DateTime<Utc>) {
        if lsn > self.watermarked && self.mark.is_none_or(|(m, _)| lsn > m) {
            self.mark = Some((lsn, at));
        }
    }

    fn watermark_moved(&mut self, lsn: u64) {
        self.watermarked = self.watermarked.max(lsn);
        if self.mark.is_some_and(|(m, _)| m <= lsn) {
            self.mark = None;
        }
    }
}

/// How often the stream checks that its slot is neither lost nor dropped.
const SLOT_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Closed batches waiting for the recorder before the stream waits for it.
const RECORD_QUEUE: usize = 64;
/// A merged flush carries at most this many batches' worth of rows.
const MERGE_ROWS_FACTOR: usize = 20;

/// What the stream tells the confirmer.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    /// WAL position past which every change has been handed to a batch (seen
    /// at a keepalive outside a transaction, or an empty commit, with nothing
    /// buffered).
    quiet_lsn: u64,
    /// The open batch has rows.
    buffering: bool,
    /// Batches closed but not yet recorded.
    queued: usize,
}

impl Progress {
    fn quiet(&mut self, lsn: u64) {
        self.quiet_lsn = self.quiet_lsn.max(lsn);
    }
}

/// [`Progress`] shared by the stream and its helpers.
#[derive(Clone, Default)]
struct SharedProgress(std::sync::Arc<std::sync::Mutex<Progress>>);

impl SharedProgress {
    /// A panic while holding the lock leaves plain numbers behind, still
    /// usable, so a poisoned lock is taken as it is.
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Aborts a helper task when the stream that owns it ends.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), ReplicationError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn helper_ended(which: &str, ended: Result<Result<(), ReplicationError>, tokio::task::JoinError>) -> ReplicationError {
    match ended {
        Ok(Err(err)) => err,
        Ok(Ok(())) => ReplicationError::Helper(format!("the {which} stopped")),
        Err(err) => ReplicationError::Helper(format!("the {which} failed: {err}")),
    }
}

/// How the replication connection names itself in `pg_stat_replication`
/// (Postgres keeps 63 bytes of it).
pub fn application_name(slot: &str) -> String {
    format!("sessiond:{slot}")
}

async fn sleep_or_stop(d: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.changed() => {}
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes: Vec<u8> = form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned().into_bytes())?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_behind_the_confirmed_slot_still_moves_the_watermark() {
        let at = Utc::now();
        // Quiet WAL at 500 was confirmed while the batch ending at 300 was
        // flushed between the two queries: the slot is past it already.
        let mut state = Confirmation { confirmed: 500, ..Default::default() };
        state.flushed(300, at);
        assert_eq!(state.mark, Some((300, at)));
        state.watermark_moved(300);
        assert_eq!(state.mark, None);
        // Seen again (not pruned yet), it asks for nothing more; a newer one does.
        state.flushed(300, at);
        assert_eq!(state.mark, None);
        state.flushed(400, at);
        assert_eq!(state.mark, Some((400, at)));
        // A failed move keeps the newest batch to move to.
        state.flushed(450, at);
        assert_eq!(state.mark, Some((450, at)));
    }
}
