// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The real daemon over HTTPS on 127.0.0.1 with certificates made here:
//! mutual TLS, bundle verification on upload, operations (idempotency,
//! VM-name exclusion, cancel, rollback), the audit trail, metrics,
//! operator rollback, and graceful shutdown. `crashes.rs` kills it.

use std::path::Path;
use std::time::Duration;

use provd_client::{Client, ClientError, TlsFiles};
use provd_tests::daemon::TestNode;
use provd_tests::pki::Pki;
use provd_tests::{HELLO, IMAGER};
use serde_json::{Value, json};

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn only_managers_with_a_certificate_from_the_trusted_ca_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let (ca, cert, key) = node.tls();
    // No client certificate: the handshake fails, no HTTP status at all.
    let anonymous =
        Client::new(&node.url, &TlsFiles { ca: ca.clone(), cert: None, key: None }).unwrap();
    let e = anonymous.get("/healthz").await.unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    // A certificate from another CA.
    let other = Pki::new(&dir.path().join("other"), "other-ca").unwrap();
    let stranger = other.client("stranger", "stranger").unwrap();
    let c = Client::new(
        &node.url,
        &TlsFiles { ca: ca.clone(), cert: Some(stranger.cert), key: Some(stranger.key) },
    )
    .unwrap();
    let e = c.get("/healthz").await.unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    // The manager's certificate.
    let c = Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) }).unwrap();
    let health = c.get("/healthz").await.unwrap().body;
    assert_eq!(health["status"], "ok");
    let e = code(c.get("/v2/anything").await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (404, "not-found"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bundles_are_verified_on_upload_and_every_refusal_is_named_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "[limits]\nmax-bundle-bytes = 4194304\n");
    let c = client(&node);
    let wasm = HELLO.wasm();

    let v2 = node.bundle(&hello("2.0.0"), &wasm);
    let a = c.deploy(v2.clone()).await.unwrap();
    assert_eq!(a.status, 201);
    assert_eq!(a.body["bundle"]["version"], "2.0.0");
    // The identical bundle again: accepted, nothing new.
    assert_eq!(c.deploy(v2.clone()).await.unwrap().status, 200);

    // An older version: a replay or a downgrade.
    let e = code(c.deploy(node.bundle(&hello("1.0.0"), &wasm)).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (409, "version-downgrade"), "{}", e.2);
    // Signed by a key the node does not trust.
    let stranger = provd_bundle::SigningKey::generate().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let unsigned = provd_bundle::build(&hello("3.0.0"), &wasm, now - 60, now + 3600).unwrap();
    let forged = provd_bundle::sign(&unsigned, &stranger).unwrap();
    let e = code(c.deploy(forged).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (403, "untrusted-signer"), "{}", e.2);
    // A component changed after signing.
    let mut tampered = node.bundle(&hello("3.0.1"), &wasm);
    // The component is the bulk of the file: its middle is component bytes.
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0xff;
    let e = code(c.deploy(tampered).await.unwrap_err());
    assert_eq!(e.0, 403, "{e:?}");
    assert!(["tampered", "bad-signature"].contains(&e.1.as_str()), "{e:?}");
    // More memory than the node's policy allows: the exact excess is named.
    let greedy = hello("3.0.2").replace("memory-mib = 16", "memory-mib = 1024");
    let e = code(c.deploy(node.bundle(&greedy, &wasm)).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (403, "over-policy"), "{}", e.2);
    assert!(e.2.contains("memory"), "{}", e.2);
    // Larger than the upload limit: refused from its Content-Length,
    // before the body is read.
    let (status, body) =
        raw_head_only(&node, "/v1/bundles", "application/octet-stream", 5 << 20).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("too-large")), "{body}");
    // Garbage.
    let e = code(c.deploy(b"not a bundle".to_vec()).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (400, "invalid-bundle"), "{}", e.2);

    // Only 2.0.0 is on the node.
    let bundles = c.get("/v1/bundles").await.unwrap().body;
    let versions: Vec<&str> = bundles["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["2.0.0"]);
    // Every upload is on the record, with who sent it.
    let audit = c.get("/v1/audit?kind=bundle").await.unwrap().body;
    let outcomes: Vec<&str> =
        audit["audit"].as_array().unwrap().iter().map(|a| a["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes[..2], ["accepted", "already-accepted"]);
    assert_eq!(outcomes.iter().filter(|o| **o == "refused").count(), 5, "{outcomes:?}");
    assert!(audit["audit"].as_array().unwrap().iter().all(|a| a["actor"] == "manager-1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_json_and_bad_specs_get_errors_that_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let c = client(&node);
    c.deploy(node.bundle(&hello("1.0.0"), &HELLO.wasm())).await.unwrap();

    let raw = reqwest_client(&node);
    let resp = raw
        .post(format!("{}/v1/operations", node.url))
        .header("content-type", "application/json")
        .body("{\"plugin\": \"hello\",")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid-json");

    let e = code(c.provision(&json!({"plugin": "hello", "colour": "red"})).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (400, "invalid-json"));
    assert!(e.2.contains("colour"), "{}", e.2);
    let e = code(c.provision(&json!({"plugin": "nope"})).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (404, "no-such-plugin"));
    let bad = json!({"name": "Bad_Name", "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512, "image": "x"});
    let e = code(c.provision(&json!({"plugin": "hello", "vms": [bad]})).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (400, "invalid-vm-spec"));
    assert!(e.2.starts_with("vms[0]"), "{}", e.2);
    let e = code(c.provision(&json!({"plugin": "hello", "params": [1, 2]})).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (400, "invalid-request"));
    // Nothing to start VMs in on a node without libvirt.
    let e = code(c.provision(&json!({"plugin": "hello", "start": true})).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (400, "invalid-request"));
    assert!(e.2.contains("libvirt-uri"), "{}", e.2);
    // A body over the JSON limit.
    let (status, body) = raw_head_only(&node, "/v1/operations", "application/json", 2 << 20).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("too-large")), "{body}");
}

/// Sends only the head of a POST announcing `length` bytes and reads the
/// answer: a server that refuses by the announced length answers without
/// reading a byte of the body (a client still writing it could instead see
/// the connection close under it).
async fn raw_head_only(
    node: &TestNode,
    path: &str,
    content_type: &str,
    length: usize,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (ca, cert, key) = node.tls();
    let tls = provd_client::tls_config(&TlsFiles { ca, cert: Some(cert), key: Some(key) }).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let addr = node.url.trim_start_matches("https://").to_string();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: node\r\ncontent-type: {content_type}\r\ncontent-length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_string)
                    })
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if len.is_some_and(|len| body.len() >= len) {
                    break;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer before the body was sent");
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn reqwest_client(node: &TestNode) -> reqwest::Client {
    let (ca, cert, key) = node.tls();
    let tls = provd_client::tls_config(&TlsFiles { ca, cert: Some(cert), key: Some(key) }).unwrap();
    reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operation_runs_once_per_idempotency_key_and_reports_progress_audit_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let c = client(&node);
    c.deploy(node.bundle(&hello("1.0.0"), &HELLO.wasm())).await.unwrap();
    let request = json!({"plugin": "hello", "params": {"name": "n1", "items": ["a", "b", "c"]},
                         "idempotency-key": "k-1"});
    let first = c.provision(&request).await.unwrap();
    assert_eq!(first.status, 202);
    let id = first.body["operation"]["id"].as_str().unwrap().to_string();
    let again = c.provision(&request).await.unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(again.body["operation"]["id"], id.as_str());
    let mut other = request.clone();
    other["params"]["name"] = json!("n2");
    let e = code(c.provision(&other).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (409, "idempotency-conflict"));

    let mut seen = Vec::new();
    let done = c.wait(&id, |op| seen.push(op.state.as_str())).await.unwrap();
    assert_eq!(done.state.as_str(), "succeeded", "{done:?}");
    assert_eq!(done.version, "1.0.0");
    assert_eq!(done.report_field("summary"), "hello, n1: hashed 3 items");
    assert_eq!(done.report_field("output").as_array().unwrap().len(), 3);
    assert_eq!(done.actor, "manager-1");

    // The audit trail: the progress and hashing calls, folded with counts.
    let audit = c.get(&format!("/v1/audit?operation={id}")).await.unwrap().body;
    let rows = audit["audit"].as_array().unwrap();
    let count = |f: &str| -> u64 {
        rows.iter().filter(|r| r["function"] == f).map(|r| r["count"].as_u64().unwrap()).sum()
    };
    assert_eq!(count("blake3"), 3, "{audit}");
    assert_eq!(count("report"), 4, "{audit}");
    assert!(rows.iter().all(|r| r["plugin"] == "hello" && r["version"] == "1.0.0"));

    let metrics = c.get_text("/metrics").await.unwrap();
    assert!(metrics.contains("provd_operations_total{outcome=\"succeeded\"} 1"), "{metrics}");
    assert!(
        metrics.contains("provd_host_calls_total{interface=\"hashing\",outcome=\"ok\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("provd_plugin_instantiation_seconds_count{plugin=\"hello\"} 1"),
        "{metrics}"
    );

    // A plugin error is a typed failure.
    let bad = c.provision(&json!({"plugin": "hello", "params": {"name": ""}})).await.unwrap();
    let id = bad.body["operation"]["id"].as_str().unwrap();
    let done = c.wait(id, |_| {}).await.unwrap();
    assert_eq!(done.state.as_str(), "failed");
    assert_eq!(done.error_code().unwrap_or_default(), "plugin-invalid-input", "{done:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_vm_name_is_in_one_operation_at_a_time_and_cancel_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let c = client(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&imager("1.0.0", &images), &IMAGER.wasm())).await.unwrap();
    let web = spec("web-1", &images.join("web"));
    let db = spec("db-1", &images.join("db"));

    let slow = json!({"plugin": "imager", "vms": [web, db], "params": partitions_params(true)});
    let a = c.provision(&slow).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    // Once it waits, it has built its partitions and configured both VMs.
    wait_until(&c, &a, |op| op.phase.as_deref() == Some("waiting")).await;
    let (vms, partitions, _) = node_state(&c, &node.data).await;
    assert_eq!((vms, partitions), (2, 3));

    // The same VM name in another operation, while the first runs.
    let e = code(
        c.provision(&json!({"plugin": "imager", "vms": [spec("web-1", &images.join("web"))],
                                      "params": partitions_params(false)}))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.0, e.1.as_str()), (409, "vm-busy"));
    assert!(e.2.contains(&a), "{}", e.2);

    // Cancel: it stops at its next host call and everything is undone.
    let cancel = c.post_json(&format!("/v1/operations/{a}/cancel"), &json!({})).await.unwrap();
    assert_eq!(cancel.status, 202);
    let done = c.wait(&a, |_| {}).await.unwrap();
    assert_eq!(done.state.as_str(), "cancelled", "{done:?}");
    let (vms, partitions, reserved) = node_state(&c, &node.data).await;
    assert_eq!((vms, partitions), (0, 0));
    assert_eq!(reserved, json!({"vcpus": 0, "memory-mib": 0, "disk-bytes": 0}));
    let e = code(c.post_json(&format!("/v1/operations/{a}/cancel"), &json!({})).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (409, "already-finished"));

    // Now the name is free.
    let quick = json!({"plugin": "imager", "vms": [spec("web-1", &images.join("web"))],
                       "params": partitions_params(false)});
    let b =
        c.provision(&quick).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    let done = c.wait(&b, |_| {}).await.unwrap();
    assert_eq!(done.state.as_str(), "succeeded", "{done:?}");
    let vm = c.get("/v1/vms/web-1").await.unwrap().body;
    assert_eq!(vm["vm"]["operation"], b.as_str());
    // Every decision of the operation is on the record.
    let audit = c.get(&format!("/v1/audit?operation={b}&kind=host-call")).await.unwrap().body;
    let calls: Vec<String> = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}.{}:{}",
                r["interface"].as_str().unwrap(),
                r["function"].as_str().unwrap(),
                r["outcome"].as_str().unwrap()
            )
        })
        .collect();
    for expected in
        ["images.fetch:ok", "dedup.plan:ok", "partitions.create-private:ok", "vm.configure:ok"]
    {
        assert!(calls.iter().any(|c| c == expected), "{expected} missing from {calls:?}");
    }
    let fetch =
        audit["audit"].as_array().unwrap().iter().find(|r| r["function"] == "fetch").unwrap();
    assert!(fetch["args"].as_str().unwrap().contains("images/web"), "{fetch}");

    // Deleting the VM is an operation too, and gives everything back.
    let deleted = c.delete("/v1/vms/web-1").await.unwrap().body;
    assert_eq!(deleted["operation"]["state"], "succeeded");
    let (vms, partitions, reserved) = node_state(&c, &node.data).await;
    assert_eq!((vms, partitions), (0, 0));
    assert_eq!(reserved["vcpus"], 0);
    let e = code(c.delete("/v1/vms/web-1").await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (404, "not-found"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_leaves_running_operations_on_their_version_and_an_operator_can_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(dir.path(), "");
    let c = client(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&imager("1.0.0", &images), &IMAGER.wasm())).await.unwrap();
    let slow = json!({"plugin": "imager", "vms": [spec("web-1", &images.join("web"))],
                      "params": partitions_params(true)});
    let a = c.provision(&slow).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    wait_until(&c, &a, |op| op.phase.as_deref() == Some("waiting")).await;

    c.deploy(node.bundle(&imager("1.1.0", &images), &IMAGER.wasm())).await.unwrap();
    let quick = json!({"plugin": "imager", "vms": [spec("db-1", &images.join("db"))],
                       "params": partitions_params(false)});
    let b =
        c.provision(&quick).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    let done = c.wait(&b, |_| {}).await.unwrap();
    assert_eq!((done.state.as_str(), done.version.as_str()), ("succeeded", "1.1.0"));
    let running = c.operation(&a, None).await.unwrap();
    assert_eq!((running.state.as_str(), running.version.as_str()), ("running", "1.0.0"));
    c.post_json(&format!("/v1/operations/{a}/cancel"), &json!({})).await.unwrap();
    assert_eq!(c.wait(&a, |_| {}).await.unwrap().state.as_str(), "cancelled");

    // The operator rolls back: new operations get 1.0.0 again.
    let r = c.post_json("/v1/plugins/imager/rollback", &json!({})).await.unwrap().body;
    assert_eq!((r["previous"].as_str(), r["active"].as_str()), (Some("1.1.0"), Some("1.0.0")));
    let e = code(c.post_json("/v1/plugins/imager/rollback", &json!({})).await.unwrap_err());
    assert_eq!((e.0, e.1.as_str()), (409, "no-previous-version"));
    c.delete("/v1/vms/db-1").await.unwrap();
    let d =
        c.provision(&quick).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    assert_eq!(c.wait(&d, |_| {}).await.unwrap().version, "1.0.0");
    // A bundle cannot do what the operator did: 1.0.0 stays below the
    // highest accepted, so only the identical 1.1.0 is taken again.
    let e =
        code(c.deploy(node.bundle(&imager("1.0.1", &images), &IMAGER.wasm())).await.unwrap_err());
    assert_eq!(e.1, "version-downgrade");
    // Forward again, explicitly.
    c.post_json("/v1/plugins/imager/activate", &json!({"version": "1.1.0"})).await.unwrap();
    let audit = c.get("/v1/audit?kind=plugin").await.unwrap().body;
    let changes: Vec<&str> =
        audit["audit"].as_array().unwrap().iter().map(|r| r["detail"].as_str().unwrap()).collect();
    assert_eq!(changes, ["active version 1.1.0 -> 1.0.0", "active version 1.0.0 -> 1.1.0"]);

    // SIGTERM: a clean stop, and the state survives it.
    let status = node.terminate().unwrap();
    assert!(status.success(), "{status:?}");
    node.restart().unwrap();
    let c = client(&node);
    let bundles = c.get("/v1/bundles").await.unwrap().body;
    let active: Vec<&str> = bundles["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["active"] == true)
        .map(|b| b["version"].as_str().unwrap())
        .collect();
    assert_eq!(active, ["1.1.0"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_mid_upload_leaves_nothing_and_the_node_serves_on() {
    use tokio::io::AsyncWriteExt as _;
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let (ca, cert, key) = node.tls();
    let tls = provd_client::tls_config(&TlsFiles { ca, cert: Some(cert), key: Some(key) }).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let addr = node.url.trim_start_matches("https://").to_string();
    let bundle = node.bundle(&hello("1.0.0"), &HELLO.wasm());
    for cut in [10, bundle.len() / 2, bundle.len() - 1] {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut stream = connector.connect(name, tcp).await.unwrap();
        let head = format!(
            "POST /v1/bundles HTTP/1.1\r\nhost: node\r\ncontent-type: application/octet-stream\r\n\
             content-length: {}\r\n\r\n",
            bundle.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&bundle[..cut]).await.unwrap();
        stream.flush().await.unwrap();
        drop(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = client(&node);
    assert_eq!(c.get("/v1/bundles").await.unwrap().body["bundles"], json!([]));
    assert_eq!(c.get("/healthz").await.unwrap().body["status"], "ok");
    assert_eq!(c.deploy(bundle).await.unwrap().status, 201);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_requests_for_one_vm_at_the_same_moment_start_one_operation() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let c = client(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&imager("1.0.0", &images), &IMAGER.wasm())).await.unwrap();
    for round in 0..5 {
        let name = format!("race-{round}");
        let request = json!({"plugin": "imager", "vms": [spec(&name, &images.join("web"))],
                             "params": partitions_params(true)});
        let (a, b) = tokio::join!(c.provision(&request), c.provision(&request));
        let (won, lost) = match (a, b) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            (a, b) => panic!("expected one start and one refusal, got {a:?} and {b:?}"),
        };
        let (status, code, _) = code(lost);
        assert_eq!((status, code.as_str()), (409, "vm-busy"));
        let id = won.body["operation"]["id"].as_str().unwrap().to_string();
        c.post_json(&format!("/v1/operations/{id}/cancel"), &json!({})).await.unwrap();
        assert_eq!(c.wait(&id, |_| {}).await.unwrap().state.as_str(), "cancelled");
    }
    assert_eq!(node_state(&c, &node.data).await.0, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_follow_an_operation_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let c = client(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&imager("1.0.0", &images), &IMAGER.wasm())).await.unwrap();
    let slow = json!({"plugin": "imager", "vms": [spec("web-1", &images.join("web"))],
                      "params": partitions_params(true)});
    let id =
        c.provision(&slow).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    wait_until(&c, &id, |op| op.phase.as_deref() == Some("waiting")).await;
    let raw = reqwest_client(&node);
    let events = raw.get(format!("{}/v1/operations/{id}/events", node.url)).send().await.unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let canceller = {
        let c = c.clone();
        let id = id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c.post_json(&format!("/v1/operations/{id}/cancel"), &json!({})).await.unwrap();
        })
    };
    // The stream ends by itself after the `done` event.
    let text = tokio::time::timeout(Duration::from_secs(60), events.text()).await.unwrap().unwrap();
    canceller.await.unwrap();
    assert!(text.contains("event: progress\ndata: {"), "{text}");
    assert!(text.contains("\"phase\":\"waiting\""), "{text}");
    let done = text.split("event: done\ndata: ").nth(1).unwrap().lines().next().unwrap();
    let done: Value = serde_json::from_str(done).unwrap();
    assert_eq!(done["operation"]["state"], "cancelled");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_socket_is_owner_only_and_its_actions_are_recorded_as_local() {
    use std::os::unix::fs::PermissionsExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let socket = dir.path().join("admin.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let bundle = node.bundle(&hello("1.0.0"), &HELLO.wasm());
    let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let head = format!(
        "POST /v1/bundles HTTP/1.1\r\nhost: local\r\nconnection: close\r\n\
         content-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        bundle.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&bundle).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let audit = client(&node).get("/v1/audit?kind=bundle").await.unwrap().body;
    assert_eq!(audit["audit"][0]["actor"], "local");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_stops_a_plugin_that_makes_no_more_host_calls() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let c = client(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&imager("1.0.0", &images), &IMAGER.wasm())).await.unwrap();
    let mut params = partitions_params(false);
    params["then_spin"] = json!(true);
    let spin =
        json!({"plugin": "imager", "vms": [spec("web-1", &images.join("web"))], "params": params});
    let id =
        c.provision(&spin).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    // Configured, then spinning in wasm without host calls.
    for _ in 0..600 {
        if node_state(&c, &node.data).await.0 == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(node_state(&c, &node.data).await.0, 1);
    let asked = std::time::Instant::now();
    c.post_json(&format!("/v1/operations/{id}/cancel"), &json!({})).await.unwrap();
    let done = c.wait(&id, |_| {}).await.unwrap();
    // Its deadline is 120 s away: the cancel, not the deadline, stopped it.
    assert!(asked.elapsed() < Duration::from_secs(30), "{:?}", asked.elapsed());
    assert_eq!(done.state.as_str(), "cancelled", "{done:?}");
    assert_eq!(node_state(&c, &node.data).await.0, 0);
    // The audit trail has the start, the cancel and the end.
    let audit = c.get(&format!("/v1/audit?operation={id}&kind=operation")).await.unwrap().body;
    let steps: Vec<String> = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}:{}", r["function"].as_str().unwrap(), r["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(steps, ["start:started", "cancel:requested", "finish:cancelled"], "{audit}");
}

/// A user starts the daemon from a shell with a relative `--config` whose
/// paths are relative to it: every path is made absolute at load, and a
/// provisioning writes under the node's data directory.
#[tokio::test(flavor = "multi_thread")]
async fn a_relative_config_path_from_another_directory_provisions() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(&dir.path().join("node"), "");
    node.terminate();
    node.use_relative_config().unwrap();
    let text = std::fs::read_to_string(&node.config).unwrap();
    assert!(text.contains("data-dir = \"data\""), "{text}");
    node.restart().unwrap();
    let c = client(&node);
    let images = dir.path().join("node/images");
    c.deploy(node.bundle(&imager("1.0.0", &images), &IMAGER.wasm())).await.unwrap();
    let request = json!({"plugin": "imager", "vms": [spec("web-1", &images.join("web"))],
                         "params": partitions_params(false)});
    let id =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    let done = c.wait(&id, |_| {}).await.unwrap();
    assert_eq!(done.state.as_str(), "succeeded", "{done:?}");
    let xml = std::fs::read_to_string(node.data.join("vms/web-1/domain.xml")).unwrap();
    let data = node.data.canonicalize().unwrap();
    assert!(xml.contains(&format!("<source file=\"{}/partitions/", data.display())), "{xml}");
}

/// Malformed bundles uploaded to a running node, generated from a good one
/// signed by the trusted key: every truncation at 64 points, bit flips at
/// 64 points across header, component and signatures, each section length
/// lying, trailing bytes, another magic or version, the signatures
/// removed. Each is refused with a 4xx code and recorded; the node keeps
/// serving; nothing is added to the data directory but the audit rows; and
/// only the good bundle is ever accepted.
#[tokio::test(flavor = "multi_thread")]
async fn generated_malformed_bundles_are_refused_by_a_running_node_which_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let c = client(&node);
    let good = node.bundle(&hello("1.0.0"), &HELLO.wasm());
    let raw = provd_bundle::container::RawBundle::parse(&good).unwrap();
    let (header_len, component_len) = (raw.header.len(), raw.component.len());
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..64 {
        let at = good.len() * i / 64;
        cases.push((format!("truncated at {at}"), good[..at].to_vec()));
        let mut flipped = good.clone();
        let at = (good.len() * i / 64 + 7).min(good.len() - 1);
        flipped[at] ^= 1 << (i % 8);
        cases.push((format!("bit {} flipped at {at}", i % 8), flipped));
    }
    // Section lengths: header at 10, component after it, signatures last.
    let offsets = [10, 14 + header_len, 18 + header_len + component_len];
    for (s, at) in offsets.iter().enumerate() {
        for delta in [1i64, -1, i64::from(u32::MAX)] {
            let mut b = good.clone();
            let len = u32::from_le_bytes(b[*at..at + 4].try_into().unwrap());
            let lied = if delta == i64::from(u32::MAX) {
                u32::MAX
            } else {
                (i64::from(len) + delta) as u32
            };
            b[*at..at + 4].copy_from_slice(&lied.to_le_bytes());
            cases.push((format!("section {s} length {lied}"), b));
        }
    }
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"trailing");
    cases.push(("trailing bytes".into(), trailing));
    let mut magic = good.clone();
    magic[..8].copy_from_slice(b"PROVDBNX");
    cases.push(("another magic".into(), magic));
    let mut version = good.clone();
    version[8..10].copy_from_slice(&2u16.to_le_bytes());
    cases.push(("format version 2".into(), version));
    let unsigned =
        provd_bundle::container::RawBundle { signatures: b"[]", ..raw }.to_bytes().unwrap();
    cases.push(("no signatures".into(), unsigned));

    let data_before: Vec<String> = {
        let mut v: Vec<String> = walk(&node.data);
        v.retain(|p| !p.starts_with("provd.db"));
        v
    };
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for (what, bytes) in &cases {
        match c.deploy(bytes.clone()).await {
            // Every byte of a bundle is checked (the header signed, the
            // component by its digest, the signatures verified, the
            // container's lengths exact), so every change is refused.
            Ok(answer) => panic!("{what}: accepted with {}", answer.status),
            Err(e) => {
                let (status, code, message) = code(e);
                assert!((400..500).contains(&status), "{what}: {status} {code} {message}");
                *codes.entry(code).or_default() += 1;
            }
        }
        assert!(c.get("/healthz").await.is_ok(), "{what}: the node stopped serving");
    }
    let mut data_after = walk(&node.data);
    data_after.retain(|p| !p.starts_with("provd.db"));
    assert_eq!(data_after, data_before, "a refused bundle left files");
    assert_eq!(c.deploy(good).await.unwrap().status, 201);
    let audit = c.get("/v1/audit?kind=bundle&limit=1000").await.unwrap().body;
    let refused =
        audit["audit"].as_array().unwrap().iter().filter(|a| a["outcome"] == "refused").count();
    assert_eq!(refused, cases.len());
    println!("{} malformed bundles refused: {codes:?}", cases.len());
}

/// Every path under `dir`, relative, sorted.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() {
                todo.push(p);
            }
        }
    }
    out.sort();
    out
}
