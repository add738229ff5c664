//! A session channel's tail for the session page: server-sent events whose
//! data is HTML (htmx's SSE extension swaps it in), fed by the same fan-out
//! hub as the API's SSE.
//!
//! The hub's broadcast is used only as a wake-up: each wake reads the channel
//! after this stream's cursor, so a missed or lagged broadcast costs nothing
//! but a read, and no record is skipped.
//!
//! A record is anyone's text, and SSE ends a line at CR, LF or CRLF: a record
//! byte that ended a line would end its `data:` field, and what followed
//! (`id: x`, `retry: 1`, a blank line) would be read as fields or events of
//! the stream. So a record's text is escaped for HTML with CR and LF as
//! character references (the `<pre>` renders them as before), leaving the
//! template's own line breaks as the only ones, and [`event`] splits on every
//! SSE line ending, so no byte of any source can end a field early.

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
use crate::streams::permits::{Holder, StreamPermits};
use crate::streams::store::ChannelStore;
use crate::streams::{ChannelKey, Io, Record};

/// Records shown when the page opens.
const TAIL: u64 = 20;
const KEEPALIVE: Duration = Duration::from_secs(15);

#[derive(Template)]
#[template(path = "dashboard/records.html")]
struct Records {
    records: Vec<RecordLine>,
}

/// A record as the tail shows it.
struct RecordLine {
    seq_num: u64,
    /// The body as HTML text without line endings (see [`tail_text`]).
    body: String,
}

impl RecordLine {
    fn of(records: &[Record]) -> Vec<RecordLine> {
        records.iter().map(|r| RecordLine { seq_num: r.seq_num, body: tail_text(&r.body) }).collect()
    }
}

/// `text` escaped for HTML (as askama does) with CR and LF as character
/// references as well, so it holds no SSE line ending.
fn tail_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&#38;"),
            '<' => out.push_str("&#60;"),
            '>' => out.push_str("&#62;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            '\r' => out.push_str("&#13;"),
            '\n' => out.push_str("&#10;"),
            c => out.push(c),
        }
    }
    out
}

pub async fn tail(
    State(db): State<PgPool>,
    State(channels): State<ChannelStore>,
    State(hub): State<Hub>,
    State(permits): State<StreamPermits>,
    _signed: Signed,
    Path((id, io)): Path<(String, String)>,
) -> PageResult<Response> {
    let io = match io.as_str() {
        "in" => Io::In,
        "out" => Io::Out,
        _ => return Err(DashboardError::NotFound("A session has the channels in and out".into())),
    };
    let session = super::pages::find_session(&db, &id).await?;
    // A tail holds its connection like an SSE subscription: it takes one of
    // the server's long-lived places (operators are not counted against a
    // tenant's token, session or environment). Over the cap, 429: htmx's SSE
    // extension retries with its backoff.
    let permit = match permits.acquire(Holder::default()) {
        Ok(permit) => permit,
        Err(_) => {
            let mut resp = Response::new(Body::from("too many open streams; retry shortly"));
            *resp.status_mut() = axum::http::StatusCode::TOO_MANY_REQUESTS;
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return Ok(resp);
        }
    };
    let key = ChannelKey { session_id: session.id, io };
    // Joined before the first read, so nothing appended after it is missed.
    let feed = hub.feed(key);
    let mut wake = feed.subscribe();
    let next = channels.next_seq(key).await.map_err(|e| DashboardError::Internal(e.into()))?;
    let mut cursor = next.checked_sub(TAIL + 1);
    let stream = async_stream(move |tx| async move {
        let _feed = feed;
        let _permit = permit;
        loop {
            match channels.read_after(key, cursor, 100).await {
                Ok(records) if !records.is_empty() => {
                    cursor = records.last().map(|r| r.seq_num);
                    let html = Records { records: RecordLine::of(&records) }.render().unwrap_or_default();
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

/// One SSE event; every line of the HTML becomes a `data:` line. Lines end
/// where an SSE parser ends them (CRLF, CR or LF), so none can hide in a
/// field; a final line ending adds no empty line.
fn event(name: &str, html: &str) -> Bytes {
    let mut out = format!("event: {name}\n");
    let mut rest = html;
    while !rest.is_empty() {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        out.push_str("data: ");
        out.push_str(&rest[..end]);
        out.push('\n');
        rest = &rest[end..];
        rest = rest.strip_prefix("\r\n").or_else(|| rest.strip_prefix(['\r', '\n'])).unwrap_or(rest);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_record_byte_ends_a_line_of_the_event() {
        let record = Record { seq_num: 7, body: "a\rid: x\nretry: 1\r\n<b>&'\"".into(), headers: vec![], timestamp: 0 };
        let html = Records { records: RecordLine::of(&[record]) }.render().unwrap();
        let frame = event("record", &html);
        assert_eq!(
            std::str::from_utf8(&frame).unwrap(),
            "event: record\ndata: <span class=\"record\" data-seq=\"7\">#7 \
             a&#13;id: x&#10;retry: 1&#13;&#10;&#60;b&#62;&#38;&#39;&#34;</span>\n\n"
        );
    }

    #[test]
    fn every_sse_line_ending_starts_a_new_data_line() {
        let frame = event("e", "a\rb\nc\r\nd\r\n");
        assert_eq!(&frame[..], b"event: e\ndata: a\ndata: b\ndata: c\ndata: d\n\n");
    }
}
