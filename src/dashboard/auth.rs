//! Who is signed in to the dashboard, and what they may do.
//!
//! - The session cookie holds a server-side session id and its HMAC-SHA256
//!   under a key derived from the master key (every server of a deployment
//!   derives the same one). A forged or altered cookie is refused before the
//!   database is asked; logout deletes the row, so a copied cookie dies too.
//!   HttpOnly, SameSite=Strict, scoped to `/dashboard`.
//! - CSRF: every signed-in form carries the session's token (`csrf`), and
//!   htmx sends it as `X-CSRF-Token`; the login form uses a double-submit
//!   cookie, as there is no session yet.
//! - API keys and tokens are never looked at here, and the API never reads
//!   cookies: neither credential works on the other side.

use super::error::Form;
use askama::Template;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::error::{DashboardError, PageResult};
use crate::config::Config;
use crate::http::client::ClientAddr;
use crate::operators::sign_in::{Outcome, SignIn};
use crate::operators::{store, Operator};
use redis::aio::ConnectionManager;
use std::sync::Arc;

const SESSION_COOKIE: &str = "sessiond_dashboard";
const LOGIN_COOKIE: &str = "sessiond_login";

/// What the dashboard's sign-in needs: the operators' table and the cookie key.
#[derive(Clone)]
pub struct DashboardAuth {
    db: PgPool,
    mac: Hmac<Sha256>,
    secure: bool,
    session_hours: i64,
    /// Password checks, throttled per address and slowed per email.
    sign_in: SignIn,
    trusted_proxies: Arc<[ipnet::IpNet]>,
}

impl DashboardAuth {
    pub fn new(config: &Config, db: PgPool, redis: ConnectionManager) -> Self {
        // Derived from the master key, so every server signs alike; without
        // one (tools, some tests) a random key: sign-ins end with the process.
        let mut key = [0u8; 32];
        match config.master_key.as_deref() {
            Some(master) => {
                let mut mac = new_mac(master.trim().as_bytes());
                mac.update(b"sessiond dashboard session cookie v1");
                key.copy_from_slice(&mac.finalize().into_bytes());
            }
            None => rand::thread_rng().fill_bytes(&mut key),
        }
        DashboardAuth {
            sign_in: SignIn::new(db.clone(), redis, &config.redis_prefix, config.auth_failures_per_minute),
            trusted_proxies: config.trusted_proxies.clone().into(),
            db,
            mac: new_mac(&key),
            secure: config.dashboard_cookie_secure,
            session_hours: config.dashboard_session_hours,
        }
    }

    /// The password verifier sign-ins share (its gauges show in tests).
    pub fn verifier(&self) -> &crate::operators::Verifier {
        self.sign_in.verifier()
    }

    fn sign(&self, value: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(value.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The session id in a cookie value, if its signature holds.
    fn verify(&self, cookie: &str) -> Option<Uuid> {
        let (id, sig) = cookie.split_once('.')?;
        let expected = self.sign(id);
        bool::from(expected.as_bytes().ct_eq(sig.as_bytes())).then(|| Uuid::parse_str(id).ok()).flatten()
    }

    fn cookie(&self, name: &str, value: &str, path: &str, max_age_secs: i64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{name}={value}; Path={path}; Max-Age={max_age_secs}; HttpOnly; SameSite=Strict{secure}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// HMAC takes a key of any length, so this cannot fail.
fn new_mac(key: &[u8]) -> Hmac<Sha256> {
    match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    }
}

/// A signed-in operator, with their session's CSRF token.
#[derive(Debug, Clone)]
pub struct Signed {
    pub operator: Operator,
    pub session_id: Uuid,
    pub csrf: String,
}

impl Signed {
    /// Refuses a viewer, and a request without this session's CSRF token.
    pub fn authorize_action(&self, token: Option<&str>) -> PageResult<()> {
        self.check_csrf(token)?;
        if !self.operator.role.can_act() {
            return Err(DashboardError::Forbidden);
        }
        Ok(())
    }

    pub fn check_csrf(&self, token: Option<&str>) -> PageResult<()> {
        match token {
            Some(t) if bool::from(t.as_bytes().ct_eq(self.csrf.as_bytes())) => Ok(()),
            _ => Err(DashboardError::Csrf),
        }
    }

    pub fn can_act(&self) -> bool {
        self.operator.role.can_act()
    }
}

/// The CSRF token of a request: the form's `csrf` field, else htmx's header.
pub fn csrf_token<'a>(form: Option<&'a str>, headers: &'a HeaderMap) -> Option<&'a str> {
    form.or_else(|| headers.get("x-csrf-token").and_then(|v| v.to_str().ok()))
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl<S> FromRequestParts<S> for Signed
where
    DashboardAuth: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = DashboardError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth = DashboardAuth::from_ref(state);
        let id =
            cookie_value(&parts.headers, SESSION_COOKIE).and_then(|c| auth.verify(c)).ok_or(DashboardError::SignIn)?;
        let (operator, csrf) = store::session(&auth.db, id).await?.ok_or(DashboardError::SignIn)?;
        Ok(Signed { operator, session_id: id, csrf })
    }
}

#[derive(Template)]
#[template(path = "dashboard/login.html")]
struct LoginPage<'a> {
    csrf: &'a str,
    email: &'a str,
    error: Option<&'a str>,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn login_form(auth: &DashboardAuth, status: StatusCode, email: &str, error: Option<&str>) -> PageResult<Response> {
    let csrf = random_token();
    let body = LoginPage { csrf: &csrf, email, error }.render()?;
    let mut resp = (status, Html(body)).into_response();
    resp.headers_mut().append(header::SET_COOKIE, auth.cookie(LOGIN_COOKIE, &csrf, "/dashboard/login", 3600));
    Ok(resp)
}

pub async fn login_page(State(auth): State<DashboardAuth>) -> PageResult<Response> {
    login_form(&auth, StatusCode::OK, "", None)
}

#[derive(serde::Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

/// The client address of a request, as the sign-in throttle counts it.
pub struct Client(pub Option<ClientAddr>);

impl<S> FromRequestParts<S> for Client
where
    DashboardAuth: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(Client(ClientAddr::of(parts, &DashboardAuth::from_ref(state).trusted_proxies)))
    }
}

