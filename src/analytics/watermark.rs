//! How far ClickHouse is known to be complete, per table: every change
//! committed before the watermark is there. Readers overlay what Postgres
//! changed after it (see [`super::session_list`]).

use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::{Deserialize, Serialize};

use super::{AnalyticsError, ClickHouse};

/// The tables ClickHouse copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum Table {
    Sessions,
    Runs,
}

impl Table {
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Sessions => "sessions",
            Table::Runs => "runs",
        }
    }
}

/// Who moved a watermark.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    Backfill,
    Replication,
}

#[derive(Row, Serialize)]
struct Mark<'a> {
    table_name: &'a str,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    watermark: DateTime<Utc>,
    lsn: u64,
    source: &'a str,
}

#[derive(Row, Deserialize)]
struct Latest {
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros::option")]
    watermark: Option<DateTime<Utc>>,
}

/// Records that every change committed before `at` (WAL position `lsn`) is in
/// ClickHouse. Moving it backwards is harmless: readers take the highest.
pub async fn advance(
    ch: &ClickHouse,
    table: Table,
    at: DateTime<Utc>,
    lsn: u64,
    source: Source,
) -> Result<(), AnalyticsError> {
    let source = match source {
        Source::Backfill => "backfill",
        Source::Replication => "replication",
    };
    let mut insert = ch.write(ch.client().insert::<Mark>("sessiond_watermarks")).await?;
    ch.write(insert.write(&Mark { table_name: table.as_str(), watermark: at, lsn, source })).await?;
    ch.write(insert.end()).await?;
    Ok(())
}

/// The table's watermark, or None while nothing vouches for ClickHouse's copy
/// (never backfilled), when the whole list must come from Postgres.
pub async fn read(ch: &ClickHouse, table: Table) -> Result<Option<DateTime<Utc>>, AnalyticsError> {
    let latest: Latest = ch
        .read(
            ch.client()
                .query(
                    "SELECT if(count() = 0, NULL, max(watermark)) AS watermark
                     FROM sessiond_watermarks WHERE table_name = {table:String}",
                )
                .param("table", table.as_str())
                .fetch_one(),
        )
        .await?;
    Ok(latest.watermark)
}
