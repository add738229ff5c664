//! A short-lived cache of session rows for the realtime hot path (appends, reads,
//! subscriptions), so a busy channel does not cost a Postgres round trip per
//! record. Safe because what it is used for tolerates a second of staleness:
//! sessions are never deleted, closing is final and enforced atomically by the
//! channel store itself (a close is acknowledged only once the channels are
//! sealed, so a stale open row here cannot let a write land after it), and run
//! management always re-reads the primary.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use uuid::Uuid;

use super::model::Session;
use super::store;
use crate::db::StoreError;

const MAX_ENTRIES: usize = 100_000;

/// (environment, friendly or external id) → (cached at, row).
type Entries = HashMap<(Uuid, String), (Instant, Arc<Session>)>;

pub struct SessionLookup {
    ttl: Duration,
    entries: RwLock<Entries>,
}

impl SessionLookup {
    pub fn new(ttl: Duration) -> Self {
        SessionLookup { ttl, entries: RwLock::default() }
    }

    /// The session `key` (friendly or external id) names in `env_id`, at most `ttl` old.
    pub async fn find(&self, pool: &PgPool, env_id: Uuid, key: &str) -> Result<Option<Arc<Session>>, StoreError> {
        let cache_key = (env_id, key.to_string());
        if let Ok(entries) = self.entries.read() {
            if let Some((at, s)) = entries.get(&cache_key) {
                if at.elapsed() < self.ttl {
                    return Ok(Some(s.clone()));
                }
            }
        }
        let Some(session) = store::find(pool, env_id, key).await? else {
            return Ok(None);
        };
        let session = Arc::new(session);
        if let Ok(mut entries) = self.entries.write() {
            if entries.len() >= MAX_ENTRIES {
                entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
                if entries.len() >= MAX_ENTRIES {
                    entries.clear();
                }
            }
            entries.insert(cache_key, (Instant::now(), session.clone()));
        }
        Ok(Some(session))
    }

    /// Forgets `session` under each id it answers to, so this server sees a
    /// change it made itself (a close) at once; other servers within `ttl`.
    pub fn forget(&self, session: &Session) {
        if let Ok(mut entries) = self.entries.write() {
            for key in session.keys() {
                entries.remove(&(session.runtime_environment_id, key.to_string()));
            }
        }
    }
}
