//! Realtime routes for session channels. `:io` is `in` or `out`.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::effects::{Appender, NewAppend};
use super::hub::Hub;
use super::permits::{self, Holder, StreamPermits};
use super::sse::{self, SubscribeRequest, Subscription};
use super::store::ChannelStore;
use super::{ChannelKey, Io, RealtimeSettings, Record};
use crate::app::AppState;
use crate::auth::{jwt, Action, Auth};
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{validate_path_id, ApiPath, ApiQuery};
use crate::limits::{Limits, RouteClass};
use crate::sessions::access::{channel_scope_id, ChannelAccess};
use crate::validation::{parse_seq_num, MAX_SEQ_NUM};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/realtime/v1/sessions/{session}/{io}", get(subscribe).put(initialize))
        .route("/realtime/v1/sessions/{session}/{io}/append", post(append))
        .route("/realtime/v1/sessions/{session}/{io}/records", get(records))
}

/// `/:session/:io` path parameters, validated.
pub struct ChannelPath {
    pub session: String,
    pub io: Io,
}

impl<S: Send + Sync> FromRequestParts<S> for ChannelPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let ApiPath((session, io)) = ApiPath::<(String, String)>::from_request_parts(parts, state).await?;
        validate_path_id(&session)?;
        let io = Io::parse(&io).ok_or_else(|| ApiError::BadRequest("io must be \"in\" or \"out\"".into()))?;
        Ok(ChannelPath { session, io })
    }
}

fn base_url(settings: &RealtimeSettings, headers: &HeaderMap) -> String {
    if let Some(url) = &settings.public_url {
        return url.trim_end_matches('/').to_string();
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    format!("http://{host}")
}

/// Lifetime of the direct-write token handed out by initialize.
const WRITE_TOKEN_TTL_SECS: i64 = 15 * 60;

/// Initializes a channel: the version, plus what a high-throughput writer needs
/// to append directly (the append URL and a short-lived channel-scoped token).
async fn initialize(
    State(sessions): State<ChannelAccess>,
    State(channels): State<ChannelStore>,
    State(settings): State<RealtimeSettings>,
    auth: Auth,
    limits: Limits,
    path: ChannelPath,
    headers: HeaderMap,
) -> ApiResult<Response> {
    limits.admit(&auth, RouteClass::Mint).await?;
    let session = sessions.load(&auth, &path.session, path.io, Action::Write).await?;
    if let Some(refusal) = session.write_refusal() {
        return Err(ApiError::BadRequest(refusal.into()));
    }
    // The row may be a second old (lookup cache); the seal is not.
    if channels.is_sealed(ChannelKey { session_id: session.id, io: path.io }).await? {
        return Err(ApiError::BadRequest("Session is closed".into()));
    }
    // A run's direct-write token stays behind its run's fence (`mintedBy`).
    let token = jwt::mint_by(
        auth.env.id,
        &auth.env.secret_key,
        vec![format!("write:session-channels:{}", channel_scope_id(&session, path.io))],
        WRITE_TOKEN_TTL_SECS,
        auth.acting_run(),
    );
    let append_url =
        format!("{}/realtime/v1/sessions/{}/{}/append", base_url(&settings, &headers), session.friendly_id, path.io);
    let expires = crate::clock::now() + chrono::Duration::seconds(WRITE_TOKEN_TTL_SECS);
    let mut resp = Json(json!({"version": "v2"})).into_response();
    let h = resp.headers_mut();
    for (name, value) in [
        ("x-stream-version", "v2".to_string()),
        ("x-append-url", append_url),
        ("x-write-token", token),
        ("x-write-token-expires-at", expires.to_rfc3339()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    Ok(resp)
}

/// Errors on the append route answer `{ok: false, error}`.
struct AppendError(ApiError);

impl IntoResponse for AppendError {
    fn into_response(self) -> Response {
        let error = self.0.classified();
        let status = error.status();
        let message = match &error {
            ApiError::Internal(err) => {
                tracing::error!(error = ?err, "append failed");
                "Something went wrong".to_string()
            }
            other => other.to_string(),
        };
        let mut body = json!({"ok": false, "error": message});
        if let Some(code) = error.code() {
            body["code"] = json!(code);
        }
        let mut resp = (status, Json(body)).into_response();
        // As for every API 409: final (the official client retries 409 by default).
        if status == StatusCode::CONFLICT {
            resp.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        error.write_headers(resp.headers_mut());
        resp
    }
}

impl<E: Into<ApiError>> From<E> for AppendError {
    fn from(e: E) -> Self {
        AppendError(e.into())
    }
}

const MAX_RECORD_HEADERS: usize = 32;
const MAX_PART_ID_LEN: usize = 128;

/// An `X-Part-Id` is what its error message says: 1-128 visible ASCII
/// characters (`!` to `~`; no spaces or tabs, which a header value may carry).
fn is_part_id(p: &str) -> bool {
    (1..=MAX_PART_ID_LEN).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_graphic())
}

/// Record headers from the request: `X-Record-Headers` (a JSON array of
/// `[name, value]` pairs) and the shorthand `X-Trigger-Control: <subtype>`.
fn record_headers(headers: &HeaderMap) -> Result<Vec<(String, String)>, ApiError> {
    let mut out: Vec<(String, String)> = Vec::new();
    if let Some(raw) = headers.get("x-record-headers") {
        let raw = raw.to_str().map_err(|_| ApiError::BadRequest("X-Record-Headers must be ASCII JSON".into()))?;
        out = serde_json::from_str(raw)
            .map_err(|_| ApiError::BadRequest("X-Record-Headers must be a JSON array of [name, value] pairs".into()))?;
    }
    if let Some(control) = headers.get("x-trigger-control").and_then(|v| v.to_str().ok()) {
        out.push((super::CONTROL_HEADER.into(), control.to_string()));
    }
    if out.len() > MAX_RECORD_HEADERS {
        return Err(ApiError::BadRequest(format!("At most {MAX_RECORD_HEADERS} record headers")));
    }
    if out.iter().any(|(k, v)| k.is_empty() || k.len() > 256 || v.len() > 4096) {
        return Err(ApiError::BadRequest("Record header names must be 1-256 bytes and values at most 4096".into()));
    }
    Ok(out)
}

/// The raw request body, with 413 for bodies over the limit.
struct RawBody(Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = AppendError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state).await.map(RawBody).map_err(|rejection| {
            AppendError(if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadRequest("Could not read the request body".into())
            })
        })
    }
}

