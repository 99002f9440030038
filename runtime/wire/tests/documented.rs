//! docs/api.md is checked against the types: every field of every request
//! and response body is named there, so a field added to the API without a
//! word in its reference fails here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use provd_wire::*;
use serde_json::{Value, json};

fn operation() -> Operation {
    Operation {
        id: "op-1".into(),
        idempotency_key: Some("k".into()),
        plugin: "p".into(),
        version: "1.0.0".into(),
        actor: "a".into(),
        state: OperationState::Failed,
        phase: Some("x".into()),
        done: Some(1),
        total: Some(2),
        report: Some(json!({})),
        error: Some(OperationFailure { code: "c".into(), message: Some("m".into()) }),
        vms: vec!["v".into()],
        created_at: 1,
        finished_at: Some(2),
        seq: Some(3),
    }
}

/// One value of every body type, each optional field present.
fn samples() -> Vec<Value> {
    let headroom = Headroom { total: 1, reserved: 1, free: 0 };
    let vm = Vm {
        name: "v".into(),
        operation: Some("op".into()),
        macs: vec![],
        reserved: Resources::default(),
        created_at: 1,
        spec: json!({}),
        partitions: Some(vec![VmPartition {
            id: "p".into(),
            role: "private".into(),
            format: "ext4".into(),
            bytes: 1,
        }]),
        state: Some("running".into()),
    };
    let values = [
        serde_json::to_value(ErrorBody {
            error: ErrorDetail { code: "c".into(), message: "m".into() },
        }),
        serde_json::to_value(Health {
            status: "ok".into(),
            version: "0".into(),
            running_operations: 0,
        }),
        serde_json::to_value(BundleAnswer {
            bundle: Accepted {
                name: "n".into(),
                version: "v".into(),
                digest: "d".into(),
                signer: "s".into(),
                new: true,
            },
        }),
        serde_json::to_value(BundleList {
            bundles: vec![Bundle {
                name: "n".into(),
                version: "v".into(),
                digest: "d".into(),
                signer: "s".into(),
                active: true,
                accepted_at: 1,
                expires: 2,
                grant: "g".into(),
                manifest: "m".into(),
            }],
        }),
        serde_json::to_value(Activated {
            plugin: "p".into(),
            active: "a".into(),
            previous: "b".into(),
        }),
        serde_json::to_value(ActivateRequest { version: "v".into() }),
        serde_json::to_value(OperationRequest {
            plugin: "p".into(),
            version: Some("v".into()),
            vms: vec![json!({})],
            params: Some(json!({})),
            idempotency_key: Some("k".into()),
            allow_inactive: true,
            start: true,
        }),
        serde_json::to_value(OperationAnswer { operation: operation() }),
        serde_json::to_value(OperationList { operations: vec![operation()] }),
        serde_json::to_value(CancelAnswer { operation: operation(), cancel: "requested".into() }),
        serde_json::to_value(Progress {
            seq: 1,
            state: OperationState::Running,
            phase: None,
            done: 0,
            total: None,
        }),
        serde_json::to_value(VmList { vms: vec![vm.clone()], reserved: Resources::default() }),
        serde_json::to_value(VmAnswer { vm }),
        serde_json::to_value(Deleted { deleted: "v".into(), operation: operation() }),
        serde_json::to_value(RepackRequest {
            vms: Some(vec![]),
            all: true,
            shared_format: Some("erofs".into()),
        }),
        serde_json::to_value(RepackAnswer {
            repack: Some(
                serde_json::to_value(RepackReport {
                    partition: Some(RepackedPartition { id: "p".into(), bytes: 1 }),
                    ..RepackReport::default()
                })
                .unwrap(),
            ),
            operation: operation(),
        }),
        serde_json::to_value(ImageList {
            images: vec![Image {
                reference: "r".into(),
                digest: "d".into(),
                source: "dir".into(),
                source_digest: Some("s".into()),
                entries: 1,
                files: 1,
                bytes: 1,
                created_at: 1,
                used_at: Some(2),
                in_use: true,
            }],
        }),
        serde_json::to_value(ImageDeleted { reference: "r".into(), objects: 1, bytes: 1 }),
        serde_json::to_value(GcRequest { max_age_secs: Some(1), max_bytes: Some(1) }),
        serde_json::to_value(GcAnswer {
            gc: GcReport {
                images: vec![RemovedImage {
                    reference: "r".into(),
                    reason: "age".into(),
                    freed_bytes: 1,
                }],
                objects: 1,
                bytes: 1,
                in_use: 1,
                object_bytes: 1,
                max_age_secs: Some(1),
                max_bytes: Some(1),
            },
        }),
        serde_json::to_value(Capacity {
            vcpus: headroom,
            memory_mib: headroom,
            disk_bytes: DiskHeadroom { total: 1, reserved: 1, free: 0, filesystem_free: 0 },
            vms: 1,
        }),
        serde_json::to_value(LayerPage {
            layers: vec![Layer {
                partition: "p".into(),
                layer: "l".into(),
                digest: "d".into(),
                files: 1,
                bytes: 1,
                format: "erofs".into(),
                vms: vec![],
                domain: "public".into(),
            }],
            total: 1,
            next: Some("p/l".into()),
        }),
        serde_json::to_value(EntryPage {
            entries: vec![LayerFile { path: "/x".into(), size: 1, blake3: "b".into() }],
            total: 1,
            next: Some(1),
        }),
        serde_json::to_value(AuditList {
            audit: vec![AuditEntry {
                id: 1,
                at: 1,
                actor: "a".into(),
                kind: "k".into(),
                plugin: Some("p".into()),
                version: Some("v".into()),
                operation: Some("o".into()),
                interface: Some("i".into()),
                function: Some("f".into()),
                args: Some("x".into()),
                outcome: "ok".into(),
                detail: Some("d".into()),
                count: 1,
            }],
        }),
    ];
    values.into_iter().map(|v| v.unwrap()).collect()
}

fn keys(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                out.insert(k.clone());
                keys(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

#[test]
fn every_field_of_the_api_is_in_its_reference() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md"))
        .expect("docs/api.md");
    let mut all = BTreeSet::new();
    for v in samples() {
        keys(&v, &mut all);
    }
    assert!(all.len() > 60, "{all:?}");
    let missing: Vec<&String> = all
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")) && !doc.contains(&format!("\"{k}\"")))
        .collect();
    assert!(missing.is_empty(), "fields not named in docs/api.md: {missing:?}");
}

#[test]
fn answers_decode_from_what_the_node_sends() {
    // Each sample decodes back into its type; an unknown field from a
    // newer node is ignored, an unknown request field refused.
    let op: OperationAnswer =
        serde_json::from_value(json!({"operation": operation(), "extra": 1})).unwrap();
    assert_eq!(op.operation, operation());
    let extra = json!({"plugin": "p", "colour": "red"});
    assert!(serde_json::from_value::<OperationRequest>(extra).is_err());
    let old_layer = json!({"partition": "p", "layer": "l", "digest": "d", "files": 1,
                           "bytes": 1, "format": "erofs", "vms": []});
    assert_eq!(serde_json::from_value::<Layer>(old_layer).unwrap().domain, "tenant:default");
}
