//! The `sessiond` binary: server, migrations and operator commands (see
//! [`cli`]).

mod cli;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    // A long-running process logs to stdout as it always has; a command that
    // prints data logs to stderr, so its stdout stays the data alone (a
    // `--json` document, a key) even when a slow statement is logged.
    let to_stdout = cli.is_long_running();
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(move || -> Box<dyn std::io::Write> {
        if to_stdout {
            Box::new(std::io::stdout())
        } else {
            Box::new(std::io::stderr())
        }
    });
    if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        logs.json().init();
    } else {
        logs.init();
    }
    cli.run().await
}
