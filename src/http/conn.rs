//! Connection limits: what keeps slow, idle or numerous clients from holding
//! the server's file descriptors and memory.
//!
//! - A request head must arrive within the header-read timeout (hyper's own
//!   timer; it also runs while a kept-alive connection waits for its next
//!   request, so it bounds keep-alive idling too).
//! - A request body must arrive whole within the body-read timeout of its head
//!   ([`body_deadline`]); otherwise 408 and the connection closes.
//! - A connection on which no byte moves either way for the idle timeout is
//!   closed, unless the server itself is still working on a response (a long
//!   poll). SSE responses write keep-alives, so they never count as idle.
//! - At most `max_connections` are open. A connection beyond the cap sheds the
//!   oldest one that is not inside a request (never sent a complete head, or
//!   idles between requests); if every connection is busy, the newcomer is
//!   closed. So a flood of idle sockets cannot lock out a new client, and
//!   long-lived subscribers are never the ones dropped.
//! - Long-lived requests (SSE, waitpoint long-polls, the dashboard's live
//!   tail) may hold at most [`Limits::long_lived`] of those connections
//!   (`crate::streams::permits`): the rest, `SSE_RESERVED_CONNECTIONS`, are
//!   always left to short requests and `/healthz`, which the cap's shedding
//!   then always finds room for.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::error::ApiError;
use crate::config::Config;

/// File descriptors kept back from the connection cap for Postgres, Redis,
/// the listener and files.
const RESERVED_FDS: u64 = 1024;

/// The limits `serve` applies, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read: Duration,
    pub idle: Duration,
    pub max_connections: usize,
    /// Connections long-lived requests may hold: the cap less the reserve.
    pub long_lived: usize,
}

/// Connections long-lived requests may hold under a cap of `max_connections`
/// with `reserved` kept for short requests: at most half the cap is reserved,
/// and at least one long-lived request is allowed.
pub fn long_lived_cap(max_connections: usize, reserved: usize) -> usize {
    max_connections.saturating_sub(reserved.min(max_connections / 2)).max(1)
}

impl Limits {
    /// Reads the limits and fits the cap under the process's file-descriptor
    /// limit, which it first raises as far as it may (soft to hard).
    pub fn from_config(config: &Config) -> anyhow::Result<Limits> {
        anyhow::ensure!(config.max_connections > 0, "MAX_CONNECTIONS must be at least 1");
        anyhow::ensure!(
            config.idle_timeout_ms > config.sse_keepalive_ms,
            "IDLE_TIMEOUT_MS ({}) must exceed SSE_KEEPALIVE_MS ({}), or idle SSE subscribers are cut",
            config.idle_timeout_ms,
            config.sse_keepalive_ms
        );
        let mut max_connections = config.max_connections;
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(fds) => {
                let room = fds.saturating_sub(RESERVED_FDS).max(fds / 2);
                if (max_connections as u64) > room {
                    tracing::warn!(
                        max_connections,
                        fd_limit = fds,
                        cap = room,
                        "MAX_CONNECTIONS exceeds the file-descriptor limit; capping"
                    );
                    max_connections = room.max(1) as usize;
                }
            }
            Err(err) => tracing::warn!(%err, "cannot read or raise the file-descriptor limit"),
        }
        if config.sse_reserved_connections > max_connections / 2 {
            tracing::warn!(
                reserved = config.sse_reserved_connections,
                max_connections,
                "SSE_RESERVED_CONNECTIONS exceeds half the connection cap; reserving half"
            );
        }
        Ok(Limits {
            header_read: Duration::from_millis(config.header_read_timeout_ms.max(1)),
            idle: Duration::from_millis(config.idle_timeout_ms),
            max_connections,
            long_lived: long_lived_cap(max_connections, config.sse_reserved_connections),
        })
    }
}

/// One open connection, as the cap and the idle reaper see it.
pub struct Conn {
    id: u64,
    /// Requests whose response is not fully written yet (SSE included).
    in_flight: AtomicUsize,
    /// Requests whose handler is still running (no response yet).
    handling: AtomicUsize,
    /// Last byte read or written, in ms since `epoch`.
    last_active: AtomicU64,
    epoch: Instant,
    close: Notify,
}

