//! The session list served from ClickHouse, correct while ClickHouse lags and
//! answered by Postgres while it is away.
//!
//! A ClickHouse answer is built from three reads:
//! 1. the ids of sessions Postgres changed since ClickHouse's watermark (less a
//!    margin), from `sessions_env_updated_idx`: the rows ClickHouse may have
//!    stale or not at all;
//! 2. the page from ClickHouse (filters, status and cursor in SQL, `FINAL`),
//!    leaving out those ids;
//! 3. from Postgres, the page's rows by id (the response shows the current row
//!    and its run, like every other read), plus the changed rows that match the
//!    query, chosen by the same SQL the Postgres list uses.
//!
//! The two sets are disjoint, so merging them in cursor order and cutting at
//! the page size gives the page Postgres alone would give. With no watermark
//! (never backfilled), a copy incomplete since a new replication slot (see
//! [`crate::replication::slot::copy_incomplete`]), too many changed rows
//! (ClickHouse far behind), or a ClickHouse error or timeout, the whole answer
//! comes from Postgres.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::watermark::{self, Table};
use super::{ch_time, AnalyticsError, ClickHouse};
use crate::db::StoreError;
use crate::replication::slot;
use crate::sessions::list::{
    paginate, Direction, EnvScope, ListPage, ListQuery, ListSource, PgSessionList, Served, SessionListRepository,
    MAX_PAGE_SIZE,
};
use crate::sessions::model::{Session, SessionStatus};
use crate::sessions::store as session_store;

/// How long a read watermark is reused. A stale watermark is only older, so it
/// costs a larger overlay, never a wrong answer: the overlay spans this, the
/// margin and replication's lag, times the write rate.
const WATERMARK_TTL: Duration = Duration::from_millis(250);

pub struct ClickHouseSessionList {
    pg: PgSessionList,
    ch: ClickHouse,
    margin: chrono::Duration,
    max_overlay: usize,
    watermark: Mutex<Option<(Instant, Option<DateTime<Utc>>)>>,
}

/// Sessions Postgres changed since ClickHouse's watermark.
struct Overlay {
    ids: Vec<Uuid>,
}

