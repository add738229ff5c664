//! The `sessiond` binary: server, migrations and operator commands.

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use uuid::Uuid;

use sessiond::analytics;
use sessiond::app::{self, AppState};
use sessiond::config::Config;
use sessiond::db;
use sessiond::jobs;
use sessiond::sessions;
use sessiond::tenancy::{store as tenancy, EnvType};

#[derive(Parser)]
#[command(name = "sessiond", about = "Durable agent sessions server")]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server (applies pending migrations first).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage environments and their secret keys.
    #[command(subcommand)]
    Env(EnvCommand),
    /// Inspect and retry background jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Operator actions on sessions.
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// The ClickHouse copy the session list and analytics read.
    #[command(subcommand)]
    Clickhouse(ClickhouseCommand),
    /// Logical replication into ClickHouse.
    #[command(subcommand)]
    Replication(ReplicationCommand),
    /// Dashboard operator accounts.
    #[command(subcommand)]
    Operators(OperatorsCommand),
    /// Run a task worker against a sessiond server (the example echo agent).
    Worker {
        /// Task identifier to serve (only `echo-agent` ships).
        #[arg(long, default_value = "echo-agent")]
        task: String,
        /// Server base URL.
        #[arg(long, env = "SESSIOND_URL", default_value = "http://127.0.0.1:3030")]
        url: String,
        /// Environment secret key.
        #[arg(long, env = "SESSIOND_SECRET_KEY", hide_env_values = true)]
        key: String,
        /// Runs handled at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Recent jobs, newest first.
    List {
        /// Only jobs that exhausted their attempts.
        #[arg(long)]
        failed: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One job and every attempt, with errors.
    Show { id: Uuid },
    /// Run a failed or canceled job again with a fresh attempt budget.
    Retry { id: Uuid },
    /// Submit a probe job, a test seam that fails its first N attempts on
    /// purpose, then succeeds: checks the job pipeline and the dashboard's
    /// retry end to end. Prints the job id.
    Probe {
        /// Attempts that fail before one succeeds.
        #[arg(long = "fail", default_value_t = 0)]
        fail: u32,
        /// The job's attempt budget (1 to 5); at most `fail` leaves it failed.
        #[arg(long, default_value_t = jobs::DEFAULT_MAX_ATTEMPTS,
              value_parser = clap::value_parser!(i32).range(1..=i64::from(jobs::DEFAULT_MAX_ATTEMPTS)))]
        max_attempts: i32,
    },
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// Start a fresh run for a session now (reason manual); the current run is canceled.
    TriggerRun {
        /// Environment id the session lives in.
        #[arg(long)]
        env: Uuid,
        /// Session friendly id or external id.
        session: String,
    },
}

#[derive(Subcommand)]
enum OperatorsCommand {
    /// Create an operator. The password is read from SESSIOND_OPERATOR_PASSWORD,
    /// else from the first line of standard input (never from a flag, which
    /// would leave it in the shell history and the process list).
    Create {
        #[arg(long)]
        email: String,
        #[arg(long, value_enum)]
        role: sessiond::operators::Role,
        /// Succeed without changes if the email already has an account.
        #[arg(long)]
        if_missing: bool,
    },
}

#[derive(Subcommand)]
enum ReplicationCommand {
    /// The slot's lag, confirmed position and retained WAL, pending flushes,
    /// the last error and the last reconciliation, as JSON.
    Status,
    /// Queue a reconciliation of ClickHouse against Postgres now (a server
    /// with replication on runs it).
    Reconcile,
}

