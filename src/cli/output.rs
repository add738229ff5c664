//! `--json`: what a command prints for scripts instead of for people.

use clap::Args;
use serde_json::Value;

/// The `--json` flag of a command that prints data.
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct Format {
    /// Print JSON (one document) instead of text.
    #[arg(long)]
    pub json: bool,
}

impl Format {
    /// Prints `json()` with `--json`, else runs `text` (which prints).
    pub fn print(self, json: impl FnOnce() -> Value, text: impl FnOnce()) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(&json())?);
        } else {
            text();
        }
        Ok(())
    }
}