#[derive(Serialize)]
struct AppendResponse {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'static str>,
    /// The record's seq (a retry gets the one stored first). The chat
    /// transport matches a turn's `turn-complete` (its `session-in-event-id`)
    /// against the seq of the message it sent.
    seq: u64,
}

/// Appends one record (the raw body). The record is durable before anything
/// else happens: pending waitpoints are then completed with it, and an append to
/// `.in` while the session has no live run boots one, which will read it.
async fn append(
    State(sessions): State<ChannelAccess>,
    State(appender): State<Appender>,
    auth: Auth,
    limits: Limits,
    path: ChannelPath,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Json<AppendResponse>, AppendError> {
    limits.admit(&auth, RouteClass::Append).await?;
    let record_headers = record_headers(&headers)?;
    let part_id = match headers.get("x-part-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|p| is_part_id(p))
                .ok_or_else(|| ApiError::BadRequest("X-Part-Id must be 1-128 visible ASCII characters".into()))?,
        ),
        None => None,
    };
    let body = std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest("Record body must be UTF-8".into()))?;
    let session = sessions.load(&auth, &path.session, path.io, Action::Write).await?;
    let acting_run = match path.io {
        Io::Out => auth.out_writer_run(),
        Io::In => auth.acting_run(),
    };
    let new = NewAppend { io: path.io, body, headers: &record_headers, part_id, acting_run };
    let appended = appender.append(auth.env.id, &session, new).await.map_err(ApiError::from)?;
    Ok(Json(AppendResponse { ok: true, message: appended.duplicate.then_some(DUPLICATE), seq: appended.seq_num }))
}

