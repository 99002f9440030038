//! A client of provd's HTTP API (`docs/api.md`): mutual TLS with the
//! manager's certificate, JSON in and out, the node's error codes kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

/// The files that identify a manager and the node's CA.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA certificate(s) that sign node certificates.
    pub ca: PathBuf,
    /// The manager's certificate chain and key; without them the node
    /// refuses the connection.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Why a call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// a local file could not be used
    #[error("{path}: {message}")]
    File { path: String, message: String },
    /// no HTTP exchange happened: connection, TLS handshake, timeout
    #[error("cannot reach {url}: {message}")]
    Connect { url: String, message: String },
    /// the node answered with an error
    #[error("{status} {code}: {message}")]
    Api { status: u16, code: String, message: String },
    /// the answer was not what the API documents
    #[error("unexpected answer from {url}: {message}")]
    Protocol { url: String, message: String },
}

impl ClientError {
    /// The node's error code, when the node answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn file_error(path: &Path, message: impl ToString) -> ClientError {
    ClientError::File { path: path.display().to_string(), message: message.to_string() }
}

fn pem(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| file_error(path, e))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = CertificateDer::pem_slice_iter(&pem(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// Longest answer read from a node (a page of 5000 layer entries is about
/// 1 MiB; an operation with its report, at most a few).
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

/// The rustls configuration for `files`.
pub fn tls_config(files: &TlsFiles) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs(&files.ca)? {
        roots.add(ca).map_err(|e| file_error(&files.ca, e))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| file_error(&files.ca, e))?
        .with_root_certificates(roots);
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let key_der =
                PrivateKeyDer::from_pem_slice(&pem(key)?).map_err(|e| file_error(key, e))?;
            builder.with_client_auth_cert(certs(cert)?, key_der).map_err(|e| file_error(cert, e))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(p), None) | (None, Some(p)) => {
            Err(file_error(p, "a client certificate needs both --cert and --key"))
        }
    }
}

/// One node's API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

/// A successful answer: status and JSON body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Client {
    /// A client of the node at `base` (`https://host:port`).
    pub fn new(base: &str, files: &TlsFiles) -> Result<Client, ClientError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(files)?)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| ClientError::Connect { url: base.into(), message: e.to_string() })?;
        Ok(Client { http, base: base.trim_end_matches('/').to_string() })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<Answer, ClientError> {
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Connect { url: url.into(), message: error_chain(&e) })?;
        let status = resp.status().as_u16();
        // A node's answer is read chunk by chunk up to a bound: a node that
        // sends without end must not exhaust the manager's memory.
        let mut resp = resp;
        let mut bytes = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| ClientError::Connect { url: url.into(), message: error_chain(&e) })?
        {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(ClientError::Protocol {
                    url: url.into(),
                    message: format!("answer longer than {MAX_ANSWER_BYTES} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        let body: Value = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            url: url.into(),
            message: format!("status {status}, body is not JSON: {e}"),
        })?;
        if status >= 400 {
            let code = body
                .pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string();
            let message =
                body.pointer("/error/message").and_then(Value::as_str).unwrap_or("").to_string();
            return Err(ClientError::Api { status, code, message });
        }
        Ok(Answer { status, body })
    }

    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        let url = self.url(path);
        self.send(self.http.get(&url), &url).await
    }

    /// The raw text of a GET (for `/metrics`).
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let url = self.url(path);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| ClientError::Connect { url: url.clone(), message: error_chain(&e) })?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::Connect { url: url.clone(), message: error_chain(&e) })?;
        if status >= 400 {
            let body: Value = serde_json::from_str(&text).unwrap_or_default();
            let code = body.pointer("/error/code").and_then(Value::as_str).unwrap_or("unknown");
            let message = body.pointer("/error/message").and_then(Value::as_str).unwrap_or("");
            return Err(ClientError::Api { status, code: code.into(), message: message.into() });
        }
        Ok(text)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Answer, ClientError> {
        let url = self.url(path);
        self.send(self.http.post(&url).json(body), &url).await
    }

    pub async fn post_bytes(&self, path: &str, bytes: Vec<u8>) -> Result<Answer, ClientError> {
        let url = self.url(path);
        let req =
            self.http.post(&url).header("content-type", "application/octet-stream").body(bytes);
        self.send(req, &url).await
    }

    pub async fn delete(&self, path: &str) -> Result<Answer, ClientError> {
        let url = self.url(path);
        self.send(self.http.delete(&url), &url).await
    }

    /// Uploads a signed bundle.
    pub async fn deploy(&self, bundle: Vec<u8>) -> Result<Answer, ClientError> {
        self.post_bytes("/v1/bundles", bundle).await
    }

    /// Starts an operation; the answer holds `operation.id`.
    pub async fn provision(&self, request: &Value) -> Result<Answer, ClientError> {
        self.post_json("/v1/operations", request).await
    }

    /// The operation `id`, waiting up to `wait` for a change past `since`.
    pub async fn operation(
        &self,
        id: &str,
        wait: Option<(u64, u64)>,
    ) -> Result<Value, ClientError> {
        let id = encode(id);
        let path = match wait {
            Some((secs, since)) => format!("/v1/operations/{id}?wait={secs}&since={since}"),
            None => format!("/v1/operations/{id}"),
        };
        Ok(self.get(&path).await?.body.get("operation").cloned().unwrap_or_default())
    }

    /// Follows operation `id` by long polls until it finishes, calling
    /// `progress` with each new state; returns the finished operation.
    pub async fn wait(
        &self,
        id: &str,
        mut progress: impl FnMut(&Value),
    ) -> Result<Value, ClientError> {
        let mut since = u64::MAX;
        loop {
            let op = self.operation(id, Some((30, since))).await?;
            progress(&op);
            if op.get("state").and_then(Value::as_str) != Some("running") {
                return Ok(op);
            }
            match op.get("seq").and_then(Value::as_u64) {
                Some(seq) => since = seq,
                // Running but not live on the node (its end being recorded):
                // ask again shortly rather than at once.
                None => {
                    since = u64::MAX;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// `text` for a URL path segment or query value: everything but
/// unreserved characters percent-encoded.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An error with its causes, which is where reqwest says what failed
/// (the TLS alert, the refused connection).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
