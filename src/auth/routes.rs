//! The auth endpoints: the claims the official SDK signs its own public
//! tokens with, and public tokens the server mints (see [`super::minting`]).

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgPool;

use super::minting::{self, Expiration};
use super::{jwt, Auth};
use crate::app::AppState;
use crate::http::error::ApiResult;
use crate::http::extract::ApiJson;
use crate::validation::ValidationError;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/auth/jwt/claims", get(jwt_claims).post(jwt_claims))
        .route("/api/v1/auth/public-tokens", post(public_tokens))
}

/// Claims the official SDK signs into the public tokens it mints itself.
async fn jwt_claims(auth: Auth) -> ApiResult<Json<Value>> {
    auth.require_secret_key()?;
    Ok(Json(json!({ "sub": auth.env.id.to_string(), "pub": true })))
}

/// The official client's `CreatePublicTokenRequestBody`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PublicTokenBody {
    scopes: Vec<String>,
    expiration_time: Option<Expiration>,
    #[serde(default)]
    one_time_use: bool,
    /// Column choices for run subscriptions; sessions have none to skip.
    #[serde(default, rename = "realtime")]
    _realtime: Option<Value>,
}

async fn public_tokens(
    State(db): State<PgPool>,
    auth: Auth,
    limits: crate::limits::Limits,
    ApiJson(body): ApiJson<PublicTokenBody>,
) -> ApiResult<Json<Value>> {
    limits.admit(&auth, crate::limits::RouteClass::Mint).await?;
    if body.one_time_use {
        return Err(ValidationError::new("oneTimeUse", "one-time tokens are not supported").into());
    }
    let grant = minting::grant(&auth.principal, &body.scopes, body.expiration_time.as_ref(), crate::clock::now())?;
    // A run's token (the only public token `grant` lets through) mints only
    // while its run still serves the session, judged by a fresh read.
    if let Some(run_id) = auth.acting_run() {
        let run = crate::runs::store::find(&db, auth.env.id, run_id).await?;
        let session = match run.as_ref().and_then(|r| r.session_id) {
            Some(id) => crate::sessions::store::find_by_id(&db, auth.env.id, id).await?,
            None => None,
        };
        let current = session.as_ref().and_then(|s| s.current_run_friendly_id.as_deref());
        minting::run_may_mint(run.as_ref(), current)?;
    }
    let token = jwt::mint_by(auth.env.id, &auth.env.secret_key, grant.scopes, grant.ttl_secs, auth.acting_run());
    Ok(Json(json!({ "token": token })))
}