const DUPLICATE: &str = "duplicate part id: already appended";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordsQuery {
    #[serde(default)]
    after_event_id: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RecordView {
    data: Value,
    id: String,
    seq_num: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, String)>,
}

const MAX_RECORDS_READ: usize = 1000;

/// Immediate drain: records after `afterEventId`, with the SDK envelope unwrapped.
async fn records(
    State(sessions): State<ChannelAccess>,
    State(channels): State<ChannelStore>,
    auth: Auth,
    path: ChannelPath,
    ApiQuery(q): ApiQuery<RecordsQuery>,
) -> ApiResult<Json<Value>> {
    let after = parse_cursor("afterEventId", q.after_event_id.as_deref())?;
    let session = sessions.load(&auth, &path.session, path.io, Action::Read).await?;
    let key = ChannelKey { session_id: session.id, io: path.io };
    let mut records = channels.read_after(key, after, MAX_RECORDS_READ).await?;
    // As for Last-Event-ID: an id the channel never reached is refused, as
    // following it would skip the records that later take those numbers.
    if let Some(a) = after {
        let first = match records.first() {
            Some(r) => r.seq_num,
            None => {
                let next_seq = channels.next_seq(key).await?;
                if a >= next_seq {
                    return Err(ApiError::BadRequest(format!(
                        "afterEventId {a} is past the end of the stream (next is {next_seq})"
                    )));
                }
                next_seq
            }
        };
        // Numbers after the cursor that are gone (expired, or lost with
        // Redis's data) are signalled as SSE does, so the cursor moves past them.
        if let Some(gap) = sse::gap_before(Some(a), first) {
            records.insert(0, gap);
        }
    }
    let views: Vec<RecordView> = records.into_iter().map(record_view).collect();
    Ok(Json(json!({ "records": views })))
}

fn record_view(r: Record) -> RecordView {
    let envelope: Option<Value> = serde_json::from_str(&r.body).ok();
    let data = envelope.as_ref().and_then(|e| e.get("data").cloned()).unwrap_or(Value::Null);
    let id = envelope
        .as_ref()
        .and_then(|e| e.get("id").and_then(Value::as_str).map(String::from))
        .unwrap_or_else(|| r.seq_num.to_string());
    RecordView { data, id, seq_num: r.seq_num, headers: r.headers }
}

/// A client's cursor (`afterEventId`, `Last-Event-ID`): absent, or a sequence
/// number in range (`validation::parse_seq_num`); anything else is 400.
fn parse_cursor(name: &str, value: Option<&str>) -> ApiResult<Option<u64>> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => parse_seq_num(v)
            .map(Some)
            .ok_or_else(|| ApiError::BadRequest(format!("{name} must be a sequence number from 0 to {MAX_SEQ_NUM}"))),
    }
}

const DEFAULT_WINDOW_SECS: u64 = 60;
const MAX_WINDOW_SECS: u64 = 600;

