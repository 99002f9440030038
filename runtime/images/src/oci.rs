//! Images from an OCI distribution registry (spec v2): the manifest by tag
//! or digest, each layer blob downloaded and verified against its digest,
//! layers applied in order with whiteouts and opaque directories.
//!
//! Registries that require authentication are not supported yet.

use serde::Deserialize;

use crate::reference::{Digest, OciRef};
use crate::{Download, Images, ImportError, error_chain};

/// Largest manifest or index accepted.
const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Most layers one image may have.
pub const MAX_LAYERS: usize = 128;

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Layer media types provd unpacks; compression is detected from content.
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

fn sha256_digest(d: &str) -> Option<Digest> {
    let hex = d.strip_prefix("sha256:")?;
    let ok = hex.len() == 64 && hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    ok.then(|| Digest { algorithm: "sha256", hex: hex.to_string() })
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A layer a manifest lists, checked: a type provd unpacks, a sha256
/// digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    /// Its digest.
    pub digest: Digest,
    /// Its size as the manifest gives it (the download is held to it).
    pub size: u64,
}

/// What a manifest document asks for next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestDoc {
    /// An image index: the digest of the manifest for linux/amd64 (or the
    /// first one listed).
    Index(Digest),
    /// An image manifest: its layers, bottom first.
    Image(Vec<LayerRef>),
}

/// Reads a manifest or index a registry sent for the image `key`, and
/// checks everything later steps rely on: JSON, media types, at most
/// [`MAX_LAYERS`] layers, every digest `sha256:<64 hex>` (digests become
/// URL paths).
pub fn parse_manifest(key: &str, bytes: &[u8]) -> Result<ManifestDoc, ImportError> {
    let source = |detail: String| ImportError::Source { reference: key.to_string(), detail };
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ImportError::Limit {
            reference: key.into(),
            what: "manifest bytes".into(),
            limit: MAX_MANIFEST_BYTES as u64,
        });
    }
    let manifest: Manifest = serde_json::from_slice(bytes)
        .map_err(|e| source(format!("manifest is not valid JSON: {e}")))?;
    if INDEX_TYPES.contains(&manifest.media_type.as_str()) || !manifest.manifests.is_empty() {
        // An index: pick this machine's platform.
        let chosen = manifest
            .manifests
            .iter()
            .find(|m| {
                m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .or_else(|| manifest.manifests.first())
            .ok_or_else(|| source("image index lists no manifests".into()))?;
        let digest = sha256_digest(&chosen.digest).ok_or_else(|| {
            source(format!("image index names manifest {:?}, not sha256:<hex>", chosen.digest))
        })?;
        return Ok(ManifestDoc::Index(digest));
    }
    if !manifest.media_type.is_empty() && !MANIFEST_TYPES.contains(&manifest.media_type.as_str()) {
        return Err(source(format!("unsupported manifest type {}", manifest.media_type)));
    }
    if manifest.layers.len() > MAX_LAYERS {
        return Err(ImportError::Limit {
            reference: key.into(),
            what: "layers".into(),
            limit: MAX_LAYERS as u64,
        });
    }
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (i, layer) in manifest.layers.iter().enumerate() {
        if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
            return Err(source(format!(
                "layer {i} has media type {:?}, which provd does not unpack",
                layer.media_type
            )));
        }
        let digest = sha256_digest(&layer.digest).ok_or_else(|| {
            source(format!("layer {i} digest {:?} is not sha256:<hex>", layer.digest))
        })?;
        layers.push(LayerRef { digest, size: layer.size });
    }
    Ok(ManifestDoc::Image(layers))
}

