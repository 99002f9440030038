//! `provd serve`: the node daemon.
//!
//! A remote manager reaches the node over HTTPS with a client certificate
//! (mutual TLS); the API (`api`) accepts signed bundles, starts operations
//! that run supervised (`provd_node::operations`), and serves the node's state, its audit
//! trail and its metrics. `docs/api.md` is the reference and
//! `docs/security.md` the threat model.

pub mod access;
pub mod api;
pub mod config;
pub mod log;
pub mod metrics;
pub mod serve;
pub mod tls;

pub use config::Config;
pub use serve::{Bound, serve};
