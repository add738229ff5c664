//! Listing sessions: filters parsed from the query string, opaque keyset cursors,
//! and the repository the list endpoint reads through. Postgres serves lists
//! today; the analytics store can implement the same trait.

use async_trait::async_trait;
use base64::Engine;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use super::model::{Session, SessionStatus};
use super::store::SESSION_SELECT;
use crate::db::StoreError;
use crate::validation::{
    check_text, duration, parse_duration_secs, timestamp_from_millis, timestamp_in_range, ValidationError,
};

pub const DEFAULT_PAGE_SIZE: i64 = 20;
pub const MAX_PAGE_SIZE: i64 = 100;

/// Most values one list filter (`filter[type]`, `filter[taskIdentifier]`,
/// `filter[tags]`) takes, over all its parameters and commas.
///
/// Why caps at all: every value is sent to the store that answers the list
/// (in ClickHouse's SQL text, in Postgres's bind parameters), so an
/// uncapped filter is a way for one caller to make requests of any size; a
/// 5,000-tag filter was refused by the ClickHouse client. With these caps
/// and the value lengths below, one request's filter values stay under
/// 32,256 characters.
pub const MAX_FILTER_VALUES: usize = 100;
/// The longest `filter[type]` value: the longest `type` a session can have.
pub const MAX_FILTER_TYPE_CHARS: usize = 64;
/// The longest `filter[taskIdentifier]` value, as `taskIdentifier` on create.
pub const MAX_FILTER_TASK_CHARS: usize = 128;
/// The longest `filter[tags]` value: the longest tag a session can have.
pub const MAX_FILTER_TAG_CHARS: usize = 128;
/// The longest `filter[externalId]`: the longest `externalId`.
pub const MAX_FILTER_EXTERNAL_ID_CHARS: usize = crate::ids::MAX_ID_CHARS;

/// A position in the (created_at DESC, id DESC) order, plus which request cursors
/// produced the page it came from.
///
/// Why the origin: the official client builds its next request by merging the new
/// cursor into the previous request's parameters, so after paging forward and then
/// back it sends both `page[after]` and `page[before]`. The cursor it just received
/// names the other parameter as it was when the cursor was issued; the stale one
/// cannot name a cursor issued after it. That tells the two apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
    pub origin: Origin,
}

/// Fingerprints of the `page[after]` / `page[before]` values of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Origin {
    pub after: Option<u32>,
    pub before: Option<u32>,
}

