//! A client of provd's HTTP API (`docs/api.md`): mutual TLS with the
//! manager's certificate, the node's error codes kept.
//!
//! Answers decode into `provd_wire`'s types ([`Answer::decode`], and the
//! typed calls [`Client::start`], [`Client::operation`], [`Client::wait`]);
//! the raw JSON stays available in [`Answer::body`] for tools and tests
//! that look at the wire itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use provd_wire as wire;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize as _;
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
    url: String,
}

impl Answer {
    /// The body as the API's type `T`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClientError> {
        T::deserialize(&self.body).map_err(|e| ClientError::Protocol {
            url: self.url.clone(),
            message: format!("status {}: {e}", self.status),
        })
    }
}

/// The node's error code and message in an error body.
fn api_error(status: u16, body: &Value) -> ClientError {
    match wire::ErrorBody::deserialize(body) {
        Ok(e) => ClientError::Api { status, code: e.error.code, message: e.error.message },
        Err(_) => ClientError::Api { status, code: "unknown".into(), message: String::new() },
    }
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
            return Err(api_error(status, &body));
        }
        Ok(Answer { status, body, url: url.into() })
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
            return Err(api_error(status, &serde_json::from_str(&text).unwrap_or_default()));
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

    /// Starts an operation from a request as JSON (which may be one the
    /// node refuses); the answer holds `operation.id`.
    pub async fn provision(&self, request: &Value) -> Result<Answer, ClientError> {
        self.post_json("/v1/operations", request).await
    }

    /// Starts an operation; returns it, and whether it is new (`false`: its
    /// idempotency key named one started before).
    pub async fn start(
        &self,
        request: &wire::OperationRequest,
    ) -> Result<(wire::Operation, bool), ClientError> {
        let body = serde_json::to_value(request).map_err(|e| ClientError::Protocol {
            url: self.url("/v1/operations"),
            message: format!("encoding the request: {e}"),
        })?;
        let answer = self.provision(&body).await?;
        let started: wire::OperationAnswer = answer.decode()?;
        Ok((started.operation, answer.status == 202))
    }

    /// The operation `id`, waiting up to `wait` for a change past `since`.
    pub async fn operation(
        &self,
        id: &str,
        wait: Option<(u64, u64)>,
    ) -> Result<wire::Operation, ClientError> {
        let id = encode(id);
        let path = match wait {
            Some((secs, since)) => format!("/v1/operations/{id}?wait={secs}&since={since}"),
            None => format!("/v1/operations/{id}"),
        };
        Ok(self.get(&path).await?.decode::<wire::OperationAnswer>()?.operation)
    }

    /// Follows operation `id` by long polls until it finishes, calling
    /// `progress` with each new state; returns the finished operation.
    pub async fn wait(
        &self,
        id: &str,
        mut progress: impl FnMut(&wire::Operation),
    ) -> Result<wire::Operation, ClientError> {
        let mut since = u64::MAX;
        loop {
            let op = self.operation(id, Some((30, since))).await?;
            progress(&op);
            if op.state != wire::OperationState::Running {
                return Ok(op);
            }
            match op.seq {
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