/// SSE subscription: backlog from the cursor, then live records, until the
/// long-poll window ends (the client reconnects with `Last-Event-ID`).
// Each argument is one axum extractor, a service or a part of the request.
#[allow(clippy::too_many_arguments)]
async fn subscribe(
    State(sessions): State<ChannelAccess>,
    State(channels): State<ChannelStore>,
    State(hub): State<Hub>,
    State(settings): State<RealtimeSettings>,
    State(permits): State<StreamPermits>,
    auth: Auth,
    limits: Limits,
    path: ChannelPath,
    headers: HeaderMap,
) -> ApiResult<Response> {
    limits.admit(&auth, RouteClass::Subscribe).await?;
    let header_str = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let last_event_id = parse_cursor("Last-Event-ID", header_str("last-event-id"))?;
    let window = match header_str("timeout-seconds") {
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|s| (1..=MAX_WINDOW_SECS).contains(s))
            .ok_or_else(|| ApiError::BadRequest(format!("Timeout-Seconds must be 1-{MAX_WINDOW_SECS}")))?,
        None => DEFAULT_WINDOW_SECS,
    };
    let session = sessions.load(&auth, &path.session, path.io, Action::Read).await?;
    // Its place among the long-lived requests, before Redis is read; held by
    // the response body until it ends or the client goes.
    let permit =
        permits.acquire(Holder::of(&auth, &headers).on_session(session.id)).map_err(ApiError::TooManyStreams)?;
    let key = ChannelKey { session_id: session.id, io: path.io };
    let req = SubscribeRequest {
        last_event_id,
        from_tail: header_str("x-trigger-stream-start") == Some("latest"),
        // Only `.out` carries turns; on `.in` the header is ignored.
        peek_settled: path.io == Io::Out && header_str("x-peek-settled") == Some("1"),
        window: Duration::from_secs(window),
        keepalive: settings.keepalive,
    };
    let sub = Subscription::open(channels, &hub, key, req).await?;
    let settled = sub.settled;
    let mut resp = Response::new(Body::from_stream(permits::holding(sse::stream(sub), permit)));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert("x-stream-version", HeaderValue::from_static("v2"));
    if settled {
        h.insert("x-session-settled", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cursors_out_of_range_are_refused() {
        // u64::MAX wrapped to 0 in read_after and returned the whole history.
        assert!(parse_cursor("afterEventId", Some(&u64::MAX.to_string())).is_err());
        assert!(parse_cursor("afterEventId", Some(&(MAX_SEQ_NUM + 1).to_string())).is_err());
        assert_eq!(parse_cursor("afterEventId", Some(&MAX_SEQ_NUM.to_string())).unwrap(), Some(MAX_SEQ_NUM));
        assert_eq!(parse_cursor("afterEventId", Some(" ")).unwrap(), None);
    }

    fn headers_with(name: &str, value: &str) -> Option<HeaderMap> {
        let mut h = HeaderMap::new();
        h.insert(axum::http::HeaderName::from_bytes(name.as_bytes()).ok()?, HeaderValue::from_str(value).ok()?);
        Some(h)
    }

    proptest! {
        #[test]
        fn cursors_round_trip_in_range_and_refuse_the_rest(n in any::<u64>(), text in ".{0,30}") {
            let parsed = parse_cursor("Last-Event-ID", Some(&n.to_string()));
            if n <= MAX_SEQ_NUM {
                prop_assert_eq!(parsed.ok(), Some(Some(n)));
            } else {
                prop_assert!(parsed.is_err());
            }
            if let Ok(Some(c)) = parse_cursor("afterEventId", Some(&text)) {
                prop_assert!(c <= MAX_SEQ_NUM && c.checked_add(1).is_some());
            }
        }

        #[test]
        fn record_headers_never_panic_and_keep_their_bounds(raw in ".{0,200}", control in "[ -~]{0,20}") {
            if let Some(h) = headers_with("x-record-headers", &raw) {
                if let Ok(out) = record_headers(&h) {
                    prop_assert!(out.len() <= MAX_RECORD_HEADERS);
                    prop_assert!(out.iter().all(|(k, v)| !k.is_empty() && k.len() <= 256 && v.len() <= 4096));
                }
            }
            if let Some(h) = headers_with("x-trigger-control", &control) {
                prop_assert_eq!(record_headers(&h).ok(), Some(vec![(super::super::CONTROL_HEADER.to_string(), control.clone())]));
            }
        }

        #[test]
        fn part_ids_are_exactly_1_to_128_visible_ascii(p in ".{0,140}") {
            let visible = p.bytes().all(|b| (b'!'..=b'~').contains(&b));
            prop_assert_eq!(is_part_id(&p), visible && (1..=MAX_PART_ID_LEN).contains(&p.len()));
        }

        #[test]
        fn visible_ascii_part_ids_up_to_128_are_accepted(p in "[!-~]{1,128}") {
            prop_assert!(is_part_id(&p));
        }

        #[test]
        fn record_headers_round_trip(pairs in proptest::collection::vec(("[a-z-]{1,20}", "[ -~]{0,40}"), 0..=MAX_RECORD_HEADERS)) {
            let raw = serde_json::to_string(&pairs).unwrap();
            let h = headers_with("x-record-headers", &raw).unwrap();
            prop_assert_eq!(record_headers(&h).ok(), Some(pairs));
        }
    }
}