/// A short fingerprint of an encoded cursor.
pub fn fingerprint(encoded: &str) -> u32 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(encoded.as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

fn fp_text(fp: Option<u32>) -> String {
    fp.map(|f| format!("{f:08x}")).unwrap_or_else(|| "-".into())
}

fn fp_parse(s: &str) -> Option<Option<u32>> {
    if s == "-" {
        Some(None)
    } else {
        u32::from_str_radix(s, 16).ok().map(Some)
    }
}

impl Cursor {
    pub fn of(session: &Session, origin: Origin) -> Self {
        Cursor { created_at: session.created_at, id: session.id, origin }
    }

    pub fn encode(&self) -> String {
        let raw = format!(
            "{}.{}.{}.{}",
            self.created_at.timestamp_micros(),
            self.id.simple(),
            fp_text(self.origin.after),
            fp_text(self.origin.before)
        );
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn decode(s: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?;
        let raw = std::str::from_utf8(&raw).ok()?;
        let mut parts = raw.split('.');
        let (Some(micros), Some(id), Some(a), Some(b), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        // A cursor is opaque but client-held: its time must be one Postgres takes.
        let created_at = Utc.timestamp_micros(micros.parse().ok()?).single().filter(|t| timestamp_in_range(*t))?;
        let origin = Origin { after: fp_parse(a)?, before: fp_parse(b)? };
        Some(Cursor { created_at, id: Uuid::parse_str(id).ok()?, origin })
    }
}

/// Picks the cursor a request means. With both present, the fresh one is the one
/// whose origin names the other as it is now (see [`Cursor`]); if neither or both
/// do, the request is ambiguous and rejected.
fn resolve_cursor(
    after: Option<String>,
    before: Option<String>,
) -> Result<Option<(Direction, Cursor)>, ListQueryError> {
    let decode = |s: &str| Cursor::decode(s).ok_or(ListQueryError::BadCursor);
    match (after, before) {
        (None, None) => Ok(None),
        (Some(a), None) => Ok(Some((Direction::After, decode(&a)?))),
        (None, Some(b)) => Ok(Some((Direction::Before, decode(&b)?))),
        (Some(a), Some(b)) => {
            let (ca, cb) = (decode(&a)?, decode(&b)?);
            let before_is_fresh = cb.origin.after == Some(fingerprint(&a));
            let after_is_fresh = ca.origin.before == Some(fingerprint(&b));
            match (after_is_fresh, before_is_fresh) {
                (true, false) => Ok(Some((Direction::After, ca))),
                (false, true) => Ok(Some((Direction::Before, cb))),
                _ => Err(ValidationError::new(
                    "page[before]",
                    "Cannot pass both page[after] and page[before] on the same request",
                )
                .into()),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `page[after]`: older than the cursor.
    After,
    /// `page[before]`: newer than the cursor.
    Before,
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub types: Vec<String>,
    pub tags: Vec<String>,
    pub task_identifiers: Vec<String>,
    pub external_id: Option<String>,
    pub statuses: Vec<SessionStatus>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    pub page_size: i64,
    pub cursor: Option<(Direction, Cursor)>,
    /// Fingerprints of the cursors as the request sent them; stamped on the
    /// cursors of the page this query returns.
    pub origin: Origin,
}

#[derive(Debug, thiserror::Error)]
pub enum ListQueryError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("Invalid pagination cursor")]
    BadCursor,
}

/// Adds a comma-separated value to a list filter, within its caps: a value
/// longer than any stored one could match nothing, and more than
/// [`MAX_FILTER_VALUES`] values are refused (422 naming the filter) before
/// any store is asked, so no request is sized by its caller.
fn comma_list(out: &mut Vec<String>, field: &str, value: &str, max_chars: usize) -> Result<(), ValidationError> {
    for v in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
        if v.chars().count() > max_chars {
            return Err(ValidationError::new(field, format!("each value must be at most {max_chars} characters")));
        }
        if out.len() == MAX_FILTER_VALUES {
            return Err(ValidationError::new(field, format!("at most {MAX_FILTER_VALUES} values are allowed")));
        }
        out.push(v.to_string());
    }
    Ok(())
}

fn epoch_ms(field: &str, value: &str) -> Result<DateTime<Utc>, ValidationError> {
    value
        .trim()
        .parse::<i64>()
        .ok()
        .and_then(timestamp_from_millis)
        .ok_or_else(|| ValidationError::new(field, "must be epoch milliseconds from 0 to 253402300799999 (year 9999)"))
}

impl ListQuery {
    /// Parses `filter[*]` and `page[*]` parameters. Repeated parameters and
    /// comma-separated values both add to a list filter; unknown parameters are
    /// ignored.
    pub fn parse(query: &str, now: DateTime<Utc>) -> Result<Self, ListQueryError> {
        let mut q = ListQuery { page_size: DEFAULT_PAGE_SIZE, ..Default::default() };
        let mut after = None;
        let mut before = None;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            // Filter values are bound as text, which cannot hold NUL.
            check_text(&key, &value)?;
            match key.as_ref() {
                "page[size]" => {
                    q.page_size = value
                        .trim()
                        .parse::<i64>()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
                        .ok_or_else(|| ValidationError::new("page[size]", "must be an integer from 1 to 100"))?;
                }
                "page[after]" => after = Some(value.into_owned()),
                "page[before]" => before = Some(value.into_owned()),
                "filter[type]" => comma_list(&mut q.types, &key, &value, MAX_FILTER_TYPE_CHARS)?,
                "filter[tags]" => comma_list(&mut q.tags, &key, &value, MAX_FILTER_TAG_CHARS)?,
                "filter[taskIdentifier]" => comma_list(&mut q.task_identifiers, &key, &value, MAX_FILTER_TASK_CHARS)?,
                "filter[externalId]" => {
                    if value.chars().count() > MAX_FILTER_EXTERNAL_ID_CHARS {
                        return Err(ValidationError::new(
                            "filter[externalId]",
                            format!("must be at most {MAX_FILTER_EXTERNAL_ID_CHARS} characters"),
                        )
                        .into());
                    }
                    q.external_id = Some(value.into_owned())
                }
                "filter[status]" => {
                    for s in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let status = SessionStatus::parse(s).ok_or_else(|| {
                            ValidationError::new("filter[status]", "must be ACTIVE, CLOSED or EXPIRED")
                        })?;
                        // Each status once: repeated, they would only
                        // lengthen the SQL (there are three).
                        if !q.statuses.contains(&status) {
                            q.statuses.push(status);
                        }
                    }
                }
                "filter[createdAt][period]" => {
                    let from = parse_duration_secs(&value)
                        .filter(|s| *s > 0)
                        .and_then(duration)
                        .and_then(|d| now.checked_sub_signed(d))
                        .ok_or_else(|| {
                            ValidationError::new(
                                "filter[createdAt][period]",
                                "must be a period such as 1h, 7d or 2w (at most 68 years)",
                            )
                        })?;
                    q.created_from = Some(from);
                }
                "filter[createdAt][from]" => q.created_from = Some(epoch_ms("filter[createdAt][from]", &value)?),
                "filter[createdAt][to]" => q.created_to = Some(epoch_ms("filter[createdAt][to]", &value)?),
                _ => {}
            }
        }
        q.origin = Origin { after: after.as_deref().map(fingerprint), before: before.as_deref().map(fingerprint) };
        q.cursor = resolve_cursor(after, before)?;
        Ok(q)
    }
}

/// One page, newest first, with cursors to the neighbouring pages.
#[derive(Debug)]
pub struct ListPage {
    pub sessions: Vec<Session>,
    pub next: Option<Cursor>,
    pub previous: Option<Cursor>,
}

/// Turns rows fetched with one sentinel row beyond the page size into a page.
/// `rows` are in fetch order: DESC for forward pages, ASC for `page[before]`.
/// The sentinel is always the last row, whichever the direction.
pub fn paginate(mut rows: Vec<Session>, size: usize, cursor: Option<Direction>, origin: Origin) -> ListPage {
    let has_more = rows.len() > size;
    rows.truncate(size);
    let at = |s: &Session| Cursor::of(s, origin);
    if cursor == Some(Direction::Before) {
        rows.reverse();
        let next = rows.last().map(at);
        let previous = if has_more { rows.first().map(at) } else { None };
        return ListPage { sessions: rows, next, previous };
    }
    let next = if has_more { rows.last().map(at) } else { None };
    let previous = if cursor.is_some() { rows.first().map(at) } else { None };
    ListPage { sessions: rows, next, previous }
}

/// Which store answered a list (told to the caller in a response header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListSource {
    ClickHouse,
    Postgres,
}

