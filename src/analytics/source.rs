//! The Postgres side of the copy: the digests and id scans of [`super::digest`]
//! computed over the tables the copy is made from, so that reconciliation
//! (`replication::reconcile`) compares like with like.
//!
//! These read `sessions` and `task_runs`, whose stores own every other query
//! on them. They live here instead because they are one query over the
//! columns both tables share, the counterpart of a ClickHouse query on the
//! copy, and typed by the copy's digests: in a store they would make
//! `sessions` and `runs` import `analytics`, which imports them.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::digest::{BucketDigest, Digest, Grain, Scope};
use super::watermark::Table;
use crate::db::StoreError;

/// The Postgres table `table` copies (the counterpart of
/// [`super::digest::copy_of`]).
fn table_of(table: Table) -> &'static str {
    match table {
        Table::Sessions => "sessions",
        Table::Runs => "task_runs",
    }
}

/// The environment of `scope` as Postgres keys it. An environment id that is
/// not a uuid (the copy can hold anything) has no rows in Postgres at all.
fn environment(scope: &Scope) -> Option<Uuid> {
    Uuid::parse_str(&scope.environment_id).ok()
}

/// Digests at `grain` of `table`'s rows created before `cutoff` (within
/// `scope` if given) and not changed since: the same as
/// [`super::digest::digests`] computes over the copy. Without a scope, a
/// whole-table scan: it runs on a schedule, not per request; with one, a
/// range of the environment's creation index.
pub async fn digests(
    pool: &PgPool,
    table: Table,
    grain: Grain,
    scope: Option<&Scope>,
    cutoff: DateTime<Utc>,
) -> Result<Vec<Digest>, StoreError> {
    let scope = match scope {
        None => None,
        Some(s) => match environment(s) {
            Some(env) => Some((env, s.from, s.to)),
            None => return Ok(Vec::new()),
        },
    };
    let (table, key) = (table_of(table), grain.postgres_key());
    let within =
        if scope.is_some() { " AND runtime_environment_id = $2 AND created_at >= $3 AND created_at < $4" } else { "" };
    let sql = format!(
        "SELECT runtime_environment_id::text AS environment_id, {key} AS bucket, count(*) AS rows,
                coalesce((extract(epoch FROM max(updated_at)) * 1000000)::bigint, 0) AS newest_update_us,
                coalesce(sum((extract(epoch FROM updated_at) * 1000000)::bigint), 0)::text AS update_sum
         FROM {table} WHERE created_at < $1 AND updated_at < $1{within} GROUP BY 1, 2 ORDER BY 1, 2"
    );
    let mut query = sqlx::query_as(&sql).bind(cutoff);
    if let Some((env, from, to)) = scope {
        query = query.bind(env).bind(from).bind(to);
    }
    Ok(query.fetch_all(pool).await?)
}

/// The digest of `scope`'s rows not changed since `cutoff`, with the ids of
/// those changed since, read in one snapshot (the copy's side is
/// [`super::digest::bucket_digest`], which leaves those ids out).
pub async fn bucket_digest(
    pool: &PgPool,
    table: Table,
    scope: &Scope,
    cutoff: DateTime<Utc>,
) -> Result<BucketDigest, StoreError> {
    let Some(env) = environment(scope) else {
        return Ok(BucketDigest { rows: 0, newest_update_us: 0, update_sum: "0".into(), changed: Vec::new() });
    };
    let sql = format!(
        "SELECT count(*) FILTER (WHERE updated_at < $4) AS rows,
                coalesce((extract(epoch FROM max(updated_at) FILTER (WHERE updated_at < $4)) * 1000000)::bigint, 0)
                    AS newest_update_us,
                coalesce(sum((extract(epoch FROM updated_at) * 1000000)::bigint) FILTER (WHERE updated_at < $4), 0)::text
                    AS update_sum,
                coalesce(array_agg(id::text) FILTER (WHERE updated_at >= $4), '{{}}') AS changed
         FROM {} WHERE runtime_environment_id = $1 AND created_at >= $2 AND created_at < $3",
        table_of(table)
    );
    Ok(sqlx::query_as(&sql).bind(env).bind(scope.from).bind(scope.to).bind(cutoff).fetch_one(pool).await?)
}

/// Ids of `table`'s rows in `scope` (the copy's side is
/// [`super::digest::ids`]).
pub async fn ids(pool: &PgPool, table: Table, scope: &Scope) -> Result<Vec<Uuid>, StoreError> {
    let Some(env) = environment(scope) else { return Ok(Vec::new()) };
    let sql = format!(
        "SELECT id FROM {} WHERE runtime_environment_id = $1 AND created_at >= $2 AND created_at < $3",
        table_of(table)
    );
    Ok(sqlx::query_scalar(&sql).bind(env).bind(scope.from).bind(scope.to).fetch_all(pool).await?)
}
