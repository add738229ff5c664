//! The domain layer's error: a rejected field and why. The HTTP layer maps it to 422.

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

/// Checks a string's length in characters against inclusive bounds.
pub fn check_len(field: &str, value: &str, min: usize, max: usize) -> Validated<()> {
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

/// Parses a duration such as `30s`, `10m`, `1h`, `2d`, `1w` or `1h30m` into seconds.
/// A bare number is seconds.
pub fn parse_duration_secs(input: &str) -> Option<i64> {
    let s = input.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(n) = s.parse::<i64>() {
        return (n >= 0).then_some(n);
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
    }
    digits.is_empty().then_some(total)
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
        for bad in ["", "h", "10x", "1h30", "-5", "99999999999999999999d"] {
            assert_eq!(parse_duration_secs(bad), None, "{bad}");
        }
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
}
