//! Trust domains: whose files a layer or shared partition holds.
//!
//! A node carries VMs of many tenants, and sharing must never let one
//! tenant's guest read another's bytes. Every layer and shared partition
//! therefore belongs to one domain: `public` (it holds only entries of
//! images of the provider's public catalogue, `[sharing] public-images`) or
//! `tenant:<name>`. A VM of tenant T may stack and attach only partitions of
//! `public` and `tenant:T`.

/// The tenant of a VM whose spec names none.
pub const DEFAULT_TENANT: &str = "default";
/// The domain of layers holding only entries of public images.
pub const PUBLIC: &str = "public";
/// The domain of partitions built before domains were recorded.
pub const LEGACY_DOMAIN: &str = "tenant:default";

/// The domain of tenant `tenant`'s own layers and partitions.
pub fn tenant_domain(tenant: &str) -> String {
    format!("tenant:{tenant}")
}

/// Whether a VM of `tenant` may stack and attach what `domain` holds.
pub fn may_see(tenant: &str, domain: &str) -> bool {
    domain == PUBLIC || domain.strip_prefix("tenant:") == Some(tenant)
}

/// Whether `reference` (canonical form) is of the public catalogue that
/// `patterns` (`[sharing] public-images`) name.
pub fn is_public_image(patterns: &[String], reference: &str) -> bool {
    patterns.iter().any(|p| crate::glob_match(p, reference))
}

/// Whether `domain` is one this node writes: `public` or `tenant:` and a
/// DNS label.
pub fn valid_domain(domain: &str) -> bool {
    domain == PUBLIC || domain.strip_prefix("tenant:").is_some_and(valid_tenant)
}

/// A tenant is a DNS label: 1–63 of `a-z 0-9 -`, not starting or ending
/// with `-`.
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 63
        && !t.starts_with('-')
        && !t.ends_with('-')
        && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_sees_public_and_its_own_domain_only() {
        assert!(may_see("a", PUBLIC));
        assert!(may_see("a", "tenant:a"));
        assert!(!may_see("a", "tenant:b"));
        assert!(!may_see("a", "tenant:ab"));
        assert!(!may_see("a", "a"));
        assert!(!may_see("a", ""));
        assert!(may_see(DEFAULT_TENANT, LEGACY_DOMAIN));
        assert!(valid_domain("tenant:acme-1") && valid_domain(PUBLIC));
        for bad in ["tenant:", "tenant:A", "tenant:-a", "tenant:a.b", "private", "tenant:x/y"] {
            assert!(!valid_domain(bad), "{bad}");
        }
        let pats = vec!["oci://registry.example/catalogue/**".to_string()];
        assert!(is_public_image(&pats, "oci://registry.example/catalogue/web:1"));
        assert!(!is_public_image(&pats, "oci://registry.example/customers/web:1"));
        assert!(!is_public_image(&[], "dir:/srv/web"));
    }
}
