//! `sessions`: operator actions on sessions.

use clap::Subcommand;
use serde_json::json;
use uuid::Uuid;

use sessiond::app;
use sessiond::audit::Actor;
use sessiond::config::Config;
use sessiond::sessions;

use super::deps;
use super::output::Format;

#[derive(Subcommand)]
pub enum SessionsCommand {
    /// Start a fresh run for a session now (reason manual); the current run is canceled.
    TriggerRun {
        /// Environment id the session lives in.
        #[arg(long)]
        env: Uuid,
        /// Session friendly id or external id.
        session: String,
        #[command(flatten)]
        format: Format,
    },
}

pub async fn run(cmd: SessionsCommand, config: &Config) -> anyhow::Result<()> {
    let pool = deps::database(config).await?;
    match cmd {
        SessionsCommand::TriggerRun { env, session, format } => {
            let redis = deps::redis(config).await?;
            let runs = app::run_manager(config, pool.clone(), redis);
            let Some(s) = sessions::store::find(&pool, env, &session).await? else {
                anyhow::bail!("no session {session} in environment {env}")
            };
            let run = runs.trigger_manual(env, s.id, &Actor::Cli).await?;
            format.print(
                || json!({"session": s.friendly_id, "runId": run.to_string(), "reason": "manual"}),
                || println!("session {} now runs {run} (reason manual)", s.friendly_id),
            )
        }
    }
}
