// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The node's trust boundaries, tried as an attacker would against a real
//! daemon over mutual TLS with real certificates: an image reference that
//! climbs to the node's keys, managers without a role or with a smaller one,
//! a revoked certificate, a signer the node no longer trusts, an expired
//! bundle, an older version run without saying so, a flood of idle and slow
//! connections, and a data directory other users could read.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use provd_client::{Client, ClientError, TlsFiles};
use provd_tests::daemon::{DEFAULT_EXTRA, TestNode};
use provd_tests::pki::Identity;
use provd_tests::{HELLO, IMAGER, files_under};
use serde_json::{Value, json};

const PROVD: &str = env!("CARGO_BIN_EXE_provd");

const HELLO_MANIFEST: &str = "name = \"hello\"\nversion = \"VERSION\"\n[capabilities.log]\n\
     [capabilities.progress]\n[capabilities.hashing]\n[limits]\nmemory-mib = 16\n";

fn hello(version: &str) -> String {
    HELLO_MANIFEST.replace("VERSION", version)
}

fn imager(images: &Path) -> String {
    format!(
        "name = \"imager\"\nversion = \"1.0.0\"\n[capabilities.log]\n[capabilities.progress]\n\
         [capabilities.hashing]\n[capabilities.dedup]\n[capabilities.vm]\n[capabilities.partitions]\n\
         [capabilities.images]\nsources = [\"dir:{}/**\"]\n[limits]\nmemory-mib = 128\ntimeout-ms = 120000\n",
        images.display()
    )
}

/// A node allowing `dir:<dir>/images/**`, as scripts/dev-node.sh sets one
/// up: its certificates and keys lie in `<dir>/pki`, beside `images/`.
fn node(dir: &Path, extra: &str) -> TestNode {
    node_with(dir, "", extra)
}

/// [`node`] with `policy` lines added to its `[policy]`.
fn node_with(dir: &Path, policy: &str, extra: &str) -> TestNode {
    let web = dir.join("images/web");
    std::fs::create_dir_all(web.join("etc")).unwrap();
    std::fs::write(web.join("etc/hostname"), "web-1\n").unwrap();
    std::fs::write(web.join("lib.so"), vec![7u8; 100_000]).unwrap();
    let policy = format!(
        "[policy]\nimage-sources = [\"dir:{}/images/**\"]\nmax-memory-mib = 256\n{policy}{DEFAULT_EXTRA}{extra}",
        dir.display()
    );
    TestNode::start(Path::new(PROVD), dir, &policy).unwrap()
}

fn client_as(node: &TestNode, id: &Identity) -> Client {
    let files = TlsFiles {
        ca: node.pki.ca_pem.clone(),
        cert: Some(id.cert.clone()),
        key: Some(id.key.clone()),
    };
    Client::new(&node.url, &files).unwrap()
}

fn admin(node: &TestNode) -> Client {
    client_as(node, &node.manager)
}

fn spec(name: &str, image: &str) -> Value {
    json!({"name": name, "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512, "image": image,
           "boot": {"firmware": "uefi"}, "nics": [{"bridge": "br0", "dhcp4": true}]})
}

fn partitions_params() -> Value {
    json!({"op": "partitions", "min_layer_bytes": 0, "max_layers": 8,
           "shared_format": "erofs", "private_format": "ext4"})
}

fn api_error(e: ClientError) -> (u16, String, String) {
    match e {
        ClientError::Api { status, code, message } => (status, code, message),
        other => panic!("expected an API error, got {other}"),
    }
}

