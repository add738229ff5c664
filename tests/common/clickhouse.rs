//! ClickHouse for tests: the dev server that `scripts/clickhouse.sh` starts
//! (ClickHouse's engine through chDB, `scripts/clickhouse-dev-server.py`), or
//! a private instance of it for a test that must stop and restart one.
//! Each test works in a database of its own, `t_<uuid>`, like its Postgres
//! schema; `scripts/test.sh` drops those of earlier runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clickhouse::{Client, Compression};

pub fn clickhouse_url() -> String {
    std::env::var("CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

/// A client for `url` as the project builds one for dev: no compression,
/// since the dev server speaks uncompressed HTTP only.
pub fn client(url: &str) -> Client {
    Client::default().with_url(url).with_compression(Compression::None)
}

/// Creates a fresh database `t_<uuid>` on `url`; returns its name and a
/// client whose default database it is.
pub async fn fresh_database(url: &str) -> (String, Client) {
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    client(url)
        .query(&format!("CREATE DATABASE {name}"))
        .execute()
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE on {url} (is the dev server up? scripts/clickhouse.sh): {e}"));
    let db = client(url).with_database(&name);
    (name, db)
}

/// A dev server of this test's own, on a free port, with its data in a
/// temporary directory that survives [`restart`](Self::restart). Killed and
/// removed on drop.
pub struct PrivateClickHouse {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl PrivateClickHouse {
    pub async fn start() -> PrivateClickHouse {
        let dir = std::env::temp_dir().join(format!("sessiond-ch-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("data")).expect("create the data dir");
        // Port 0 asks the OS for a free port; the listener is dropped so the
        // server can take it (the same port again on restart).
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("find a free port").port();
        let mut ch = PrivateClickHouse { child: None, port, dir };
        ch.spawn().await;
        ch
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's stderr (start-up line, failed queries).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Stops the server the way a service manager does (SIGTERM), waiting
    /// until it has exited.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -TERM the dev server");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait for the dev server") {
                assert!(status.success(), "the dev server exited with {status} on SIGTERM; log:\n{}", self.log());
                return;
            }
            assert!(Instant::now() < deadline, "the dev server did not exit on SIGTERM; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server with SIGKILL, as a crash would (nothing flushed, no
    /// goodbye to clients), and reaps it. [`restart`](Self::restart) starts
    /// it again on the same port and data.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // std's Child::kill sends SIGKILL on Unix.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts the server again on the same port and data dir.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        // The venv scripts/clickhouse.sh installs; a python3 with chdb on PATH otherwise.
        let venv_python = root.join(".sessiond/clickhouse-venv/bin/python");
        let python = if venv_python.exists() { venv_python } else { PathBuf::from("python3") };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("open the server log");
        let child = Command::new(&python)
            .arg(root.join("scripts/clickhouse-dev-server.py"))
            .arg("--path")
            .arg(self.dir.join("data"))
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {} (run scripts/clickhouse.sh install): {e}", python.display()));
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let http = reqwest::Client::new();
        let ping = format!("{}/ping", self.url());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(resp) = http.get(&ping).send().await {
                if resp.status().is_success() && resp.text().await.is_ok_and(|t| t == "Ok.\n") {
                    return;
                }
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none(), "the dev server exited ({exited:?}) during start-up; log:\n{}", self.log());
            assert!(Instant::now() < deadline, "the dev server did not answer /ping; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
