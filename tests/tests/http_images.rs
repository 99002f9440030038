// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Images over HTTPS from a real TLS server on 127.0.0.1 that the test
//! starts: verified by digest, streamed to a private file, and nothing left
//! behind when the server misbehaves.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use provd_images::{HttpConfig, Images, ImportError, ImportLimits, NoProgress};
use provd_store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone)]
enum Route {
    /// 200 with this body.
    Body(Vec<u8>),
    /// Announces `announced` bytes, sends `sent`, then goes silent.
    Stall { sent: Vec<u8>, announced: usize },
    /// Announces `announced` bytes, sends `sent`, then closes.
    Short { sent: Vec<u8>, announced: usize },
    /// Announces the body's length, then sends more after it.
    Extra { body: Vec<u8>, extra: Vec<u8> },
    /// Waits until the gate opens, then answers 200 with the body.
    Gate(Arc<tokio::sync::Notify>, Vec<u8>),
}

struct Server {
    base: String,
    ca_pem: Vec<u8>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

async fn serve(routes: HashMap<&'static str, Route>) -> Server {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let ca_pem = cert.cert.pem().into_bytes();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let routes: Arc<HashMap<String, Route>> =
        Arc::new(routes.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, routes, hits) = (acceptor.clone(), routes.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&request)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
                let head = |len: usize| {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
                };
                match routes.get(&path).cloned() {
                    Some(Route::Body(body)) => {
                        let _ = tls.write_all(head(body.len()).as_bytes()).await;
                        let _ = tls.write_all(&body).await;
                    }
                    Some(Route::Stall { sent, announced }) => {
                        let _ = tls.write_all(head(announced).as_bytes()).await;
                        let _ = tls.write_all(&sent).await;
                        let _ = tls.flush().await;
                        tokio::time::sleep(Duration::from_secs(600)).await;
                    }
                    Some(Route::Short { sent, announced }) => {
                        let _ = tls.write_all(head(announced).as_bytes()).await;
                        let _ = tls.write_all(&sent).await;
                    }
                    Some(Route::Extra { body, extra }) => {
                        let _ = tls.write_all(head(body.len()).as_bytes()).await;
                        let _ = tls.write_all(&body).await;
                        let _ = tls.write_all(&extra).await;
                    }
                    Some(Route::Gate(gate, body)) => {
                        gate.notified().await;
                        let _ = tls.write_all(head(body.len()).as_bytes()).await;
                        let _ = tls.write_all(&body).await;
                    }
                    None => {
                        let _ = tls.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    Server { base, ca_pem, hits }
}

struct Node {
    _dir: tempfile::TempDir,
    data: PathBuf,
    images: Arc<Images>,
}

fn node(server: &Server, stall: Duration) -> Node {
    node_parallel(server, stall, 4)
}

fn node_parallel(server: &Server, stall: Duration, parallel: usize) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Arc::new(Store::open(&data).unwrap());
    let http = HttpConfig {
        extra_roots_pem: vec![server.ca_pem.clone()],
        stall_timeout: stall,
        ..HttpConfig::default()
    };
    let images = Images::new(store, ImportLimits::default(), parallel).with_http(http).unwrap();
    Node { _dir: dir, data, images: Arc::new(images) }
}

impl Node {
    async fn import(&self, reference: &str) -> Result<provd_store::ImageRecord, Arc<ImportError>> {
        self.images.import(reference, Arc::new(NoProgress)).await
    }

    fn assert_empty(&self) {
        let stats = self.images.store().stats().unwrap();
        assert_eq!((stats.images, stats.objects), (0, 0));
        assert!(
            self.images.store().staging_files().unwrap().is_empty(),
            "{:?}",
            self.images.store().staging_files()
        );
        assert_eq!(std::fs::read_dir(self.data.join("objects")).unwrap().count(), 0);
    }
}

fn tarball() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in [("etc/hostname", &b"web\n"[..]), ("usr/lib/libx.so", &[7u8; 50_000][..])] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    gz.finish().unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    // sha256 through a real tool, independent of the code under test.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x");
    std::fs::write(&f, bytes).unwrap();
    let out = std::process::Command::new("sha256sum").arg(&f).output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

#[tokio::test]
async fn an_https_archive_is_verified_by_sha256_or_blake3_and_imported() {
    let body = tarball();
    let server = serve(HashMap::from([("/img.tar.gz", Route::Body(body.clone()))])).await;
    let node = node(&server, Duration::from_secs(10));
    let sha = format!("{}/img.tar.gz#sha256:{}", server.base, sha256_hex(&body));
    let image = node.import(&sha).await.unwrap();
    assert_eq!(image.source, "http");
    assert_eq!(
        image.source_digest.as_deref(),
        Some(format!("sha256:{}", sha256_hex(&body)).as_str())
    );
    assert_eq!((image.files, image.bytes), (2, 50_004));

    let b3 = format!("{}/img.tar.gz#blake3:{}", server.base, blake3::hash(&body).to_hex());
    let same = node.import(&b3).await.unwrap();
    assert_eq!(same.digest, image.digest);
    assert_eq!(node.images.store().stats().unwrap().objects, 2);
    assert!(node.images.store().staging_files().unwrap().is_empty());
}

#[tokio::test]
async fn a_digest_mismatch_is_refused_and_leaves_nothing() {
    let body = tarball();
    let server = serve(HashMap::from([("/img.tar.gz", Route::Body(body))])).await;
    let node = node(&server, Duration::from_secs(10));
    let wrong = "0".repeat(64);
    let err = node.import(&format!("{}/img.tar.gz#sha256:{wrong}", server.base)).await.unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "digest mismatch: expected sha256:{wrong}, the download has sha256:"
        )),
        "{err}"
    );
    node.assert_empty();
}

