//! Scope checks for public tokens (JWTs). Secret keys are never checked here:
//! they are full-power for their own environment.
//!
//! A scope is `action:resource[:id]`. The id is everything after the second
//! colon, because external ids may themselves contain colons.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    Write,
    /// What only an owner may do, such as giving a session another external id:
    /// granted by `admin`, `admin:{resource}` and `admin:{resource}:{id}` alone.
    Admin,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Write => "write",
            Action::Admin => "admin",
        }
    }
}

struct Scope<'a> {
    action: &'a str,
    resource: &'a str,
    id: Option<&'a str>,
}

fn parse(scope: &str) -> Scope<'_> {
    let mut parts = scope.splitn(3, ':');
    Scope { action: parts.next().unwrap_or(""), resource: parts.next().unwrap_or(""), id: parts.next() }
}

/// Scopes that grant `action` on every resource of type `resource`.
fn is_super_scope(scope: &Scope<'_>, resource: &str, action: Action) -> bool {
    match (scope.action, scope.resource, scope.id) {
        ("admin", "", None) => true,
        // `read:all` and `write:all`; there is no `admin:all`.
        (a, "all", None) if a == action.as_str() && action != Action::Admin => true,
        (a, r, None) if r == resource && (a == action.as_str() || a == "admin") => true,
        _ => false,
    }
}

fn is_session_super_scope(scope: &Scope<'_>, action: Action) -> bool {
    is_super_scope(scope, "sessions", action)
}

/// May a token perform `action` on the `resource` (`sessions`, `runs`) known by
/// any of `keys`? `admin:{resource}:{id}` implies read and write, and only admin
/// scopes grant [`Action::Admin`]. Empty keys never match.
pub fn allows(scopes: &[String], resource: &str, action: Action, keys: &[&str]) -> bool {
    scopes.iter().map(|s| parse(s)).any(|scope| {
        is_super_scope(&scope, resource, action)
            || (scope.resource == resource
                && (scope.action == action.as_str() || scope.action == "admin")
                && scope.id.is_some_and(|id| !id.is_empty() && keys.iter().any(|k| !k.is_empty() && *k == id)))
    })
}

/// The run a token acts as: the id of its `write:runs:{id}` scope (the token a
/// worker gets with a run carries exactly one). Such a token writes to its
/// session's channels as that run, so the run's fence applies to it.
pub fn acting_run(scopes: &[String]) -> Option<&str> {
    scopes.iter().map(|s| parse(s)).find_map(|scope| match (scope.action, scope.resource, scope.id) {
        ("write" | "admin", "runs", Some(id)) if !id.is_empty() => Some(id),
        _ => None,
    })
}

/// [`allows`] for sessions: `keys` are the URL form, friendly id and external id.
pub fn allows_session(scopes: &[String], action: Action, keys: &[&str]) -> bool {
    allows(scopes, "sessions", action, keys)
}

/// May a token list sessions? Session super scopes list everything; otherwise the
/// caller must filter by task identifiers it holds `read:tasks:{id}` for.
pub fn allows_list(scopes: &[String], task_filter: &[String]) -> bool {
    let parsed: Vec<Scope<'_>> = scopes.iter().map(|s| parse(s)).collect();
    if parsed.iter().any(|s| is_session_super_scope(s, Action::Read)) {
        return true;
    }
    if parsed.iter().any(|s| s.action == "read" && s.resource == "tasks" && s.id.is_none()) {
        return true;
    }
    !task_filter.is_empty()
        && task_filter.iter().all(|task| {
            parsed.iter().any(|s| s.action == "read" && s.resource == "tasks" && s.id == Some(task.as_str()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn session_scopes_match_either_form() {
        let scopes = v(&["read:sessions:chat-1", "write:sessions:chat-1"]);
        assert!(allows_session(&scopes, Action::Read, &["session_abc", "chat-1"]));
        assert!(allows_session(&scopes, Action::Write, &["chat-1"]));
        assert!(!allows_session(&scopes, Action::Read, &["session_abc"]));
        assert!(!allows_session(&scopes, Action::Read, &["chat-2"]));
    }

    #[test]
    fn read_does_not_grant_write_but_admin_grants_both() {
        assert!(!allows_session(&v(&["read:sessions:x"]), Action::Write, &["x"]));
        assert!(allows_session(&v(&["admin:sessions:x"]), Action::Write, &["x"]));
        assert!(allows_session(&v(&["admin:sessions:x"]), Action::Read, &["x"]));
    }

    #[test]
    fn only_admin_scopes_grant_admin() {
        for s in ["admin", "admin:sessions", "admin:sessions:x"] {
            assert!(allows_session(&v(&[s]), Action::Admin, &["session_1", "x"]), "{s}");
        }
        for s in ["write:sessions:x", "write:sessions", "write:all", "admin:all", "admin:sessions:y", "admin:runs"] {
            assert!(!allows_session(&v(&[s]), Action::Admin, &["session_1", "x"]), "{s}");
        }
    }

    #[test]
    fn super_scopes() {
        for s in ["read:sessions", "read:all", "admin", "admin:sessions"] {
            assert!(allows_session(&v(&[s]), Action::Read, &["anything"]), "{s}");
        }
        for s in ["write:sessions", "write:all", "admin"] {
            assert!(allows_session(&v(&[s]), Action::Write, &["anything"]), "{s}");
        }
        assert!(!allows_session(&v(&["read:all"]), Action::Write, &["x"]));
        assert!(!allows_session(&v(&["read:runs"]), Action::Read, &["x"]));
    }

    #[test]
    fn empty_keys_and_ids_never_match() {
        assert!(!allows_session(&v(&["read:sessions:"]), Action::Read, &["", "x"]));
        assert!(!allows_session(&v(&["read:sessions:x"]), Action::Read, &[""]));
    }

    #[test]
    fn run_scopes() {
        assert!(allows(&v(&["write:runs:run_1"]), "runs", Action::Write, &["run_1"]));
        assert!(!allows(&v(&["write:runs:run_1"]), "runs", Action::Write, &["run_2"]));
        assert!(!allows(&v(&["write:sessions"]), "runs", Action::Write, &["run_1"]));
        assert!(allows(&v(&["write:runs"]), "runs", Action::Write, &["run_1"]));
    }

    #[test]
    fn ids_may_contain_colons() {
        assert!(allows_session(&v(&["read:sessions:a:b:c"]), Action::Read, &["a:b:c"]));
    }

    #[test]
    fn list_needs_super_scope_or_task_scopes_for_every_filtered_task() {
        assert!(allows_list(&v(&["read:sessions"]), &[]));
        assert!(!allows_list(&v(&["read:tasks:echo"]), &[]));
        assert!(allows_list(&v(&["read:tasks:echo"]), &v(&["echo"])));
        assert!(!allows_list(&v(&["read:tasks:echo"]), &v(&["echo", "other"])));
        assert!(!allows_list(&v(&["read:sessions:s1"]), &[]));
    }
}
