//! A private `redis-server` for tests that kill or restart Redis, so the shared
//! Redis on 6379 that other tests use is never touched.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "sessiond-test-redis-{}-{}",
            std::process::id(),
            Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private `redis-server` child. Dropping it SIGKILLs the process, so it is
/// gone however the test ends (success, failed assertion, panic).
pub struct RedisProc {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl RedisProc {
    pub fn spawn(dir: &Path, port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--appendonly", "yes"])
            .args(["--appendfsync", "always"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(dir)
            .args(["--logfile", "redis.log"]) // relative to --dir
            .args(["--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (is it on PATH?)");
        RedisProc { child: Some(child), port, dir: dir.to_path_buf() }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Empties this Redis, as a restart without its data would.
    pub async fn flush_all(&self) {
        let mut conn = redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Whether the child has already exited (e.g. the port was taken).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_some()).unwrap_or(true),
            None => true,
        }
    }

    /// Polls until the server answers PING and has finished loading its data.
    /// Returns false if it exits or stays silent for `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> bool {
        let client = redis::Client::open(self.url()).expect("redis url");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited() {
                return false;
            }
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
                let info: redis::RedisResult<String> =
                    redis::cmd("INFO").arg("persistence").query_async(&mut conn).await;
                if pong.as_deref() == Ok("PONG") && info.map(|i| i.contains("loading:0")).unwrap_or(false) {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// SIGKILL (std's `Child::kill` on Unix): no clean shutdown, no final
    /// AOF flush or save.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().unwrap().port()
}

/// Starts a private Redis on a free port, retrying if another process grabbed
/// the port between picking and binding it.
pub async fn start_fresh(dir: &Path) -> RedisProc {
    for _ in 0..5 {
        let mut redis = RedisProc::spawn(dir, free_port());
        if redis.wait_ready(Duration::from_secs(5)).await {
            return redis;
        }
        let log = redis.log();
        drop(redis);
        eprintln!("redis-server did not come up, retrying on another port; log:\n{log}");
    }
    panic!("could not start a private redis-server");
}
