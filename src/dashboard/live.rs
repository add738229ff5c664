//! A session channel's tail for the session page: server-sent events whose
//! data is HTML (htmx's SSE extension swaps it in), fed by the same fan-out
//! hub as the API's SSE.
//!
//! The hub's broadcast is used only as a wake-up: each wake reads the channel
//! after this stream's cursor, so a missed or lagged broadcast costs nothing
//! but a read, and no record is skipped.

use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use sqlx::PgPool;
use tokio::sync::broadcast::error::RecvError;

use super::auth::Signed;
use super::error::{DashboardError, PageResult};
use crate::streams::hub::Hub;
use crate::streams::store::ChannelStore;
use crate::streams::{ChannelKey, Io, Record};

/// Records shown when the page opens.
const TAIL: u64 = 20;
const KEEPALIVE: Duration = Duration::from_secs(15);

#[derive(Template)]
#[template(path = "dashboard/records.html")]
struct Records<'a> {
    records: &'a [Record],
}

pub async fn tail(
    State(db): State<PgPool>,
    State(channels): State<ChannelStore>,
    State(hub): State<Hub>,
    _signed: Signed,
    Path((id, io)): Path<(String, String)>,
) -> PageResult<Response> {
    let io = match io.as_str() {
        "in" => Io::In,
        "out" => Io::Out,
        _ => return Err(DashboardError::NotFound("A session has the channels in and out".into())),
    };
    let session = super::pages::find_session(&db, &id).await?;
    let key = ChannelKey { session_id: session.id, io };
    // Joined before the first read, so nothing appended after it is missed.
    let feed = hub.feed(key);
    let mut wake = feed.subscribe();
    let next = channels.next_seq(key).await.map_err(|e| DashboardError::Internal(e.into()))?;
    let mut cursor = next.checked_sub(TAIL + 1);
    let stream = async_stream(move |tx| async move {
        let _feed = feed;
        loop {
            match channels.read_after(key, cursor, 100).await {
                Ok(records) if !records.is_empty() => {
                    cursor = records.last().map(|r| r.seq_num);
                    let html = Records { records: &records }.render().unwrap_or_default();
                    if tx.send(event("record", &html)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(%err, "dashboard tail could not read the channel");
                    return;
                }
            }
            tokio::select! {
                woke = wake.recv() => if let Err(RecvError::Closed) = woke { return },
                _ = tokio::time::sleep(KEEPALIVE) => {
                    if tx.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// One SSE event; every line of the HTML becomes a `data:` line.
fn event(name: &str, html: &str) -> Bytes {
    let mut out = format!("event: {name}\n");
    for line in html.lines() {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// A stream fed by a task through a small channel; the task ends when the
/// client goes (its sends fail).
fn async_stream<F, Fut>(run: F) -> impl futures::Stream<Item = Result<Bytes, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(run(tx));
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}
