//! The API layer's error: every failure a handler can return, and the single
//! place that decides its status code and JSON body. Internal errors are logged
//! here with their cause and answered with a generic message; those caused by
//! a dependency being away ([`crate::db::unavailable`]) answer 503 with
//! `Retry-After` however deep in a domain error the cause sits.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::AuthError;
use crate::db::StoreError;
use crate::runs::dispatch::DispatchError;
use crate::sessions::access::AccessError;
use crate::sessions::close::CloseError;
use crate::sessions::list::ListQueryError;
use crate::sessions::run_manager::RunManagerError;
use crate::streams::effects::{AppendError, EffectError};
use crate::streams::permits::StreamScope;
use crate::streams::sse::SubscribeError;
use crate::streams::store::ChannelError;
use crate::validation::ValidationError;
use crate::waitpoints::WaitError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("Unauthorized: missing required scopes")]
    Forbidden,
    /// Forbidden, with the reason the caller needs to fix its request.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("Method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    /// A run acting for a session it no longer serves: 409 with a `code` a
    /// worker can act on (stop), the same wherever the fence is met.
    #[error("{message}")]
    RunFenced { fence: RunFence, message: String },
    #[error("Request body is too large")]
    PayloadTooLarge,
    /// Too many failed credentials from this client: 429 with
    /// `Retry-After` (whole seconds).
    #[error("{message}")]
    TooManyRequests { message: String, retry_after_secs: u64 },
    #[error("Request body was not received in time")]
    RequestTimeout,
    /// A long-lived request (SSE, a waitpoint long-poll) over one of its caps:
    /// 429 `too_many_streams`, naming the cap, with `Retry-After`.
    #[error("Too many open streams for this {}; close one or retry later", .0.as_str())]
    TooManyStreams(StreamScope),
    /// A quota is reached: 409 with its `code`, final for the official client
    /// (`x-should-retry: false`), as retrying cannot help until something is
    /// freed.
    #[error("{}", .0.message())]
    Quota(Quota),
    /// A request-rate limit is reached (see [`crate::limits`]): 429
    /// `rate_limited` with the `x-ratelimit-*` headers and `Retry-After`.
    #[error("{}", .0.message())]
    RateLimited(crate::limits::RateLimited),
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// A dependency (Postgres, Redis) is away or refusing writes: the request
    /// may succeed later. An `Internal` error with such a cause reads as this.
    #[error("Service temporarily unavailable, retry shortly")]
    Unavailable,
    #[error("internal error: {0}")]
    Internal(anyhow::Error),
}

/// Why a run is refused as its session's run (the `code` of a 409).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunFence {
    /// A hand-off replaced it: `run_superseded`.
    Superseded,
    /// It ended (or is gone): `run_not_live`.
    NotLive,
}

impl RunFence {
    pub fn code(self) -> &'static str {
        match self {
            RunFence::Superseded => "run_superseded",
            RunFence::NotLive => "run_not_live",
        }
    }
}

/// A quota a request would pass (the `code` of a 409).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// The channel holds its most bytes: `channel_full`.
    ChannelFull { limit: u64 },
    /// The run has its most WAITING waitpoints: `too_many_waitpoints`.
    PendingWaitpoints { limit: i64 },
}

impl Quota {
    pub fn code(self) -> &'static str {
        match self {
            Quota::ChannelFull { .. } => "channel_full",
            Quota::PendingWaitpoints { .. } => "too_many_waitpoints",
        }
    }

    fn message(self) -> String {
        match self {
            Quota::ChannelFull { limit } => format!("The channel is full: it holds at most {limit} bytes"),
            Quota::PendingWaitpoints { limit } => {
                format!("The run has {limit} pending waitpoints, its most; complete or time out one first")
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        ApiError::Internal(err.into())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        ApiError::Internal(err)
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(err: redis::RedisError) -> Self {
        anyhow::Error::from(err).into()
    }
}

// How each domain error reads over HTTP. Every mapping lives here.

/// A path parameter that does not decode (`http::extract::ApiPath`): 400
/// naming the parameter, never axum's plain-text rejection nor the Rust type
/// it was to become.
impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::PathRejection) -> Self {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        let key = match &rejection {
            PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
                ErrorKind::InvalidUtf8InPathParam { key } => {
                    return ApiError::BadRequest(format!("Invalid `{key}` in path: not valid UTF-8"))
                }
                ErrorKind::ParseErrorAtKey { key, .. } | ErrorKind::DeserializeError { key, .. } => Some(key.clone()),
                _ => None,
            },
            // A route whose handler names parameters it does not have: a bug.
            PathRejection::MissingPathParams(e) => return ApiError::Internal(anyhow::anyhow!("{e}")),
            _ => None,
        };
        ApiError::BadRequest(match key {
            Some(key) => format!("Invalid `{key}` in path"),
            None => "Invalid path".into(),
        })
    }
}

