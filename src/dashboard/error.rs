//! Dashboard errors: each becomes a page (or, for htmx requests, a fragment)
//! with a status, never a raw body; internal errors are logged and shown as
//! a generic message. Those caused by a dependency being away
//! ([`crate::db::unavailable`]) are a 503 page with `Retry-After`.

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
