// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The real daemon killed (SIGKILL) in the middle of its work, and under
//! concurrent imports, upgrades and deletions: at the next start nothing of
//! an unfinished operation is left, and nothing finished is lost.

use std::path::Path;

use provd_client::Client;
use provd_tests::IMAGER;
use serde_json::{Value, json};

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_in_the_middle_of_an_operation_is_rolled_back_at_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(dir.path(), "");
    let c = client(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&imager("1.0.0", &images), &IMAGER.wasm())).await.unwrap();
    let request = json!({"plugin": "imager",
                         "vms": [spec("web-1", &images.join("web")), spec("db-1", &images.join("db"))],
                         "params": partitions_params(true), "idempotency-key": "kill-me"});
    let id =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    wait_until(&c, &id, |op| op.phase.as_deref() == Some("waiting")).await;
    assert_eq!(node_state(&c, &node.data).await.0, 2);
    assert!(node.data.join("vms/web-1").exists());

    node.kill();
    node.restart().unwrap();
    let c = client(&node);
    let op = c.operation(&id, None).await.unwrap();
    assert_eq!(op.state.as_str(), "failed", "{op:?}");
    assert_eq!(op.error_code().unwrap_or_default(), "interrupted", "{op:?}");
    assert!(op.error_message().unwrap_or_default().contains("2 VM(s), 3 partition(s)"), "{op:?}");
    let (vms, partitions, reserved) = node_state(&c, &node.data).await;
    assert_eq!((vms, partitions), (0, 0));
    assert_eq!(reserved["vcpus"], 0);
    assert!(!node.data.join("vms/web-1").exists());
    assert_eq!(std::fs::read_dir(node.data.join("staging")).unwrap().count(), 0);
    // The names are free again, and the key still names the old operation.
    let again = c.provision(&request).await.unwrap();
    assert_eq!((again.status, again.body["operation"]["id"].as_str().unwrap()), (200, id.as_str()));
    let fresh = json!({"plugin": "imager", "vms": [spec("web-1", &images.join("web"))],
                       "params": partitions_params(false)});
    let b =
        c.provision(&fresh).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    assert_eq!(c.wait(&b, |_| {}).await.unwrap().state.as_str(), "succeeded");
    let audit = c.get(&format!("/v1/audit?operation={id}&kind=operation")).await.unwrap().body;
    let outcomes: Vec<&str> =
        audit["audit"].as_array().unwrap().iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["started", "rolled-back"], "{audit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_while_a_vm_stacks_another_vms_layer_loses_no_layer_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(dir.path(), "");
    let c = client(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&imager("1.0.0", &images), &IMAGER.wasm())).await.unwrap();
    let mut params = partitions_params(false);
    params["node_layers"] = json!(true);
    params["layer_unique_files"] = json!(true);
    let first = json!({"plugin": "imager", "vms": [spec("web-1", &images.join("web"))],
                       "params": params.clone()});
    let a =
        c.provision(&first).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    assert_eq!(c.wait(&a, |_| {}).await.unwrap().state.as_str(), "succeeded");
    let before = node_state(&c, &node.data).await.1;
    assert_eq!(before, 2, "web-1's shared and private partitions");
    // web-2 stacks web-1's layer; the node dies while it runs.
    params["then_wait"] = json!(true);
    let second = json!({"plugin": "imager", "vms": [spec("web-2", &images.join("web"))],
                        "params": params});
    let b =
        c.provision(&second).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    wait_until(&c, &b, |op| op.phase.as_deref() == Some("waiting")).await;
    assert_eq!(node_state(&c, &node.data).await.1, 3, "web-2's private partition, no shared one");
    node.kill();
    node.restart().unwrap();
    let c = client(&node);
    let op = c.operation(&b, None).await.unwrap();
    assert_eq!(op.error_code().unwrap_or_default(), "interrupted", "{op:?}");
    // web-2 is gone; web-1's layer stays, whole, and nothing else is left.
    let (vms, partitions, _) = node_state(&c, &node.data).await;
    assert_eq!((vms, partitions), (1, 2));
    node.terminate();
    let store = provd_store::Store::open(&node.data).unwrap();
    let v = provd_partitions::verify_vm(&store, "web-1", &Default::default()).unwrap();
    assert!(v.is_exact(), "{:?}", v.mismatches);
    assert_eq!(store.layers(false).unwrap()[0].vms, ["web-1"]);
    assert_eq!(std::fs::read_dir(node.data.join("staging")).unwrap().count(), 0);
}

