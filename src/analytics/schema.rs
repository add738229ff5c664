//! The ClickHouse schema: the numbered `.sql` files of `clickhouse-schema/`,
//! compiled into the binary and applied in order, each once.
//!
//! Applied files are recorded in `sessiond_schema_migrations`. Every file uses
//! `IF NOT EXISTS`, so two servers starting at once may both apply a file
//! without harm; the record only saves the work on later starts.

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use super::{AnalyticsError, ClickHouse};

/// (version, name, SQL) of every schema file, in order. A unit test checks that
/// this list and the folder agree.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "sessions_v1", include_str!("../../clickhouse-schema/0001_sessions_v1.sql")),
    (2, "task_runs_v1", include_str!("../../clickhouse-schema/0002_task_runs_v1.sql")),
    (3, "watermarks", include_str!("../../clickhouse-schema/0003_watermarks.sql")),
    (4, "replication_lag", include_str!("../../clickhouse-schema/0004_replication_lag.sql")),
];

const LEDGER: &str = "CREATE TABLE IF NOT EXISTS sessiond_schema_migrations
    (version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3))
    ENGINE = ReplacingMergeTree ORDER BY version";

#[derive(Debug, Row, Serialize, Deserialize)]
struct Applied {
    version: u32,
    name: String,
}

/// Creates the database if needed and applies the files not yet applied.
/// Returns the names applied now.
pub async fn migrate(ch: &ClickHouse) -> Result<Vec<&'static str>, AnalyticsError> {
    let create = format!("CREATE DATABASE IF NOT EXISTS {}", quote_ident(ch.database()));
    ch.write(ch.server().query(&create).execute()).await?;
    ch.write(ch.client().query(LEDGER).execute()).await?;
    let done: Vec<u32> =
        ch.read(ch.client().query("SELECT DISTINCT version FROM sessiond_schema_migrations").fetch_all()).await?;
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        for statement in statements(sql) {
            ch.write(ch.client().query(statement).execute()).await?;
        }
        let mut insert = ch.write(ch.client().insert::<Applied>("sessiond_schema_migrations")).await?;
        ch.write(insert.write(&Applied { version: *version, name: name.to_string() })).await?;
        ch.write(insert.end()).await?;
        tracing::info!(version, name, "clickhouse schema applied");
        applied.push(*name);
    }
    Ok(applied)
}

/// Applies the schema in the background until it succeeds, so `serve` starts
/// and answers while ClickHouse is down (the list falls back to Postgres).
pub fn migrate_in_background(ch: ClickHouse) {
    tokio::spawn(async move {
        let mut delay = std::time::Duration::from_millis(500);
        loop {
            match migrate(&ch).await {
                Ok(_) => return,
                Err(err) => {
                    tracing::warn!(error = %err, retry_in = ?delay, "clickhouse schema not applied; will retry");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(30));
                }
            }
        }
    });
}

/// The statements of a file: split on `;` at the end of a line, comments and
/// blank pieces dropped. Our files put no `;` inside strings.
fn statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(";\n")
        .map(str::trim)
        .filter(|s| s.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--")))
}

/// Quotes an identifier for ClickHouse (backticks, with backticks and
/// backslashes escaped): the database name comes from configuration.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_file_is_listed_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clickhouse-schema");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|f| f.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS.iter().map(|(v, n, _)| format!("{v:04}_{n}.sql")).collect();
        assert_eq!(files, listed);
    }

    #[test]
    fn statements_skip_comment_only_pieces() {
        let sql = "-- a comment\nCREATE TABLE a (x UInt8) ENGINE = Memory;\n-- trailing\n;\nSELECT 1\n";
        let got: Vec<&str> = statements(sql).collect();
        assert_eq!(got.len(), 2);
        assert!(got[0].contains("CREATE TABLE a"));
        assert_eq!(got[1], "SELECT 1");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("t_1"), "`t_1`");
        assert_eq!(quote_ident("a`b\\"), "`a\\`b\\\\`");
    }
}
