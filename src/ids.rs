//! Friendly identifiers (`session_…`, `run_…`): opaque, URL-safe, and typed by prefix
//! so a path segment can be told apart from a user-supplied external id.

use rand::Rng;

const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
const BODY_LEN: usize = 25;

pub const SESSION_PREFIX: &str = "session_";
pub const RUN_PREFIX: &str = "run_";
pub const WAITPOINT_PREFIX: &str = "waitpoint_";

fn generate(prefix: &str) -> String {
    let mut rng = rand::thread_rng();
    let mut id = String::with_capacity(prefix.len() + BODY_LEN);
    id.push_str(prefix);
    for _ in 0..BODY_LEN {
        id.push(ALPHABET[rng.gen_range(0..ALPHABET.len())] as char);
    }
    id
}

pub fn new_session_id() -> String {
    generate(SESSION_PREFIX)
}

pub fn new_run_id() -> String {
    generate(RUN_PREFIX)
}

pub fn new_waitpoint_id() -> String {
    generate(WAITPOINT_PREFIX)
}

/// Longest id, in characters, that a path segment may carry: the external id's
/// limit too (see [`id_problem`]).
pub const MAX_ID_CHARS: usize = 256;

/// Why `id` cannot name a resource in a URL path, if it cannot. Path segments and
/// the external ids create and update accept follow this one rule, so every id
/// the API accepts can be addressed: 1-256 characters, no control characters,
/// and not `.` or `..` (URL parsers resolve those segments away, even
/// percent-encoded, so no client could send them).
pub fn id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("must not be empty")
    } else if id.chars().count() > MAX_ID_CHARS {
        Some("must be at most 256 characters")
    } else if id.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else if id == "." || id == ".." {
        Some("must not be \".\" or \"..\"")
    } else {
        None
    }
}

/// Random base62 text, used for secret keys.
pub fn random_base62(len: usize) -> String {
    const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    (0..len).map(|_| B62[rng.gen_range(0..B62.len())] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_prefix_and_are_unique() {
        let a = new_session_id();
        let b = new_session_id();
        assert!(a.starts_with("session_") && a.len() == 8 + 25);
        assert_ne!(a, b);
        assert!(new_run_id().starts_with("run_"));
        assert!(random_base62(32).chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn the_id_rule_counts_characters_not_bytes() {
        assert_eq!(id_problem(&"é".repeat(MAX_ID_CHARS)), None);
        assert!(id_problem(&"é".repeat(MAX_ID_CHARS + 1)).is_some());
        for bad in ["", ".", "..", "a\u{0}b", "a\nb", "a\u{7f}b", "a\u{85}b"] {
            assert!(id_problem(bad).is_some(), "{bad:?}");
        }
        for good in ["chat-1", "a b", "a/b", "...", "user:42", "日本"] {
            assert_eq!(id_problem(good), None, "{good:?}");
        }
    }
}