impl Images {
    /// Fetches the manifest and downloads every layer, verified. Returns the
    /// layers in order and the manifest's digest.
    pub(crate) async fn fetch_oci(
        &self,
        key: &str,
        r: &OciRef,
    ) -> Result<(Vec<Download>, String), ImportError> {
        let source = |detail: String| ImportError::Source { reference: key.to_string(), detail };
        let scheme = if r.plain_http { "http" } else { "https" };
        let base = format!("{scheme}://{}/v2/{}", r.registry, r.repository);

        let (mut bytes, mut digest) = self.manifest(key, &base, &r.tag_or_digest).await?;
        if r.is_digest() && digest != r.tag_or_digest {
            return Err(source(format!(
                "manifest digest mismatch: asked for {}, got {digest}",
                r.tag_or_digest
            )));
        }
        let layers = match parse_manifest(key, &bytes)? {
            ManifestDoc::Image(layers) => layers,
            ManifestDoc::Index(wanted) => {
                let wanted = wanted.to_string();
                (bytes, digest) = self.manifest(key, &base, &wanted).await?;
                if digest != wanted {
                    return Err(source(format!(
                        "manifest digest mismatch: asked for {wanted}, got {digest}"
                    )));
                }
                match parse_manifest(key, &bytes)? {
                    ManifestDoc::Image(layers) => layers,
                    ManifestDoc::Index(_) => {
                        return Err(source(format!("manifest {wanted} is an index again")));
                    }
                }
            }
        };
        let mut downloads = Vec::with_capacity(layers.len());
        for (i, layer) in layers.iter().enumerate() {
            let url = format!("{base}/blobs/{}", layer.digest);
            let download = self
                .download(key, &url, &layer.digest, Some(layer.size))
                .await
                .map_err(|e| match e {
                    ImportError::Source { reference, detail } => ImportError::Source {
                        reference,
                        detail: format!("layer {i} ({}): {detail}", layer.digest),
                    },
                    other => other,
                })?;
            downloads.push(download);
        }
        Ok((downloads, digest))
    }

    /// GETs a manifest; returns its bytes and their sha256 digest.
    async fn manifest(
        &self,
        key: &str,
        base: &str,
        reference: &str,
    ) -> Result<(Vec<u8>, String), ImportError> {
        let source = |detail: String| ImportError::Source { reference: key.to_string(), detail };
        let accept = [MANIFEST_TYPES, INDEX_TYPES].concat().join(", ");
        let stall = self.http_config.stall_timeout;
        let request =
            self.client(key)?.get(format!("{base}/manifests/{reference}")).header("Accept", accept);
        let mut response = tokio::time::timeout(stall, request.send())
            .await
            .map_err(|_| source(format!("no response within {stall:?}")))?
            .map_err(|e| source(format!("manifest request failed: {}", error_chain(&e))))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(source(format!(
                "registry answered {} for manifest {reference}",
                response.status()
            )));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = tokio::time::timeout(stall, response.chunk())
            .await
            .map_err(|_| source("manifest download stalled".into()))?
            .map_err(|e| source(format!("manifest download failed: {}", error_chain(&e))))?
        {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_MANIFEST_BYTES {
                return Err(ImportError::Limit {
                    reference: key.into(),
                    what: "manifest bytes".into(),
                    limit: MAX_MANIFEST_BYTES as u64,
                });
            }
        }
        let digest = format!("sha256:{}", sha256_hex(&bytes));
        Ok((bytes, digest))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn an_index_picks_linux_amd64_and_its_digest_must_be_sha256() {
        let hex = "a".repeat(64);
        let index = format!(
            r#"{{"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
                {{"digest": "sha256:{}", "size": 1, "platform": {{"architecture": "arm64", "os": "linux"}}}},
                {{"digest": "sha256:{hex}", "size": 1, "platform": {{"architecture": "amd64", "os": "linux"}}}}]}}"#,
            "b".repeat(64)
        );
        match parse_manifest("k", index.as_bytes()).unwrap() {
            ManifestDoc::Index(d) => assert_eq!(d.hex, hex),
            ManifestDoc::Image(_) => panic!("an index"),
        }
        let traversal =
            r#"{"manifests": [{"digest": "../../../v2/other/manifests/latest", "size": 1}]}"#;
        let e = parse_manifest("k", traversal.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("not sha256:<hex>"), "{e}");
    }

    #[test]
    fn a_manifest_checks_every_layer() {
        let hex = "c".repeat(64);
        let ok = format!(
            r#"{{"layers": [{{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:{hex}", "size": 9}}]}}"#
        );
        assert_eq!(
            parse_manifest("k", ok.as_bytes()).unwrap(),
            ManifestDoc::Image(vec![LayerRef {
                digest: Digest { algorithm: "sha256", hex: hex.clone() },
                size: 9
            }])
        );
        let foreign = ok.replace("tar+gzip", "foreign");
        assert!(
            parse_manifest("k", foreign.as_bytes()).unwrap_err().to_string().contains("layer 0")
        );
        let layers: Vec<String> = (0..=MAX_LAYERS)
            .map(|_| format!(r#"{{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:{hex}", "size": 1}}"#))
            .collect();
        let many = format!(r#"{{"layers": [{}]}}"#, layers.join(","));
        assert!(matches!(parse_manifest("k", many.as_bytes()), Err(ImportError::Limit { .. })));
        assert!(parse_manifest("k", b"{not json").is_err());
    }
}
