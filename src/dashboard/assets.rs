//! The vendored front-end files (`static/`, see `static/VENDORED.md`), built
//! into the binary so a deployment is one file and no page needs a CDN.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

const FILES: &[(&str, &str, &[u8])] = &[
    ("htmx.min.js", "text/javascript; charset=utf-8", include_bytes!("../../static/htmx.min.js")),
    ("htmx-ext-sse.js", "text/javascript; charset=utf-8", include_bytes!("../../static/htmx-ext-sse.js")),
    ("dashboard.js", "text/javascript; charset=utf-8", include_bytes!("../../static/dashboard.js")),
    ("playground.js", "text/javascript; charset=utf-8", include_bytes!("../../static/playground.js")),
    ("dashboard.css", "text/css; charset=utf-8", include_bytes!("../../static/dashboard.css")),
];

/// Pages link assets with `?v=<ASSET_VERSION>`, so a new build is fetched anew
/// and browsers may keep a file for a day without asking.
pub const ASSET_VERSION: &str = env!("CARGO_PKG_VERSION");

pub async fn serve(Path(file): Path<String>) -> Response {
    match FILES.iter().find(|(name, ..)| *name == file) {
        Some((_, content_type, body)) => {
            ([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "public, max-age=86400")], *body)
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}