pub async fn login(
    State(auth): State<DashboardAuth>,
    Client(client): Client,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> PageResult<Response> {
    let expected = cookie_value(&headers, LOGIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !bool::from(expected.as_bytes().ct_eq(form.csrf.as_bytes())) {
        return login_form(&auth, StatusCode::FORBIDDEN, &form.email, Some("The form expired; try again."));
    }
    let outcome = auth
        .sign_in
        .attempt(client, &form.email, &form.password)
        .await
        .map_err(|e| DashboardError::Internal(e.into()))?;
    let operator = match outcome {
        Outcome::SignedIn(operator) => operator,
        Outcome::Refused => {
            tracing::info!("dashboard sign-in refused");
            return login_form(&auth, StatusCode::UNAUTHORIZED, &form.email, Some("Wrong email or password."));
        }
        Outcome::Throttled(wait) => {
            let secs = crate::auth::throttle::retry_after_secs(wait);
            let message = format!(
                "Too many failed sign-ins from this address. Try again in {}.",
                if secs < 120 { format!("{secs} seconds") } else { format!("{} minutes", secs.div_ceil(60)) }
            );
            let mut resp = login_form(&auth, StatusCode::TOO_MANY_REQUESTS, &form.email, Some(&message))?;
            resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
            return Ok(resp);
        }
    };
    let id = store::open_session(&auth.db, operator.id, &random_token(), auth.session_hours).await?;
    tracing::info!(operator = %operator.email, "operator signed in");
    let value = format!("{id}.{}", auth.sign(&id.to_string()));
    let mut resp = Redirect::to("/dashboard/sessions").into_response();
    let h = resp.headers_mut();
    h.append(header::SET_COOKIE, auth.cookie(SESSION_COOKIE, &value, "/dashboard", auth.session_hours * 3600));
    h.append(header::SET_COOKIE, auth.cookie(LOGIN_COOKIE, "", "/dashboard/login", 0));
    Ok(resp)
}

#[derive(serde::Deserialize)]
pub struct CsrfForm {
    pub csrf: Option<String>,
}

/// An operator allowed to act: signed in, an admin, and the request carries
/// this session's CSRF token (the form's `csrf` field, or htmx's header).
/// It reads the form body, so it is a handler's last argument. A body that
/// is no form is refused like a missing token.
pub struct Authorized(pub Signed);

impl<S> FromRequest<S> for Authorized
where
    DashboardAuth: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = DashboardError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let signed = Signed::from_request_parts(&mut parts, state).await?;
        let headers = parts.headers.clone();
        let Form(form) = Form::<CsrfForm>::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(|_| DashboardError::Csrf)?;
        signed.authorize_action(csrf_token(form.csrf.as_deref(), &headers))?;
        Ok(Authorized(signed))
    }
}

pub async fn logout(
    State(auth): State<DashboardAuth>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> PageResult<Response> {
    signed.check_csrf(csrf_token(form.csrf.as_deref(), &headers))?;
    store::close_session(&auth.db, signed.session_id).await?;
    let mut resp = Redirect::to("/dashboard/login").into_response();
    resp.headers_mut().append(header::SET_COOKIE, auth.cookie(SESSION_COOKIE, "", "/dashboard", 0));
    Ok(resp)
}
