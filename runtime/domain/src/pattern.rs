//! Image reference patterns: which references a node or a plugin allows.
//!
//! A pattern is matched against the canonical form of a reference one
//! `/`-separated component at a time. Inside a component `*` matches any run
//! of characters; a component that is exactly `**` matches any number of
//! whole components (at least one when it ends the pattern, so
//! `dir:/srv/images/**` allows what lies beneath `/srv/images`, not the
//! folder itself). No wildcard ever matches `.` or `..` or an empty
//! component, and a pattern may not contain them, so a reference that climbs
//! (`dir:/srv/images/../pki`) matches no pattern at all, whatever the parser
//! in front of it let through.
//!
//! A `dir:` or `tar:` pattern also names the directory that references it
//! allows are opened beneath ([`local_root`]): its components before the
//! first wildcard. The image source opens that root, then every further
//! component without following a symbolic link.

/// Matches `text` against `pattern` (see the module documentation).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let t: Vec<&str> = text.split('/').collect();
    if t.iter().any(|c| *c == "." || *c == "..") {
        return false;
    }
    let p: Vec<&str> = pattern.split('/').collect();
    // reach[j]: the first j text components are matched by the pattern
    // components seen so far. Bounded by components × components × the
    // cost of one component, whatever the pattern.
    let mut reach = vec![false; t.len() + 1];
    if let Some(first) = reach.first_mut() {
        *first = true;
    }
    for (i, pc) in p.iter().enumerate() {
        let mut next = vec![false; t.len() + 1];
        if *pc == "**" {
            let last = i + 1 == p.len();
            let mut open = false;
            for (j, slot) in next.iter_mut().enumerate() {
                // `**` ending the pattern needs one component at least; an
                // empty component is never part of what it matches.
                if last {
                    *slot = open;
                    open |= reach.get(j).copied().unwrap_or(false);
                } else {
                    open |= reach.get(j).copied().unwrap_or(false);
                    *slot = open;
                }
                if t.get(j).is_some_and(|c| c.is_empty()) {
                    open = false;
                }
            }
        } else {
            for (j, tc) in t.iter().enumerate() {
                if reach.get(j).copied().unwrap_or(false)
                    && component_match(pc, tc)
                    && let Some(slot) = next.get_mut(j + 1)
                {
                    *slot = true;
                }
            }
        }
        reach = next;
    }
    reach.last().copied().unwrap_or(false)
}

/// One component: `*` matches any run of characters, but a component with a
/// wildcard never matches an empty one.
fn component_match(pattern: &str, text: &str) -> bool {
    if !pattern.contains('*') {
        return pattern == text;
    }
    if text.is_empty() {
        return false;
    }
    wildcard_match(pattern, text)
}

/// `*` matches any run of characters, `/` included; every other character
/// itself. For names and command lines, which have no components.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    // Positions of the text reachable after each pattern byte; no
    // backtracking for a hostile pattern to exploit.
    let tb = text.as_bytes();
    let mut reach = vec![false; tb.len() + 1];
    if let Some(first) = reach.first_mut() {
        *first = true;
    }
    for &c in pattern.as_bytes() {
        let mut next = vec![false; tb.len() + 1];
        if c == b'*' {
            let mut open = false;
            for (pos, slot) in next.iter_mut().enumerate() {
                open |= reach.get(pos).copied().unwrap_or(false);
                *slot = open;
            }
        } else {
            for pos in 0..tb.len() {
                if reach.get(pos).copied().unwrap_or(false)
                    && tb.get(pos) == Some(&c)
                    && let Some(slot) = next.get_mut(pos + 1)
                {
                    *slot = true;
                }
            }
        }
        reach = next;
    }
    reach.last().copied().unwrap_or(false)
}

/// The schemes a pattern may start with.
pub const PATTERN_SCHEMES: [&str; 6] =
    ["dir:/", "tar:/", "http://", "https://", "oci://", "oci+http://"];

/// Checks one pattern of a plugin's `capabilities.images.sources` or of a
/// node's `policy.image-sources`: a known scheme, no control character, no
/// `.`, `..` or (past the scheme) empty component, at most `max_len` bytes.
pub fn check_pattern(pattern: &str, max_len: usize) -> Result<(), String> {
    let Some(scheme) = PATTERN_SCHEMES.iter().find(|s| pattern.starts_with(**s)) else {
        return Err(format!(
            "{pattern:?} is not a reference pattern: start with dir:/, tar:/, http(s):// or \
             oci(+http)://"
        ));
    };
    if pattern.len() > max_len {
        return Err(format!("{pattern:?} is longer than {max_len} bytes"));
    }
    if pattern.chars().any(char::is_control) {
        return Err(format!("{pattern:?} contains a control character"));
    }
    // The scheme's own slashes are not components; `dir:/` leaves the
    // leading `/` of an absolute path.
    let rest = pattern.get(scheme.len()..).unwrap_or_default();
    for component in rest.split('/') {
        if component == "." || component == ".." {
            return Err(format!("{pattern:?} has a {component:?} component"));
        }
        if component.is_empty() {
            return Err(format!("{pattern:?} has an empty component"));
        }
        if component.contains("**") && component != "**" {
            return Err(format!(
                "{pattern:?}: `**` must be a whole component (`*` matches within one)"
            ));
        }
    }
    Ok(())
}

