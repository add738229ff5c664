//! What every benchmark needs: a server on loopback over its own Postgres schema
//! and Redis prefix, an environment key, and percentiles.
#![allow(dead_code)]

use std::time::Duration;

use sessiond::app::{self, AppState};
use sessiond::config::Config;
use sessiond::tenancy::keys::MasterKey;
use sessiond::tenancy::{store as tenancy, EnvType};

pub struct BenchServer {
    /// Empty when the bench runs no server of its own ([`BenchServer::prepare`]).
    pub base: String,
    pub key: String,
    pub schema: String,
    pub master_hex: String,
    pub pool: sqlx::PgPool,
    pub state: AppState,
    stop: tokio::sync::watch::Sender<bool>,
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/sessiond_test".into())
}

/// `name` from the environment, parsed, or `default` (unset or unparsable).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Points `config` at the ClickHouse of CLICKHOUSE_URL (the dev server by
/// default) and a database of this run's own, dropped with nothing else.
pub fn own_clickhouse(config: &mut Config) {
    config.clickhouse_url = std::env::var("CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into());
    config.clickhouse_database = format!("bench_{}", uuid::Uuid::new_v4().simple());
}

impl BenchServer {
    /// A server in this process, over a fresh schema and Redis prefix.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let mut bench = Self::prepare(tweak).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        bench.base = format!("http://{}", listener.local_addr()?);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(app::serve(listener, bench.state.clone(), stop_rx));
        bench.stop = stop;
        Ok(bench)
    }

    /// The schema (migrated), an environment and its key, but no server in
    /// this process: for a bench that runs the server as its own process, so
    /// that no second server (jobs, sweeps, listeners) shares the schema.
    pub async fn prepare(tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let master_hex = hex::encode(uuid::Uuid::new_v4().as_bytes().repeat(2));
        let master = MasterKey::from_hex(&master_hex)?;
        let mut config = Config::for_database(&database_url(), Some(schema.clone()));
        config.redis_prefix = format!("bench:{schema}");
        config.database_max_connections = 32;
        config.master_key = Some(master_hex.clone());
        tweak(&mut config);
        let pool = sessiond::db::connect(&config).await?;
        sessiond::db::migrate(&pool).await?;
        let (_, key) = tenancy::create_environment(&pool, &master, "bench", "bench", EnvType::Prod).await?;
        let state = AppState::connect(config, pool.clone(), master).await?;
        let (stop, _) = tokio::sync::watch::channel(false);
        Ok(BenchServer { base: String::new(), key: key.expose().to_string(), schema, master_hex, pool, state, stop })
    }

    /// The bench environment's (organization, project, environment) ids.
    pub async fn env_ids(&self) -> anyhow::Result<(uuid::Uuid, uuid::Uuid, uuid::Uuid)> {
        Ok(sqlx::query_as("SELECT organization_id, project_id, id FROM runtime_environments")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Stops the server, drops the schema and deletes the run's Redis keys.
    /// Left behind, a run's records would make every later run slower: Redis
    /// rewrites its append-only file as it grows, copying them all each time.
    pub async fn finish(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        tokio::time::sleep(Duration::from_millis(200)).await;
        sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema)).execute(&self.pool).await?;
        let mut redis = self.state.redis.clone();
        let pattern = format!("bench:{}*", self.schema);
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut redis)
                .await?;
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut redis).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(())
    }
}

/// The `p` quantile (0..1) of sorted samples, in milliseconds.
pub fn pct_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// Prints a latency distribution for people, and its p50 and p99 as figures
/// `<key>.p50` and `<key>.p99` for scripts (benches/ab.sh).
pub fn summary(name: &str, key: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<36} n={:<7} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        samples.len(),
        pct_ms(&samples, 0.5),
        pct_ms(&samples, 0.99),
        samples.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(f64::NAN)
    );
    figure(&format!("{key}.p50"), pct_ms(&samples, 0.5), "ms");
    figure(&format!("{key}.p99"), pct_ms(&samples, 0.99), "ms");
}

/// One machine-readable line, `figure: <name> <value> <unit>` (no spaces in
/// the name or unit), which benches/ab.sh collects.
pub fn figure(name: &str, value: f64, unit: &str) {
    println!("figure: {name} {value:.3} {unit}");
}

