//! `jobs`: inspect, retry and probe background jobs.

use clap::Subcommand;
use serde_json::json;
use uuid::Uuid;

use sessiond::audit::Actor;
use sessiond::config::Config;
use sessiond::jobs::actions::OneJob;
use sessiond::jobs::store;

use super::deps;
use super::output::Format;

#[derive(Subcommand)]
pub enum JobsCommand {
    /// Recent jobs, newest first.
    List {
        /// Only jobs that exhausted their attempts.
        #[arg(long)]
        failed: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[command(flatten)]
        format: Format,
    },
    /// One job and every attempt, with errors.
    Show {
        id: Uuid,
        #[command(flatten)]
        format: Format,
    },
    /// Run a failed or canceled job again with a fresh attempt budget.
    Retry {
        id: Uuid,
        #[command(flatten)]
        format: Format,
    },
    #[cfg(feature = "test-faults")]
    /// Submit a probe job, a test seam that fails its first N attempts on
    /// purpose, then succeeds: checks the job pipeline and the dashboard's
    /// retry end to end. Prints the job id.
    Probe {
        /// Attempts that fail before one succeeds.
        #[arg(long = "fail", default_value_t = 0)]
        fail: u32,
        /// The job's attempt budget (1 to 5); at most `fail` leaves it failed.
        #[arg(long, default_value_t = sessiond::jobs::DEFAULT_MAX_ATTEMPTS,
              value_parser = clap::value_parser!(i32).range(1..=i64::from(sessiond::jobs::DEFAULT_MAX_ATTEMPTS)))]
        max_attempts: i32,
        #[command(flatten)]
        format: Format,
    },
}

fn job_json(j: &store::JobRow) -> serde_json::Value {
    json!({
        "id": j.id, "kind": j.kind.to_string(), "status": j.status.to_string(), "attempts": j.attempts,
        "maxAttempts": j.max_attempts, "lastError": j.last_error, "createdAt": j.created_at,
        "updatedAt": j.updated_at, "finishedAt": j.finished_at,
    })
}

pub async fn run(cmd: JobsCommand, config: &Config) -> anyhow::Result<()> {
    let pool = deps::database(config).await?;
    match cmd {
        JobsCommand::List { failed, limit, format } => {
            let rows = store::list(&pool, failed, limit).await?;
            format.print(
                || json!(rows.iter().map(job_json).collect::<Vec<_>>()),
                || {
                    println!(
                        "{:<36}  {:<22}  {:<9}  {:>8}  {:<16}  last error",
                        "id", "kind", "status", "attempts", "updated"
                    );
                    for j in &rows {
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
                },
            )
        }
        JobsCommand::Show { id, format } => {
            let Some(j) = store::find(&pool, id).await? else { anyhow::bail!("no job {id}") };
            let attempts = store::attempts(&pool, id).await?;
            format.print(
                || {
                    let mut doc = job_json(&j);
                    doc["payload"] = j.payload.clone();
                    doc["attemptLog"] = json!(attempts
                        .iter()
                        .map(|a| json!({"attempt": a.attempt, "status": a.status.to_string(), "error": a.error,
                                        "startedAt": a.started_at, "finishedAt": a.finished_at}))
                        .collect::<Vec<_>>());
                    doc
                },
                || {
                    println!("job {} ({}) {} — {}/{} attempts", j.id, j.kind, j.status, j.attempts, j.max_attempts);
                    println!("payload: {}", j.payload);
                    for a in &attempts {
                        println!(
                            "  attempt {} {} at {}: {}",
                            a.attempt,
                            a.status,
                            a.started_at,
                            a.error.as_deref().unwrap_or("ok")
                        );
                    }
                },
            )
        }
        JobsCommand::Retry { id, format } => {
            let jobs = deps::jobs(config, &pool).await?;
            if jobs.act_on(&Actor::Cli, id, OneJob::Retry).await?.is_none() {
                anyhow::bail!("job {id} does not exist, or is neither failed nor canceled");
            }
            let Some(j) = store::find(&pool, id).await? else { anyhow::bail!("no job {id}") };
            format.print(|| job_json(&j), || println!("job {} ({}) queued again", j.id, j.kind))
        }
        #[cfg(feature = "test-faults")]
        JobsCommand::Probe { fail, max_attempts, format } => {
            let jobs = deps::jobs(config, &pool).await?;
            let id =
                jobs.submit_with_attempts(&sessiond::jobs::probe::Probe { fail_first: fail }, max_attempts).await?;
            format.print(|| json!({"id": id}), || println!("{id}"))
        }
    }
}
