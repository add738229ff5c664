//! The `sessiond` command line: one module per command group, each building
//! only the services it uses (a worker needs no database; `jobs list` needs
//! Postgres but not Redis). Every command that prints data takes `--json`
//! for scripts; the default is a table or a sentence for people.

mod clickhouse;
mod deps;
mod env;
mod jobs;
mod operators;
mod output;
mod replication;
mod serve;
mod sessions;
mod worker;

use clap::{Parser, Subcommand};
use sessiond::config::Config;

#[derive(Parser)]
#[command(name = "sessiond", about = "Durable agent sessions server")]
pub struct Cli {
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
    Env(env::EnvCommand),
    /// Inspect and retry background jobs.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Operator actions on sessions.
    #[command(subcommand)]
    Sessions(sessions::SessionsCommand),
    /// The ClickHouse copy the session list and analytics read.
    #[command(subcommand)]
    Clickhouse(clickhouse::ClickhouseCommand),
    /// Logical replication into ClickHouse.
    #[command(subcommand)]
    Replication(replication::ReplicationCommand),
    /// Dashboard operator accounts.
    #[command(subcommand)]
    Operators(operators::OperatorsCommand),
    /// Run a task worker against a sessiond server (the example echo agent).
    Worker(worker::WorkerArgs),
}

impl Cli {
    /// Runs the command the arguments name.
    pub async fn run(self) -> anyhow::Result<()> {
        let config = self.config;
        match self.command {
            Command::Serve => serve::serve(config).await,
            Command::Migrate => serve::migrate(&config).await,
            Command::Env(cmd) => env::run(cmd, &config).await,
            Command::Jobs(cmd) => jobs::run(cmd, &config).await,
            Command::Sessions(cmd) => sessions::run(cmd, &config).await,
            Command::Clickhouse(cmd) => clickhouse::run(cmd, &config).await,
            Command::Replication(cmd) => replication::run(cmd, &config).await,
            Command::Operators(cmd) => operators::run(cmd, &config).await,
            Command::Worker(args) => worker::run(args).await,
        }
    }
}