impl ClickHouseSessionList {
    pub fn new(pg: PgSessionList, ch: ClickHouse, margin: Duration, max_overlay: usize) -> Self {
        ClickHouseSessionList {
            pg,
            ch,
            margin: chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::zero()),
            max_overlay,
            watermark: Mutex::new(None),
        }
    }

    /// The watermark the list may trust: None while there is none, or while
    /// the copy is incomplete since a new slot (its flushes move the
    /// watermark past rows only the backfill brings).
    ///
    /// The watermark is read first and the flag after it, and the two are
    /// kept together: a flag found clear at `t2` means any slot generation
    /// still healing began after `t2` (the consumer commits the flag before it
    /// creates the slot), so none of its flushes had moved the watermark read
    /// at `t1 <= t2`. That watermark stays a true claim however long it is
    /// reused (everything committed before it is in ClickHouse), so a set flag
    /// is seen before any list could be wrong, cache or not. Read the other
    /// way round (flag first), a generation begun and its first flushes
    /// landed between the two reads would pair a clear flag with a watermark
    /// already past the gap.
    async fn watermark(&self) -> Result<Option<DateTime<Utc>>, AnalyticsError> {
        if let Some((at, mark)) = *self.cached() {
            if at.elapsed() < WATERMARK_TTL {
                return Ok(mark);
            }
        }
        let Some(mark) = watermark::read(&self.ch, Table::Sessions).await? else { return Ok(None) };
        if slot::copy_incomplete(&self.pg.pool, Table::Sessions).await? {
            return Ok(None);
        }
        // Only a trusted watermark is kept: until one exists, each list asks,
        // so the first list after a backfill already uses it.
        *self.cached() = Some((Instant::now(), Some(mark)));
        Ok(Some(mark))
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Option<DateTime<Utc>>)>> {
        self.watermark.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether ClickHouse can serve this environment now, and the rows to
    /// overlay if so. None: answer from Postgres.
    async fn overlay(&self, env: EnvScope) -> Result<Option<Overlay>, AnalyticsError> {
        if !self.ch.healthy() {
            return Ok(None);
        }
        let Some(mark) = self.watermark().await? else {
            return Ok(None);
        };
        let since = mark - self.margin;
        let limit = self.max_overlay as i64 + 1;
        let ids = session_store::changed_since(&self.pg.pool, env.environment_id, since, limit).await?;
        if ids.len() > self.max_overlay {
            tracing::debug!(env = %env.environment_id, "clickhouse too far behind for the list; postgres serves it");
            return Ok(None);
        }
        Ok(Some(Overlay { ids }))
    }

    /// Runs `from_clickhouse` if ClickHouse can serve, else (or if it fails)
    /// `from_postgres`. Postgres errors are errors either way.
    async fn serve<'a, T, C, P>(
        &'a self,
        env: EnvScope,
        from_clickhouse: C,
        from_postgres: P,
    ) -> Result<Served<T>, StoreError>
    where
        C: FnOnce(Overlay) -> futures::future::BoxFuture<'a, Result<T, AnalyticsError>>,
        P: std::future::Future<Output = Result<Served<T>, StoreError>>,
    {
        let failure = match self.overlay(env).await {
            Ok(Some(overlay)) => match from_clickhouse(overlay).await {
                Ok(value) => return Ok(Served { value, source: ListSource::ClickHouse }),
                Err(err) => err,
            },
            Ok(None) => return from_postgres.await,
            Err(err) => err,
        };
        match failure {
            AnalyticsError::Store(err) => Err(err),
            err => {
                tracing::warn!(error = %err, "clickhouse unavailable; the session list is served by postgres");
                from_postgres.await
            }
        }
    }

    async fn page_from_clickhouse(
        &self,
        env: EnvScope,
        q: &ListQuery,
        overlay: Overlay,
    ) -> Result<ListPage, AnalyticsError> {
        let direction = q.cursor.map(|(d, _)| d);
        let limit = q.page_size.clamp(1, MAX_PAGE_SIZE) + 1;
        // FINAL merges every version of every row it reads, so an unbounded
        // page reads the whole environment. A bound on created_at keeps it to
        // the page's neighbourhood: every version of a row shares its
        // created_at, so FINAL inside the bound is exact. The bound comes from
        // a plain read in sort-key order (no FINAL): the created_at a few pages
        // away. If versions or deletes there leave the bounded page short, the
        // page is read again unbounded.
        let bound_sql = page_sql("SELECT created_at FROM sessions_v1", env, q, &overlay.ids, None, limit * 2, 1);
        let bound: Option<Micros> = self.ch.read(bound_sql.query(&self.ch).fetch_optional()).await?;
        let bound = bound.map(|b| b.created_at);
        let sql = page_sql("SELECT session_id FROM sessions_v1 FINAL", env, q, &overlay.ids, bound, 0, limit);
        let mut ids: Vec<String> = self.ch.read(sql.query(&self.ch).fetch_all()).await?;
        if bound.is_some() && (ids.len() as i64) < limit {
            let sql = page_sql("SELECT session_id FROM sessions_v1 FINAL", env, q, &overlay.ids, None, 0, limit);
            ids = self.ch.read(sql.query(&self.ch).fetch_all()).await?;
        }
        let ids: Vec<Uuid> = ids.iter().filter_map(|id| Uuid::parse_str(id).ok()).collect();
        let mut rows = if ids.is_empty() {
            Vec::new()
        } else {
            session_store::find_many(&self.pg.pool, env.environment_id, &ids).await?
        };
        if !overlay.ids.is_empty() {
            rows.extend(self.pg.rows(env.environment_id, q, Some(&overlay.ids)).await?);
        }
        sort_for(&mut rows, direction);
        rows.dedup_by_key(|s| s.id);
        Ok(paginate(rows, q.page_size as usize, direction, q.origin))
    }

    async fn count_from_clickhouse(
        &self,
        env: EnvScope,
        q: &ListQuery,
        overlay: Overlay,
    ) -> Result<u64, AnalyticsError> {
        let sql = Filtered::new("SELECT count() FROM sessions_v1 FINAL", env, q, &overlay.ids);
        let in_clickhouse: u64 = self.ch.read(sql.query(&self.ch).fetch_one()).await?;
        let changed = if overlay.ids.is_empty() {
            0
        } else {
            self.pg.count_rows(env.environment_id, q, Some(&overlay.ids)).await?
        };
        Ok(in_clickhouse + changed)
    }

    async fn tags_from_clickhouse(
        &self,
        env: EnvScope,
        prefix: &str,
        limit: usize,
        overlay: Overlay,
    ) -> Result<Vec<String>, AnalyticsError> {
        let everything = ListQuery::default();
        let mut sql = Filtered::new(
            "SELECT DISTINCT tag FROM sessions_v1 FINAL ARRAY JOIN tags AS tag",
            env,
            &everything,
            &overlay.ids,
        );
        sql.push(" AND startsWith(tag, {prefix:String})");
        sql.bind("prefix", Bound::Str(prefix.to_string()));
        sql.push(&format!(" ORDER BY tag LIMIT {}", limit.clamp(1, 10_000)));
        let mut tags: Vec<String> = self.ch.read(sql.query(&self.ch).fetch_all()).await?;
        if !overlay.ids.is_empty() {
            tags.extend(self.pg.tag_values(env.environment_id, prefix, limit, Some(&overlay.ids)).await?);
            tags.sort();
            tags.dedup();
            tags.truncate(limit);
        }
        Ok(tags)
    }
}

