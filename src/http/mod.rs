//! HTTP plumbing shared by every route: the router with its layers (request ids,
//! tracing, CORS for the API only, body limit), JSON fallbacks, and the error and extractor types.

pub mod client;
pub mod conn;
pub mod error;
pub mod extract;
pub mod health;

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderName, Method};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use error::ApiError;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    let max_body = state.config.max_body_bytes;
    let body_timeout = Duration::from_millis(state.config.body_read_timeout_ms);
    // The API answers any origin (its callers hold bearer tokens); the
    // dashboard, whose credential is a cookie, is outside that CORS layer, so
    // no other origin's script is ever invited to read its pages.
    let api = Router::new()
        .route("/healthz", get(|| async { Json(json!({"ok": true})) }))
        .route("/readyz", get(health::readyz))
        .merge(crate::auth::routes::router())
        .merge(crate::sessions::routes::router())
        .merge(crate::runs::routes::router())
        .merge(crate::streams::routes::router())
        .merge(crate::waitpoints::routes::router())
        .fallback(|| async { ApiError::NotFound("Not found".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(cors());
    Router::new()
        .merge(api)
        .merge(crate::dashboard::router())
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(body_timeout, conn::body_deadline))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), uri = %req.uri().path(), request_id = %id)
        }))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// A handler that panics (a bug) answers the generic 500, logged inside the
/// request's span, instead of dropping the connection with no answer.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    use axum::response::IntoResponse;
    ApiError::Internal(anyhow::anyhow!("handler panicked: {message}")).into_response()
}

/// Browser callers hold bearer tokens (never cookies), so any origin may call;
/// preflights are answered for every route.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::any())
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([
            REQUEST_ID,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-stream-version"),
            HeaderName::from_static("x-session-settled"),
            // initialize's direct-write details, for browser writers.
            HeaderName::from_static("x-append-url"),
            HeaderName::from_static("x-write-token"),
            HeaderName::from_static("x-write-token-expires-at"),
            // A 429's rate limit, for browser callers' retries.
            HeaderName::from_static("x-ratelimit-limit"),
            HeaderName::from_static("x-ratelimit-remaining"),
            HeaderName::from_static("x-ratelimit-reset"),
            header::RETRY_AFTER,
        ])
        .max_age(Duration::from_secs(3600))
        .vary([header::ORIGIN])
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_the_generic_500() {
        let app: Router = Router::new()
            .route("/boom", get(|| async { panic!("secret detail") as &'static str }))
            .layer(CatchPanicLayer::custom(panic_response));
        let resp = app.oneshot(Request::get("/boom").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            json!({"error": "Something went wrong"})
        );
    }
}