impl ListSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ListSource::ClickHouse => "clickhouse",
            ListSource::Postgres => "postgres",
        }
    }
}

/// An answer and the store that served it.
#[derive(Debug)]
pub struct Served<T> {
    pub value: T,
    pub source: ListSource,
}

/// The environment a list reads, with the ids ClickHouse's sort key starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvScope {
    pub organization_id: Uuid,
    pub project_id: Uuid,
    pub environment_id: Uuid,
}

impl From<&crate::tenancy::Environment> for EnvScope {
    fn from(env: &crate::tenancy::Environment) -> Self {
        EnvScope { organization_id: env.organization_id, project_id: env.project_id, environment_id: env.id }
    }
}

#[async_trait]
pub trait SessionListRepository: Send + Sync {
    /// One page of sessions matching the query's filters, at its cursor.
    async fn list(&self, env: EnvScope, query: &ListQuery) -> Result<Served<ListPage>, StoreError>;
    /// How many sessions match the query's filters (its cursor is ignored).
    async fn count(&self, env: EnvScope, query: &ListQuery) -> Result<Served<u64>, StoreError>;
    /// Distinct tags of the environment's sessions starting with `prefix`, sorted.
    async fn tags(&self, env: EnvScope, prefix: &str, limit: usize) -> Result<Served<Vec<String>>, StoreError>;
}