#[async_trait]
impl SessionListRepository for ClickHouseSessionList {
    async fn list(&self, env: EnvScope, q: &ListQuery) -> Result<Served<ListPage>, StoreError> {
        self.serve(env, |overlay| Box::pin(self.page_from_clickhouse(env, q, overlay)), self.pg.list(env, q)).await
    }

    async fn count(&self, env: EnvScope, q: &ListQuery) -> Result<Served<u64>, StoreError> {
        self.serve(env, |overlay| Box::pin(self.count_from_clickhouse(env, q, overlay)), self.pg.count(env, q)).await
    }

    async fn tags(&self, env: EnvScope, prefix: &str, limit: usize) -> Result<Served<Vec<String>>, StoreError> {
        self.serve(
            env,
            |overlay| Box::pin(self.tags_from_clickhouse(env, prefix, limit, overlay)),
            self.pg.tags(env, prefix, limit),
        )
        .await
    }
}

/// Orders merged rows as they were fetched: newest first, or oldest first for
/// a `page[before]` page (see [`paginate`]).
fn sort_for(rows: &mut [Session], direction: Option<Direction>) {
    rows.sort_by_key(|s| (s.created_at, s.id));
    if direction != Some(Direction::Before) {
        rows.reverse();
    }
}

/// One page's query: the filters, the cursor, an optional created_at bound on
/// the far side of the page, in the page's order, `limit` rows from `offset`.
fn page_sql(
    select: &str,
    env: EnvScope,
    q: &ListQuery,
    skip: &[Uuid],
    bound: Option<DateTime<Utc>>,
    offset: i64,
    limit: i64,
) -> Filtered {
    let backwards = q.cursor.map(|(d, _)| d) == Some(Direction::Before);
    let mut sql = Filtered::new(select, env, q, skip);
    if let Some((dir, c)) = q.cursor {
        let (op, near) = if dir == Direction::After { ("<", "<=") } else { (">", ">=") };
        // The plain created_at comparison is what lets ClickHouse skip by the
        // sort key; the tuple breaks ties.
        sql.push(&format!(
            " AND created_at {near} {{cursor_at:DateTime64(6, 'UTC')}} \
             AND (created_at, session_id) {op} ({{cursor_at:DateTime64(6, 'UTC')}}, {{cursor_id:String}})"
        ));
        sql.bind("cursor_at", Bound::Str(ch_time(c.created_at)));
        sql.bind("cursor_id", Bound::Str(c.id.to_string()));
    }
    if let Some(bound) = bound {
        sql.push(if backwards {
            " AND created_at <= {bound:DateTime64(6, 'UTC')}"
        } else {
            " AND created_at >= {bound:DateTime64(6, 'UTC')}"
        });
        sql.bind("bound", Bound::Str(ch_time(bound)));
    }
    let order = if backwards { "ASC" } else { "DESC" };
    sql.push(&format!(" ORDER BY created_at {order}, session_id {order} LIMIT {limit} OFFSET {offset}"));
    sql
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct Micros {
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    created_at: DateTime<Utc>,
}

/// A parameter value; every value reaches ClickHouse as a bound parameter,
/// never as SQL text.
enum Bound {
    Str(String),
    Strs(Vec<String>),
}

/// SQL over `sessions_v1` scoped to one environment, with the query's filters
/// and without the overlay's ids, and the parameters it binds.
struct Filtered {
    sql: String,
    params: Vec<(&'static str, Bound)>,
}

impl Filtered {
    fn new(select: &str, env: EnvScope, q: &ListQuery, skip: &[Uuid]) -> Self {
        let mut f = Filtered {
            sql: format!(
                "{select} WHERE organization_id = {{org:String}} AND project_id = {{project:String}} \
                 AND environment_id = {{env:String}}"
            ),
            params: Vec::new(),
        };
        f.bind("org", Bound::Str(env.organization_id.to_string()));
        f.bind("project", Bound::Str(env.project_id.to_string()));
        f.bind("env", Bound::Str(env.environment_id.to_string()));
        if !q.types.is_empty() {
            f.push(" AND type IN {types:Array(String)}");
            f.bind("types", Bound::Strs(q.types.clone()));
        }
        if !q.task_identifiers.is_empty() {
            f.push(" AND task_identifier IN {tasks:Array(String)}");
            f.bind("tasks", Bound::Strs(q.task_identifiers.clone()));
        }
        if !q.tags.is_empty() {
            f.push(" AND hasAny(tags, {tags:Array(String)})");
            f.bind("tags", Bound::Strs(q.tags.clone()));
        }
        if let Some(ext) = &q.external_id {
            f.push(" AND external_id = {external_id:String}");
            f.bind("external_id", Bound::Str(ext.clone()));
        }
        if let Some(from) = q.created_from {
            f.push(" AND created_at >= {created_from:DateTime64(6, 'UTC')}");
            f.bind("created_from", Bound::Str(ch_time(from)));
        }
        if let Some(to) = q.created_to {
            f.push(" AND created_at <= {created_to:DateTime64(6, 'UTC')}");
            f.bind("created_to", Bound::Str(ch_time(to)));
        }
        if !q.statuses.is_empty() {
            // The same derivation as Postgres's (see SessionStatus::derive).
            let terms: Vec<&str> = q
                .statuses
                .iter()
                .map(|s| match s {
                    SessionStatus::Closed => "closed_at IS NOT NULL",
                    SessionStatus::Expired => "(closed_at IS NULL AND expires_at <= now64(6))",
                    SessionStatus::Active => "(closed_at IS NULL AND (expires_at IS NULL OR expires_at > now64(6)))",
                })
                .collect();
            f.push(&format!(" AND ({})", terms.join(" OR ")));
        }
        if !skip.is_empty() {
            // The overlay's ids go into the SQL text, which travels in the
            // request body. Bound, they would travel in the URL, which the
            // crate's HTTP stack caps at 64 KiB (~1,700 ids) below the list's
            // LIST_OVERLAY_MAX_ROWS; past it every list fell back to Postgres.
            // Splicing is safe here: these are typed uuids of our own, whose
            // text is hex digits and dashes, not caller input.
            let mut list = String::with_capacity(skip.len() * 39);
            for (i, id) in skip.iter().enumerate() {
                list.push_str(if i == 0 { "'" } else { ",'" });
                list.push_str(&id.hyphenated().to_string());
                list.push('\'');
            }
            f.push(&format!(" AND session_id NOT IN ({list})"));
        }
        f
    }

    fn push(&mut self, sql: &str) {
        self.sql.push_str(sql);
    }

    fn bind(&mut self, name: &'static str, value: Bound) {
        self.params.push((name, value));
    }

    fn query(self, ch: &ClickHouse) -> clickhouse::query::Query {
        let mut query = ch.client().query(&self.sql);
        for (name, value) in self.params {
            query = match value {
                Bound::Str(v) => query.param(name, v),
                Bound::Strs(v) => query.param(name, v),
            };
        }
        query
    }
}
