//! Dashboard errors: each becomes a page (or, for htmx requests, a fragment)
//! with a status, never a raw body; internal errors are logged and shown as
//! a generic message. Those caused by a dependency being away
//! ([`crate::db::unavailable`]) are a 503 page with `Retry-After`.
//!
//! [`check_input`] holds every dashboard request's text (path, query, form
//! body) to the API's text rules before any handler runs: a 400 page, never
//! a NUL reaching Postgres (a 500).

use askama::Template;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};

use crate::db::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// Not signed in: to the login page.
    #[error("sign in first")]
    SignIn,
    #[error("your role cannot do this")]
    Forbidden,
    #[error("the form expired or did not come from this dashboard; reload the page and try again")]
    Csrf,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// The action does not fit the thing's current state (say, canceling a
    /// job that already ran).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<StoreError> for DashboardError {
    fn from(err: StoreError) -> Self {
        DashboardError::Internal(err.into())
    }
}

impl From<crate::sessions::close::CloseError> for DashboardError {
    fn from(err: crate::sessions::close::CloseError) -> Self {
        match err {
            crate::sessions::close::CloseError::NotFound => DashboardError::NotFound("No such session".into()),
            other => DashboardError::Internal(other.into()),
        }
    }
}

impl From<askama::Error> for DashboardError {
    fn from(err: askama::Error) -> Self {
        DashboardError::Internal(err.into())
    }
}

#[derive(Template)]
#[template(path = "dashboard/error.html")]
struct ErrorPage<'a> {
    status: u16,
    title: &'a str,
    message: String,
}

impl IntoResponse for DashboardError {
    fn into_response(self) -> Response {
        let (status, title) = match &self {
            DashboardError::SignIn => return Redirect::to("/dashboard/login").into_response(),
            DashboardError::Forbidden => (StatusCode::FORBIDDEN, "Not allowed"),
            DashboardError::Csrf => (StatusCode::FORBIDDEN, "Form expired"),
            DashboardError::NotFound(_) => (StatusCode::NOT_FOUND, "Not found"),
            DashboardError::BadRequest(_) => (StatusCode::BAD_REQUEST, "Check the form"),
            DashboardError::Conflict(_) => (StatusCode::CONFLICT, "Not possible now"),
            DashboardError::Internal(err) if crate::db::unavailable(err) => {
                tracing::warn!(error = %format!("{err:#}"), "dashboard request: dependency unavailable");
                (StatusCode::SERVICE_UNAVAILABLE, "Temporarily unavailable")
            }
            DashboardError::Internal(err) => {
                tracing::error!(error = %format!("{err:#}"), "dashboard request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "Something went wrong")
            }
        };
        let message = match &self {
            DashboardError::Internal(_) if status == StatusCode::SERVICE_UNAVAILABLE => {
                "A service the dashboard depends on is briefly unavailable; try again in a moment.".into()
            }
            DashboardError::Internal(_) => {
                "The server could not complete this request. It has been logged; try again.".into()
            }
            other => other.to_string(),
        };
        let page = ErrorPage { status: status.as_u16(), title, message };
        let mut response = match page.render() {
            Ok(body) => (status, Html(body)).into_response(),
            Err(_) => (status, title.to_string()).into_response(),
        };
        crate::http::error::retry_after(status, response.headers_mut());
        response
    }
}

pub type PageResult<T> = Result<T, DashboardError>;

/// A form body, for the dashboard's POSTs. A request that is no form (another
/// content type, none, or fields that do not parse) is a 400 page like any
/// other refused form, never axum's bare plain-text 415/422.
pub struct Form<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Form<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = DashboardError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::FormRejection;
        match axum::Form::<T>::from_request(req, state).await {
            Ok(axum::Form(value)) => Ok(Form(value)),
            Err(FormRejection::InvalidFormContentType(_)) => Err(DashboardError::BadRequest(
                "This action takes a form (application/x-www-form-urlencoded); submit it from the dashboard's page"
                    .into(),
            )),
            Err(rejection) => {
                tracing::debug!(%rejection, "dashboard form refused");
                Err(DashboardError::BadRequest("The form could not be read; reload the page and try again".into()))
            }
        }
    }
}

