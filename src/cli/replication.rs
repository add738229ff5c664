//! `replication`: the slot's health, and reconciling on demand.

use clap::Subcommand;
use serde_json::json;

use sessiond::config::Config;
use sessiond::jobs::{Job, JobKind};
use sessiond::replication::health;

use super::deps;
use super::output::Format;

#[derive(Subcommand)]
pub enum ReplicationCommand {
    /// The slot's lag, confirmed position and retained WAL, pending flushes,
    /// the last error and the last reconciliation. Always JSON (it is read
    /// by scripts and people alike).
    Status,
    /// Queue a reconciliation of ClickHouse against Postgres now (a server
    /// with replication on runs it).
    Reconcile {
        #[command(flatten)]
        format: Format,
    },
}

pub async fn run(cmd: ReplicationCommand, config: &Config) -> anyhow::Result<()> {
    let pool = deps::database(config).await?;
    match cmd {
        ReplicationCommand::Status => {
            let redis = deps::redis(config).await?;
            let slot = config.replication_slot_name();
            let health = health::status(&pool, &redis, &config.redis_prefix, &slot).await?;
            println!("{}", serde_json::to_string_pretty(&health)?);
            Ok(())
        }
        ReplicationCommand::Reconcile { format } => {
            let jobs = deps::jobs(config, &pool).await?;
            let id = jobs.submit(&Job::sweep(JobKind::ReplicationReconcile)).await?;
            format.print(|| json!({"jobId": id}), || println!("reconciliation queued as job {id}"))
        }
    }
}
