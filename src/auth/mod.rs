//! Authentication and authorization of API callers.
//!
//! A bearer token is either an environment secret key (`tr_…`), full-power within
//! its environment, or an HS256 public token signed with that key whose `sub` is
//! the environment id and whose `scopes` say what it may touch.

pub mod cache;
pub mod jwt;
pub mod minting;
pub mod routes;
pub mod scopes;
pub mod throttle;

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sqlx::PgPool;

use crate::db::StoreError;
use crate::http::client::ClientAddr;
use crate::http::error::ApiError;
use crate::tenancy::keys::MasterKey;
use crate::tenancy::Environment;
use cache::EnvCache;
pub use scopes::Action;

#[derive(Debug, Clone)]
pub enum Principal {
    SecretKey,
    PublicToken { scopes: Vec<String> },
}

/// The authenticated caller: its environment and what it may do there.
#[derive(Debug, Clone)]
pub struct Auth {
    pub env: Arc<Environment>,
    pub principal: Principal,
}

impl Auth {
    /// Who this caller is, for the audit log.
    pub fn actor(&self) -> crate::audit::Actor {
        match self.principal {
            Principal::SecretKey => crate::audit::Actor::SecretKey { env: self.env.id },
            Principal::PublicToken { .. } => crate::audit::Actor::PublicToken { env: self.env.id },
        }
    }

    pub fn is_secret_key(&self) -> bool {
        matches!(self.principal, Principal::SecretKey)
    }

    pub fn require_secret_key(&self) -> Result<(), ApiError> {
        if self.is_secret_key() {
            Ok(())
        } else {
            Err(ApiError::Unauthorized("This endpoint requires a secret API key".into()))
        }
    }

    /// May the caller perform `action` on the session known by any of `keys`?
    pub fn can_access_session(&self, action: Action, keys: &[&str]) -> bool {
        match &self.principal {
            Principal::SecretKey => true,
            Principal::PublicToken { scopes } => scopes::allows_session(scopes, action, keys),
        }
    }

    /// May the caller perform `action` on the run `run_friendly_id`?
    pub fn can_access_run(&self, action: Action, run_friendly_id: &str) -> bool {
        match &self.principal {
            Principal::SecretKey => true,
            Principal::PublicToken { scopes } => scopes::allows(scopes, "runs", action, &[run_friendly_id]),
        }
    }

    /// The run this caller acts as (a worker's run token), if any: its writes
    /// to the session's channels are fenced once that run is superseded.
    pub fn acting_run(&self) -> Option<&str> {
        match &self.principal {
            Principal::SecretKey => None,
            Principal::PublicToken { scopes } => scopes::acting_run(scopes),
        }
    }

    /// Does a channel-scoped token (`{action}:session-channels:{session}:{io}`)
    /// grant `action` on that one channel? Secret keys need no such scope.
    pub fn can_access_channel(&self, action: Action, channel_id: &str) -> bool {
        match &self.principal {
            Principal::SecretKey => true,
            Principal::PublicToken { scopes } => scopes::allows(scopes, "session-channels", action, &[channel_id]),
        }
    }

    pub fn can_list_sessions(&self, task_filter: &[String]) -> bool {
        match &self.principal {
            Principal::SecretKey => true,
            Principal::PublicToken { scopes } => scopes::allows_list(scopes, task_filter),
        }
    }
}