#[tokio::test]
async fn a_stalled_or_short_download_fails_cleanly_and_a_retry_starts_over() {
    let body = tarball();
    let digest = sha256_hex(&body);
    let server = serve(HashMap::from([
        ("/stall.tar.gz", Route::Stall { sent: body[..100].to_vec(), announced: body.len() }),
        ("/short.tar.gz", Route::Short { sent: body[..100].to_vec(), announced: body.len() }),
        ("/img.tar.gz", Route::Body(body.clone())),
    ]))
    .await;
    let node = node(&server, Duration::from_secs(1));
    let err =
        node.import(&format!("{}/stall.tar.gz#sha256:{digest}", server.base)).await.unwrap_err();
    assert!(
        err.to_string().contains("download stalled: nothing received for 1s after 100 bytes"),
        "{err}"
    );
    node.assert_empty();
    let err =
        node.import(&format!("{}/short.tar.gz#sha256:{digest}", server.base)).await.unwrap_err();
    assert!(err.to_string().contains("after 100 bytes"), "{err}");
    node.assert_empty();
    node.import(&format!("{}/img.tar.gz#sha256:{digest}", server.base)).await.unwrap();
}

#[tokio::test]
async fn bytes_beyond_the_announced_length_are_not_read() {
    let body = tarball();
    let server = serve(HashMap::from([(
        "/img.tar.gz",
        Route::Extra { body: body.clone(), extra: vec![0xAA; 10_000] },
    )]))
    .await;
    let node = node(&server, Duration::from_secs(10));
    let image = node
        .import(&format!("{}/img.tar.gz#sha256:{}", server.base, sha256_hex(&body)))
        .await
        .unwrap();
    assert_eq!(image.files, 2);
}

#[tokio::test]
async fn http_errors_and_untrusted_servers_are_reported() {
    let server = serve(HashMap::new()).await;
    let node = node(&server, Duration::from_secs(10));
    let d = "a".repeat(64);
    let err = node.import(&format!("{}/missing.tar#sha256:{d}", server.base)).await.unwrap_err();
    assert!(err.to_string().contains("server answered 404 Not Found"), "{err}");
    node.assert_empty();

    // A node that does not trust the server's certificate refuses it.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("data")).unwrap());
    let images =
        Images::new(store, ImportLimits::default(), 1).with_http(HttpConfig::default()).unwrap();
    let err = images
        .import(&format!("{}/x.tar#sha256:{d}", server.base), Arc::new(NoProgress))
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");

    let err = node.import(&format!("{}/x.tar", server.base)).await.unwrap_err();
    assert!(err.to_string().contains("needs its digest"), "{err}");
}

#[tokio::test]
async fn twenty_concurrent_requests_download_once() {
    let body = tarball();
    let server = serve(HashMap::from([("/img.tar.gz", Route::Body(body.clone()))])).await;
    let node = node(&server, Duration::from_secs(10));
    let reference = format!("{}/img.tar.gz#sha256:{}", server.base, sha256_hex(&body));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let images = node.images.clone();
        let reference = reference.clone();
        tasks.push(tokio::spawn(async move {
            images.import(&reference, Arc::new(NoProgress)).await.unwrap()
        }));
    }
    let mut digests = Vec::new();
    for t in tasks {
        digests.push(t.await.unwrap().digest);
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(server.hits.lock().unwrap().get("/img.tar.gz"), Some(&1));
}

async fn wait_for_hit(server: &Server, path: &str) {
    let start = std::time::Instant::now();
    while server.hits.lock().unwrap().get(path).is_none() {
        assert!(start.elapsed() < Duration::from_secs(20), "{path} was never requested");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn different_images_import_in_parallel_up_to_the_limit() {
    let body = tarball();
    let digest = sha256_hex(&body);
    for parallel in [1, 2] {
        let gate = Arc::new(tokio::sync::Notify::new());
        let server = serve(HashMap::from([
            ("/slow.tar.gz", Route::Gate(gate.clone(), body.clone())),
            ("/fast.tar.gz", Route::Body(body.clone())),
        ]))
        .await;
        let node = node_parallel(&server, Duration::from_secs(30), parallel);
        let slow = {
            let images = node.images.clone();
            let r = format!("{}/slow.tar.gz#sha256:{digest}", server.base);
            tokio::spawn(async move { images.import(&r, Arc::new(NoProgress)).await })
        };
        wait_for_hit(&server, "/slow.tar.gz").await;
        let fast = {
            let images = node.images.clone();
            let r = format!("{}/fast.tar.gz#sha256:{digest}", server.base);
            tokio::spawn(async move { images.import(&r, Arc::new(NoProgress)).await })
        };
        if parallel == 1 {
            // The only import slot is taken: the second image waits.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(server.hits.lock().unwrap().get("/fast.tar.gz").is_none());
            gate.notify_one();
            slow.await.unwrap().unwrap();
            fast.await.unwrap().unwrap();
        } else {
            // A second slot: the second image completes while the first waits.
            fast.await.unwrap().unwrap();
            assert!(!slow.is_finished());
            gate.notify_one();
            slow.await.unwrap().unwrap();
        }
        assert_eq!(node.images.store().stats().unwrap().images, 2, "parallel {parallel}");
    }
}