/// Largest dashboard request body read; its forms are small (a filter, a
/// few hundred ticked ids).
pub const MAX_FORM_BYTES: usize = 1024 * 1024;

/// Middleware over every dashboard route: the path's segments, the query's
/// names and values and a body's form fields must be UTF-8 text that
/// [`crate::validation::check_text`] accepts (no NUL), as on the API. One
/// check for all routes, so a handler added later cannot forget it. A body
/// is read as a form whatever its content type (the dashboard takes nothing
/// else), and handed on whole.
pub async fn check_input(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if let Err(err) = check_path(req.uri().path()) {
        return err.into_response();
    }
    if let Err(err) = req.uri().query().map_or(Ok(()), |q| check_pairs("query", q.as_bytes())) {
        return err.into_response();
    }
    use http_body::Body as _;
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_FORM_BYTES).await {
        Ok(bytes) => bytes,
        Err(err) => {
            tracing::debug!(%err, "dashboard body refused");
            return DashboardError::BadRequest(
                "The form could not be read (too large, or it did not arrive); reload the page and try again".into(),
            )
            .into_response();
        }
    };
    if let Err(err) = check_pairs("form", &bytes) {
        return err.into_response();
    }
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

fn bad_text(err: crate::validation::ValidationError) -> DashboardError {
    DashboardError::BadRequest(format!("This request holds text the dashboard cannot take: {err}"))
}

/// `input` percent-decoded (with `+` as a space where `plus` says so) as
/// text the API would take.
fn decoded(field: &str, input: &[u8], plus: bool) -> PageResult<()> {
    let input: std::borrow::Cow<[u8]> = if plus && input.contains(&b'+') {
        input.iter().map(|&b| if b == b'+' { b' ' } else { b }).collect::<Vec<u8>>().into()
    } else {
        input.into()
    };
    let text = percent_encoding::percent_decode(&input)
        .decode_utf8()
        .map_err(|_| bad_text(crate::validation::ValidationError::new(field, "must be valid UTF-8")))?;
    crate::validation::check_text(field, &text).map_err(bad_text)
}

fn check_path(path: &str) -> PageResult<()> {
    path.split('/').try_for_each(|segment| decoded("path", segment.as_bytes(), false))
}

/// An `application/x-www-form-urlencoded` string (a query or a form body):
/// each name and value. A value is reported under its field's name once the
/// name itself has passed.
fn check_pairs(what: &str, input: &[u8]) -> PageResult<()> {
    for pair in input.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        decoded(&format!("{what} field name"), name, true)?;
        let name = String::from_utf8_lossy(name);
        let name = percent_encoding::percent_decode_str(&name.replace('+', " ")).decode_utf8_lossy().into_owned();
        decoded(&format!("{what} field `{name}`"), value, true)?;
    }
    Ok(())
}

#[cfg(test)]
mod input_tests {
    use super::*;

    #[test]
    fn nul_and_broken_utf8_are_refused_wherever_they_sit() {
        assert!(check_path("/dashboard/sessions/session_1").is_ok());
        assert!(check_path("/dashboard/sessions/a%20b").is_ok());
        assert!(check_path("/dashboard/sessions/a%00b").is_err());
        assert!(check_path("/dashboard/sessions/%FF").is_err());
        assert!(check_pairs("query", b"status=failed&q=a+b%21&flag").is_ok());
        assert!(check_pairs("query", b"q=%00").is_err());
        assert!(check_pairs("query", b"%00=x").is_err());
        assert!(check_pairs("query", b"q=%C3").is_err());
        assert!(check_pairs("form", b"csrf=abc&email=a%40b").is_ok());
        let err = check_pairs("form", b"csrf=abc&email=a%00b").unwrap_err().to_string();
        assert!(err.contains("form field `email`") && err.contains("NUL"), "{err}");
    }
}