impl Conn {
    fn touch(&self) {
        self.last_active.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.last_active.load(Ordering::Relaxed)))
    }
}

/// A connection's place in the registry; dropping it (the connection's task
/// ending) leaves.
pub struct Registration {
    conn: Arc<Conn>,
    registry: Arc<Registry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.conn.id);
    }
}

/// Every open connection, oldest first.
pub struct Registry {
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    epoch: Instant,
    limits: Limits,
}

impl Registry {
    pub fn new(limits: Limits) -> Arc<Registry> {
        Arc::new(Registry {
            conns: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
            limits,
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Number of open connections.
    pub fn open(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Registers a new connection, shedding the oldest one outside a request if
    /// the cap is reached. None: at the cap with every connection busy.
    pub fn admit(self: &Arc<Self>) -> Option<Registration> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() >= self.limits.max_connections {
            let id = conns.iter().find(|(_, c)| c.in_flight.load(Ordering::Acquire) == 0).map(|(id, _)| *id)?;
            // Out of the count now; its task closes the socket.
            if let Some(victim) = conns.remove(&id) {
                victim.close.notify_one();
                tracing::debug!(conn = id, "shed a connection outside a request at the connection cap");
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            in_flight: AtomicUsize::new(0),
            handling: AtomicUsize::new(0),
            last_active: AtomicU64::new(self.now_ms()),
            epoch: self.epoch,
            close: Notify::new(),
        });
        conns.insert(id, conn.clone());
        Some(Registration { conn, registry: self.clone() })
    }

    /// Closes connections idle for longer than the idle timeout; runs until
    /// aborted. One sweep for all connections, not a timer each.
    pub async fn reap_idle(self: Arc<Self>) {
        let idle = self.limits.idle;
        let every = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            tokio::time::sleep(every).await;
            let now = self.now_ms();
            let conns: Vec<Arc<Conn>> =
                self.conns.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
            for c in conns {
                if c.handling.load(Ordering::Acquire) > 0 {
                    // The server is working on an answer; the client is not idle.
                    c.touch();
                } else if c.idle_for(now) >= idle {
                    tracing::debug!(conn = c.id, "closing an idle connection");
                    c.close.notify_one();
                }
            }
        }
    }
}

/// Serves one accepted connection with hyper's HTTP/1.1 connection until it
/// ends, is shed, idles out, or shutdown ends it. Each request carries the
/// peer address as axum's `ConnectInfo`.
pub fn serve_connection(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    registration: Registration,
    app: Router,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) -> impl Future<Output = ()> + Send + 'static {
    use hyper_util::rt::{TokioIo, TokioTimer};

    let conn = registration.conn.clone();
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Tracked { inner: stream, conn: conn.clone() });
    let service_conn = conn.clone();
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        // The peer address, for the failure throttles (`http::client`).
        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        let exchange = Exchange::begin(service_conn.clone());
        let app = app.clone();
        async move {
            use tower::ServiceExt;
            let resp = app.oneshot(req).await.unwrap_or_else(|never: Infallible| match never {});
            let mut exchange = exchange;
            exchange.stop_handling();
            Ok::<_, Infallible>(resp.map(|body| Body::new(ResponseBody { body, _exchange: exchange })))
        }
    });
    let http = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(registration.registry.limits.header_read)
        .serve_connection(io, service);
    let http = graceful.watch(http);
    async move {
        let _registration = registration;
        tokio::select! {
            res = http => if let Err(err) = res {
                tracing::debug!(%err, "connection ended with an error");
            },
            _ = conn.close.notified() => {}
        }
    }
}

/// One request on a connection, from its head until its response is written
/// (or dropped).
struct Exchange {
    conn: Arc<Conn>,
    handling: bool,
}

impl Exchange {
    fn begin(conn: Arc<Conn>) -> Exchange {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        conn.handling.fetch_add(1, Ordering::AcqRel);
        Exchange { conn, handling: true }
    }