/// Timed samples of a read that one store is meant to answer, checked one by
/// one: a ClickHouse read that fails or times out answers from Postgres (and
/// so does every read of the cool-down after it), so a label checked once
/// before timing could file seconds of Postgres answers under "clickhouse".
/// Only the samples the meant store answered are kept; the others are
/// counted by who answered them instead.
#[derive(Debug, Default)]
pub struct Labelled {
    /// Latencies of the samples the meant store answered, sorted.
    pub kept: Vec<Duration>,
    /// Samples another store answered, by that store's name.
    pub others: std::collections::BTreeMap<String, usize>,
}

impl Labelled {
    /// Files one sample under `served`, which `meant` should have answered.
    pub fn push(&mut self, meant: &str, served: &str, took: Duration) {
        if served == meant {
            self.kept.push(took);
        } else {
            *self.others.entry(served.to_string()).or_default() += 1;
        }
    }

    /// How many samples another store answered.
    pub fn fallbacks(&self) -> usize {
        self.others.values().sum()
    }

    /// Sorts the kept samples (for [`pct_ms`]).
    pub fn sorted(mut self) -> Self {
        self.kept.sort();
        self
    }

    /// "n=…, 3 fallbacks (postgres: 3)" for the human-readable lines.
    pub fn describe(&self) -> String {
        if self.others.is_empty() {
            return format!("n={}, 0 fallbacks", self.kept.len());
        }
        let by: Vec<String> = self.others.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("n={}, {} fallbacks ({})", self.kept.len(), self.fallbacks(), by.join(", "))
    }
}

/// A lean HTTP/1.1 client for load generation (hyper directly: the client
/// shares the machine's cores with the server, so its own cost matters).
#[derive(Clone)]
pub struct FastClient {
    inner: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    base: String,
    auth: String,
}

impl FastClient {
    pub fn new(base: &str, token: &str) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let inner = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        FastClient { inner, base: base.to_string(), auth: format!("Bearer {token}") }
    }

    /// Sends a request and reads the whole answer; returns the status code.
    pub async fn send(&self, method: hyper::Method, path: &str, body: bytes::Bytes) -> anyhow::Result<u16> {
        Ok(self.send_reading(method, path, body, None).await?.0)
    }

    /// Sends a request and reads the whole answer; returns the status code and
    /// the value of response header `header` (when asked for one and present).
    pub async fn send_reading(
        &self,
        method: hyper::Method,
        path: &str,
        body: bytes::Bytes,
        header: Option<&str>,
    ) -> anyhow::Result<(u16, Option<String>)> {
        use http_body_util::BodyExt;
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header("authorization", &self.auth)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(body))?;
        let resp = self.inner.request(req).await?;
        let status = resp.status().as_u16();
        let value = header.and_then(|h| resp.headers().get(h)).and_then(|v| v.to_str().ok()).map(str::to_string);
        resp.into_body().collect().await?;
        Ok((status, value))
    }
}

/// One keep-alive HTTP/1.1 connection driven by hand: the cheapest possible
/// load generator for small requests with small, length-delimited answers.
pub struct RawConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    auth: String,
}

impl RawConn {
    pub async fn connect(base: &str, token: &str) -> anyhow::Result<Self> {
        let addr = base.trim_start_matches("http://");
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(RawConn { stream, buf: Vec::with_capacity(4096), auth: format!("Bearer {token}") })
    }

    /// POSTs `body` to `path` and reads the whole answer; returns the status.
    pub async fn post(&mut self, path: &str, body: &[u8]) -> anyhow::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.auth,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.stream.write_all(&req).await?;
        loop {
            if let Some(head_end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..head_end])?;
                let status: u16 =
                    head.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow::anyhow!("bad status line"))?;
                let len: usize = head
                    .lines()
                    .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
                    .and_then(|(_, v)| v.trim().parse().ok())
                    .unwrap_or(0);
                let total = head_end + 4 + len;
                if self.buf.len() >= total {
                    self.buf.drain(..total);
                    return Ok(status);
                }
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                anyhow::bail!("connection closed");
            }
        }
    }
}
