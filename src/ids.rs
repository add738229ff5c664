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
}
