//! A round-robin TCP load balancer for the cases where server processes come
//! and go: clients and workers use one stable address, and each new
//! connection goes to the next backend that accepts the TCP connect, as a
//! plain layer-4 balancer would. What clients see in flight is only what
//! such a balancer would show them.
//!
//! Per backend it counts the connections it forwarded and those that ended
//! with an I/O error (a reset: a process killed under them).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
pub struct BackendCounts {
    pub connections: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections that ended with an I/O error on either side.
    pub broken: AtomicU64,
}

pub struct Balancer {
    pub port: u16,
    pub counts: Arc<Vec<BackendCounts>>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    /// Listens on a free port and forwards to `backends` (ports on 127.0.0.1).
    pub async fn start(backends: Vec<u16>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the balancer");
        let port = listener.local_addr().unwrap().port();
        let counts: Arc<Vec<BackendCounts>> = Arc::new(backends.iter().map(|_| BackendCounts::default()).collect());
        let next = Arc::new(AtomicUsize::new(0));
        let backends = Arc::new(backends);
        let task_counts = counts.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let (backends, counts, next) = (backends.clone(), task_counts.clone(), next.clone());
                tokio::spawn(async move {
                    let start = next.fetch_add(1, Ordering::Relaxed);
                    for i in 0..backends.len() {
                        let b = (start + i) % backends.len();
                        let connect = TcpStream::connect(("127.0.0.1", backends[b]));
                        let Ok(Ok(server)) = tokio::time::timeout(Duration::from_secs(1), connect).await else {
                            continue;
                        };
                        let _ = server.set_nodelay(true);
                        let _ = client.set_nodelay(true);
                        let c = &counts[b];
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        c.open.fetch_add(1, Ordering::Relaxed);
                        let (mut client, mut server) = (client, server);
                        if tokio::io::copy_bidirectional(&mut client, &mut server).await.is_err() {
                            c.broken.fetch_add(1, Ordering::Relaxed);
                        }
                        c.open.fetch_sub(1, Ordering::Relaxed);
                        return;
                    }
                    // No backend accepted: the client's connection closes.
                });
            }
        });
        Balancer { port, counts, task }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn broken(&self, backend: usize) -> u64 {
        self.counts[backend].broken.load(Ordering::Relaxed)
    }

    pub fn open(&self, backend: usize) -> u64 {
        self.counts[backend].open.load(Ordering::Relaxed)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
