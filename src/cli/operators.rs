//! `operators`: dashboard accounts.

use clap::Subcommand;
use serde_json::json;

use sessiond::config::Config;
use sessiond::operators::{self, OperatorError, Role};

use super::deps;
use super::output::Format;

#[derive(Subcommand)]
pub enum OperatorsCommand {
    /// Create an operator. The password is read from SESSIOND_OPERATOR_PASSWORD,
    /// else from the first line of standard input (never from a flag, which
    /// would leave it in the shell history and the process list).
    Create {
        #[arg(long)]
        email: String,
        #[arg(long, value_enum)]
        role: Role,
        /// Succeed without changes if the email already has an account.
        #[arg(long)]
        if_missing: bool,
        #[command(flatten)]
        format: Format,
    },
}

pub async fn run(cmd: OperatorsCommand, config: &Config) -> anyhow::Result<()> {
    let pool = deps::database(config).await?;
    match cmd {
        OperatorsCommand::Create { email, role, if_missing, format } => {
            let password = match std::env::var("SESSIOND_OPERATOR_PASSWORD") {
                Ok(p) => p,
                Err(_) => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            match operators::create(&pool, &email, &password, role).await {
                Ok(op) => format.print(
                    || json!({"email": op.email, "role": op.role.as_str(), "created": true}),
                    || println!("operator {} created ({})", op.email, op.role.as_str()),
                ),
                Err(OperatorError::Exists) if if_missing => {
                    format.print(|| json!({"email": email, "created": false}), || println!("operator {email} exists"))
                }
                Err(err) => anyhow::bail!("{err}"),
            }
        }
    }
}