#[derive(Subcommand)]
enum ClickhouseCommand {
    /// Create the database and apply the schema files not yet applied.
    Migrate,
    /// Copy existing rows into ClickHouse: a resumable, chunked `backfill` job
    /// per table (both tables unless one is named).
    Backfill {
        /// Only sessions.
        #[arg(long)]
        sessions: bool,
        /// Only runs.
        #[arg(long)]
        runs: bool,
        /// Only rows created at or after this time (RFC 3339).
        #[arg(long)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// Only rows created at or before this time (RFC 3339).
        #[arg(long)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// Rows per chunk (one job each).
        #[arg(long, default_value_t = analytics::backfill::DEFAULT_CHUNK_SIZE)]
        chunk_size: i32,
        /// Wait until the backfills finish, printing their progress (a server
        /// must be running to execute the jobs).
        #[arg(long)]
        wait: bool,
    },
    /// Recent backfills and their progress.
    Backfills {
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

#[derive(Subcommand)]
enum EnvCommand {
    /// Create an environment (and its organization/project if new); prints its key once.
    Create {
        #[arg(long)]
        org: String,
        #[arg(long)]
        project: String,
        /// dev, staging or prod
        #[arg(long = "type", value_parser = parse_env_type)]
        env_type: EnvType,
    },
    /// List environments.
    List,
    /// Replace an environment's secret key; the old key stops working.
    RotateKey { env_id: Uuid },
    /// Make sure the local dev environment exists and print its key.
    BootstrapDev {
        /// Print the secret key alone, for scripts (`scripts/dev.sh` hands it
        /// to the echo-agent worker).
        #[arg(long)]
        key_only: bool,
    },
}

fn parse_env_type(s: &str) -> Result<EnvType, String> {
    EnvType::parse(s).ok_or_else(|| "expected dev, staging or prod".to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let cli = Cli::parse();
    let config = cli.config;
    let command = match cli.command {
        // A worker talks to a server over HTTP only: no database.
        Command::Worker { task, url, key, concurrency } => return run_worker(task, url, key, concurrency).await,
        other => other,
    };
    let pool = db::connect(&config).await?;
    match command {
        Command::Worker { .. } => {}
        Command::Migrate => {
            db::migrate(&pool).await?;
            println!("migrations applied");
        }
        Command::Serve => {
            db::migrate(&pool).await?;
            let master = app::master_key(&config)?;
            if let Some(ms) = config.test_clock_offset() {
                sessiond::clock::set_test_offset_ms(ms);
                tracing::warn!(offset_ms = ms, "TEST MODE: this process's clock is shifted");
            }
            let listener = TcpListener::bind(&config.listen_addr).await?;
            let addr = listener.local_addr()?;
            let state = AppState::connect(config, pool, master).await?;
            tracing::info!(%addr, "sessiond listening on http://{addr}");
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                shutdown_signal().await;
                let _ = stop_tx.send(true);
            });
            app::serve(listener, state, stop_rx).await?;
        }
        Command::Env(cmd) => env_command(cmd, &config, &pool).await?,
        Command::Jobs(cmd) => jobs_command(cmd, config, pool).await?,
        Command::Sessions(cmd) => sessions_command(cmd, config, pool).await?,
        Command::Clickhouse(cmd) => clickhouse_command(cmd, config, pool).await?,
        Command::Replication(cmd) => replication_command(cmd, config, pool).await?,
        Command::Operators(cmd) => operators_command(cmd, &pool).await?,
    }
    Ok(())
}

async fn operators_command(cmd: OperatorsCommand, pool: &sqlx::PgPool) -> anyhow::Result<()> {
    use sessiond::operators::{self, OperatorError};
    db::migrate(pool).await?;
    match cmd {
        OperatorsCommand::Create { email, role, if_missing } => {
            let password = match std::env::var("SESSIOND_OPERATOR_PASSWORD") {
                Ok(p) => p,
                Err(_) => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            match operators::create(pool, &email, &password, role).await {
                Ok(op) => println!("operator {} created ({})", op.email, op.role.as_str()),
                Err(OperatorError::Exists) if if_missing => println!("operator {email} exists"),
                Err(err) => anyhow::bail!("{err}"),
            }
        }
    }
    Ok(())
}

async fn replication_command(cmd: ReplicationCommand, config: Config, pool: sqlx::PgPool) -> anyhow::Result<()> {
    db::migrate(&pool).await?;
    let (_, redis) = app::connect_redis(&config).await?;
    match cmd {
        ReplicationCommand::Status => {
            let slot = config.replication_slot_name();
            let health = sessiond::replication::health::status(&pool, &redis, &config.redis_prefix, &slot).await?;
            println!("{}", serde_json::to_string_pretty(&health)?);
        }
        ReplicationCommand::Reconcile => {
            let jobs = app::jobs(&config, pool.clone(), redis);
            let id = jobs.submit(&jobs::Job::sweep(jobs::JobKind::ReplicationReconcile)).await?;
            println!("reconciliation queued as job {id}");
        }
    }
    Ok(())
}

async fn env_command(cmd: EnvCommand, config: &Config, pool: &sqlx::PgPool) -> anyhow::Result<()> {
    db::migrate(pool).await?;
    let master = app::master_key(config)?;
    match cmd {
        EnvCommand::Create { org, project, env_type } => {
            let (env, key) = tenancy::create_environment(pool, &master, &org, &project, env_type).await?;
            println!("environment {} ({org}/{project}/{env_type})", env.id);
            println!("secret key: {}", key.expose());
        }
        EnvCommand::List => {
            println!("{:<36}  {:<20}  {:<20}  {:<8}  {:<16}  created", "id", "organization", "project", "type", "key");
            for e in tenancy::list(pool).await? {
                println!(
                    "{:<36}  {:<20}  {:<20}  {:<8}  {:<16}  {}",
                    e.id,
                    e.organization,
                    e.project,
                    e.env_type,
                    e.api_key_hint,
                    e.created_at.format("%Y-%m-%d %H:%M")
                );
            }
        }
        EnvCommand::RotateKey { env_id } => match tenancy::rotate_key(pool, &master, env_id).await? {
            Some(key) => println!("new secret key: {}", key.expose()),
            None => anyhow::bail!("no environment {env_id}"),
        },
        EnvCommand::BootstrapDev { key_only } => {
            let env = match tenancy::find_by_slugs(pool, &master, "dev", "dev", EnvType::Dev).await? {
                Some(env) => env,
                None => tenancy::create_environment(pool, &master, "dev", "dev", EnvType::Dev).await?.0,
            };
            if key_only {
                println!("{}", env.secret_key.expose());
            } else {
                println!("dev environment: {}", env.id);
                println!("dev secret key:  {}", env.secret_key.expose());
            }
        }
    }
    Ok(())
}

async fn jobs_command(cmd: JobsCommand, config: Config, pool: sqlx::PgPool) -> anyhow::Result<()> {
    match cmd {
        JobsCommand::List { failed, limit } => {
            println!("{:<36}  {:<22}  {:<9}  {:>8}  {:<16}  last error", "id", "kind", "status", "attempts", "updated");
            for j in jobs::store::list(&pool, failed, limit).await? {
                println!(
                    "{:<36}  {:<22}  {:<9}  {:>3}/{:<4}  {:<16}  {}",
                    j.id,
                    j.kind,
                    j.status,
                    j.attempts,
                    j.max_attempts,
                    j.updated_at.format("%Y-%m-%d %H:%M"),
                    j.last_error.as_deref().unwrap_or("")
                );
            }
        }
        JobsCommand::Show { id } => {
            let Some(j) = jobs::store::find(&pool, id).await? else { anyhow::bail!("no job {id}") };
            println!("job {} ({}) {} — {}/{} attempts", j.id, j.kind, j.status, j.attempts, j.max_attempts);
            println!("payload: {}", j.payload);
            for a in jobs::store::attempts(&pool, id).await? {
                println!(
                    "  attempt {} {} at {}: {}",
                    a.attempt,
                    a.status,
                    a.started_at,
                    a.error.as_deref().unwrap_or("ok")
                );
            }
        }
        JobsCommand::Retry { id } => {
            let (_, redis) = app::connect_redis(&config).await?;
            let jobs = app::jobs(&config, pool, redis);
            match jobs.retry(id).await? {
                Some(j) => println!("job {} ({}) queued again", j.id, j.kind),
                None => anyhow::bail!("job {id} does not exist, or is neither failed nor canceled"),
            }
        }
        JobsCommand::Probe { fail, max_attempts } => {
            let (_, redis) = app::connect_redis(&config).await?;
            let jobs = app::jobs(&config, pool, redis);
            let id = jobs.submit_with_attempts(&jobs::probe::Probe { fail_first: fail }, max_attempts).await?;
            println!("{id}");
        }
    }
    Ok(())
}

async fn sessions_command(cmd: SessionsCommand, config: Config, pool: sqlx::PgPool) -> anyhow::Result<()> {
    db::migrate(&pool).await?;
    match cmd {
        SessionsCommand::TriggerRun { env, session } => {
            let (_, redis) = app::connect_redis(&config).await?;
            let runs = app::run_manager(&config, pool.clone(), redis);
            let Some(s) = sessions::store::find(&pool, env, &session).await? else {
                anyhow::bail!("no session {session} in environment {env}")
            };
            let run = runs.trigger_manual(env, s.id).await?;
            println!("session {} now runs {run} (reason manual)", s.friendly_id);
        }
    }
    Ok(())
}

async fn clickhouse_command(cmd: ClickhouseCommand, config: Config, pool: sqlx::PgPool) -> anyhow::Result<()> {
    use analytics::backfill::{self, BackfillRequest, BackfillStatus};
    use analytics::watermark::Table;
    db::migrate(&pool).await?;
    match cmd {
        ClickhouseCommand::Migrate => {
            let ch = analytics::ClickHouse::new(&config);
            let applied = analytics::schema::migrate(&ch).await?;
            println!("clickhouse schema up to date ({} applied now)", applied.len());
        }
        ClickhouseCommand::Backfill { sessions, runs, from, to, chunk_size, wait } => {
            anyhow::ensure!(chunk_size > 0, "--chunk-size must be positive");
            let tables = match (sessions, runs) {
                (true, false) => vec![Table::Sessions],
                (false, true) => vec![Table::Runs],
                _ => vec![Table::Sessions, Table::Runs],
            };
            let (_, redis) = app::connect_redis(&config).await?;
            let jobs = app::jobs(&config, pool.clone(), redis);
            let req = BackfillRequest { tables, from, to, chunk_size };
            let started = backfill::start(&pool, &jobs, &req).await?;
            for b in &started {
                println!("backfill {} of {} queued", b.id, b.target.as_str());
            }
            let mut running = if wait { started.len() } else { 0 };
            while running > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                running = 0;
                for b in &started {
                    let Some(now) = backfill::store::find(&pool, b.id).await? else { continue };
                    println!(
                        "  {} {}: {} rows in {} chunks, {}",
                        now.id,
                        now.target.as_str(),
                        now.rows_copied,
                        now.chunks_done,
                        now.status.as_str()
                    );
                    running += usize::from(now.status == BackfillStatus::Running);
                }
            }
        }
        ClickhouseCommand::Backfills { limit } => {
            println!("{:<36}  {:<8}  {:<9}  {:>10}  {:>7}  started", "id", "table", "status", "rows", "chunks");
            for b in backfill::store::list(&pool, limit).await? {
                println!(
                    "{:<36}  {:<8}  {:<9}  {:>10}  {:>7}  {}",
                    b.id,
                    b.target.as_str(),
                    b.status.as_str(),
                    b.rows_copied,
                    b.chunks_done,
                    b.started_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
    }
    Ok(())
}

async fn run_worker(task: String, url: String, key: String, concurrency: usize) -> anyhow::Result<()> {
    use sessiond::worker::{channels::HttpChannelFactory, echo, Worker, WorkerClient};
    anyhow::ensure!(task == echo::TASK, "this binary ships one task, {}", echo::TASK);
    let agent = echo::EchoAgent { channels: std::sync::Arc::new(HttpChannelFactory { base_url: url.clone() }) };
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });
    tracing::info!(%url, %task, "worker started");
    Worker::new(WorkerClient::new(&url, &key), vec![task], concurrency).run(std::sync::Arc::new(agent), stop).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
