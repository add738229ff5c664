//! Caps on long-lived requests: SSE subscriptions, waitpoint long-polls and
//! the dashboard's live tail each hold a connection for up to minutes, and
//! the connection cap never sheds a connection inside a request. Without a cap
//! of their own, one session token could hold every connection the server has
//! and lock out everyone else, health checks included.
//!
//! A long-lived request takes a [`StreamPermit`] before it starts and gives it
//! back when its response ends, however it ends (its window passes, the
//! client disconnects, the process drains): the permit lives in the response
//! body, which hyper drops then. It is counted against
//!
//! - its token (public tokens only: a secret key is the environment's own
//!   credential, bounded by the environment's cap),
//! - its session (SSE only: a run's waitpoint long-poll must not be locked
//!   out by its session's subscribers),
//! - its environment,
//! - the server: at most `MAX_CONNECTIONS` minus the reserved connections,
//!   so short requests and `/healthz` always find a connection.
//!
//! Counts are per process, in memory: a deployment of N processes behind a
//! balancer lets a caller hold up to N times each cap. Counting across
//! processes would cost a Redis round trip per connect and leave counts
//! behind when a process dies; the per-process cap is what protects each
//! process's connections, which is the point.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::auth::Auth;
use crate::config::Config;

/// Which cap refused a long-lived request (the `scope` of the 429).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamScope {
    Token,
    Session,
    Environment,
    Server,
}

impl StreamScope {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamScope::Token => "token",
            StreamScope::Session => "session",
            StreamScope::Environment => "environment",
            StreamScope::Server => "server",
        }
    }
}

/// The per-holder caps, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct StreamCaps {
    pub per_token: usize,
    pub per_session: usize,
    pub per_environment: usize,
}

impl StreamCaps {
    pub fn from_config(config: &Config) -> Self {
        StreamCaps {
            per_token: config.sse_max_per_token,
            per_session: config.sse_max_per_session,
            per_environment: config.sse_max_per_environment,
        }
    }
}

/// A public token, by the SHA-256 of its text: the count never keeps the token.
pub type TokenKey = [u8; 32];

/// What a long-lived request is counted against; None: not counted there.
#[derive(Debug, Clone, Default)]
pub struct Holder {
    pub token: Option<TokenKey>,
    pub session: Option<Uuid>,
    pub environment: Option<Uuid>,
}

impl Holder {
    /// A request by `auth` (its token counted only if it is a public token).
    pub fn of(auth: &Auth, headers: &HeaderMap) -> Holder {
        Holder { token: token_key(auth, headers), session: None, environment: Some(auth.env.id) }
    }

    pub fn on_session(mut self, session: Uuid) -> Holder {
        self.session = Some(session);
        self
    }
}

/// The key of the caller's public token; None for a secret key.
fn token_key(auth: &Auth, headers: &HeaderMap) -> Option<TokenKey> {
    if auth.is_secret_key() {
        return None;
    }
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    Some(Sha256::digest(value).into())
}

#[derive(Default)]
struct Counts {
    total: usize,
    tokens: HashMap<TokenKey, usize>,
    sessions: HashMap<Uuid, usize>,
    environments: HashMap<Uuid, usize>,
}

fn held<K: Hash + Eq>(map: &HashMap<K, usize>, key: &Option<K>) -> usize {
    key.as_ref().and_then(|k| map.get(k)).copied().unwrap_or(0)
}

fn take<K: Hash + Eq + Copy>(map: &mut HashMap<K, usize>, key: &Option<K>) {
    if let Some(k) = key {
        *map.entry(*k).or_default() += 1;
    }
}

fn give_back<K: Hash + Eq>(map: &mut HashMap<K, usize>, key: &Option<K>) {
    if let Some(k) = key {
        if let Some(n) = map.get_mut(k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // No entry outlives its last permit: the maps hold only holders
                // with a stream open.
                map.remove(k);
            }
        }
    }
}

/// The process's long-lived requests (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct StreamPermits(Arc<Inner>);

struct Inner {
    caps: StreamCaps,
    /// Long-lived requests the whole process may hold; set by `serve` once the
    /// connection cap is known (it may be lowered to fit the fd limit).
    server_cap: AtomicUsize,
    counts: Mutex<Counts>,
}