/// The list served by Postgres: the fallback while ClickHouse is away or
/// behind, and the overlay of fresh rows onto a ClickHouse page.
#[derive(Clone)]
pub struct PgSessionList {
    pub pool: PgPool,
}

/// Appends the query's filters (not its cursor) to a WHERE clause over `s`.
fn push_filters(b: &mut QueryBuilder<'_, Postgres>, q: &ListQuery) {
    if !q.types.is_empty() {
        b.push(" AND s.type = ANY(").push_bind(q.types.clone()).push(")");
    }
    if !q.task_identifiers.is_empty() {
        b.push(" AND s.task_identifier = ANY(").push_bind(q.task_identifiers.clone()).push(")");
    }
    if !q.tags.is_empty() {
        b.push(" AND s.tags && ").push_bind(q.tags.clone());
    }
    if let Some(ext) = &q.external_id {
        b.push(" AND s.external_id = ").push_bind(ext.clone());
    }
    if let Some(from) = q.created_from {
        b.push(" AND s.created_at >= ").push_bind(from);
    }
    if let Some(to) = q.created_to {
        b.push(" AND s.created_at <= ").push_bind(to);
    }
    if !q.statuses.is_empty() {
        b.push(" AND (");
        for (i, status) in q.statuses.iter().enumerate() {
            if i > 0 {
                b.push(" OR ");
            }
            b.push(match status {
                SessionStatus::Closed => "s.closed_at IS NOT NULL",
                SessionStatus::Expired => "(s.closed_at IS NULL AND s.expires_at <= now())",
                SessionStatus::Active => "(s.closed_at IS NULL AND (s.expires_at IS NULL OR s.expires_at > now()))",
            });
        }
        b.push(")");
    }
}

impl PgSessionList {
    /// The page's rows in fetch order (see [`paginate`]), one beyond the page
    /// size; only among `only` when given (the overlay).
    pub async fn rows(&self, env_id: Uuid, q: &ListQuery, only: Option<&[Uuid]>) -> Result<Vec<Session>, StoreError> {
        let mut b: QueryBuilder<Postgres> = QueryBuilder::new(format!(
            // The page is chosen from `sessions` alone and joined to its runs
            // afterwards, so the join never runs over more rows than the page.
            "SELECT {SESSION_SELECT} FROM (SELECT s.* FROM sessions s WHERE s.runtime_environment_id = "
        ));
        b.push_bind(env_id);
        if let Some(ids) = only {
            b.push(" AND s.id = ANY(").push_bind(ids.to_vec()).push(")");
        }
        push_filters(&mut b, q);
        let order = match q.cursor {
            Some((dir, c)) => {
                let op = if dir == Direction::After { "<" } else { ">" };
                b.push(format!(" AND (s.created_at, s.id) {op} ("))
                    .push_bind(c.created_at)
                    .push(", ")
                    .push_bind(c.id)
                    .push(")");
                if dir == Direction::After {
                    "DESC"
                } else {
                    "ASC"
                }
            }
            None => "DESC",
        };
        // The limit is a validated integer, written as a literal: a bound LIMIT
        // lets Postgres pick a generic plan that sorts the whole environment.
        b.push(format!(
            " ORDER BY s.created_at {order}, s.id {order} LIMIT {}) s
             LEFT JOIN task_runs r ON r.id = s.current_run_id ORDER BY s.created_at {order}, s.id {order}",
            q.page_size.clamp(1, MAX_PAGE_SIZE) + 1
        ));
        Ok(b.build_query_as().fetch_all(&self.pool).await?)
    }

    /// How many of the environment's sessions match; only among `only` when given.
    pub async fn count_rows(&self, env_id: Uuid, q: &ListQuery, only: Option<&[Uuid]>) -> Result<u64, StoreError> {
        let mut b: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT count(*) FROM sessions s WHERE s.runtime_environment_id = ");
        b.push_bind(env_id);
        if let Some(ids) = only {
            b.push(" AND s.id = ANY(").push_bind(ids.to_vec()).push(")");
        }
        push_filters(&mut b, q);
        let n: i64 = b.build_query_scalar().fetch_one(&self.pool).await?;
        Ok(n.max(0) as u64)
    }

