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
    ///
    /// A failure of the request's own ([`super::Failure::Request`]: refused by
    /// the client before sending, a 4xx from ClickHouse) is answered from
    /// Postgres too, and only this request's: ClickHouse stays in use for the
    /// next one (`ClickHouse::read` does not start the cool-down). Why not a
    /// 4xx to the caller: the query passed the list's validation (its filters
    /// are within their caps), so it is a valid list, and what ClickHouse
    /// refused is its own limit or our SQL, which the caller can neither see
    /// nor change; the same query must not succeed or fail by which store
    /// happens to serve it. Why not a 5xx: Postgres, the source of truth,
    /// answers every valid list (the overlay already runs the same filters
    /// there), so the caller gets the right page at the cost of one Postgres
    /// list, no more than while ClickHouse is away. It is logged as a warning
    /// with its kind, so a refusal that recurs (a bug in the SQL) is seen.
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
                let kind = err.failure();
                tracing::warn!(error = %err, ?kind, "clickhouse failed; the session list is served by postgres");
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
        sql.push(" AND startsWith(tag, ?)");
        sql.bind(Bound::Str(prefix.to_string()));
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
        sql.push(&format!(" AND created_at {near} {TIME} AND (created_at, session_id) {op} ({TIME}, ?)"));
        sql.bind(Bound::Str(ch_time(c.created_at)));
        sql.bind(Bound::Str(ch_time(c.created_at)));
        sql.bind(Bound::Str(c.id.to_string()));
    }
    if let Some(bound) = bound {
        sql.push(&format!(" AND created_at {} {TIME}", if backwards { "<=" } else { ">=" }));
        sql.bind(Bound::Str(ch_time(bound)));
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

/// A bound time, as the `DateTime64(6, 'UTC')` the table keeps: the
/// literal's text is read in UTC, as a `{name:DateTime64(6, 'UTC')}`
/// parameter's would be.
const TIME: &str = "toDateTime64(?, 6, 'UTC')";

/// ClickHouse's default `max_query_size`: the most SQL text it parses.
const DEFAULT_MAX_QUERY_BYTES: usize = 256 * 1024;

/// A value for one `?` of the SQL, in order.
///
/// Every value travels in the request's body, written into the SQL by the
/// crate as an escaped literal (`?` binding), never as a server-side
/// `{name:Type}` parameter: those go in the URL's query string, which the
/// crate's HTTP stack refuses past 64 KiB (a filter of 5,000 tags) and
/// which proxies and access logs keep. A literal and a parameter of the same
/// text mean the same value: the crate escapes `\`, `'`, `` ` ``, tab and
/// newline with a backslash, which ClickHouse's string literal reads back as
/// the character itself.
enum Bound {
    Str(String),
    Strs(Vec<String>),
}

impl Bound {
    /// The most bytes the value can take in the SQL: every byte escaped,
    /// quoted, with separators and brackets.
    fn max_sql_bytes(&self) -> usize {
        match self {
            Bound::Str(v) => 2 * v.len() + 2,
            Bound::Strs(vs) => vs.iter().map(|v| 2 * v.len() + 3).sum::<usize>() + 2,
        }
    }
}

/// SQL over `sessions_v1` scoped to one environment, with the query's filters
/// and without the overlay's ids, and the values of its `?`s in order.
struct Filtered {
    sql: String,
    binds: Vec<Bound>,
}

impl Filtered {
    fn new(select: &str, env: EnvScope, q: &ListQuery, skip: &[Uuid]) -> Self {
        let mut f = Filtered {
            sql: format!("{select} WHERE organization_id = ? AND project_id = ? AND environment_id = ?"),
            binds: Vec::new(),
        };
        f.bind(Bound::Str(env.organization_id.to_string()));
        f.bind(Bound::Str(env.project_id.to_string()));
        f.bind(Bound::Str(env.environment_id.to_string()));
        if !q.types.is_empty() {
            f.push(" AND type IN ?");
            f.bind(Bound::Strs(q.types.clone()));
        }
        if !q.task_identifiers.is_empty() {
            f.push(" AND task_identifier IN ?");
            f.bind(Bound::Strs(q.task_identifiers.clone()));
        }
        if !q.tags.is_empty() {
            f.push(" AND hasAny(tags, ?)");
            f.bind(Bound::Strs(q.tags.clone()));
        }
        if let Some(ext) = &q.external_id {
            f.push(" AND external_id = ?");
            f.bind(Bound::Str(ext.clone()));
        }
        if let Some(from) = q.created_from {
            f.push(&format!(" AND created_at >= {TIME}"));
            f.bind(Bound::Str(ch_time(from)));
        }
        if let Some(to) = q.created_to {
            f.push(&format!(" AND created_at <= {TIME}"));
            f.bind(Bound::Str(ch_time(to)));
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
            // The overlay's ids are spliced rather than bound: typed uuids of
            // our own, whose text is hex digits and dashes, not caller input,
            // up to LIST_OVERLAY_MAX_ROWS of them.
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

    /// Appends SQL text; its `?`s are bound in order by [`Filtered::bind`].
    /// No other `?` may appear in it (the crate would take it for a value).
    fn push(&mut self, sql: &str) {
        self.sql.push_str(sql);
    }

    fn bind(&mut self, value: Bound) {
        self.binds.push(value);
    }

    /// The query, with room to parse it. The filters' caps (see
    /// [`crate::sessions::list::MAX_FILTER_VALUES`]) keep their values to
    /// 32,256 characters, at most 129 KB in the SQL, and the overlay's ids
    /// add 39 bytes each (LIST_OVERLAY_MAX_ROWS of them), which together can
    /// pass ClickHouse's default 256 KiB: past it ClickHouse refuses the
    /// query ("Max query size exceeded"). Only then is `max_query_size`
    /// raised, so an ordinary list sends no setting; the setting travels in
    /// the URL, and it is a number of our own.
    fn query(self, ch: &ClickHouse) -> clickhouse::query::Query {
        self.build(ch.client())
    }

    fn build(self, client: &clickhouse::Client) -> clickhouse::query::Query {
        let most = self.sql.len() + self.binds.iter().map(Bound::max_sql_bytes).sum::<usize>();
        let mut query = client.query(&self.sql);
        for value in self.binds {
            query = match value {
                Bound::Str(v) => query.bind(v),
                Bound::Strs(v) => query.bind(v),
            };
        }
        if most > DEFAULT_MAX_QUERY_BYTES {
            query = query.with_option("max_query_size", most.to_string());
        }
        query
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SQL a query sends, as the crate writes it into the body.
    fn body_of(f: Filtered) -> String {
        f.build(&clickhouse::Client::default()).sql_display().to_string()
    }

    #[test]
    fn every_value_has_its_place_in_order() {
        let env = EnvScope { organization_id: Uuid::nil(), project_id: Uuid::max(), environment_id: Uuid::nil() };
        let q = ListQuery::parse(
            "filter[type]=t1&filter[taskIdentifier]=k1&filter[tags]=g1,g2&filter[externalId]=x1\
             &filter[createdAt][from]=0&filter[createdAt][to]=1000&filter[status]=CLOSED",
            chrono::Utc::now(),
        )
        .unwrap();
        let sql = body_of(page_sql("SELECT session_id FROM sessions_v1 FINAL", env, &q, &[], None, 0, 5));
        for expected in [
            "type IN ['t1']",
            "task_identifier IN ['k1']",
            "hasAny(tags, ['g1','g2'])",
            "external_id = 'x1'",
            "created_at >= toDateTime64('1970-01-01 00:00:00.000000', 6, 'UTC')",
            "created_at <= toDateTime64('1970-01-01 00:00:01.000000', 6, 'UTC')",
            "project_id = 'ffffffff-ffff-ffff-ffff-ffffffffffff'",
        ] {
            assert!(sql.contains(expected), "{expected} in {sql}");
        }
        assert!(!sql.contains('{') && !sql.contains('?'), "every value bound in the text: {sql}");
        // Hostile text stays one literal.
        let q = ListQuery::parse("filter[tags]=a'b%5C%3F%7Bx%3AString%7D", chrono::Utc::now()).unwrap();
        let sql = body_of(Filtered::new("SELECT 1 FROM sessions_v1", env, &q, &[]));
        assert!(sql.ends_with(r"hasAny(tags, ['a\'b\\?{x:String}'])"), "{sql}");
    }
}