impl StreamPermits {
    pub fn new(caps: StreamCaps, server_cap: usize) -> Self {
        StreamPermits(Arc::new(Inner {
            caps,
            server_cap: AtomicUsize::new(server_cap),
            counts: Mutex::new(Counts::default()),
        }))
    }

    pub fn set_server_cap(&self, cap: usize) {
        self.0.server_cap.store(cap, Ordering::Relaxed);
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.0.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A permit for `holder`, or the narrowest cap it would pass.
    pub fn acquire(&self, holder: Holder) -> Result<StreamPermit, StreamScope> {
        let caps = self.0.caps;
        let mut counts = self.counts();
        if held(&counts.tokens, &holder.token) >= caps.per_token && holder.token.is_some() {
            return Err(StreamScope::Token);
        }
        if held(&counts.sessions, &holder.session) >= caps.per_session && holder.session.is_some() {
            return Err(StreamScope::Session);
        }
        if held(&counts.environments, &holder.environment) >= caps.per_environment && holder.environment.is_some() {
            return Err(StreamScope::Environment);
        }
        if counts.total >= self.0.server_cap.load(Ordering::Relaxed) {
            return Err(StreamScope::Server);
        }
        counts.total += 1;
        take(&mut counts.tokens, &holder.token);
        take(&mut counts.sessions, &holder.session);
        take(&mut counts.environments, &holder.environment);
        Ok(StreamPermit { permits: self.clone(), holder })
    }

    /// Long-lived requests held now.
    pub fn held(&self) -> usize {
        self.counts().total
    }
}

/// One long-lived request's place; given back when dropped.
pub struct StreamPermit {
    permits: StreamPermits,
    holder: Holder,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut counts = self.permits.counts();
        counts.total = counts.total.saturating_sub(1);
        give_back(&mut counts.tokens, &self.holder.token);
        give_back(&mut counts.sessions, &self.holder.session);
        give_back(&mut counts.environments, &self.holder.environment);
    }
}

/// `stream`, holding `permit` until the stream is dropped (the response
/// ended or its client went away).
pub fn holding<S: futures::Stream>(stream: S, permit: StreamPermit) -> impl futures::Stream<Item = S::Item> {
    futures::StreamExt::map(stream, move |item| {
        let _held = &permit;
        item
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> StreamCaps {
        StreamCaps { per_token: 2, per_session: 3, per_environment: 4 }
    }

    #[test]
    fn each_cap_refuses_with_its_scope_and_a_dropped_permit_frees_its_place() {
        let permits = StreamPermits::new(caps(), 5);
        let (env, other_env, session) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let token = Some([1u8; 32]);
        let by_token = || Holder { token, session: None, environment: Some(env) };
        let a = permits.acquire(by_token()).unwrap();
        let _b = permits.acquire(by_token()).unwrap();
        assert_eq!(permits.acquire(by_token()).err(), Some(StreamScope::Token));
        drop(a);
        let _a = permits.acquire(by_token()).unwrap();

        let on_session = || Holder { token: None, session: Some(session), environment: Some(env) };
        let _c = permits.acquire(on_session()).unwrap();
        let _d = permits.acquire(on_session()).unwrap();
        // Four in the environment now.
        assert_eq!(permits.acquire(on_session()).err(), Some(StreamScope::Environment));
        let _e = permits.acquire(Holder { environment: Some(other_env), ..Holder::default() }).unwrap();
        assert_eq!(
            permits.acquire(Holder { environment: Some(Uuid::now_v7()), ..Holder::default() }).err(),
            Some(StreamScope::Server)
        );
        assert_eq!(permits.held(), 5);
    }

    #[test]
    fn the_counts_keep_no_entry_for_a_holder_with_nothing_open() {
        let permits = StreamPermits::new(caps(), 100);
        let p = permits.acquire(Holder { token: Some([7; 32]), session: Some(Uuid::now_v7()), environment: None });
        drop(p);
        let counts = permits.counts();
        assert!(counts.tokens.is_empty() && counts.sessions.is_empty() && counts.total == 0);
    }
}