/// For a `dir:` or `tar:` pattern, the absolute directory every reference
/// it matches lies beneath: its components before the first wildcard, the
/// whole path if it has none. `None` for other schemes.
pub fn local_root(pattern: &str) -> Option<String> {
    let path = pattern.strip_prefix("dir:").or_else(|| pattern.strip_prefix("tar:"))?;
    if !path.starts_with('/') {
        return None;
    }
    let components: Vec<&str> = path.split('/').skip(1).collect();
    // Without a wildcard the pattern names one reference, and that path is
    // the root itself.
    let literal: Vec<&str> = components.iter().take_while(|c| !c.contains('*')).copied().collect();
    Some(format!("/{}", literal.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("dir:/srv/images/*", "dir:/srv/images/web"));
        assert!(!glob_match("dir:/srv/images/*", "dir:/srv/images/web/x"));
        assert!(glob_match("dir:/srv/images/**", "dir:/srv/images/web/x"));
        assert!(!glob_match("dir:/srv/images/**", "dir:/srv/images"));
        assert!(glob_match("dir:/srv/**/web", "dir:/srv/web"));
        assert!(glob_match("dir:/srv/**/web", "dir:/srv/a/b/web"));
        assert!(glob_match("tar:/srv/*.tar.zst", "tar:/srv/a.tar.zst"));
        assert!(!glob_match("tar:/srv/*.tar.zst", "tar:/srv/a.tar"));
        assert!(!glob_match("dir:/srv/images/*", "dir:/etc"));
        assert!(glob_match("https://h/**", "https://h/a/b.tar#sha256:00"));
        assert!(glob_match("oci://reg/library/*", "oci://reg/library/debian:12"));
        assert!(!glob_match("", "x"));
        assert!(glob_match("", ""));
        assert!(glob_match("a*b*c", "axbyc"));
        // A pattern that makes backtracking matchers exponential.
        let hostile = "*a".repeat(30) + "b";
        assert!(!glob_match(&hostile, &"a".repeat(1000)));
    }

    #[test]
    fn wildcards_never_climb_or_match_empty_components() {
        for text in [
            "dir:/srv/images/../pki",
            "dir:/srv/images/web/../../pki",
            "dir:/srv/images/./web",
            "dir:/srv/images/..",
            "tar:/srv/images/../x.tar",
        ] {
            for pattern in ["dir:/srv/images/*", "dir:/srv/images/**", "tar:/srv/**", "dir:/**"] {
                assert!(!glob_match(pattern, text), "{pattern} matched {text}");
            }
        }
        assert!(!glob_match("dir:/srv/images/*", "dir:/srv/images/"));
        assert!(!glob_match("dir:/srv/images/**", "dir:/srv/images//x"));
        assert!(!glob_match("dir:/srv/images/*/x", "dir:/srv/images//x"));
        // Whole components: a prefix of a name is not the name.
        assert!(!glob_match("dir:/srv/images", "dir:/srv/images-secret"));
    }

    #[test]
    fn patterns_are_checked_and_name_their_root() {
        assert!(check_pattern("dir:/srv/images/*", 1024).is_ok());
        assert!(check_pattern("https://h/**", 1024).is_ok());
        assert!(check_pattern("oci://reg/lib/*", 1024).is_ok());
        for bad in [
            "dir:/srv/../x/*",
            "dir:/srv/./x",
            "dir:/srv//x",
            "dir:/srv/x/",
            "dir:/srv/im**",
            "file:/x",
            "dir:relative",
            "dir:/a\nb",
        ] {
            assert!(check_pattern(bad, 1024).is_err(), "{bad}");
        }
        assert!(check_pattern(&format!("dir:/{}", "a".repeat(2000)), 1024).is_err());
        assert_eq!(local_root("dir:/srv/images/*").as_deref(), Some("/srv/images"));
        assert_eq!(local_root("tar:/srv/*.tar.zst").as_deref(), Some("/srv"));
        assert_eq!(local_root("dir:/srv/images/web").as_deref(), Some("/srv/images/web"));
        assert_eq!(local_root("dir:/**").as_deref(), Some("/"));
        assert_eq!(local_root("https://h/**"), None);
    }
}
