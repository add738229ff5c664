//! PostgreSQL's text output formats for the column types the replicated
//! tables use, parsed into what the ClickHouse rows hold.
//!
//! Each parser accepts what the server prints with its default `DateStyle`
//! (ISO) in any `TimeZone`, and refuses anything else, so a changed server
//! setting shows as an error instead of a quietly wrong row.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveTime, TimeZone, Utc};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TextError {
    #[error("not a uuid")]
    Uuid,
    #[error("not a 32-bit integer")]
    Int,
    #[error("not an array literal: {0}")]
    Array(&'static str),
    #[error("not JSON: {0}")]
    Json(String),
    #[error("not an ISO timestamp with time zone: {0}")]
    Timestamp(&'static str),
}

/// A uuid as the rows keep it: lowercase hyphenated.
pub fn uuid(s: &str) -> Result<String, TextError> {
    Uuid::try_parse(s).map(|u| u.to_string()).map_err(|_| TextError::Uuid)
}

pub fn int4(s: &str) -> Result<i32, TextError> {
    // `i32::from_str` takes a leading '+', which PostgreSQL never prints.
    if s.starts_with('+') {
        return Err(TextError::Int);
    }
    s.parse().map_err(|_| TextError::Int)
}

/// JSON text normalized the way `serde_json::Value::to_string` prints it,
/// which is how the backfill writes the same column.
pub fn json(s: &str) -> Result<String, TextError> {
    serde_json::from_str::<serde_json::Value>(s).map(|v| v.to_string()).map_err(|e| TextError::Json(e.to_string()))
}

/// A one-dimensional array literal (`{a,"b c",NULL}`); `None` is a NULL element.
///
/// Elements are quoted when they are empty, spell NULL, or hold a brace,
/// comma, quote, backslash or whitespace; inside quotes a backslash escapes the
/// next character. A non-default lower bound prints as `[2:3]={…}`.
pub fn array(s: &str) -> Result<Vec<Option<String>>, TextError> {
    let body = match s.strip_prefix('[') {
        Some(rest) => {
            let (bounds, body) = rest.split_once("]=").ok_or(TextError::Array("unclosed dimension bounds"))?;
            if bounds.contains('[') || bounds.contains(']') {
                return Err(TextError::Array("more than one dimension"));
            }
            body
        }
        None => s,
    };
    let mut chars = body.chars().peekable();
    if chars.next() != Some('{') {
        return Err(TextError::Array("no opening brace"));
    }
    let mut out = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
    } else {
        loop {
            out.push(element(&mut chars)?);
            match chars.next() {
                Some(',') => continue,
                Some('}') => break,
                Some(_) => return Err(TextError::Array("junk after an element")),
                None => return Err(TextError::Array("no closing brace")),
            }
        }
    }
    match chars.next() {
        None => Ok(out),
        Some(_) => Err(TextError::Array("text after the closing brace")),
    }
}

