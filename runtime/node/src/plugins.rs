//! The operator's choice of a plugin's active version, and why a bundle
//! was refused, in the terms a transport answers with.

use provd_store::{AcceptError, StoreError};

use crate::{BundleRefused, Node};

/// Why the active version of a plugin was not changed.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// that version (or plugin) was never accepted here
    #[error("{0} has not been accepted on this node")]
    NotAccepted(String),
    /// no version of the plugin was accepted here
    #[error("no accepted plugin {0} on this node")]
    NoSuchPlugin(String),
    /// the active version is the oldest accepted
    #[error("plugin {0} has no accepted version older than its active one")]
    NoPreviousVersion(String),
    /// the node could not read or write its records
    #[error("{0}")]
    Internal(String),
}

impl Node {
    /// Makes `version` the version of `name` new operations run; returns
    /// the version active before.
    pub fn activate(&self, name: &str, version: &str) -> Result<String, ActivateError> {
        match self.store().activate_plugin(name, version) {
            Ok(previous) => Ok(previous),
            Err(AcceptError::Store(StoreError::NotFound(what))) => {
                Err(ActivateError::NotAccepted(what))
            }
            Err(e) => Err(ActivateError::Internal(e.to_string())),
        }
    }

    /// The version to roll `name` back to: the newest accepted one older
    /// than its active version.
    pub fn previous_version(&self, name: &str) -> Result<String, ActivateError> {
        let internal = |e: &dyn std::fmt::Display| ActivateError::Internal(e.to_string());
        if let Some(previous) = self.store().previous_version(name).map_err(|e| internal(&e))? {
            return Ok(previous);
        }
        let known =
            self.store().bundles().map_err(|e| internal(&e))?.iter().any(|b| b.name == name);
        Err(if known {
            ActivateError::NoPreviousVersion(name.to_string())
        } else {
            ActivateError::NoSuchPlugin(name.to_string())
        })
    }
}

/// What kind of refusal a [`BundleRefused`] is, for a transport to answer
/// with its own status (HTTP maps them one to one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// the bundle is not trusted, over the node's policy or out of date
    Forbidden,
    /// the bundle or its component is over a size limit
    TooLarge,
    /// another version stands in its way
    Conflict,
    /// the bundle is malformed
    Invalid,
    /// the component is not one the node can run
    Unprocessable,
    /// the node failed, not the bundle
    Internal,
}

impl BundleRefused {
    /// The kind of this refusal and its stable code (`docs/api.md`).
    pub fn kind(&self) -> (Refusal, &'static str) {
        use provd_bundle::BundleError as B;
        use provd_engine::LoadError as L;
        match self {
            BundleRefused::Invalid(b) => match b {
                B::NoTrustedSignature { .. } => (Refusal::Forbidden, "untrusted-signer"),
                B::BadSignature { .. } => (Refusal::Forbidden, "bad-signature"),
                B::DigestMismatch { .. } | B::SizeMismatch { .. } => {
                    (Refusal::Forbidden, "tampered")
                }
                B::Expired { .. } | B::CreatedInFuture { .. } => {
                    (Refusal::Forbidden, "outside-validity")
                }
                B::TooLarge { .. } => (Refusal::TooLarge, "too-large"),
                _ => (Refusal::Invalid, "invalid-bundle"),
            },
            BundleRefused::Load(l) => match l {
                L::Policy(_) => (Refusal::Forbidden, "over-policy"),
                L::UndeclaredImports(_) => (Refusal::Forbidden, "undeclared-imports"),
                L::Unavailable(_) => (Refusal::Forbidden, "unavailable-capability"),
                L::TooLarge { .. } => (Refusal::TooLarge, "too-large"),
                L::Cache { .. } => (Refusal::Internal, "internal"),
                _ => (Refusal::Unprocessable, "invalid-component"),
            },
            BundleRefused::Version(v) => match v {
                AcceptError::Downgrade { .. } => (Refusal::Conflict, "version-downgrade"),
                AcceptError::Conflict { .. } => (Refusal::Conflict, "version-conflict"),
                AcceptError::Expired { .. } => (Refusal::Forbidden, "outside-validity"),
                AcceptError::BadVersion(_) => (Refusal::Invalid, "invalid-bundle"),
                AcceptError::Store(_) => (Refusal::Internal, "internal"),
            },
            BundleRefused::Untrusted { .. } => (Refusal::Forbidden, "untrusted-signer"),
            BundleRefused::Expired { .. } => (Refusal::Forbidden, "outside-validity"),
            BundleRefused::Internal(_) => (Refusal::Internal, "internal"),
        }
    }
}