/// Starts a provisioning of `vms` (names) from the web image; returns the
/// operation id or the API error.
async fn start(
    c: &Client,
    images: &Path,
    names: &[String],
) -> Result<String, (u16, String, String)> {
    let vms: Vec<Value> = names.iter().map(|n| spec(n, &images.join("web"))).collect();
    let request = json!({"plugin": "imager", "vms": vms, "params": partitions_params(false)});
    match c.provision(&request).await {
        Ok(a) => Ok(a.body["operation"]["id"].as_str().unwrap().to_string()),
        Err(e) => Err(code(e)),
    }
}

/// Races with exact outcomes: eight operations importing one image at
/// once, an upgrade racing provisionings, and deletions racing the
/// re-provisioning of the same name. After each, the node's VMs,
/// partitions and reservations agree exactly.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_imports_upgrades_and_deletions_end_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), "");
    let c = client(&node);
    let images = dir.path().join("images");
    c.deploy(node.bundle(&imager("1.0.0", &images), &IMAGER.wasm())).await.unwrap();
    // Each VM of the imager holds one private partition; its shared one is
    // used by all of one operation's VMs.
    let check = |expected_vms: usize| {
        let c = &c;
        let data = node.data.clone();
        async move {
            let (vms, _, reserved) = node_state(c, &data).await;
            assert_eq!(vms, expected_vms);
            assert_eq!(reserved["vcpus"], json!(expected_vms), "{reserved}");
            assert_eq!(reserved["memory-mib"], json!(512 * expected_vms), "{reserved}");
        }
    };

    // Eight operations fetch the same image at once: all succeed, and the
    // node holds the image once.
    let names: Vec<String> = (0..8).map(|i| format!("web-{i}")).collect();
    let started = futures::future::join_all(
        names.iter().map(|n| start(&c, &images, std::slice::from_ref(n))),
    )
    .await;
    for (name, id) in names.iter().zip(&started) {
        let id = id.as_ref().unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(c.wait(id, |_| {}).await.unwrap().state.as_str(), "succeeded", "{name}");
    }
    let listed = c.get("/v1/images").await.unwrap().body;
    assert_eq!(listed["images"].as_array().unwrap().len(), 1, "{listed}");
    check(8).await;

    // An upgrade races four provisionings: each runs whole on one version,
    // and every operation started after the upload answered runs the new.
    let bundle = node.bundle(&imager("1.1.0", &images), &IMAGER.wasm());
    let racing: Vec<String> = (0..4).map(|i| format!("up-{i}")).collect();
    let (deployed, ids) = tokio::join!(
        c.deploy(bundle),
        futures::future::join_all(racing.iter().map(|n| start(
            &c,
            &images,
            std::slice::from_ref(n)
        )))
    );
    assert_eq!(deployed.unwrap().status, 201);
    for id in &ids {
        let done = c.wait(id.as_ref().unwrap(), |_| {}).await.unwrap();
        assert_eq!(done.state.as_str(), "succeeded");
        assert!(["1.0.0", "1.1.0"].contains(&done.version.as_str()), "{done:?}");
    }
    let after = start(&c, &images, &["up-after".to_string()]).await.unwrap();
    let done = c.wait(&after, |_| {}).await.unwrap();
    assert_eq!((done.state.as_str(), done.version.as_str()), ("succeeded", "1.1.0"));
    check(13).await;

    // A deletion races the provisioning of the same name, five times: the
    // name is in at most one operation; whichever order they run in, the
    // VM exists exactly when the provisioning succeeded after the delete.
    for round in 0..5 {
        let name = format!("web-{round}");
        let path = format!("/v1/vms/{name}");
        let (deleted, provisioned) =
            tokio::join!(c.delete(&path), start(&c, &images, std::slice::from_ref(&name)));
        let deleted_ok = match deleted {
            Ok(d) => {
                assert_eq!(d.body["operation"]["state"], "succeeded");
                true
            }
            Err(e) => {
                let (status, code, _) = code(e);
                assert_eq!((status, code.as_str()), (409, "vm-busy"), "round {round}");
                false
            }
        };
        let provisioned_ok = match provisioned {
            Ok(id) => {
                let done = c.wait(&id, |_| {}).await.unwrap();
                match Some(done.state.as_str()) {
                    Some("succeeded") => true,
                    // Started before the delete: the old VM still held
                    // the name (its record, or its private partition,
                    // whichever step the plugin reached first).
                    Some("failed") => {
                        let message = done.error_message().unwrap_or_default();
                        assert!(
                            message.contains(&name)
                                && (message.contains("already exists")
                                    || message.contains("already has private partition")),
                            "round {round}: {done:?}"
                        );
                        false
                    }
                    other => panic!("round {round}: {other:?} {done:?}"),
                }
            }
            Err((status, code, _)) => {
                assert_eq!((status, code.as_str()), (409, "vm-busy"), "round {round}");
                false
            }
        };
        assert!(deleted_ok || !provisioned_ok, "round {round}: provisioned over a VM not deleted");
        println!("round {round}: deleted {deleted_ok}, provisioned again {provisioned_ok}");
        let exists = c.get(&format!("/v1/vms/{name}")).await.is_ok();
        assert_eq!(exists, provisioned_ok || !deleted_ok, "round {round}");
    }
    // Whatever the rounds gave, the node's records and disk agree: the
    // reservations are the VMs', every partition on disk is on record and
    // used by a VM on record.
    let (vms, partitions, reserved) = node_state(&c, &node.data).await;
    assert_eq!(reserved["vcpus"], json!(vms), "{reserved}");
    let mut node = node;
    node.terminate();
    let store = provd_store::Store::open(&node.data).unwrap();
    let records = store.partitions().unwrap();
    assert_eq!(records.len(), partitions);
    let names: Vec<String> = store.vms().unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names.len(), vms);
    let mut used = std::collections::BTreeSet::new();
    for n in &names {
        for p in store.partitions_of_vm(n).unwrap() {
            used.insert(p.id);
        }
    }
    let on_record: std::collections::BTreeSet<String> = records.into_iter().map(|p| p.id).collect();
    assert_eq!(used, on_record, "partitions no VM uses");
}

