//! Who may do what: every manager certificate maps to a role, or to none.
//!
//! `[access]` in `provd.toml` lists certificate common names, or
//! `group:NAME` for a certificate's organisation (O), under three roles,
//! as Kubernetes maps a client certificate's CN to a user and its O to
//! groups:
//!
//! | role | may |
//! | --- | --- |
//! | `readers` | `GET` (and `HEAD`) on every route |
//! | `operators` | also start and cancel operations, delete, start and stop VMs, repack |
//! | `admins` | everything: also upload bundles, activate and roll back plugins |
//!
//! A certificate that no entry maps gets `403` on every route but
//! `/healthz`, unknown routes included: what the node serves is itself
//! information. The admin socket's caller (`local`) is an administrator:
//! reaching the socket already takes the node's root account.

use axum::http::Method;
use serde::Deserialize;

/// A manager's rights, each including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Reader,
    Operator,
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// The subject of a client certificate, as roles read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The one common name (CN).
    pub name: String,
    /// Every organisation (O).
    pub groups: Vec<String>,
}

/// `[access]`: who holds each role. Empty by default: no certificate may do
/// anything until the administrator says so.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    pub admins: Vec<String>,
    pub operators: Vec<String>,
    pub readers: Vec<String>,
}

/// Most entries of one role: a list this long is a group's job.
const MAX_ENTRIES: usize = 1024;

impl AccessConfig {
    /// Checks every entry: a non-empty name without control characters,
    /// `group:` followed by one.
    pub fn check(&self) -> Result<(), String> {
        for (key, entries) in [
            ("access.admins", &self.admins),
            ("access.operators", &self.operators),
            ("access.readers", &self.readers),
        ] {
            if entries.len() > MAX_ENTRIES {
                return Err(format!("{key}: at most {MAX_ENTRIES} entries"));
            }
            for entry in entries {
                let name = entry.strip_prefix("group:").unwrap_or(entry);
                if name.is_empty() || name.chars().any(char::is_control) {
                    return Err(format!("{key}: {entry:?} is not a common name or group:NAME"));
                }
            }
        }
        Ok(())
    }

    /// The highest role an entry gives `subject`, if any.
    pub fn role(&self, subject: &Subject) -> Option<Role> {
        let matches = |entry: &String| match entry.strip_prefix("group:") {
            Some(group) => subject.groups.iter().any(|g| g == group),
            None => *entry == subject.name,
        };
        [
            (Role::Admin, &self.admins),
            (Role::Operator, &self.operators),
            (Role::Reader, &self.readers),
        ]
        .into_iter()
        .find(|(_, entries)| entries.iter().any(matches))
        .map(|(role, _)| role)
    }
}

/// The role a request needs: `None` for what anyone who passed the TLS
/// handshake may ask (`GET /healthz`). Routes not listed need an
/// administrator, so a new route is closed until it is placed here.
pub fn required(method: &Method, path: &str) -> Option<Role> {
    let read = *method == Method::GET || *method == Method::HEAD;
    if read && path == "/healthz" {
        return None;
    }
    if read {
        return Some(Role::Reader);
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let operator = matches!(
        (method, segments.as_slice()),
        (&Method::POST, ["v1", "operations"])
            | (&Method::POST, ["v1", "operations", _, "cancel"])
            | (&Method::DELETE, ["v1", "vms", _])
            | (&Method::POST, ["v1", "vms", _, "start" | "stop"])
            | (&Method::POST, ["v1", "repack"])
    );
    Some(if operator { Role::Operator } else { Role::Admin })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(name: &str, groups: &[&str]) -> Subject {
        Subject { name: name.into(), groups: groups.iter().map(|g| g.to_string()).collect() }
    }

    #[test]
    fn entries_map_names_and_groups_to_the_highest_role() {
        let access = AccessConfig {
            admins: vec!["admin".into()],
            operators: vec!["ops-bot".into(), "group:sre".into()],
            readers: vec!["monitoring".into(), "group:sre".into(), "admin".into()],
        };
        assert!(access.check().is_ok());
        assert_eq!(access.role(&subject("admin", &[])), Some(Role::Admin));
        assert_eq!(access.role(&subject("ops-bot", &[])), Some(Role::Operator));
        assert_eq!(access.role(&subject("alice", &["sre"])), Some(Role::Operator));
        assert_eq!(access.role(&subject("monitoring", &[])), Some(Role::Reader));
        assert_eq!(access.role(&subject("monitoring-readonly", &[])), None);
        // A common name is not a group and a group is not a name.
        assert_eq!(access.role(&subject("sre", &[])), None);
        assert_eq!(access.role(&subject("x", &["admin"])), None);
        assert!(
            AccessConfig { admins: vec!["group:".into()], ..Default::default() }.check().is_err()
        );
        assert!(
            AccessConfig { readers: vec!["a\nb".into()], ..Default::default() }.check().is_err()
        );
    }

    #[test]
    fn routes_need_the_least_role_that_may_use_them() {
        assert_eq!(required(&Method::GET, "/healthz"), None);
        assert_eq!(required(&Method::GET, "/v1/vms"), Some(Role::Reader));
        assert_eq!(required(&Method::GET, "/metrics"), Some(Role::Reader));
        assert_eq!(required(&Method::POST, "/v1/operations"), Some(Role::Operator));
        assert_eq!(required(&Method::POST, "/v1/operations/op-1/cancel"), Some(Role::Operator));
        assert_eq!(required(&Method::DELETE, "/v1/vms/web-1"), Some(Role::Operator));
        assert_eq!(required(&Method::POST, "/v1/repack"), Some(Role::Operator));
        assert_eq!(required(&Method::POST, "/v1/vms/web-1/start"), Some(Role::Operator));
        assert_eq!(required(&Method::POST, "/v1/vms/web-1/stop"), Some(Role::Operator));
        assert_eq!(required(&Method::POST, "/v1/vms/web-1/reboot"), Some(Role::Admin));
        assert_eq!(required(&Method::POST, "/v1/bundles"), Some(Role::Admin));
        assert_eq!(required(&Method::POST, "/v1/plugins/x/activate"), Some(Role::Admin));
        assert_eq!(required(&Method::POST, "/healthz"), Some(Role::Admin));
        assert_eq!(required(&Method::DELETE, "/v1/vms/a/b"), Some(Role::Admin));
        assert_eq!(required(&Method::PUT, "/v1/operations"), Some(Role::Admin));
    }
}