async fn audit(c: &Client, query: &str) -> Vec<Value> {
    c.get(&format!("/v1/audit?{query}")).await.unwrap().body["audit"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_reference_that_climbs_to_the_nodes_keys_is_refused_and_nothing_of_them_is_stored()
{
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let c = admin(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&imager(&images), &IMAGER.wasm())).await.unwrap();
    let keys: Vec<Vec<u8>> = ["managers-ca.key", "node.key", "manager.key"]
        .iter()
        .map(|k| std::fs::read(dir.path().join("pki").join(k)).unwrap())
        .collect();

    let mut refused = Vec::new();
    for (i, image) in [
        format!("dir:{}/images/../pki", dir.path().display()),
        format!("dir:{}/images/web/../../pki", dir.path().display()),
        format!("dir:{}/images/%2e%2e/pki", dir.path().display()),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("thief-{i}");
        let request =
            json!({"plugin": "imager", "vms": [spec(&name, image)], "params": partitions_params()});
        let id = c.provision(&request).await.unwrap().body["operation"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let done = c.wait(&id, |_| {}).await.unwrap();
        assert_eq!(done.state.as_str(), "failed", "{done:?}");
        assert_eq!(done.error_code().unwrap_or_default(), "plugin-invalid-input", "{done:?}");
        refused.push(done.error_message().unwrap_or_default().to_string());
    }
    assert!(refused[0].contains("\"..\" is not accepted in a path"), "{refused:?}");
    assert!(refused[2].contains("percent-encoded"), "{refused:?}");

    // A symbolic link planted under the allowed folder leads nowhere.
    std::os::unix::fs::symlink("../pki", images.join("keys")).unwrap();
    let request = json!({"plugin": "imager",
                         "vms": [spec("thief-link", &format!("dir:{}/keys", images.display()))],
                         "params": partitions_params()});
    let id =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    let done = c.wait(&id, |_| {}).await.unwrap();
    assert_eq!(done.state.as_str(), "failed", "{done:?}");
    assert!(done.error_message().unwrap_or_default().contains("symbolic link"), "{done:?}");

    // The allowed image still provisions; then nothing in the data
    // directory holds any of the keys.
    let request = json!({"plugin": "imager",
                         "vms": [spec("web-1", &format!("dir:{}/web", images.display()))],
                         "params": partitions_params()});
    let id =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    assert_eq!(c.wait(&id, |_| {}).await.unwrap().state.as_str(), "succeeded");
    for file in files_under(&node.data).unwrap() {
        let bytes = std::fs::read(&file).unwrap();
        for key in &keys {
            assert!(!bytes.windows(key.len()).any(|w| w == key.as_slice()), "{}", file.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_certificate_does_only_what_its_role_allows_and_refusals_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let access = "[access]\nadmins = [\"manager-1\"]\noperators = [\"ops-bot\", \"group:sre\"]\n\
                  readers = [\"monitoring\"]\n";
    let node = node(dir.path(), access);
    let admin = admin(&node);
    let images = dir.path().join("images");
    let id = |file: &str, cn: &str| node.pki.client(file, cn).unwrap();
    let unmapped = client_as(&node, &id("ro", "monitoring-readonly"));
    let reader = client_as(&node, &id("mon", "monitoring"));
    let operator = client_as(&node, &id("ops", "ops-bot"));
    let sre = client_as(&node, &node.pki.client_in("alice", "alice", "sre").unwrap());
    // An organisation is a group only where an entry says group:.
    let org_named_like_a_user =
        client_as(&node, &node.pki.client_in("bob", "bob", "manager-1").unwrap());

    admin.deploy(node.bundle(&imager(&images), &IMAGER.wasm())).await.unwrap();
    let request = json!({"plugin": "imager",
                         "vms": [spec("web-1", &format!("dir:{}/web", images.display()))],
                         "params": partitions_params()});
    let op = admin.provision(&request).await.unwrap().body["operation"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(admin.wait(&op, |_| {}).await.unwrap().state.as_str(), "succeeded");

    // No role: only /healthz.
    for c in [&unmapped, &org_named_like_a_user] {
        assert_eq!(c.get("/healthz").await.unwrap().body["status"], "ok");
        for e in [
            c.get("/v1/vms").await.unwrap_err(),
            c.get("/metrics").await.unwrap_err(),
            c.get("/v1/no-such-route").await.unwrap_err(),
            c.delete("/v1/vms/web-1").await.unwrap_err(),
        ] {
            let (status, code, message) = api_error(e);
            assert_eq!((status, code.as_str()), (403, "forbidden"), "{message}");
            assert!(message.contains("has no role"), "{message}");
        }
    }
    assert_eq!(admin.get("/v1/vms/web-1").await.unwrap().body["vm"]["name"], "web-1");

    // A reader reads, and nothing else.
    assert_eq!(reader.get("/v1/vms").await.unwrap().body["vms"].as_array().unwrap().len(), 1);
    reader.get("/v1/audit").await.unwrap();
    for e in [
        reader.delete("/v1/vms/web-1").await.unwrap_err(),
        reader.provision(&request).await.unwrap_err(),
        reader.post_json(&format!("/v1/operations/{op}/cancel"), &json!({})).await.unwrap_err(),
    ] {
        let (status, _, message) = api_error(e);
        assert_eq!(status, 403, "{message}");
        assert!(
            message.contains("needs the operator role") && message.contains("has reader"),
            "{message}"
        );
    }

    // Operators (by name or by group) run operations and delete VMs, but
    // do not change what the node runs.
    for c in [&operator, &sre] {
        let (status, _, message) =
            api_error(c.deploy(node.bundle(&hello("1.0.0"), &HELLO.wasm())).await.unwrap_err());
        assert_eq!(status, 403, "{message}");
        assert!(message.contains("needs the admin role"), "{message}");
        let (status, _, _) =
            api_error(c.post_json("/v1/plugins/imager/rollback", &json!({})).await.unwrap_err());
        assert_eq!(status, 403);
    }
    let deleted = sre.delete("/v1/vms/web-1").await.unwrap().body;
    assert_eq!(deleted["operation"]["state"], "succeeded");
    assert_eq!(deleted["operation"]["actor"], "alice");

    // Every refusal is on the record with who asked.
    let rows = audit(&admin, "kind=access&limit=1000").await;
    let by = |actor: &str| rows.iter().filter(|r| r["actor"] == actor).count();
    assert_eq!(by("monitoring-readonly"), 4);
    assert_eq!(by("bob"), 4);
    assert_eq!(by("monitoring"), 3);
    assert_eq!(by("ops-bot") + by("alice"), 4);
    let row = rows
        .iter()
        .find(|r| r["actor"] == "monitoring-readonly" && r["args"] == "DELETE /v1/vms/web-1")
        .unwrap();
    assert_eq!(row["outcome"], "denied");
}

/// `openssl ca` over the test CA: revokes `cert` (when given) and writes
/// the CA's current revocation list to `out`.
fn openssl_crl(node: &TestNode, revoke: Option<&Path>, out: &Path) {
    let ca_dir = node.dir.join("openssl-ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    let cnf = ca_dir.join("ca.cnf");
    if !cnf.exists() {
        std::fs::write(ca_dir.join("index.txt"), "").unwrap();
        std::fs::write(ca_dir.join("crlnumber"), "1000\n").unwrap();
        std::fs::write(
            &cnf,
            format!(
                "[ca]\ndefault_ca = test\n[test]\ndatabase = {}\ncrlnumber = {}\n\
                 default_md = sha256\ndefault_crl_days = 7\n",
                ca_dir.join("index.txt").display(),
                ca_dir.join("crlnumber").display()
            ),
        )
        .unwrap();
    }
    let ca = |extra: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new("openssl")
            .arg("ca")
            .arg("-config")
            .arg(&cnf)
            .arg("-keyfile")
            .arg(&node.pki.ca_key)
            .arg("-cert")
            .arg(&node.pki.ca_pem)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl ca: {}", String::from_utf8_lossy(&out.stderr));
    };
    if let Some(cert) = revoke {
        ca(&["-revoke".as_ref(), cert.as_os_str()]);
    }
    ca(&["-gencrl".as_ref(), "-out".as_ref(), out.as_os_str()]);
}

fn hangup(node: &TestNode) {
    let pid = node.pid().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_revoked_by_the_ca_fails_the_handshake_once_provd_rereads_its_crl() {
    let dir = tempfile::tempdir().unwrap();
    let crl = dir.path().join("managers.crl");
    // The node starts with the CA's list, which revokes nothing yet (the
    // CA is made with the node, so the list is added on a restart).
    let access = "[access]\nadmins = [\"manager-1\", \"laptop\"]\n";
    let mut node = node(dir.path(), access);
    openssl_crl(&node, None, &crl);
    let text = std::fs::read_to_string(&node.config).unwrap();
    let text = text.replace("[tls]\n", &format!("[tls]\ncrl = {crl:?}\n"));
    std::fs::write(&node.config, text).unwrap();
    node.terminate();
    node.restart().unwrap();

    let laptop = node.pki.client("laptop", "laptop").unwrap();
    let admin = admin(&node);
    let stolen = client_as(&node, &laptop);
    assert_eq!(stolen.get("/v1/vms").await.unwrap().status, 200);

    // Revoked at the CA: until provd reads the new list, the certificate
    // still works; SIGHUP makes the daemon read it without a restart.
    openssl_crl(&node, Some(&laptop.cert), &crl);
    assert_eq!(client_as(&node, &laptop).get("/healthz").await.unwrap().status, 200);
    let pid = node.pid();
    hangup(&node);
    let mut refused = None;
    for _ in 0..100 {
        match client_as(&node, &laptop).get("/healthz").await {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let e = refused.expect("the revoked certificate was still accepted after SIGHUP");
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    // The same process, and the other managers are untouched.
    assert_eq!(node.pid(), pid);
    assert_eq!(admin.get("/v1/vms").await.unwrap().status, 200);
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(log.contains("SIGHUP: TLS certificates and revocation lists read again"), "{log}");

    // A broken list on SIGHUP keeps the one in use.
    std::fs::write(&crl, "not a CRL\n").unwrap();
    hangup(&node);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client_as(&node, &node.manager).get("/v1/vms").await.unwrap().status, 200);
    assert!(client_as(&node, &laptop).get("/healthz").await.is_err());
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(log.contains("SIGHUP: TLS files refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn trust_is_checked_at_every_run_and_older_versions_run_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(dir.path(), "");
    let c = admin(&node);
    c.deploy(node.bundle(&hello("1.0.0"), &HELLO.wasm())).await.unwrap();
    c.deploy(node.bundle(&hello("1.1.0"), &HELLO.wasm())).await.unwrap();
    let run = |body: Value| {
        let c = &c;
        async move {
            match c.provision(&body).await {
                Ok(a) => {
                    let id = a.body["operation"]["id"].as_str().unwrap().to_string();
                    Ok(c.wait(&id, |_| {}).await.unwrap())
                }
                Err(e) => Err(api_error(e)),
            }
        }
    };
    let params = json!({"name": "trust", "items": ["a"]});
    assert_eq!(
        run(json!({"plugin": "hello", "params": params})).await.unwrap().state.as_str(),
        "succeeded"
    );

    // An older accepted version: refused unless the request says so, and
    // then on the record.
    let (status, code, message) =
        run(json!({"plugin": "hello", "version": "1.0.0", "params": params})).await.unwrap_err();
    assert_eq!((status, code.as_str()), (409, "inactive-version"), "{message}");
    assert!(message.contains("1.1.0") && message.contains("allow-inactive"), "{message}");
    let done = run(json!({"plugin": "hello", "version": "1.0.0", "allow-inactive": true,
                         "params": params}))
    .await
    .unwrap();
    assert_eq!((done.state.as_str(), done.version.as_str()), ("succeeded", "1.0.0"));
    let rows = audit(&c, "outcome=inactive-version").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["actor"], "manager-1");

    // A bundle that expires: it runs while valid, not after.
    let deployed = std::time::Instant::now();
    c.deploy(node.bundle_valid_for(&hello("1.2.0"), &HELLO.wasm(), 5)).await.unwrap();
    assert_eq!(run(json!({"plugin": "hello", "params": params})).await.unwrap().version, "1.2.0");
    tokio::time::sleep(Duration::from_millis(6_000).saturating_sub(deployed.elapsed())).await;
    let (status, code, message) =
        run(json!({"plugin": "hello", "params": params})).await.unwrap_err();
    assert_eq!((status, code.as_str()), (403, "untrusted-bundle"), "{message}");
    assert!(message.contains("hello 1.2.0 expired"), "{message}");

    // The signer's key leaves trusted-keys: after a restart, nothing it
    // signed runs, whatever version is named.
    let other = provd_bundle::SigningKey::generate().unwrap();
    let other_pub = dir.path().join("other.pub");
    other.public_key().write_file(&other_pub, "another signer").unwrap();
    let text = std::fs::read_to_string(&node.config).unwrap();
    let line = text.lines().find(|l| l.starts_with("trusted-keys = ")).unwrap().to_string();
    std::fs::write(&node.config, text.replace(&line, &format!("trusted-keys = [{other_pub:?}]")))
        .unwrap();
    node.terminate();
    node.restart().unwrap();
    let c = admin(&node);
    for body in [
        json!({"plugin": "hello", "version": "1.1.0", "allow-inactive": true, "params": params}),
        json!({"plugin": "hello", "version": "1.0.0", "allow-inactive": true, "params": params}),
    ] {
        let e = api_error(c.provision(&body).await.unwrap_err());
        assert_eq!((e.0, e.1.as_str()), (403, "untrusted-bundle"), "{}", e.2);
        assert!(e.2.contains("no longer trusts"), "{}", e.2);
    }
    let rows = audit(&c, "outcome=untrusted-bundle").await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r["actor"] == "manager-1" && r["kind"] == "operation"));
}

/// Opens `n` TCP connections to `addr` that never start a handshake.
fn idle(addr: &str, n: usize) -> Vec<std::net::TcpStream> {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    (0..n)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_slow_connections_from_one_address_do_not_keep_managers_or_the_admin_out() {
    // 1,200 + 200 connections and the other tests' files need more than
    // the usual 1024; the daemon started next inherits the limit.
    let limit = provd_tests::raise_open_files();
    let (idle_n, slow_n) = if limit >= 2048 { (1200, 200) } else { (600, 100) };
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let addr = node.url.trim_start_matches("https://").to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 1,200 idle connections, reopened as the node closes them, and 200
    // that dribble a ClientHello one byte every 500 ms.
    let flood = {
        let (addr, stop) = (addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = idle(&addr, idle_n);
            let mut slow = idle(&addr, slow_n);
            let hello = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
            let mut i = 0;
            let mut opened = held.len() + slow.len();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut slow {
                    let _ = s.write_all(&hello[i % hello.len()..][..1]);
                }
                i += 1;
                // Whatever the node closed is opened again.
                held.retain(|s| {
                    let mut b = [0u8; 1];
                    s.set_nonblocking(true).ok();
                    match (&*s).read(&mut b) {
                        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                        Ok(n) => n > 0,
                    }
                });
                let again = idle(&addr, idle_n - held.len());
                opened += again.len();
                held.extend(again);
                std::thread::sleep(Duration::from_millis(500));
            }
            opened
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..5 {
        // A new client each time: a new connection and handshake. From the
        // flooding address itself a handshake can be closed to make room
        // when 128 newer ones arrive before its ClientHello is read
        // (docs/benchmarks.md: about one in 3,000); a client retries once.
        let mut health = admin(&node).get("/healthz").await;
        if matches!(health, Err(ClientError::Connect { .. })) {
            health = admin(&node).get("/healthz").await;
        }
        assert_eq!(health.unwrap().body["status"], "ok");
    }
    // The admin socket has slots of its own.
    let mut unix = std::os::unix::net::UnixStream::connect(dir.path().join("admin.sock")).unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    unix.write_all(b"GET /healthz HTTP/1.1\r\nHost: provd\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    unix.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened = flood.join().unwrap();
    assert!(opened >= idle_n, "the flood opened only {opened} connections");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_directory_is_the_nodes_own_and_provd_refuses_a_looser_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(dir.path(), "");
    let c = admin(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&imager(&images), &IMAGER.wasm())).await.unwrap();
    let request = json!({"plugin": "imager",
                         "vms": [spec("web-1", &format!("dir:{}/web", images.display()))],
                         "params": partitions_params()});
    let op =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    assert_eq!(c.wait(&op, |_| {}).await.unwrap().state.as_str(), "succeeded");
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&node.data), 0o700);
    let mut checked = 0;
    for file in files_under(&node.data).unwrap() {
        assert_eq!(mode(&file) & 0o077, 0, "{} is {:04o}", file.display(), mode(&file));
        checked += 1;
    }
    assert!(checked >= 8, "{checked}");
    for seen in ["provd.db", "vms/web-1/seed.iso", "vms/web-1/domain.xml"] {
        assert!(node.data.join(seen).exists(), "{seen}");
    }

    // Loosened by hand: provd names the path and does not start.
    node.terminate();
    for (path, loose) in [(node.data.clone(), 0o755), (node.data.join("provd.db"), 0o644)] {
        let before = mode(&path);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(loose)).unwrap();
        let e = node.restart().unwrap_err().to_string();
        assert!(e.contains(&format!("{} is mode {loose:04o}", path.display())), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(before)).unwrap();
    }
    node.restart().unwrap();
    assert_eq!(admin(&node).get("/healthz").await.unwrap().body["status"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_names_an_operation_of_its_own_manager_only() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "[access]\nadmins = [\"manager-1\"]\noperators = [\"ops-bot\"]\n");
    let admin = admin(&node);
    let ops = client_as(&node, &node.pki.client("ops", "ops-bot").unwrap());
    admin.deploy(node.bundle(&hello("1.0.0"), &HELLO.wasm())).await.unwrap();
    let request = |who: &str| json!({"plugin": "hello", "params": {"name": who, "items": []}, "idempotency-key": "nightly-1"});
    let first = admin.provision(&request("a")).await.unwrap();
    assert_eq!(first.status, 202);
    let id = first.body["operation"]["id"].as_str().unwrap().to_string();
    assert_eq!(first.body["operation"]["idempotency-key"], "nightly-1");
    // Another manager, the same key, another request: its own operation,
    // not the first one's record and not a conflict.
    let other = ops.provision(&request("b")).await.unwrap();
    assert_eq!(other.status, 202);
    assert_ne!(other.body["operation"]["id"], id.as_str());
    // The first manager's retry finds its own.
    let again = admin.provision(&request("a")).await.unwrap();
    assert_eq!((again.status, again.body["operation"]["id"].as_str()), (200, Some(id.as_str())));
    let e = api_error(admin.provision(&request("c")).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (409, "idempotency-conflict"));
    assert!(e.2.contains("\"nightly-1\""), "{}", e.2);
}

#[tokio::test(flavor = "multi_thread")]
async fn vms_join_only_the_networks_and_boot_only_the_files_the_node_lists() {
    let dir = tempfile::tempdir().unwrap();
    let policy = "vm-bridges = [\"br0\", \"br-tenant-*\"]\nvm-boot-files = [\"vmlinuz\"]\n\
                  vm-cmdlines = [\"console=ttyS0 *\"]\n";
    let node = node_with(dir.path(), policy, "");
    let c = admin(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&imager(&images), &IMAGER.wasm())).await.unwrap();
    let image = format!("dir:{}/web", images.display());
    let provision = |spec: Value| {
        let c = &c;
        async move {
            c.provision(&json!({"plugin": "imager", "vms": [spec], "params": partitions_params()}))
                .await
        }
    };
    let mut management = spec("a", &image);
    management["nics"] = json!([{"bridge": "mgmt0", "dhcp4": true}, {"tap": "tap0"}]);
    let mut own_kernel = spec("b", &image);
    own_kernel["boot"] =
        json!({"kernel": "other/vmlinuz", "initrd": "initrd.img", "cmdline": "init=/bin/sh"});
    for (spec, expected) in [
        (management, vec!["nics[0].bridge: \"mgmt0\"", "nics[1].tap: \"tap0\""]),
        (
            own_kernel,
            vec!["boot.kernel: \"other/vmlinuz\"", "boot.initrd: \"initrd.img\"", "boot.cmdline"],
        ),
    ] {
        let (status, code, message) = api_error(provision(spec).await.unwrap_err());
        assert_eq!((status, code.as_str()), (403, "over-policy"), "{message}");
        for e in expected {
            assert!(message.contains(e), "{e} missing from {message}");
        }
    }
    assert!(c.get("/v1/vms").await.unwrap().body["vms"].as_array().unwrap().is_empty());
    // Within the lists: provisioned.
    std::fs::create_dir_all(node.data.join("boot")).unwrap();
    std::fs::write(node.data.join("boot/vmlinuz"), b"a kernel").unwrap();
    let mut tenant = spec("c", &image);
    tenant["nics"] = json!([{"bridge": "br-tenant-7", "dhcp4": true}]);
    tenant["boot"] = json!({"kernel": "vmlinuz", "cmdline": "console=ttyS0 quiet"});
    let id = provision(tenant).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    assert_eq!(c.wait(&id, |_| {}).await.unwrap().state.as_str(), "succeeded");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_cannot_rewrite_the_managers_spec_or_build_for_vms_outside_its_operation() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let c = admin(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&imager(&images), &IMAGER.wasm())).await.unwrap();
    let image = format!("dir:{}/web", images.display());
    let run = |body: Value| {
        let c = &c;
        async move {
            let id = c.provision(&body).await.unwrap().body["operation"]["id"]
                .as_str()
                .unwrap()
                .to_string();
            c.wait(&id, |_| {}).await.unwrap()
        }
    };
    // The manager asks for web-1 on br0; the plugin configures it on a
    // management network with its own user-data.
    let mut rewritten = spec("web-1", &image);
    rewritten["nics"] = json!([{"bridge": "mgmt0", "dhcp4": true}]);
    rewritten["cloud-init"] = json!({"user-data": "#cloud-config\nusers: [{name: intruder}]\n"});
    let mut params = partitions_params();
    params["specs"] = json!({"web-1": rewritten.to_string()});
    let done =
        run(json!({"plugin": "imager", "vms": [spec("web-1", &image)], "params": params})).await;
    assert_eq!(done.state.as_str(), "failed", "{done:?}");
    assert_eq!(done.error_code().unwrap_or_default(), "plugin-denied", "{done:?}");
    let message = done.error_message().unwrap_or_default();
    assert!(
        message.contains("differs from the one its operation was given in cloud-init, nics"),
        "{message}"
    );
    // A plan and partitions for a VM the operation does not name.
    let mut params = partitions_params();
    params["vms"] = json!([["victim", image]]);
    let done = run(json!({"plugin": "imager", "params": params})).await;
    assert_eq!(done.error_code().unwrap_or_default(), "plugin-denied", "{done:?}");
    assert!(
        done.error_message()
            .unwrap_or_default()
            .contains("\"victim\" is not among the VMs this operation names"),
        "{done:?}"
    );
    // Nothing of either is left.
    assert!(c.get("/v1/vms").await.unwrap().body["vms"].as_array().unwrap().is_empty());
    assert_eq!(std::fs::read_dir(node.data.join("partitions")).unwrap().count(), 0);
}
