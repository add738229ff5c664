//! `env`: environments and their secret keys.

use clap::Subcommand;
use serde_json::json;
use uuid::Uuid;

use sessiond::app;
use sessiond::config::Config;
use sessiond::tenancy::{store as tenancy, EnvType};

use super::deps;
use super::output::Format;

#[derive(Subcommand)]
pub enum EnvCommand {
    /// Create an environment (and its organization/project if new); prints its key once.
    Create {
        #[arg(long)]
        org: String,
        #[arg(long)]
        project: String,
        /// dev, staging or prod
        #[arg(long = "type", value_parser = parse_env_type)]
        env_type: EnvType,
        #[command(flatten)]
        format: Format,
    },
    /// List environments.
    List {
        #[command(flatten)]
        format: Format,
    },
    /// Replace an environment's secret key; the old key stops working.
    RotateKey {
        env_id: Uuid,
        #[command(flatten)]
        format: Format,
    },
    /// Make sure the local dev environment exists and print its key.
    BootstrapDev {
        /// Print the secret key alone, for scripts (`scripts/dev.sh` hands it
        /// to the echo-agent worker).
        #[arg(long)]
        key_only: bool,
        #[command(flatten)]
        format: Format,
    },
}

fn parse_env_type(s: &str) -> Result<EnvType, String> {
    EnvType::parse(s).ok_or_else(|| "expected dev, staging or prod".to_string())
}

pub async fn run(cmd: EnvCommand, config: &Config) -> anyhow::Result<()> {
    let pool = deps::database(config).await?;
    let master = app::master_key(config)?;
    match cmd {
        EnvCommand::Create { org, project, env_type, format } => {
            let (env, key) = tenancy::create_environment(&pool, &master, &org, &project, env_type).await?;
            format.print(
                || {
                    json!({"id": env.id, "organization": org, "project": project, "type": env_type.to_string(),
                           "secretKey": key.expose()})
                },
                || {
                    println!("environment {} ({org}/{project}/{env_type})", env.id);
                    println!("secret key: {}", key.expose());
                },
            )
        }
        EnvCommand::List { format } => {
            let envs = tenancy::list(&pool).await?;
            format.print(
                || {
                    json!(envs
                        .iter()
                        .map(|e| json!({
                            "id": e.id, "organization": e.organization, "project": e.project,
                            "type": e.env_type, "keyHint": e.api_key_hint, "createdAt": e.created_at,
                            "keyRotatedAt": e.key_rotated_at,
                        }))
                        .collect::<Vec<_>>())
                },
                || {
                    println!(
                        "{:<36}  {:<20}  {:<20}  {:<8}  {:<16}  created",
                        "id", "organization", "project", "type", "key"
                    );
                    for e in &envs {
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
                },
            )
        }
        EnvCommand::RotateKey { env_id, format } => match tenancy::rotate_key(&pool, &master, env_id).await? {
            Some(key) => format.print(
                || json!({"id": env_id, "secretKey": key.expose()}),
                || println!("new secret key: {}", key.expose()),
            ),
            None => anyhow::bail!("no environment {env_id}"),
        },
        EnvCommand::BootstrapDev { key_only, format } => {
            let env = match tenancy::find_by_slugs(&pool, &master, "dev", "dev", EnvType::Dev).await? {
                Some(env) => env,
                None => tenancy::create_environment(&pool, &master, "dev", "dev", EnvType::Dev).await?.0,
            };
            format.print(
                || json!({"id": env.id, "secretKey": env.secret_key.expose()}),
                || {
                    if key_only {
                        println!("{}", env.secret_key.expose());
                    } else {
                        println!("dev environment: {}", env.id);
                        println!("dev secret key:  {}", env.secret_key.expose());
                    }
                },
            )
        }
    }
}