    /// Distinct tags starting with `prefix`; only of `only` when given.
    pub async fn tag_values(
        &self,
        env_id: Uuid,
        prefix: &str,
        limit: usize,
        only: Option<&[Uuid]>,
    ) -> Result<Vec<String>, StoreError> {
        let mut b: QueryBuilder<Postgres> = QueryBuilder::new(
            "SELECT DISTINCT tag FROM sessions s, unnest(s.tags) AS tag WHERE s.runtime_environment_id = ",
        );
        b.push_bind(env_id);
        if let Some(ids) = only {
            b.push(" AND s.id = ANY(").push_bind(ids.to_vec()).push(")");
        }
        b.push(" AND starts_with(tag, ").push_bind(prefix.to_string()).push(")");
        b.push(format!(" ORDER BY tag LIMIT {}", limit.clamp(1, 10_000)));
        Ok(b.build_query_scalar().fetch_all(&self.pool).await?)
    }
}

#[async_trait]
impl SessionListRepository for PgSessionList {
    async fn list(&self, env: EnvScope, q: &ListQuery) -> Result<Served<ListPage>, StoreError> {
        let rows = self.rows(env.environment_id, q, None).await?;
        let page = paginate(rows, q.page_size as usize, q.cursor.map(|(d, _)| d), q.origin);
        Ok(Served { value: page, source: ListSource::Postgres })
    }

    async fn count(&self, env: EnvScope, q: &ListQuery) -> Result<Served<u64>, StoreError> {
        Ok(Served { value: self.count_rows(env.environment_id, q, None).await?, source: ListSource::Postgres })
    }