impl From<crate::auth::minting::MintError> for ApiError {
    fn from(err: crate::auth::minting::MintError) -> Self {
        use crate::auth::minting::MintError;
        match err {
            MintError::Invalid(v) => ApiError::Validation(v),
            MintError::NotAllowed(why) => ApiError::Refused(why),
            MintError::Superseded(_) => ApiError::RunFenced { fence: RunFence::Superseded, message: err.to_string() },
            MintError::RunNotLive(_) => ApiError::RunFenced { fence: RunFence::NotLive, message: err.to_string() },
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Store(e) => e.into(),
            other => ApiError::Unauthorized(other.to_string()),
        }
    }
}

impl From<ListQueryError> for ApiError {
    fn from(err: ListQueryError) -> Self {
        match err {
            ListQueryError::Invalid(v) => ApiError::Validation(v),
            ListQueryError::BadCursor => ApiError::BadRequest(err.to_string()),
        }
    }
}

impl From<AccessError> for ApiError {
    fn from(err: AccessError) -> Self {
        match err {
            AccessError::Forbidden => ApiError::Forbidden,
            AccessError::NotFound => ApiError::NotFound("Session not found".into()),
            AccessError::Store(e) => e.into(),
        }
    }
}

impl From<RunManagerError> for ApiError {
    fn from(err: RunManagerError) -> Self {
        match err {
            RunManagerError::Closed => ApiError::Conflict("Session is closed".into()),
            RunManagerError::NotFound => ApiError::NotFound("Session not found".into()),
            RunManagerError::Channel(e) => e.into(),
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<ChannelError> for ApiError {
    fn from(err: ChannelError) -> Self {
        match err {
            ChannelError::Closed => ApiError::BadRequest("Session is closed".into()),
            ChannelError::Superseded => ApiError::RunFenced {
                fence: RunFence::Superseded,
                message: "This run was superseded by another run of the session and may no longer write to it".into(),
            },
            ChannelError::Full { limit } => ApiError::Quota(Quota::ChannelFull { limit }),
            ChannelError::Redis(err) => err.into(),
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<EffectError> for ApiError {
    fn from(err: EffectError) -> Self {
        match err {
            EffectError::Channel(e) => e.into(),
            EffectError::Boot(e) => e.into(),
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<AppendError> for ApiError {
    fn from(err: AppendError) -> Self {
        match err {
            AppendError::Refused(reason) => ApiError::BadRequest(reason.into()),
            AppendError::Channel(e) => e.into(),
            AppendError::Effect(e) => e.into(),
        }
    }
}

impl From<WaitError> for ApiError {
    fn from(err: WaitError) -> Self {
        match err {
            WaitError::SessionClosed(reason) => ApiError::BadRequest(reason.into()),
            WaitError::RunNotFound => ApiError::NotFound("Run not found".into()),
            WaitError::RunNotInSession => {
                ValidationError::new("session", "the run does not belong to this session").into()
            }
            WaitError::Superseded(by) => ApiError::superseded(&by),
            WaitError::RunNotActive(status) => ApiError::Conflict(format!("Run is {status}")),
            WaitError::TooManyPending(limit) => ApiError::Quota(Quota::PendingWaitpoints { limit }),
            WaitError::Store(e) => e.into(),
            WaitError::Channel(e) => e.into(),
        }
    }
}

impl From<CloseError> for ApiError {
    fn from(err: CloseError) -> Self {
        match err {
            CloseError::NotFound => ApiError::NotFound("Session not found".into()),
            CloseError::Store(e) => e.into(),
            // Closed but not sealed: the cause stays in the chain, so Redis
            // away is classified 503, not 500 (the job keeps sealing).
            seal @ CloseError::Seal { .. } => ApiError::Internal(anyhow::Error::new(seal)),
        }
    }
}

impl From<SubscribeError> for ApiError {
    fn from(err: SubscribeError) -> Self {
        match err {
            SubscribeError::PastEnd { .. } => ApiError::BadRequest(err.to_string()),
            SubscribeError::Channel(e) => e.into(),
        }
    }
}

impl From<DispatchError> for ApiError {
    fn from(err: DispatchError) -> Self {
        match err {
            DispatchError::Queue(e) => e.into(),
            DispatchError::Store(e) => e.into(),
        }
    }
}

/// Asks the client to retry a 503 (or a 429: a stream over its cap) after a
/// second; dependencies come back, streams end, or the client gives up on its
/// own schedule.
pub fn retry_after(status: StatusCode, headers: &mut axum::http::HeaderMap) {
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        headers.insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
    }
}

impl ApiError {
    /// A run replaced by `by` (a hand-off) acting as its session's run.
    pub fn superseded(by: &str) -> ApiError {
        ApiError::RunFenced {
            fence: RunFence::Superseded,
            message: format!("Run was superseded by {by}: another run now serves its session"),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden | ApiError::Refused(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) | ApiError::RunFenced { .. } | ApiError::Quota(_) => StatusCode::CONFLICT,
            ApiError::TooManyStreams(_) | ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(err) if crate::db::unavailable(err) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable `code` of this error, where one tells a client
    /// what to do beyond the status.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::RunFenced { fence, .. } => Some(fence.code()),
            ApiError::Quota(quota) => Some(quota.code()),
            ApiError::TooManyStreams(_) => Some("too_many_streams"),
            ApiError::RateLimited(_) => Some("rate_limited"),
            _ => None,
        }
    }

    /// Headers this error adds to its answer: `Retry-After` on a 503 or 429,
    /// a rate limit's `x-ratelimit-*` and an authentication throttle's wait
    /// (which set their own `Retry-After`).
    pub fn write_headers(&self, headers: &mut axum::http::HeaderMap) {
        retry_after(self.status(), headers);
        if let ApiError::RateLimited(limited) = self {
            limited.write_headers(headers);
        }
        if let ApiError::TooManyRequests { retry_after_secs, .. } = self {
            headers.insert(axum::http::header::RETRY_AFTER, (*retry_after_secs).into());
        }
    }

    /// This error as answered: an internal error caused by a dependency being
    /// away becomes [`ApiError::Unavailable`] (logged as a warning, with its
    /// cause), so no wrapping layer can turn an outage into a 500.
    pub fn classified(self) -> ApiError {
        match self {
            ApiError::Internal(err) if crate::db::unavailable(&err) => {
                tracing::warn!(error = %format!("{err:#}"), "dependency unavailable");
                ApiError::Unavailable
            }
            other => other,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let this = self.classified();
        let status = this.status();
        let body = match &this {
            ApiError::Internal(err) => {
                tracing::error!(error = ?err, "internal error");
                json!({ "error": "Something went wrong" })
            }
            ApiError::Validation(v) => json!({
                "error": format!("Invalid request: {}: {}", v.field, v.message),
                "field": v.field,
                "reason": v.message,
            }),
            ApiError::RunFenced { fence, message } => json!({ "error": message, "code": fence.code() }),
            ApiError::TooManyStreams(scope) => {
                json!({ "error": this.to_string(), "code": "too_many_streams", "scope": scope.as_str() })
            }
            ApiError::Quota(quota) => json!({ "error": this.to_string(), "code": quota.code() }),
            ApiError::RateLimited(_) => json!({ "error": this.to_string(), "code": "rate_limited" }),
            other => json!({ "error": other.to_string() }),
        };
        let mut response = (status, Json(body)).into_response();
        // The official client retries 409 by default; a conflict here is final.
        if status == StatusCode::CONFLICT {
            response.headers_mut().insert("x-should-retry", axum::http::HeaderValue::from_static("false"));
        }
        this.write_headers(response.headers_mut());
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
