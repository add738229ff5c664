//! The domain layer's error: a rejected field and why. The HTTP layer maps it to 422.
//! Also the rules every parser of client input shares: text without NUL, and the
//! ranges of durations, timestamps and sequence numbers, so no arithmetic on a
//! client's value can overflow or reach the database out of range.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError { field: field.into(), message: message.into() }
    }
}

pub type Validated<T> = Result<T, ValidationError>;

/// Refuses a string holding NUL. Postgres `text` (and `jsonb`) cannot store it, so
/// a string the server keeps or matches as text is refused up front (422) instead
/// of failing in the database (500).
pub fn check_text(field: &str, value: &str) -> Validated<()> {
    if value.contains('\0') {
        return Err(ValidationError::new(field, "must not contain NUL characters"));
    }
    Ok(())
}

/// Where in `value` the first string or object key holding NUL sits, in
/// `serde_path_to_error`'s notation (`metadata.a[2]`; `.` for the root), so the
/// 422 names the field as a shape error would.
pub fn nul_path(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    fn walk(v: &Value, path: &mut String) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            Value::Object(map) => map.iter().any(|(k, item)| {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                let found = k.contains('\0') || walk(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            _ => false,
        }
    }
    let mut path = String::new();
    walk(value, &mut path).then(|| if path.is_empty() { ".".to_string() } else { path })
}

/// Checks a string's length in characters against inclusive bounds (and, as
/// every bounded string is stored as text, that it holds no NUL).
pub fn check_len(field: &str, value: &str, min: usize, max: usize) -> Validated<()> {
    check_text(field, value)?;
    let n = value.chars().count();
    if n < min {
        return Err(ValidationError::new(field, format!("must be at least {min} characters")));
    }
    if n > max {
        return Err(ValidationError::new(field, format!("must be at most {max} characters")));
    }
    Ok(())
}

/// Tags: at most 10, each at most 128 characters.
pub fn check_tags(field: &str, tags: &[String]) -> Validated<()> {
    if tags.len() > 10 {
        return Err(ValidationError::new(field, "at most 10 tags are allowed"));
    }
    for (i, tag) in tags.iter().enumerate() {
        check_len(&format!("{field}[{i}]"), tag, 0, 128)?;
    }
    Ok(())
}

/// The longest duration a client may give: `i32::MAX` seconds (about 68 years).
/// Runs keep durations as 32-bit seconds, and an instant this far from now is
/// still a valid timestamp, so arithmetic on a checked duration cannot overflow.
pub const MAX_DURATION_SECS: i64 = i32::MAX as i64;

/// Parses a duration such as `30s`, `10m`, `1h`, `2d`, `1w` or `1h30m` into seconds.
/// A bare number is seconds. `None` for anything else, negative, or longer than
/// [`MAX_DURATION_SECS`].
pub fn parse_duration_secs(input: &str) -> Option<i64> {
    let s = input.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(n) = s.parse::<i64>() {
        return (0..=MAX_DURATION_SECS).contains(&n).then_some(n);
    }
    let mut total: i64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: i64 = digits.parse().ok()?;
        digits.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
        if total > MAX_DURATION_SECS {
            return None;
        }
    }
    digits.is_empty().then_some(total)
}

/// A checked duration in seconds (see [`parse_duration_secs`]) as a `TimeDelta`;
/// `None` outside `0..=MAX_DURATION_SECS`.
pub fn duration(secs: i64) -> Option<TimeDelta> {
    (0..=MAX_DURATION_SECS).contains(&secs).then(|| TimeDelta::try_seconds(secs)).flatten()
}

/// The latest instant a client may name: 9999-12-31T23:59:59.999Z, in epoch
/// milliseconds. Client timestamps lie between the epoch and this: what RFC 3339
/// can write, and inside Postgres's `timestamptz` range (chrono reaches years
/// Postgres refuses, which would otherwise fail in the database as a 500).
pub const MAX_TIMESTAMP_MILLIS: i64 = 253_402_300_799_999;

/// Whether a timestamp is one a client may send (see [`MAX_TIMESTAMP_MILLIS`]).
pub fn timestamp_in_range(t: DateTime<Utc>) -> bool {
    (0..=MAX_TIMESTAMP_MILLIS).contains(&t.timestamp_millis())
}

/// Epoch milliseconds as a timestamp, if in range.
pub fn timestamp_from_millis(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single().filter(|t| timestamp_in_range(*t))
}

/// The largest sequence number a client may name. Sequence numbers come from a
/// Redis counter (a signed 64-bit integer) and are stored as `bigint`, so a
/// cursor one past any of them still fits in a `u64`.
pub const MAX_SEQ_NUM: u64 = i64::MAX as u64;

