//! Plugins: deploy a bundle, list bundles, roll back or pin a version.

use std::path::Path;

use anyhow::{Context as _, Result};
use provd_client::encode;
use provd_wire as wire;
use serde_json::json;

use super::{Target, decoded, exit_of, fan_out, load_target, print};

pub(super) async fn deploy(bundle: &Path, target: &Target) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let bytes = std::fs::read(bundle).with_context(|| format!("reading {}", bundle.display()))?;
    let results = fan_out(&nodes, &tls, |c| {
        let bytes = bytes.clone();
        async move { decoded::<wire::BundleAnswer>(c.deploy(bytes).await) }
    })
    .await;
    print(&results, target.json, |v| {
        let b = &v.bundle;
        let what = if b.new { "accepted" } else { "already accepted" };
        format!("{} {} {what} (signer {})", b.name, b.version, b.signer)
    });
    Ok(exit_of(&results))
}

pub(super) async fn bundles(target: &Target) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let results = fan_out(&nodes, &tls, |c| async move {
        decoded::<wire::BundleList>(c.get("/v1/bundles").await)
    })
    .await;
    print(&results, target.json, |v| {
        let mut out = String::new();
        for b in &v.bundles {
            let active = if b.active { "  (active)" } else { "" };
            out.push_str(&format!(
                "{} {} {} signer {}{active}\n",
                b.name, b.version, b.digest, b.signer
            ));
        }
        if out.is_empty() {
            out.push_str("no bundles\n");
        }
        out
    });
    Ok(exit_of(&results))
}

pub(super) async fn rollback(plugin: &str, to: Option<String>, target: &Target) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let results = fan_out(&nodes, &tls, |c| {
        let (path, body) = match &to {
            Some(v) => (
                format!("/v1/plugins/{}/activate", encode(plugin)),
                json!(wire::ActivateRequest { version: v.clone() }),
            ),
            None => (format!("/v1/plugins/{}/rollback", encode(plugin)), json!({})),
        };
        async move { decoded::<wire::Activated>(c.post_json(&path, &body).await) }
    })
    .await;
    print(&results, target.json, |v| format!("{}: {} -> {}", v.plugin, v.previous, v.active));
    Ok(exit_of(&results))
}
