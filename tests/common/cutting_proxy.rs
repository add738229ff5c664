//! A TCP proxy in front of a server's HTTP port that cuts connections at
//! chosen points of the response: inside the status line and headers, inside
//! a chunk's size line, inside an SSE frame, after a frame but before its
//! chunk's closing CRLF, or cleanly between two chunks. Which point, and after
//! how many whole chunks, comes from a seeded RNG, so a failing run can be
//! replayed with its printed seed.
//!
//! While a connection's cut is pending, the proxy holds back the bytes of the
//! chunk it will cut in, so the cut lands exactly where planned whatever the
//! server's write sizes; everything before it goes through unchanged. After
//! `max_cuts` cuts the proxy passes everything through.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where in the response a cut lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CutKind {
    /// Inside the status line or headers: the client never gets a response.
    MidHeaders,
    /// Inside a chunk's `<hex>\r\n` size line.
    ChunkSizeLine,
    /// Inside an SSE frame's bytes: a partial frame reaches the client.
    MidFrame,
    /// After a chunk's data (a whole frame) but before its closing CRLF.
    ChunkTrailer,
    /// Between two chunks: every byte sent so far is a whole frame.
    BetweenFrames,
}

const KINDS: [CutKind; 5] =
    [CutKind::MidHeaders, CutKind::ChunkSizeLine, CutKind::MidFrame, CutKind::ChunkTrailer, CutKind::BetweenFrames];

#[derive(Debug, Clone, Copy)]
struct Plan {
    kind: CutKind,
    /// Whole chunks let through before the one the cut concerns.
    skip: usize,
    /// Where inside the chosen span, as a fraction of it.
    frac: f64,
}

pub struct CuttingProxy {
    pub base: String,
    cuts: Arc<AtomicUsize>,
    kinds: Arc<Mutex<Vec<CutKind>>>,
    pub connections: Arc<AtomicUsize>,
}

impl CuttingProxy {
    /// Cuts made so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }

    /// The kind of every cut made, in order.
    pub fn kinds(&self) -> Vec<CutKind> {
        self.kinds.lock().unwrap().clone()
    }
}

/// Starts a proxy to `upstream` (`host:port`) that makes `max_cuts` cuts, one
/// per connection at most, chosen with `seed`.
pub async fn cutting_proxy(upstream: String, seed: u64, max_cuts: usize) -> CuttingProxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
    let cuts = Arc::new(AtomicUsize::new(0));
    let kinds = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let proxy = CuttingProxy { base, cuts: cuts.clone(), kinds: kinds.clone(), connections: connections.clone() };
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            connections.fetch_add(1, Ordering::SeqCst);
            let plan = (cuts.load(Ordering::SeqCst) < max_cuts).then(|| {
                let mut rng = rng.lock().unwrap();
                Plan { kind: KINDS[rng.gen_range(0..KINDS.len())], skip: rng.gen_range(0..=2), frac: rng.gen() }
            });
            let (upstream, cuts, kinds) = (upstream.clone(), cuts.clone(), kinds.clone());
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&upstream).await else { return };
                let ((mut client_rx, mut client_tx), (mut server_rx, mut server_tx)) =
                    (client.into_split(), server.into_split());
                let requests = async move {
                    let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                    // Keep the connection to the server open until the
                    // response side ends: a half-closed client is not a cut.
                    std::future::pending::<()>().await
                };
                let responses = async move {
                    let Some(plan) = plan else {
                        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                        return;
                    };
                    let (mut seen, mut forwarded, mut chunk) = (Vec::new(), 0usize, [0u8; 16 * 1024]);
                    loop {
                        let n = match server_rx.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        seen.extend_from_slice(&chunk[..n]);
                        match decide(&seen, plan) {
                            Decision::Hold(upto) => {
                                let upto = upto.max(forwarded);
                                if client_tx.write_all(&seen[forwarded..upto]).await.is_err() {
                                    return;
                                }
                                forwarded = upto;
                            }
                            Decision::Cut(at) => {
                                // Only while the budget lasts (two connections
                                // may have planned the last cut).
                                if cuts.fetch_add(1, Ordering::SeqCst) >= max_cuts {
                                    cuts.fetch_sub(1, Ordering::SeqCst);
                                    break;
                                }
                                kinds.lock().unwrap().push(plan.kind);
                                let at = at.max(forwarded);
                                let _ = client_tx.write_all(&seen[forwarded..at]).await;
                                let _ = client_tx.flush().await;
                                // Dropping both halves closes the connection
                                // to both sides: the client sees the body end
                                // right there.
                                return;
                            }
                            Decision::PassThrough => break,
                        }
                    }
                    // No cut after all: let the rest through.
                    let _ = client_tx.write_all(&seen[forwarded..]).await;
                    let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                };
                tokio::select! { _ = requests => {}, _ = responses => {} }
            });
        }
    });
    proxy
}

enum Decision {
    /// Not there yet: send up to here and read on.
    Hold(usize),
    /// Send up to here, then close.
    Cut(usize),
    /// The plan does not apply to this response (not chunked, or it ended).
    PassThrough,
}

/// A chunk of a chunked body, as raw offsets: its size line starts at
/// `start`, its data is `data..data_end`, and it ends (after the CRLF) at `end`.
struct Chunk {
    start: usize,
    data: usize,
    data_end: usize,
    end: usize,
}

fn find(buf: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    buf.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// A point strictly inside `lo..hi` (exclusive of both ends), placed by `frac`.
fn inside(lo: usize, hi: usize, frac: f64) -> usize {
    let span = hi - lo - 1; // positions lo+1 ..= hi-1
    lo + 1 + ((frac * span as f64) as usize).min(span - 1)
}

fn decide(seen: &[u8], plan: Plan) -> Decision {
    let Some(header_end) = find(seen, 0, b"\r\n\r\n").map(|p| p + 4) else {
        return Decision::Hold(0);
    };
    if plan.kind == CutKind::MidHeaders {
        return Decision::Cut(inside(0, header_end, plan.frac));
    }
    let headers = String::from_utf8_lossy(&seen[..header_end]).to_ascii_lowercase();
    if !headers.contains("transfer-encoding: chunked") {
        return Decision::PassThrough;
    }
    // The complete chunks so far, and where the first incomplete one starts.
    let mut at = header_end;
    let mut chunks = Vec::new();
    while let Some(line_end) = find(seen, at, b"\r\n") {
        let size_text = String::from_utf8_lossy(&seen[at..line_end]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16) else {
            return Decision::PassThrough;
        };
        if size == 0 {
            // The body's end: the plan never got its chunk.
            return Decision::PassThrough;
        }
        let (data, data_end) = (line_end + 2, line_end + 2 + size);
        if seen.len() < data_end + 2 {
            break;
        }
        chunks.push(Chunk { start: at, data, data_end, end: data_end + 2 });
        at = data_end + 2;
    }
    let Some(c) = chunks.get(plan.skip) else {
        return Decision::Hold(at);
    };
    Decision::Cut(match plan.kind {
        CutKind::MidHeaders => unreachable!(),
        CutKind::ChunkSizeLine => inside(c.start, c.data, plan.frac),
        CutKind::MidFrame if c.data_end - c.data >= 2 => inside(c.data, c.data_end, plan.frac),
        CutKind::MidFrame => c.data,
        CutKind::ChunkTrailer => c.data_end + 1,
        CutKind::BetweenFrames => c.end,
    })
}