/// SIGKILL at every journalled step of an operation: after its plan, after
/// the shared partition, after each private partition, each file added and
/// each VM configured (two VMs: eight points). After each restart the
/// operation is recorded as interrupted and rolled back, nothing of it is
/// left on disk or in the store, the reservations are zero, the names are
/// free, and the node provisions them. Then a finished operation and an
/// accepted bundle survive a SIGKILL.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_every_journalled_step_leaves_nothing_and_loses_nothing_finished() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(dir.path(), "");
    let images = dir.path().join("images");
    client(&node).deploy(node.bundle(&imager("1.0.0", &images), &IMAGER.wasm())).await.unwrap();
    let vms = [spec("web-1", &images.join("web")), spec("db-1", &images.join("db"))];
    // shared, then per VM: private partition, file, configuration.
    let steps = 1 + 2 * 3;
    for pause_after in 0..=steps {
        let c = client(&node);
        let mut params = partitions_params(false);
        params["pause_after"] = json!(pause_after);
        let request = json!({"plugin": "imager", "vms": vms, "params": params});
        let id = c.provision(&request).await.unwrap().body["operation"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        wait_until(&c, &id, |op| op.phase.as_deref() == Some("paused")).await;
        node.kill();
        node.restart().unwrap();
        let c = client(&node);
        let op = c.operation(&id, None).await.unwrap();
        assert_eq!(
            (Some(op.state.as_str()), op.error_code()),
            (Some("failed"), Some("interrupted")),
            "step {pause_after}: {op:?}"
        );
        // What was built by then, as the restart found and rolled it back.
        let (built_vms, built_partitions) = match pause_after {
            0 => (0, 0),
            1 => (0, 1),
            2 | 3 => (0, 2),
            4 => (1, 2),
            5 | 6 => (1, 3),
            _ => (2, 3),
        };
        let message = op.error_message().unwrap_or_default();
        println!("step {pause_after}: {message}");
        assert!(
            message
                .contains(&format!("({built_vms} VM(s), {built_partitions} partition(s) removed)")),
            "step {pause_after}: {message}"
        );
        let (vms_left, partitions, reserved) = node_state(&c, &node.data).await;
        assert_eq!((vms_left, partitions), (0, 0), "step {pause_after}");
        assert_eq!(reserved, json!({"vcpus": 0, "memory-mib": 0, "disk-bytes": 0}));
        assert_eq!(std::fs::read_dir(node.data.join("staging")).unwrap().count(), 0);
        let vm_dirs = std::fs::read_dir(node.data.join("vms")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(vm_dirs, 0, "step {pause_after}");
    }
    // The names are free: the same VMs provision whole.
    let c = client(&node);
    let request = json!({"plugin": "imager", "vms": vms, "params": partitions_params(false)});
    let id =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    assert_eq!(c.wait(&id, |_| {}).await.unwrap().state.as_str(), "succeeded");
    let before = node_state(&c, &node.data).await;
    // A finished operation and the accepted bundle survive a SIGKILL.
    node.kill();
    node.restart().unwrap();
    let c = client(&node);
    assert_eq!(c.operation(&id, None).await.unwrap().state.as_str(), "succeeded");
    assert_eq!(node_state(&c, &node.data).await, before);
    let bundles = c.get("/v1/bundles").await.unwrap().body;
    assert!(bundles.to_string().contains("\"imager\""), "{bundles}");
    let again = json!({"plugin": "imager", "vms": [spec("api-1", &images.join("web"))],
                       "params": partitions_params(false)});
    let id =
        c.provision(&again).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    assert_eq!(c.wait(&id, |_| {}).await.unwrap().state.as_str(), "succeeded");
}

/// SIGKILL inside host calls: the daemon is killed while a file is being
/// written in its staging directory (an image import inside `images.fetch`,
/// a partition inside `partitions.create-*`), at growing delays after the
/// file appears. After each restart the operation either finished before
/// the kill or is recorded as interrupted with everything it built rolled
/// back: no VM, partition, staging file or reservation is left, and the
/// node provisions the same VMs whole.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_inside_host_calls_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(dir.path(), "");
    let images = dir.path().join("images");
    // Images large enough that importing and building take a while.
    for (name, seed) in [("big-web", 1u64), ("big-db", 2)] {
        let root = images.join(name);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), format!("{name}\n")).unwrap();
        for i in 0..48u64 {
            let shared = i < 32;
            let data = provd_tests::pseudo_random(200_000, if shared { i } else { seed << 32 | i });
            std::fs::write(root.join(format!("f{i}.so")), data).unwrap();
        }
    }
    client(&node).deploy(node.bundle(&imager("1.0.0", &images), &IMAGER.wasm())).await.unwrap();
    let vms = [spec("web-1", &images.join("big-web")), spec("db-1", &images.join("big-db"))];
    let request = json!({"plugin": "imager", "vms": vms, "params": partitions_params(false)});
    let staging = node.data.join("staging");
    let mut inside = 0;
    for delay_ms in [0u64, 1, 3, 6, 10, 15, 20, 30, 40, 50, 60, 80, 100, 130, 160, 320] {
        let c = client(&node);
        let id = c.provision(&request).await.unwrap().body["operation"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        // Wait for a file in staging: some host call is writing.
        let mut seen = false;
        for _ in 0..20_000 {
            if std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0) > 0 {
                seen = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        node.kill();
        node.restart().unwrap();
        let c = client(&node);
        let op = c.operation(&id, None).await.unwrap();
        let state = op.state.as_str().to_string();
        let message = op.error_message().unwrap_or_default().to_string();
        println!("staging file seen: {seen}, killed {delay_ms} ms later: {state} {message}");
        let (vms_left, partitions, reserved) = node_state(&c, &node.data).await;
        assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0, "{delay_ms} ms");
        if state == "succeeded" {
            assert_eq!(vms_left, 2, "{delay_ms} ms");
            for vm in ["web-1", "db-1"] {
                c.delete(&format!("/v1/vms/{vm}")).await.unwrap();
            }
        } else {
            assert_eq!(
                (state.as_str(), op.error_code()),
                ("failed", Some("interrupted")),
                "{delay_ms} ms: {op:?}"
            );
            assert_eq!((vms_left, partitions), (0, 0), "{delay_ms} ms");
            assert_eq!(reserved, json!({"vcpus": 0, "memory-mib": 0, "disk-bytes": 0}));
            if seen {
                inside += 1;
            }
        }
        let vm_dirs = std::fs::read_dir(node.data.join("vms")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(vm_dirs, 0, "{delay_ms} ms");
    }
    println!("{inside} kills while a host call wrote to staging, each rolled back");
    assert!(inside >= 5, "only {inside} kills landed inside a host call");
    let c = client(&node);
    let id =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    assert_eq!(c.wait(&id, |_| {}).await.unwrap().state.as_str(), "succeeded");
}