/// A client's sequence number (a cursor such as `afterEventId`): a decimal
/// integer from 0 to [`MAX_SEQ_NUM`].
pub fn parse_seq_num(value: &str) -> Option<u64> {
    value.trim().parse::<u64>().ok().filter(|n| *n <= MAX_SEQ_NUM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("30s"), Some(30));
        assert_eq!(parse_duration_secs("10m"), Some(600));
        assert_eq!(parse_duration_secs("1h30m"), Some(5400));
        assert_eq!(parse_duration_secs("7d"), Some(604_800));
        assert_eq!(parse_duration_secs("2w"), Some(1_209_600));
        assert_eq!(parse_duration_secs("45"), Some(45));
        for bad in [
            "",
            "h",
            "10x",
            "1h30",
            "-5",
            "99999999999999999999d",
            "9223372036854775807",
            "2147483648",
            "3551w",
            "106751991167300d",
        ] {
            assert_eq!(parse_duration_secs(bad), None, "{bad}");
        }
        assert_eq!(parse_duration_secs("2147483647"), Some(MAX_DURATION_SECS));
    }

    #[test]
    fn nul_is_refused_and_located() {
        assert!(check_text("f", "a\0b").is_err());
        assert_eq!(check_len("f", "\0", 0, 10).unwrap_err().message, "must not contain NUL characters");
        let v = serde_json::json!({"a": {"b": ["x", "y\u{0}"]}, "c": 1});
        assert_eq!(nul_path(&v).as_deref(), Some("a.b[1]"));
        assert_eq!(nul_path(&serde_json::json!({"k\u{0}": 1})).as_deref(), Some("k\u{0}"));
        assert_eq!(nul_path(&serde_json::json!("\u{0}")).as_deref(), Some("."));
        assert_eq!(nul_path(&serde_json::json!({"a": ["\\u0000"]})), None);
    }

    #[test]
    fn lengths_and_tags() {
        assert!(check_len("f", "abc", 1, 3).is_ok());
        assert!(check_len("f", "", 1, 3).is_err());
        assert!(check_len("f", "abcd", 1, 3).is_err());
        let many: Vec<String> = (0..11).map(|i| i.to_string()).collect();
        assert!(check_tags("tags", &many).is_err());
        assert_eq!(check_tags("tags", &["x".repeat(129)]).unwrap_err().field, "tags[0]");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const UNITS: [(char, i64); 5] = [('s', 1), ('m', 60), ('h', 3600), ('d', 86_400), ('w', 604_800)];

        proptest! {
            #[test]
            fn durations_never_panic_and_stay_in_range(input in ".{0,40}") {
                if let Some(secs) = parse_duration_secs(&input) {
                    prop_assert!((0..=MAX_DURATION_SECS).contains(&secs));
                    prop_assert!(duration(secs).is_some());
                }
            }

            #[test]
            fn durations_round_trip_or_refuse(n in any::<i64>(), unit in 0usize..5) {
                let (c, mult) = UNITS[unit];
                let expected = n.checked_mul(mult).filter(|s| (0..=MAX_DURATION_SECS).contains(s) && n >= 0);
                prop_assert_eq!(parse_duration_secs(&format!("{n}{c}")), if n < 0 { None } else { expected });
                let bare = (0..=MAX_DURATION_SECS).contains(&n).then_some(n);
                prop_assert_eq!(parse_duration_secs(&n.to_string()), bare);
            }

            #[test]
            fn compound_durations_add_up(parts in proptest::collection::vec((0i64..10_000_000, 0usize..5), 1..5)) {
                let text: String = parts.iter().map(|(n, u)| format!("{n}{}", UNITS[*u].0)).collect();
                let total: i64 = parts.iter().map(|(n, u)| n * UNITS[*u].1).sum();
                // Refused as soon as a running total passes the limit.
                let mut running = 0i64;
                let mut over = false;
                for (n, u) in &parts {
                    running += n * UNITS[*u].1;
                    over |= running > MAX_DURATION_SECS;
                }
                prop_assert_eq!(parse_duration_secs(&text), (!over).then_some(total));
            }

            #[test]
            fn any_duration_offset_from_now_is_representable(secs in any::<i64>()) {
                let now = Utc::now();
                if let Some(d) = duration(secs) {
                    prop_assert!(now.checked_add_signed(d).is_some() && now.checked_sub_signed(d).is_some());
                } else {
                    prop_assert!(!(0..=MAX_DURATION_SECS).contains(&secs));
                }
            }

            #[test]
            fn timestamps_in_range_round_trip(ms in any::<i64>()) {
                match timestamp_from_millis(ms) {
                    Some(t) => {
                        prop_assert!((0..=MAX_TIMESTAMP_MILLIS).contains(&ms));
                        prop_assert_eq!(t.timestamp_millis(), ms);
                        prop_assert!(timestamp_in_range(t));
                    }
                    None => prop_assert!(!(0..=MAX_TIMESTAMP_MILLIS).contains(&ms)),
                }
            }

            #[test]
            fn seq_nums_in_range_round_trip(n in any::<u64>(), input in ".{0,30}") {
                prop_assert_eq!(parse_seq_num(&n.to_string()), (n <= MAX_SEQ_NUM).then_some(n));
                if let Some(seq) = parse_seq_num(&input) {
                    prop_assert!(seq <= MAX_SEQ_NUM && seq.checked_add(1).is_some());
                }
            }

            #[test]
            fn nul_anywhere_in_a_document_is_found(key in "[a-z]{1,8}", before in "[^\\x00]{0,8}", after in "[^\\x00]{0,8}", depth in 0usize..4) {
                let mut with = serde_json::Value::String(format!("{before}\0{after}"));
                let mut without = serde_json::Value::String(format!("{before}{after}"));
                for _ in 0..depth {
                    with = serde_json::json!({ key.clone(): [with] });
                    without = serde_json::json!({ key.clone(): [without] });
                }
                let (bad, good) = (format!("{before}\0{after}"), format!("{before}{after}"));
                prop_assert!(nul_path(&with).is_some());
                prop_assert!(check_text("f", &bad).is_err());
                prop_assert_eq!(nul_path(&without), None);
                prop_assert!(check_text("f", &good).is_ok());
            }
        }
    }
}
