//! The agent playground: an admin starts a session of a task (or reopens one)
//! and talks to its agent from the page, the way a customer's browser app
//! would. The server only creates or finds the session and hands the page a
//! short-lived public token scoped to it; `static/playground.js` then uses the
//! public realtime endpoints (`.in` append, `.out` and `.in` SSE) with that
//! token, so the playground exercises exactly what a browser client sees.
//!
//! Admin only: starting creates a session and triggers its first run, and the
//! conversation page carries a token that writes to the session. A start's
//! audit row commits with the session it created; a reopen is audited too.

use super::error::Form;
use askama::Template;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::auth::{csrf_token, Signed};
use super::error::{DashboardError, PageResult};
use super::pages::{env_choices, env_label, find_session, iso, render, EnvChoice, Frame};
use crate::audit::{self, Actor, AuditAction};
use crate::auth::minting::{self, Expiration};
use crate::auth::{jwt, Authenticator, Principal};
use crate::db::StoreError;
use crate::ids::{id_problem, SESSION_PREFIX};
use crate::jobs::Jobs;
use crate::runs::store as run_store;
use crate::sessions::model::Session;
use crate::sessions::store::{self as session_store, CreateOutcome};
use crate::sessions::validate::{self, CreateSessionBody};
use crate::tenancy::store as tenancy_store;
use crate::tenancy::Environment;

/// The task the form suggests: the example agent `scripts/dev.sh` runs.
const DEFAULT_TASK: &str = crate::worker::echo::TASK;
/// The session type the official chat clients create.
const SESSION_TYPE: &str = "chat.agent";
/// Every playground session carries this tag, so the sessions list can tell
/// them from the customers'.
const TAG: &str = "playground";
/// How long the page's token lives: long enough for a conversation, short
/// enough that a copied page is soon useless. The agent hands a fresh token
/// with each turn's end (`public-access-token` on `turn-complete`), which the
/// page adopts, as the official transport does.
const TOKEN_TTL: &str = "15m";

/// Most task identifiers suggested per environment.
const SUGGESTED_TASKS: i64 = 50;

/// The task identifiers an environment has run, for the task field's datalist.
pub struct EnvTasks {
    pub env: String,
    pub tasks: Vec<String>,
}

#[derive(Template)]
#[template(path = "dashboard/playground.html")]
struct StartPage {
    frame: Frame,
    envs: Vec<EnvChoice>,
    /// One datalist per environment; `static/playground.js` points the task
    /// field at the selected environment's.
    tasks: Vec<EnvTasks>,
    /// The selected environment's datalist.
    selected: String,
    task: &'static str,
}

/// The playground's form: an environment, a task, and what to reopen.
pub async fn index(State(db): State<PgPool>, signed: Signed) -> PageResult<Response> {
    let envs = tenancy_store::list(&db).await?;
    let selected = envs.first().map(|e| e.id.to_string()).unwrap_or_default();
    let mut tasks = Vec::with_capacity(envs.len());
    for e in &envs {
        let mut seen = run_store::task_identifiers(&db, e.id, SUGGESTED_TASKS).await?;
        if !seen.iter().any(|t| t == DEFAULT_TASK) {
            seen.insert(0, DEFAULT_TASK.to_string());
        }
        tasks.push(EnvTasks { env: e.id.to_string(), tasks: seen });
    }
    render(StartPage {
        frame: Frame::new(&signed, "playground"),
        envs: env_choices(&envs, &selected),
        tasks,
        selected,
        task: DEFAULT_TASK,
    })
}

#[derive(serde::Deserialize)]
pub struct StartForm {
    csrf: Option<String>,
    #[serde(default)]
    env: String,
    #[serde(default)]
    task: String,
    /// A session id or external id to reopen; empty starts a new session.
    #[serde(default)]
    reopen: String,
}

/// Starts a session (or reopens one) and redirects to its conversation.
pub async fn start(
    State(db): State<PgPool>,
    State(auth): State<Authenticator>,
    State(jobs): State<Jobs>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<StartForm>,
) -> PageResult<Response> {
    signed.authorize_action(csrf_token(form.csrf.as_deref(), &headers))?;
    let env_id =
        Uuid::parse_str(form.env.trim()).map_err(|_| DashboardError::BadRequest("Pick an environment".into()))?;
    let env = tenancy_store::find_by_id(&db, auth.master_key(), env_id)
        .await?
        .ok_or_else(|| DashboardError::NotFound(format!("No environment {env_id}")))?;
    let reopen = form.reopen.trim();
    let (session, action) = if reopen.is_empty() {
        (create(&db, &jobs, &env, &form.task, signed.operator.id).await?, AuditAction::PlaygroundStart)
    } else {
        let session = find_to_reopen(&db, &env, reopen).await?;
        audit::record(
            &db,
            &Actor::Operator(signed.operator.id),
            AuditAction::PlaygroundReopen,
            &target(&session),
            audit_detail(&env, &session),
        )
        .await?;
        (session, AuditAction::PlaygroundReopen)
    };
    tracing::info!(operator = %signed.operator.email, session = %session.friendly_id, %action, "operator used the playground");
    Ok(Redirect::to(&format!("/dashboard/playground/{}", session.friendly_id)).into_response())
}

