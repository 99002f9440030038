// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Operations in the store: one per idempotency key, one running operation
//! per VM name, the end releasing the names, and a bounded history.

use provd_store::{NewAudit, NewOperation, OpState, OperationError, Started, Store};

fn op(id: &str, key: Option<&str>, digest: &str, vms: &[&str]) -> NewOperation {
    NewOperation {
        id: id.into(),
        idempotency_key: key.map(str::to_string),
        request_digest: digest.into(),
        plugin: "p".into(),
        version: "1.0.0".into(),
        input: "{}".into(),
        actor: "manager".into(),
        vms: vms.iter().map(|v| v.to_string()).collect(),
    }
}

fn row(op: &str) -> NewAudit {
    NewAudit {
        actor: "manager".into(),
        kind: "operation".into(),
        operation: Some(op.into()),
        outcome: "started".into(),
        count: 1,
        ..NewAudit::default()
    }
}

#[test]
fn keys_names_and_ends() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let started = store.start_operation(&op("op-1", Some("k"), "d1", &["a", "b"]), &[row("op-1")]);
    assert!(matches!(started.unwrap(), Started::New(_)));
    // The same key and request: the same operation, no new row.
    match store.start_operation(&op("op-2", Some("k"), "d1", &["a"]), &[row("op-2")]).unwrap() {
        Started::Existing(rec) => assert_eq!(rec.id, "op-1"),
        other => panic!("{other:?}"),
    }
    // The same key, another request.
    let e = store.start_operation(&op("op-3", Some("k"), "d2", &[]), &[]).unwrap_err();
    assert!(matches!(e, OperationError::KeyReused { ref operation, .. } if operation == "op-1"));
    // A name held by a running operation.
    let e =
        store.start_operation(&op("op-4", None, "d4", &["c", "b"]), &[row("op-4")]).unwrap_err();
    assert!(
        matches!(e, OperationError::VmBusy { ref vm, ref operation } if vm == "b" && operation == "op-1")
    );
    assert!(store.operation("op-4").unwrap().is_none());
    assert_eq!(store.audit(&Default::default()).unwrap().len(), 1);
    // The end releases the names, with its progress and rows, once.
    let finished = store
        .finish_operation(
            "op-1",
            OpState::Succeeded,
            Some("{}"),
            None,
            Some(("done", 3, Some(3))),
            &[row("op-1")],
        )
        .unwrap();
    assert!(finished);
    let again =
        store.finish_operation("op-1", OpState::Failed, None, None, None, &[row("op-1")]).unwrap();
    assert!(!again);
    let rec = store.operation("op-1").unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.phase.as_deref(), rec.done),
        (OpState::Succeeded, Some("done"), Some(3))
    );
    assert_eq!(store.audit(&Default::default()).unwrap().len(), 2);
    assert!(matches!(
        store.start_operation(&op("op-5", None, "d5", &["b"]), &[]).unwrap(),
        Started::New(_)
    ));
}

#[test]
fn the_history_is_bounded_and_running_operations_stay() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for i in 0..10 {
        let id = format!("op-{i}");
        store.start_operation(&op(&id, None, "d", &[]), &[row(&id), row(&id)]).unwrap();
        if i != 0 {
            store.finish_operation(&id, OpState::Succeeded, None, None, None, &[]).unwrap();
        }
    }
    let (ops, rows) = store.prune_history(3, 5).unwrap();
    assert_eq!((ops, rows), (6, 15));
    let left: Vec<String> =
        store.operations(None, 100).unwrap().into_iter().map(|o| o.id).collect();
    assert_eq!(left.len(), 4);
    assert!(left.contains(&"op-0".to_string()), "the running one stays: {left:?}");
    assert_eq!(store.audit(&Default::default()).unwrap().len(), 5);
}
