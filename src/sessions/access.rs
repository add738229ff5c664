//! Who may touch a session: resolve it (it may be missing) and authorize the
//! caller on it, or on one of its channels. Every route that names a session
//! goes through here, so the rule lives in one place.
//!
//! Authorization runs before the existence check: `action` is checked against
//! the URL form and every id of the session, so an under-scoped caller gets
//! `Forbidden` whether or not the session exists, and only an authorized
//! caller learns that it is missing.

use std::borrow::Borrow;
use std::sync::Arc;

use sqlx::PgPool;

use super::lookup::SessionLookup;
use super::model::Session;
use super::store;
use crate::auth::{Action, Auth};
use crate::db::StoreError;
use crate::streams::Io;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("Unauthorized: missing required scopes")]
    Forbidden,
    #[error("Session not found")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The rule once the session is resolved (or not): `action` on the URL form or
/// any id of the session, or whatever `also_allowed` grants.
pub fn authorize<S: Borrow<Session>>(
    auth: &Auth,
    key: &str,
    session: Option<S>,
    action: Action,
    also_allowed: impl FnOnce(&Session) -> bool,
) -> Result<S, AccessError> {
    let found = session.as_ref().map(|s| s.borrow());
    let mut keys = vec![key];
    if let Some(s) = found {
        keys.extend(s.keys());
    }
    if !auth.can_access_session(action, &keys) && !found.is_some_and(also_allowed) {
        return Err(AccessError::Forbidden);
    }
    session.ok_or(AccessError::NotFound)
}

/// The session `key` names in the caller's environment, read from the primary,
/// if the caller may perform `action` on it.
pub async fn load(db: &PgPool, auth: &Auth, key: &str, action: Action) -> Result<Session, AccessError> {
    let session = store::find(db, auth.env.id, key).await?;
    authorize(auth, key, session, action, |_| false)
}

/// A channel-scoped token's id for one channel: `<session friendly id>:<io>`
/// (scope `write:session-channels:<id>`).
pub fn channel_scope_id(session: &Session, io: Io) -> String {
    format!("{}:{}", session.friendly_id, io)
}

/// Resolves sessions for the realtime hot path: through the short-lived lookup
/// cache, then the database.
#[derive(Clone)]
pub struct ChannelAccess {
    pub lookup: Arc<SessionLookup>,
    pub db: PgPool,
}

impl ChannelAccess {
    /// The session behind a channel, if the caller may perform `action` on the
    /// session, or holds a token scoped to that channel.
    pub async fn load(&self, auth: &Auth, key: &str, io: Io, action: Action) -> Result<Arc<Session>, AccessError> {
        let session = self.lookup.find(&self.db, auth.env.id, key).await?;
        authorize(auth, key, session, action, |s| auth.can_access_channel(action, &channel_scope_id(s, io)))
    }
}