fn target(session: &Session) -> String {
    format!("session:{}", session.friendly_id)
}

fn audit_detail(env: &Environment, session: &Session) -> serde_json::Value {
    json!({ "environment": env.id, "task": session.task_identifier, "run": session.current_run_friendly_id })
}

/// Creates a chat session of `task` as the API's create does (the same
/// validation, the same transaction with its first run, the trigger job
/// relayed), named by a fresh external id that also serves as the chat id.
/// The operator's audit row commits in that transaction.
async fn create(db: &PgPool, jobs: &Jobs, env: &Environment, task: &str, operator: Uuid) -> PageResult<Session> {
    let chat_id = format!("playground-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let body: CreateSessionBody = serde_json::from_value(json!({
        "type": SESSION_TYPE,
        "taskIdentifier": task,
        "externalId": chat_id,
        "triggerConfig": { "basePayload": { "chatId": chat_id } },
        "tags": [TAG],
    }))
    .map_err(|e| DashboardError::Internal(e.into()))?;
    let new = validate::create(body).map_err(|e| DashboardError::BadRequest(e.to_string()))?;
    let mut tx = crate::db::begin(db).await.map_err(StoreError::from)?;
    match session_store::create_in(&mut tx, env, &new).await? {
        CreateOutcome::Created(session, job) => {
            audit::record(
                &mut *tx,
                &Actor::Operator(operator),
                AuditAction::PlaygroundStart,
                &target(&session),
                audit_detail(env, &session),
            )
            .await?;
            tx.commit().await.map_err(StoreError::from)?;
            jobs.relay(&[job]).await;
            Ok(session)
        }
        // A fresh random external id: another session holding it is a bug.
        other => Err(DashboardError::Internal(anyhow::anyhow!("playground external id {chat_id} taken: {other:?}"))),
    }
}

/// The session `key` (a session id or an external id) names in `env`.
async fn find_to_reopen(db: &PgPool, env: &Environment, key: &str) -> PageResult<Session> {
    if let Some(problem) = id_problem(key) {
        return Err(DashboardError::BadRequest(format!("The session to reopen {problem}")));
    }
    session_store::find(db, env.id, key)
        .await?
        .ok_or_else(|| DashboardError::NotFound(format!("No session {key} in this environment; nothing was changed")))
}

#[derive(Template)]
#[template(path = "dashboard/playground_session.html")]
struct ConversationPage {
    frame: Frame,
    session: String,
    chat_id: String,
    external_id: String,
    task: String,
    status: &'static str,
    environment: String,
    open: bool,
    token: String,
    token_expires: String,
    in_url: String,
    out_url: String,
}

/// The conversation view of a session, with a public token for it.
pub async fn conversation(
    State(db): State<PgPool>,
    State(auth): State<Authenticator>,
    signed: Signed,
    Path(id): Path<String>,
) -> PageResult<Response> {
    // The page carries a token that writes to the session: admins only.
    if !signed.can_act() {
        return Err(DashboardError::Forbidden);
    }
    if !id.starts_with(SESSION_PREFIX) {
        return Err(DashboardError::BadRequest("Not a session id".into()));
    }
    let s = find_session(&db, &id).await?;
    let env = tenancy_store::find_by_id(&db, auth.master_key(), s.runtime_environment_id)
        .await?
        .ok_or_else(|| DashboardError::Internal(anyhow::anyhow!("session {id} has no environment")))?;
    let label = tenancy_store::list(&db)
        .await?
        .iter()
        .find(|e| e.id == env.id)
        .map(env_label)
        .unwrap_or_else(|| env.id.to_string());
    let (token, expires) = session_token(&env, &s.friendly_id)?;
    let base = format!("/realtime/v1/sessions/{}", s.friendly_id);
    render(ConversationPage {
        frame: Frame::new(&signed, "playground"),
        chat_id: s.external_id.clone().unwrap_or_else(|| s.friendly_id.clone()),
        external_id: s.external_id.clone().unwrap_or_default(),
        task: s.task_identifier.clone(),
        status: s.status_now().as_str(),
        environment: label,
        open: s.write_refusal().is_none(),
        token,
        token_expires: iso(&expires),
        in_url: format!("{base}/in"),
        out_url: format!("{base}/out"),
        session: s.friendly_id,
    })
}

/// A public token reading and writing `session` only, minted as
/// `POST /api/v1/auth/public-tokens` mints one for the environment's key.
fn session_token(env: &Environment, session: &str) -> PageResult<(String, chrono::DateTime<Utc>)> {
    let scopes = vec![format!("read:sessions:{session}"), format!("write:sessions:{session}")];
    let now = crate::clock::now();
    let grant = minting::grant(&Principal::SecretKey, &scopes, Some(&Expiration::In(TOKEN_TTL.into())), now)
        .map_err(|e| DashboardError::Internal(e.into()))?;
    let token = jwt::mint(env.id, &env.secret_key, grant.scopes, grant.ttl_secs);
    Ok((token, now + chrono::Duration::seconds(grant.ttl_secs)))
}