/// One element, up to (not including) the `,` or `}` after it.
fn element(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<Option<String>, TextError> {
    let mut value = String::new();
    if chars.peek() == Some(&'"') {
        chars.next();
        loop {
            match chars.next() {
                Some('"') => return Ok(Some(value)),
                Some('\\') => value.push(chars.next().ok_or(TextError::Array("escape at the end"))?),
                Some(c) => value.push(c),
                None => return Err(TextError::Array("unclosed quote")),
            }
        }
    }
    let mut escaped = false;
    loop {
        match chars.peek() {
            Some(',' | '}') | None => break,
            Some('{') => return Err(TextError::Array("more than one dimension")),
            Some('"') => return Err(TextError::Array("quote inside an unquoted element")),
            Some('\\') => {
                chars.next();
                escaped = true;
                value.push(chars.next().ok_or(TextError::Array("escape at the end"))?);
            }
            Some(&c) => {
                chars.next();
                value.push(c);
            }
        }
    }
    if value.is_empty() {
        return Err(TextError::Array("empty unquoted element"));
    }
    if !escaped && value.eq_ignore_ascii_case("NULL") {
        return Ok(None);
    }
    Ok(Some(value))
}

/// A `timestamptz` as printed with `DateStyle` ISO: `2026-01-01
/// 00:00:00.123456+00`, with 0-6 fraction digits and an offset of hours,
/// minutes and (for historical zones) seconds, whatever the session's
/// `TimeZone`. Infinities and BC dates have no place in a row and are refused.
pub fn timestamptz(s: &str) -> Result<DateTime<Utc>, TextError> {
    if s.ends_with(" BC") {
        return Err(TextError::Timestamp("BC date"));
    }
    let (date, rest) = s.split_once(' ').ok_or(TextError::Timestamp("no space between date and time"))?;
    let mut ymd = date.splitn(3, '-');
    let (year, month, day) = match (ymd.next(), ymd.next(), ymd.next()) {
        (Some(y), Some(m), Some(d)) => (number(y, 4, 7)?, number(m, 2, 2)?, number(d, 2, 2)?),
        _ => return Err(TextError::Timestamp("date is not YYYY-MM-DD")),
    };
    let date = i32::try_from(year)
        .ok()
        .and_then(|y| NaiveDate::from_ymd_opt(y, month, day))
        .ok_or(TextError::Timestamp("no such date"))?;

    let split = rest.find(['+', '-']).ok_or(TextError::Timestamp("no offset"))?;
    let (time, offset) = rest.split_at(split);
    let (hms, fraction) = match time.split_once('.') {
        Some((hms, f)) if (1..=6).contains(&f.len()) => (hms, number(f, 1, 6)? * 10u32.pow(6 - f.len() as u32)),
        Some(_) => return Err(TextError::Timestamp("fraction is not 1-6 digits")),
        None => (time, 0),
    };
    let [h, m, sec] = hh_mm_ss(hms, 3)?;
    let time = NaiveTime::from_hms_micro_opt(h, m, sec, fraction).ok_or(TextError::Timestamp("no such time"))?;

    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let [oh, om, os] = hh_mm_ss(&offset[1..], 1)?;
    let offset_secs = sign * (oh * 3600 + om * 60 + os) as i32;
    let zone = FixedOffset::east_opt(offset_secs).ok_or(TextError::Timestamp("offset out of range"))?;
    zone.from_local_datetime(&date.and_time(time))
        .single()
        .map(|t| t.with_timezone(&Utc))
        .ok_or(TextError::Timestamp("out of range"))
}

/// `HH[:MM[:SS]]` with at least `required` parts, each two digits; missing
/// parts are 0.
fn hh_mm_ss(s: &str, required: usize) -> Result<[u32; 3], TextError> {
    let mut out = [0; 3];
    let mut parts = 0;
    for (i, part) in s.split(':').enumerate() {
        if i == 3 {
            return Err(TextError::Timestamp("too many time fields"));
        }
        out[i] = number(part, 2, 2)?;
        parts = i + 1;
    }
    if parts < required {
        return Err(TextError::Timestamp("time is not HH:MM:SS"));
    }
    Ok(out)
}

/// ASCII digits only (no sign), between `min` and `max` of them.
fn number(s: &str, min: usize, max: usize) -> Result<u32, TextError> {
    if s.len() < min || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TextError::Timestamp("malformed number"));
    }
    s.parse().map_err(|_| TextError::Timestamp("malformed number"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn uuids_come_out_lowercase_hyphenated() {
        assert_eq!(uuid("0190F2A8-1B2C-7D3E-8F40-123456789ABC").unwrap(), "0190f2a8-1b2c-7d3e-8f40-123456789abc");
        assert_eq!(uuid("0190f2a8-1b2c-7d3e-8f40-123456789abc").unwrap(), "0190f2a8-1b2c-7d3e-8f40-123456789abc");
        assert_eq!(uuid("nope"), Err(TextError::Uuid));
        assert_eq!(uuid(""), Err(TextError::Uuid));
    }

    #[test]
    fn int4s() {
        assert_eq!(int4("0"), Ok(0));
        assert_eq!(int4("-7"), Ok(-7));
        assert_eq!(int4("2147483647"), Ok(i32::MAX));
        for bad in ["", "+1", "2147483648", "1.0", " 1", "x"] {
            assert_eq!(int4(bad), Err(TextError::Int), "{bad}");
        }
    }

    #[test]
    fn json_is_normalized_like_value_to_string() {
        // jsonb prints with spaces after ':' and ',' and sorts keys by length
        // first; the row holds serde_json's compact, key-sorted text.
        let pg = r#"{"b": 1, "aa": [1, 2.5, "x\"y"], "c": {"z": null, "é": true}}"#;
        let value: serde_json::Value = serde_json::from_str(pg).unwrap();
        assert_eq!(json(pg).unwrap(), value.to_string());
        assert_eq!(json(pg).unwrap(), r#"{"aa":[1,2.5,"x\"y"],"b":1,"c":{"z":null,"é":true}}"#);
        assert_eq!(json("null").unwrap(), "null");
        assert_eq!(json(r#""\u0041""#).unwrap(), r#""A""#);
        assert!(matches!(json("{"), Err(TextError::Json(_))));
    }

    #[test]
    fn arrays_with_quotes_commas_escapes_and_nulls() {
        assert_eq!(array("{}").unwrap(), Vec::<Option<String>>::new());
        assert_eq!(array("{a}").unwrap(), vec![Some("a".to_string())]);
        assert_eq!(
            array(r#"{plain,"a,b","say \"hi\"","back\\slash","",NULL,"NULL",null,"{x}"," sp ",ünï}"#).unwrap(),
            vec![
                Some("plain".into()),
                Some("a,b".into()),
                Some("say \"hi\"".into()),
                Some("back\\slash".into()),
                Some("".into()),
                None,
                Some("NULL".into()),
                None,
                Some("{x}".into()),
                Some(" sp ".into()),
                Some("ünï".into()),
            ]
        );
        // An escaped unquoted NULL is the text, not a null.
        assert_eq!(array(r"{\NULL,a\,b}").unwrap(), vec![Some("NULL".into()), Some("a,b".into())]);
        assert_eq!(array("[0:1]={a,b}").unwrap(), vec![Some("a".into()), Some("b".into())]);
        for bad in [
            "",
            "a",
            "{",
            "{a",
            "{a,",
            "{a,}",
            "{,a}",
            "{\"a}",
            "{\"a\"b}",
            "{a\"b\"}",
            "{a}x",
            "{{a},{b}}",
            "[1:2][1:1]={{a},{b}}",
            "[1:2={a}",
            "{a\\",
            "{\"a\\",
        ] {
            assert!(matches!(array(bad), Err(TextError::Array(_))), "{bad:?} parsed");
        }
    }

    #[test]
    fn timestamps_as_postgres_prints_them() {
        assert_eq!(timestamptz("2026-01-01 00:00:00+00").unwrap(), at("2026-01-01T00:00:00Z"));
        assert_eq!(timestamptz("2026-01-01 00:00:00.123456+00").unwrap(), at("2026-01-01T00:00:00.123456Z"));
        assert_eq!(timestamptz("2026-01-01 00:00:00.5+00").unwrap(), at("2026-01-01T00:00:00.5Z"));
        assert_eq!(timestamptz("2026-01-01 00:00:00.000010+00").unwrap(), at("2026-01-01T00:00:00.00001Z"));
        assert_eq!(timestamptz("2026-01-01 05:30:00+05:30").unwrap(), at("2026-01-01T00:00:00Z"));
        assert_eq!(timestamptz("2025-12-31 21:00:00.25-03").unwrap(), at("2026-01-01T00:00:00.25Z"));
        // Historical local mean time: offsets with seconds.
        assert_eq!(timestamptz("1850-01-01 00:00:00+00:53:28").unwrap(), at("1849-12-31T23:06:32Z"));
        assert_eq!(timestamptz("1850-01-01 00:00:00-00:01:15").unwrap(), at("1850-01-01T00:01:15Z"));
        assert_eq!(
            timestamptz("10000-01-01 00:00:00+00").unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(timestamptz("2024-02-29 23:59:59.999999+00").unwrap(), at("2024-02-29T23:59:59.999999Z"));
        for bad in [
            "",
            "infinity",
            "-infinity",
            "0044-03-15 00:00:00+00 BC",
            "2026-01-01T00:00:00+00",
            "2026-01-01 00:00:00",
            "2026-01-01 00:00:00Z",
            "2026-01-01 00:00+00",
            "2026-01-01 00:00:00.+00",
            "2026-01-01 00:00:00.1234567+00",
            "2026-01-01 24:00:00+00",
            "2026-02-30 00:00:00+00",
            "2026-1-01 00:00:00+00",
            "2026-01-01 00:00:00+1",
            "2026-01-01 00:00:00+00:00:00:00",
            "2026-01-01 00:00:00+99",
            "+2026-01-01 00:00:00+00",
            "Thu Jan 01 00:00:00 2026 UTC",
        ] {
            assert!(matches!(timestamptz(bad), Err(TextError::Timestamp(_))), "{bad:?} parsed");
        }
    }

    /// Writes an array literal the way PostgreSQL's `array_out` does.
    fn pg_array(items: &[Option<String>]) -> String {
        let quote = |s: &str| {
            s.is_empty()
                || s.eq_ignore_ascii_case("NULL")
                || s.chars().any(|c| matches!(c, '{' | '}' | ',' | '"' | '\\') || c.is_ascii_whitespace())
        };
        let parts: Vec<String> = items
            .iter()
            .map(|item| match item {
                None => "NULL".to_string(),
                Some(s) if quote(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
                Some(s) => s.clone(),
            })
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    proptest! {
        #[test]
        fn arrays_round_trip(items in proptest::collection::vec(proptest::option::of(".*"), 0..12)) {
            prop_assert_eq!(array(&pg_array(&items)), Ok(items));
        }

        #[test]
        fn timestamps_round_trip(micros in -60_000_000_000_000_000i64..200_000_000_000_000_000, offset_secs in -50_400i32..=50_400) {
            let utc = DateTime::from_timestamp_micros(micros).unwrap();
            let zone = FixedOffset::east_opt(offset_secs).unwrap();
            let local = utc.with_timezone(&zone);
            // As PostgreSQL prints it: fraction without trailing zeros, the
            // offset's minutes and seconds only when not zero.
            let mut text = local.format("%Y-%m-%d %H:%M:%S").to_string();
            let frac = local.timestamp_subsec_micros();
            if frac != 0 {
                text.push_str(format!(".{frac:06}").trim_end_matches('0'));
            }
            let abs = offset_secs.unsigned_abs();
            text.push_str(&format!("{}{:02}", if offset_secs < 0 { '-' } else { '+' }, abs / 3600));
            if abs % 3600 != 0 {
                text.push_str(&format!(":{:02}", abs / 60 % 60));
                if abs % 60 != 0 {
                    text.push_str(&format!(":{:02}", abs % 60));
                }
            }
            prop_assert_eq!(timestamptz(&text), Ok(utc), "{}", text);
        }

        #[test]
        fn random_text_never_panics(s in ".*") {
            let _ = array(&s);
            let _ = timestamptz(&s);
            let _ = int4(&s);
            let _ = uuid(&s);
            let _ = json(&s);
        }
    }
}
