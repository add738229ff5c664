//! A short-lived in-process cache of authenticated environments, so the hot path
//! (every request) does not hit Postgres and unseal a key each time. Entries live
//! a few seconds: a rotated key stops working everywhere within that window.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use uuid::Uuid;

use crate::db::StoreError;
use crate::tenancy::keys::{self, MasterKey};
use crate::tenancy::{store, Environment};

/// Past this many entries the cache starts over rather than grow without bound.
const MAX_ENTRIES: usize = 10_000;

type Map<K> = RwLock<HashMap<K, (Instant, Arc<Environment>)>>;

pub struct EnvCache {
    ttl: Duration,
    by_hash: Map<[u8; 32]>,
    by_id: Map<Uuid>,
}

fn get<K: std::hash::Hash + Eq>(map: &Map<K>, key: &K, ttl: Duration) -> Option<Arc<Environment>> {
    let guard = map.read().ok()?;
    let (at, env) = guard.get(key)?;
    (at.elapsed() < ttl).then(|| env.clone())
}

fn put<K: std::hash::Hash + Eq>(map: &Map<K>, key: K, env: Arc<Environment>) {
    if let Ok(mut guard) = map.write() {
        if guard.len() >= MAX_ENTRIES {
            guard.clear();
        }
        guard.insert(key, (Instant::now(), env));
    }
}

impl EnvCache {
    pub fn new(ttl: Duration) -> Self {
        EnvCache { ttl, by_hash: RwLock::default(), by_id: RwLock::default() }
    }

    pub async fn by_key(
        &self,
        pool: &PgPool,
        master: &MasterKey,
        key: &str,
    ) -> Result<Option<Arc<Environment>>, StoreError> {
        let hash = keys::hash(key);
        if let Some(env) = get(&self.by_hash, &hash, self.ttl) {
            return Ok(Some(env));
        }
        let Some(env) = store::find_by_key(pool, master, key).await? else {
            return Ok(None);
        };
        let env = Arc::new(env);
        put(&self.by_hash, hash, env.clone());
        Ok(Some(env))
    }

    pub async fn by_id(
        &self,
        pool: &PgPool,
        master: &MasterKey,
        id: Uuid,
    ) -> Result<Option<Arc<Environment>>, StoreError> {
        if let Some(env) = get(&self.by_id, &id, self.ttl) {
            return Ok(Some(env));
        }
        let Some(env) = store::find_by_id(pool, master, id).await? else {
            return Ok(None);
        };
        let env = Arc::new(env);
        put(&self.by_id, id, env.clone());
        Ok(Some(env))
    }
}
