//! The API layer's error: every failure a handler can return, and the single
//! place that decides its status code and JSON body. Internal errors are logged
//! here with their cause and answered with a generic message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::db::StoreError;
use crate::validation::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("Unauthorized: missing required scopes")]
    Forbidden,
    #[error("{0}")]
    NotFound(String),
    #[error("Method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("Request body is too large")]
    PayloadTooLarge,
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("internal error: {0}")]
    Internal(#[from] anyhow::Error),
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        ApiError::Internal(err.into())
    }
}

impl ApiError {
    /// A run replaced by `by` (a hand-off) acting as its session's run.
    pub fn superseded(by: &str) -> ApiError {
        ApiError::Conflict(format!("Run was superseded by {by}: another run now serves its session"))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            ApiError::Internal(err) => {
                tracing::error!(error = ?err, "internal error");
                json!({ "error": "Something went wrong" })
            }
            ApiError::Validation(v) => json!({
                "error": format!("Invalid request: {}: {}", v.field, v.message),
                "field": v.field,
                "reason": v.message,
            }),
            other => json!({ "error": other.to_string() }),
        };
        let mut response = (status, Json(body)).into_response();
        // The official client retries 409 by default; a conflict here is final.
        if status == StatusCode::CONFLICT {
            response.headers_mut().insert("x-should-retry", axum::http::HeaderValue::from_static("false"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