/// Why a caller was not authenticated. Mapped to 401 (or 500 for `Store`) in
/// `http::error`.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No bearer token, or a secret key no environment has.
    #[error("Invalid or missing API key")]
    BadKey,
    /// Every public token that fails, whatever the reason (malformed, unknown
    /// environment, bad signature, expired), gets this same answer, so a caller
    /// cannot probe which environment ids exist.
    #[error("Invalid or expired public access token")]
    BadToken,
    /// A genuine token (its signature verified, so naming the cause tells a
    /// prober nothing) whose time is up, or not yet come, by this server's
    /// clock: the cause is named so a clock skew between hosts is visible.
    #[error("Public access token expired {0} s ago by this server's clock; mint a new one, or check the clocks of the hosts that minted and verified it")]
    TokenExpired(i64),
    #[error("Public access token not yet valid: it starts {0} s from now by this server's clock, beyond the allowed leeway; the clock of the host that minted it runs ahead of this server's")]
    TokenNotYetValid(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Turns bearer tokens into callers: looks environments up (cached) and
/// verifies public tokens with their environment's key.
#[derive(Clone)]
pub struct Authenticator {
    db: PgPool,
    master_key: Arc<MasterKey>,
    envs: Arc<EnvCache>,
    leeway_secs: u64,
    /// Failed bearer tokens per client address (see [`throttle`]); None for
    /// tools that serve no clients.
    failures: Option<AddressThrottle>,
}

/// A failure throttle keyed by client address, and the proxies whose
/// `X-Forwarded-For` says which client that is.
#[derive(Clone)]
pub struct AddressThrottle {
    pub throttle: throttle::Throttle,
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
}

impl AddressThrottle {
    pub fn client(&self, parts: &Parts) -> Option<ClientAddr> {
        ClientAddr::of(parts, &self.trusted_proxies)
    }
}

impl Authenticator {
    pub fn new(db: PgPool, master_key: MasterKey, envs: EnvCache, leeway_secs: u64) -> Self {
        Authenticator { db, master_key: Arc::new(master_key), envs: Arc::new(envs), leeway_secs, failures: None }
    }

    /// Throttles failed bearer tokens per client address.
    pub fn with_throttle(mut self, failures: AddressThrottle) -> Self {
        self.failures = Some(failures);
        self
    }

    /// [`Self::authenticate`] for a request from `client`. A token that fails
    /// (unknown key, forged or malformed token) counts against the client's
    /// address; once its budget is spent, the address's failing tokens are
    /// answered 429 with `Retry-After` until the block ends. A request that
    /// authenticates is never refused or slowed: the check is a local lookup
    /// made after the failure, and Redis is asked on failures only. Genuine
    /// tokens refused for their time (expired, not yet valid) and requests
    /// with no token at all cost nothing to answer and are not counted.
    pub async fn authenticate_client(
        &self,
        client: Option<ClientAddr>,
        header: Option<&str>,
    ) -> Result<Auth, ApiError> {
        let result = self.authenticate(header).await;
        let (Some(failures), Some(client)) = (&self.failures, client) else { return Ok(result?) };
        match result {
            Err(err @ (AuthError::BadKey | AuthError::BadToken)) if header.is_some() => {
                let subject = client.to_string();
                if let Some(wait) = failures.throttle.blocked(&subject) {
                    let secs = throttle::retry_after_secs(wait);
                    return Err(ApiError::TooManyRequests {
                        message: format!("Too many failed API keys or tokens from this address; retry in {secs} s"),
                        retry_after_secs: secs,
                    });
                }
                if let Some(wait) = failures.throttle.fail(&subject).await.blocked_for {
                    tracing::warn!(client = %subject, block_secs = wait.as_secs(), "failed bearer tokens: address blocked");
                }
                Err(err.into())
            }
            other => Ok(other?),
        }
    }

    /// The key environments' secrets are sealed with (the dashboard's key
    /// rotation seals the new one).
    pub fn master_key(&self) -> &MasterKey {
        &self.master_key
    }

    /// The caller an `Authorization` header value names.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Auth, AuthError> {
        let token = header
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::BadKey)?;

        if token.starts_with("tr_") {
            let env = self.envs.by_key(&self.db, &self.master_key, token).await?.ok_or(AuthError::BadKey)?;
            return Ok(Auth { env, principal: Principal::SecretKey });
        }

        let env_id = jwt::unverified_subject(token).map_err(|_| AuthError::BadToken)?;
        let env = self.envs.by_id(&self.db, &self.master_key, env_id).await?.ok_or(AuthError::BadToken)?;
        let claims = jwt::verify(token, &env.secret_key, self.leeway_secs).map_err(|err| {
            tracing::debug!(%err, "rejected public token");
            match err {
                jwt::TokenError::Expired(secs) => AuthError::TokenExpired(secs),
                jwt::TokenError::NotYetValid(secs) => AuthError::TokenNotYetValid(secs),
                _ => AuthError::BadToken,
            }
        })?;
        Ok(Auth { env, principal: Principal::PublicToken { scopes: claims.scopes } })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Auth
where
    Authenticator: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        let authenticator = Authenticator::from_ref(state);
        let client = authenticator.failures.as_ref().and_then(|f| f.client(parts));
        authenticator.authenticate_client(client, header).await
    }
}
