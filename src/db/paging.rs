//! Keyset paging over `(created_at, id)`: the newest-first lists people page
//! through, and the oldest-first walks that copy a whole table. Kept below
//! every store (it imports nothing of the crate) so any store, and the
//! analytics copy above them, can build on it without an import cycle.

/// Appends a keyset range over `{alias}.created_at, {alias}.id` to a WHERE
/// clause: rows after `after` in (created_at, id) order, created within
/// [`from`, `to`]. Conditions are added only when present (not `$1 IS NULL OR
/// ...`), so the plan is always an index range scan. For copies that walk a
/// whole table in order (the ClickHouse backfill).
pub fn push_created_range(
    b: &mut sqlx::QueryBuilder<'_, sqlx::Postgres>,
    alias: &str,
    after: Option<(chrono::DateTime<chrono::Utc>, uuid::Uuid)>,
    from: Option<chrono::DateTime<chrono::Utc>>,
    to: Option<chrono::DateTime<chrono::Utc>>,
) {
    if let Some((at, id)) = after {
        b.push(format!(" AND ({alias}.created_at, {alias}.id) > (")).push_bind(at).push(", ").push_bind(id).push(")");
    }
    if let Some(from) = from {
        b.push(format!(" AND {alias}.created_at >= ")).push_bind(from);
    }
    if let Some(to) = to {
        b.push(format!(" AND {alias}.created_at <= ")).push_bind(to);
    }
}

/// A position in a newest-first list keyed on `(created_at, id)`: the newest
/// rows, the rows older than a row, or the rows newer than it (the page
/// before, read oldest first and turned around by [`Keyset::arrange`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyset {
    Newest,
    Older(chrono::DateTime<chrono::Utc>, uuid::Uuid),
    Newer(chrono::DateTime<chrono::Utc>, uuid::Uuid),
}

impl Keyset {
    /// Appends this position's range, the order and `LIMIT limit` to a query
    /// whose WHERE clause is open. Row comparisons, so an index on
    /// `(…, created_at DESC, id DESC)` serves both directions.
    pub fn push(&self, b: &mut sqlx::QueryBuilder<'_, sqlx::Postgres>, alias: &str, limit: i64) {
        let (op, order) = match self {
            Keyset::Newest => ("", "DESC"),
            Keyset::Older(..) => ("<", "DESC"),
            Keyset::Newer(..) => (">", "ASC"),
        };
        if let Keyset::Older(at, id) | Keyset::Newer(at, id) = *self {
            b.push(format!(" AND ({alias}.created_at, {alias}.id) {op} (")).push_bind(at).push(", ").push_bind(id);
            b.push(")");
        }
        b.push(format!(" ORDER BY {alias}.created_at {order}, {alias}.id {order} LIMIT {}", limit.max(1)));
    }

    /// Rows read with [`Keyset::push`] (asking one more than `size`), newest
    /// first and cut to `size`, with whether there are older and newer rows.
    pub fn arrange<T>(&self, mut rows: Vec<T>, size: usize) -> (Vec<T>, bool, bool) {
        let more = rows.len() > size;
        rows.truncate(size);
        match self {
            Keyset::Newest => (rows, more, false),
            Keyset::Older(..) => (rows, more, true),
            Keyset::Newer(..) => {
                rows.reverse();
                (rows, true, more)
            }
        }
    }
}
