//! Keyset cursors in the dashboard's URLs (`<created_at in µs>_<id>`), so a
//! link shows the page the operator saw and paging never needs an OFFSET.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::error::{DashboardError, PageResult};
use crate::db::paging::Keyset;

/// The cursor of a row.
pub fn encode(at: &DateTime<Utc>, id: Uuid) -> String {
    format!("{}_{id}", at.timestamp_micros())
}

/// A cursor from the query parameter `name`; None when empty.
pub fn decode(name: &str, value: &str) -> PageResult<Option<(DateTime<Utc>, Uuid)>> {
    if value.is_empty() {
        return Ok(None);
    }
    let parsed = value
        .split_once('_')
        .and_then(|(t, id)| Some((DateTime::from_timestamp_micros(t.parse().ok()?)?, Uuid::parse_str(id).ok()?)));
    parsed.map(Some).ok_or_else(|| DashboardError::BadRequest(format!("{name} is not a cursor of this page")))
}

/// Where a newest-first page starts: older than `after`, newer than
/// `before`, else at the newest row.
pub fn keyset(after: &str, before: &str) -> PageResult<Keyset> {
    match (decode("after", after)?, decode("before", before)?) {
        (Some(_), Some(_)) => Err(DashboardError::BadRequest("give after or before, not both".into())),
        (Some((t, id)), None) => Ok(Keyset::Older(t, id)),
        (None, Some((t, id))) => Ok(Keyset::Newer(t, id)),
        (None, None) => Ok(Keyset::Newest),
    }
}

/// The links to a page's older and newer neighbours (None where there is
/// none): `url` makes a link from its query (the cursor's parameter), and
/// the page's rows are newest first, each giving its `(created_at, id)`.
pub fn links<T>(
    page: &[T],
    older: bool,
    newer: bool,
    key: impl Fn(&T) -> (DateTime<Utc>, Uuid),
    url: impl Fn(&str) -> String,
) -> (Option<String>, Option<String>) {
    let link = |name: &str, row: Option<&T>| {
        row.map(|row| {
            let (at, id) = key(row);
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.append_pair(name, &encode(&at, id));
            url(&q.finish())
        })
    };
    let older = if older { link("after", page.last()) } else { None };
    let newer = if newer { link("before", page.first()) } else { None };
    (older, newer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let at = DateTime::from_timestamp_micros(1_765_000_000_123_456).unwrap();
        let id = Uuid::now_v7();
        let c = encode(&at, id);
        assert_eq!(decode("after", &c).unwrap(), Some((at, id)));
        assert_eq!(keyset("", &c).unwrap(), Keyset::Newer(at, id));
        assert_eq!(keyset("", "").unwrap(), Keyset::Newest);
        assert!(decode("after", "yesterday").is_err());
        assert!(keyset(&c, &c).is_err());
    }
}