    fn stop_handling(&mut self) {
        if std::mem::take(&mut self.handling) {
            self.conn.touch();
            self.conn.handling.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.stop_handling();
        self.conn.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`Exchange`] until written.
struct ResponseBody {
    body: Body,
    _exchange: Exchange,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket, noting when a byte last moved.
struct Tracked {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl Tracked {
    fn note<T>(&self, poll: &Poll<io::Result<T>>, moved: impl FnOnce(&T) -> bool) {
        if let Poll::Ready(Ok(v)) = poll {
            if moved(v) {
                self.conn.touch();
            }
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let after = buf.filled().len();
        self.note(&poll, |_| after > before);
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&poll, |n| *n > 0);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&poll, |n| *n > 0);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Middleware: the request body must arrive whole within `limit` of the head.
/// A body that does not fails its read, and the request is answered 408 and
/// its connection closed, whatever the handler made of the failed read.
pub async fn body_deadline(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let expired = Arc::new(AtomicBool::new(false));
    let flag = expired.clone();
    let req = req.map(|body| {
        Body::new(DeadlineBody { body, deadline: Some(Box::pin(tokio::time::sleep(limit))), expired: flag })
    });
    let resp = next.run(req).await;
    if expired.load(Ordering::Acquire) {
        let mut resp = ApiError::RequestTimeout.into_response();
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    resp
}

struct DeadlineBody {
    body: Body,
    /// Dropped once the body has ended.
    deadline: Option<Pin<Box<Sleep>>>,
    expired: Arc<AtomicBool>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let Some(deadline) = this.deadline.as_mut() else { return Pin::new(&mut this.body).poll_frame(cx) };
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(None) => {
                this.deadline = None;
                Poll::Ready(None)
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                this.expired.store(true, Ordering::Release);
                Poll::Ready(Some(Err(axum::Error::new("request body not received in time"))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn limits(max_connections: usize) -> Limits {
        Limits {
            header_read: Duration::from_secs(1),
            idle: Duration::from_secs(1),
            max_connections,
            long_lived: long_lived_cap(max_connections, 0),
        }
    }

    #[test]
    fn the_reserve_is_at_most_half_the_cap_and_leaves_one_long_lived_place() {
        assert_eq!(long_lived_cap(16_384, 1_024), 15_360);
        assert_eq!(long_lived_cap(12, 4), 8);
        assert_eq!(long_lived_cap(100, 1_024), 50);
        assert_eq!(long_lived_cap(1, 1_024), 1);
    }

    fn closed(r: &Registration) -> bool {
        r.conn.close.notified().now_or_never().is_some()
    }

    #[test]
    fn the_cap_sheds_the_oldest_connection_outside_a_request_and_never_one_inside() {
        let registry = Registry::new(limits(2));
        let a = registry.admit().unwrap();
        let b = registry.admit().unwrap();
        let _in_b = Exchange::begin(b.conn.clone());
        let c = registry.admit().unwrap();
        assert!(closed(&a) && !closed(&b) && !closed(&c));
        assert_eq!(registry.open(), 2);
        let _in_c = Exchange::begin(c.conn.clone());
        // Every connection is inside a request: the newcomer is refused.
        assert!(registry.admit().is_none());
        drop(_in_c);
        let d = registry.admit().unwrap();
        assert!(closed(&c) && !closed(&b) && !closed(&d));
        drop((a, c));
        assert_eq!(registry.open(), 2);
    }

    #[tokio::test]
    async fn the_reaper_closes_idle_connections_but_not_one_whose_answer_is_being_prepared() {
        let registry = Registry::new(Limits { idle: Duration::from_millis(200), ..limits(10) });
        let idle = registry.admit().unwrap();
        let polling = registry.admit().unwrap();
        let _long_poll = Exchange::begin(polling.conn.clone());
        let reaper = tokio::spawn(registry.clone().reap_idle());
        tokio::time::sleep(Duration::from_millis(600)).await;
        reaper.abort();
        assert!(closed(&idle));
        assert!(!closed(&polling));
    }

    #[test]
    fn the_idle_timeout_must_exceed_the_sse_keepalive() {
        let mut config = Config::for_database("postgres://localhost/unused", None);
        config.idle_timeout_ms = config.sse_keepalive_ms;
        assert!(Limits::from_config(&config).is_err());
        config.idle_timeout_ms = config.sse_keepalive_ms + 1;
        assert!(Limits::from_config(&config).is_ok());
    }
}
