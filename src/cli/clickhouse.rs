//! `clickhouse`: the copy's schema and backfills.

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use sessiond::analytics::backfill::{self, store::Backfill, BackfillRequest, BackfillStatus};
use sessiond::analytics::{self, watermark::Table};
use sessiond::audit::Actor;
use sessiond::config::Config;

use super::deps;
use super::output::Format;

#[derive(Subcommand)]
pub enum ClickhouseCommand {
    /// Create the database and apply the schema files not yet applied.
    Migrate {
        #[command(flatten)]
        format: Format,
    },
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
        #[arg(long, default_value_t = backfill::DEFAULT_CHUNK_SIZE)]
        chunk_size: i32,
        /// Wait until the backfills finish, printing their progress (a server
        /// must be running to execute the jobs).
        #[arg(long)]
        wait: bool,
        /// With `--wait`, one JSON document of the final state at the end.
        #[command(flatten)]
        format: Format,
    },
    /// Recent backfills and their progress.
    Backfills {
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[command(flatten)]
        format: Format,
    },
}

fn backfill_json(b: &Backfill) -> serde_json::Value {
    json!({
        "id": b.id, "table": b.target.as_str(), "status": b.status.as_str(), "rowsCopied": b.rows_copied,
        "chunksDone": b.chunks_done, "chunkSize": b.chunk_size, "from": b.created_from, "to": b.created_to,
        "startedAt": b.started_at, "completedAt": b.completed_at,
    })
}

pub async fn run(cmd: ClickhouseCommand, config: &Config) -> anyhow::Result<()> {
    match cmd {
        ClickhouseCommand::Migrate { format } => {
            // The ClickHouse schema alone: no Postgres needed.
            let ch = analytics::ClickHouse::new(config);
            let applied = analytics::schema::migrate(&ch).await?;
            format.print(
                || json!({"applied": applied}),
                || println!("clickhouse schema up to date ({} applied now)", applied.len()),
            )
        }
        ClickhouseCommand::Backfill { sessions, runs, from, to, chunk_size, wait, format } => {
            anyhow::ensure!(chunk_size > 0, "--chunk-size must be positive");
            let tables = match (sessions, runs) {
                (true, false) => vec![Table::Sessions],
                (false, true) => vec![Table::Runs],
                _ => vec![Table::Sessions, Table::Runs],
            };
            let pool = deps::database(config).await?;
            let jobs = deps::jobs(config, &pool).await?;
            let req = BackfillRequest { tables, from, to, chunk_size };
            let mut backfills = backfill::start_by(&pool, &jobs, &Actor::Cli, &req).await?;
            if !format.json {
                for b in &backfills {
                    println!("backfill {} of {} queued", b.id, b.target.as_str());
                }
            }
            let mut running = if wait { backfills.len() } else { 0 };
            while running > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                running = 0;
                for b in backfills.iter_mut() {
                    let Some(now) = backfill::store::find(&pool, b.id).await? else { continue };
                    if !format.json {
                        println!(
                            "  {} {}: {} rows in {} chunks, {}",
                            now.id,
                            now.target.as_str(),
                            now.rows_copied,
                            now.chunks_done,
                            now.status.as_str()
                        );
                    }
                    running += usize::from(now.status == BackfillStatus::Running);
                    *b = now;
                }
            }
            format.print(|| json!(backfills.iter().map(backfill_json).collect::<Vec<_>>()), || {})
        }
        ClickhouseCommand::Backfills { limit, format } => {
            let pool = deps::database(config).await?;
            let rows = backfill::store::list(&pool, limit).await?;
            format.print(
                || json!(rows.iter().map(backfill_json).collect::<Vec<_>>()),
                || {
                    println!("{:<36}  {:<8}  {:<9}  {:>10}  {:>7}  started", "id", "table", "status", "rows", "chunks");
                    for b in &rows {
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
                },
            )
        }
    }
}