    async fn tags(&self, env: EnvScope, prefix: &str, limit: usize) -> Result<Served<Vec<String>>, StoreError> {
        let tags = self.tag_values(env.environment_id, prefix, limit, None).await?;
        Ok(Served { value: tags, source: ListSource::Postgres })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let c = Cursor {
            created_at: Utc.timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
            origin: Origin { after: Some(7), before: None },
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in ["", "!!!", "bm9wZQ", &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("1.x")] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn parse_filters() {
        let now = Utc::now();
        let q = ListQuery::parse(
            "filter%5Btype%5D=a,b&filter[tags]=x&filter[tags]=y&filter[status]=ACTIVE,CLOSED&page[size]=5&filter[createdAt][period]=1h",
            now,
        )
        .unwrap();
        assert_eq!(q.types, vec!["a", "b"]);
        assert_eq!(q.tags, vec!["x", "y"]);
        assert_eq!(q.statuses, vec![SessionStatus::Active, SessionStatus::Closed]);
        assert_eq!(q.page_size, 5);
        assert_eq!(q.created_from, Some(now - chrono::Duration::hours(1)));
    }

    #[test]
    fn parse_rejects_bad_values() {
        let now = Utc::now();
        let field = |q: &str| match ListQuery::parse(q, now) {
            Err(ListQueryError::Invalid(v)) => v.field,
            other => panic!("{q}: {other:?}"),
        };
        assert_eq!(field("page[size]=0"), "page[size]");
        assert_eq!(field("page[size]=101"), "page[size]");
        assert_eq!(field("filter[status]=OPEN"), "filter[status]");
        assert_eq!(field("filter[createdAt][from]=yesterday"), "filter[createdAt][from]");
        let c = Cursor { created_at: now, id: Uuid::now_v7(), origin: Origin::default() }.encode();
        assert_eq!(field(&format!("page[after]={c}&page[before]={c}")), "page[before]");
        assert!(matches!(ListQuery::parse("page[after]=zzz", now), Err(ListQueryError::BadCursor)));
    }

    #[test]
    fn list_filters_are_capped_and_name_the_filter() {
        let now = Utc::now();
        let refused = |q: &str| match ListQuery::parse(q, now) {
            Err(ListQueryError::Invalid(v)) => (v.field, v.message),
            other => panic!("{q}: {other:?}"),
        };
        let values = |n: usize, len: usize| (0..n).map(|i| format!("{i:0>len$}")).collect::<Vec<_>>().join(",");
        for (key, len) in [("filter[type]", 64), ("filter[taskIdentifier]", 128), ("filter[tags]", 128)] {
            // At the caps, whether in one parameter or spread over repeats.
            let q = ListQuery::parse(&format!("{key}={}", values(MAX_FILTER_VALUES, len)), now).unwrap();
            let half = values(MAX_FILTER_VALUES / 2, len);
            let q2 = ListQuery::parse(&format!("{key}={half}&{key}={half}"), now).unwrap();
            for parsed in [q, q2] {
                let n = parsed.types.len() + parsed.task_identifiers.len() + parsed.tags.len();
                assert_eq!(n, MAX_FILTER_VALUES, "{key}");
            }
            let (field, message) = refused(&format!("{key}={}", values(MAX_FILTER_VALUES + 1, 1)));
            assert_eq!((field.as_str(), message.as_str()), (key, "at most 100 values are allowed"));
            let (field, _) = refused(&format!("{key}={half}&{key}={half},x"));
            assert_eq!(field, key);
            let (field, message) = refused(&format!("{key}=a,{}", "é".repeat(len + 1)));
            assert_eq!(field, key);
            assert!(message.contains(&len.to_string()), "{message}");
            // Characters, not bytes.
            assert!(ListQuery::parse(&format!("{key}={}", "é".repeat(len)), now).is_ok());
        }
        assert!(ListQuery::parse(&format!("filter[externalId]={}", "x".repeat(256)), now).is_ok());
        assert_eq!(refused(&format!("filter[externalId]={}", "x".repeat(257))).0, "filter[externalId]");
        // Statuses repeat into nothing.
        let q = ListQuery::parse(&format!("filter[status]={}", ["ACTIVE"; 5_000].join(",")), now).unwrap();
        assert_eq!(q.statuses, vec![SessionStatus::Active]);
    }

    #[test]
    fn merged_parameters_resolve_to_the_fresh_cursor() {
        let now = Utc::now();
        let pos = |origin| Cursor { created_at: now, id: Uuid::now_v7(), origin };
        // Page 2 was fetched with after=N1; its previous cursor names N1.
        let n1 = pos(Origin::default()).encode();
        let p2 = pos(Origin { after: Some(fingerprint(&n1)), before: None }).encode();
        let q = ListQuery::parse(&format!("page[after]={n1}&page[before]={p2}"), now).unwrap();
        assert_eq!(q.cursor.map(|(d, _)| d), Some(Direction::Before));
        // A page fetched with before=P2 hands out a next cursor naming P2.
        let n2 = pos(Origin { after: Some(fingerprint(&n1)), before: Some(fingerprint(&p2)) }).encode();
        let q = ListQuery::parse(&format!("page[after]={n2}&page[before]={p2}"), now).unwrap();
        assert_eq!(q.cursor.map(|(d, c)| (d, c.encode())), Some((Direction::After, n2.clone())));
        assert_eq!(q.origin.after, Some(fingerprint(&n2)));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let now = Utc::now();
        let field = |q: &str| match ListQuery::parse(q, now) {
            Err(ListQueryError::Invalid(v)) => v.field,
            other => panic!("{q}: {other:?}"),
        };
        // Panicked in chrono (Duration::seconds out of bounds) before the bound.
        assert_eq!(field("filter[createdAt][period]=9223372036854775807"), "filter[createdAt][period]");
        assert_eq!(field("filter[createdAt][period]=15250284452w"), "filter[createdAt][period]");
        // Years before 4713 BC (chrono takes them, Postgres does not) answered 500;
        // years past 9999 are refused as well.
        assert_eq!(field("filter[createdAt][from]=-8210266876800000"), "filter[createdAt][from]");
        assert_eq!(field("filter[createdAt][to]=8210266876799999"), "filter[createdAt][to]");
        assert_eq!(field("filter[externalId]=a%00b"), "filter[externalId]");
        assert_eq!(field("filter[tags]=x,%00"), "filter[tags]");
        let far = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("-8210266876800000000.{}.-.-", Uuid::nil().simple()));
        assert!(matches!(ListQuery::parse(&format!("page[after]={far}"), now), Err(ListQueryError::BadCursor)));
    }

    mod props {
        use super::*;
        use crate::validation::{MAX_DURATION_SECS, MAX_TIMESTAMP_MILLIS};
        use proptest::prelude::*;

        fn enc(s: &str) -> String {
            form_urlencoded::byte_serialize(s.as_bytes()).collect()
        }

        const KEYS: [&str; 11] = [
            "page[size]",
            "page[after]",
            "page[before]",
            "filter[type]",
            "filter[tags]",
            "filter[taskIdentifier]",
            "filter[externalId]",
            "filter[status]",
            "filter[createdAt][period]",
            "filter[createdAt][from]",
            "filter[createdAt][to]",
        ];

        proptest! {
            #[test]
            fn any_query_parses_or_is_refused_without_panicking(pairs in proptest::collection::vec((0usize..11, ".{0,24}"), 0..6), raw in ".{0,64}") {
                let now = Utc::now();
                let q: String = pairs.iter().map(|(k, v)| format!("{}={}", enc(KEYS[*k]), enc(v))).collect::<Vec<_>>().join("&");
                if let Ok(parsed) = ListQuery::parse(&q, now) {
                    for t in [parsed.created_from, parsed.created_to].into_iter().flatten() {
                        prop_assert!(t.timestamp_millis() <= MAX_TIMESTAMP_MILLIS);
                    }
                    prop_assert!((1..=MAX_PAGE_SIZE).contains(&parsed.page_size));
                    for v in parsed.types.iter().chain(&parsed.tags).chain(&parsed.task_identifiers).chain(&parsed.external_id) {
                        prop_assert!(!v.contains('\0'));
                    }
                }
                let _ = ListQuery::parse(&raw, now);
            }

            #[test]
            fn epoch_filters_round_trip_in_range(ms in any::<i64>()) {
                let now = Utc::now();
                let parsed = ListQuery::parse(&format!("filter[createdAt][from]={ms}&filter[createdAt][to]={ms}"), now);
                if (0..=MAX_TIMESTAMP_MILLIS).contains(&ms) {
                    let q = parsed.unwrap();
                    prop_assert_eq!(q.created_from.map(|t| t.timestamp_millis()), Some(ms));
                    prop_assert_eq!(q.created_to.map(|t| t.timestamp_millis()), Some(ms));
                } else {
                    prop_assert!(matches!(parsed, Err(ListQueryError::Invalid(_))));
                }
            }

            #[test]
            fn periods_in_range_subtract_exactly(secs in any::<i64>()) {
                let now = Utc::now();
                let parsed = ListQuery::parse(&format!("filter[createdAt][period]={secs}s"), now);
                if (1..=MAX_DURATION_SECS).contains(&secs) {
                    prop_assert_eq!(parsed.unwrap().created_from, Some(now - chrono::Duration::seconds(secs)));
                } else {
                    prop_assert!(matches!(parsed, Err(ListQueryError::Invalid(_))));
                }
            }

            #[test]
            fn cursors_round_trip_in_range_and_refuse_the_rest(micros in any::<i64>(), id in any::<u128>(), a in any::<Option<u32>>(), b in any::<Option<u32>>()) {
                let raw = format!("{micros}.{}.{}.{}", Uuid::from_u128(id).simple(), fp_text(a), fp_text(b));
                let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
                let in_range = (0..=MAX_TIMESTAMP_MILLIS * 1000 + 999).contains(&micros);
                match Cursor::decode(&encoded) {
                    Some(c) => {
                        prop_assert!(in_range);
                        prop_assert_eq!(c.created_at.timestamp_micros(), micros);
                        prop_assert_eq!(c.origin, Origin { after: a, before: b });
                        prop_assert_eq!(c.encode(), encoded);
                    }
                    None => prop_assert!(!in_range),
                }
            }

            #[test]
            fn cursor_decode_never_panics(s in ".{0,80}", bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                let _ = Cursor::decode(&s);
                let _ = Cursor::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes));
            }
        }
    }
}
