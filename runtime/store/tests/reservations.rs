// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Node resources: VMs reserve vCPUs, memory and disk atomically with their
//! record, distinct VMs never share a reservation or a MAC, and deleting a
//! VM gives back exactly what it took.

use std::sync::Arc;

use provd_store::{NewVm, ReserveError, Resources, Store};

fn vm(name: &str, vcpus: u64, memory_mib: u64, macs: &[&str]) -> NewVm {
    NewVm {
        name: name.into(),
        spec: format!("{{\"name\":\"{name}\"}}"),
        operation: Some("op-1".into()),
        macs: macs.iter().map(|m| m.to_string()).collect(),
        needs: Resources { vcpus, memory_mib, disk_bytes: 10 << 30 },
    }
}

const NODE: Resources = Resources { vcpus: 8, memory_mib: 16_384, disk_bytes: 100 << 30 };

#[test]
fn reservations_fit_the_node_and_deleting_gives_back_exactly_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = store.reserve_vm(&vm("a", 4, 8192, &["52:54:00:00:00:01"]), &NODE).unwrap();
    assert_eq!(a.reserved, Resources { vcpus: 4, memory_mib: 8192, disk_bytes: 10 << 30 });
    store.reserve_vm(&vm("b", 2, 4096, &[]), &NODE).unwrap();
    // 2 vCPUs and 4096 MiB left: a VM wanting 3 and 8192 is told both.
    let err = store.reserve_vm(&vm("c", 3, 8192, &[]), &NODE).unwrap_err();
    assert_eq!(
        err.to_string(),
        "VM \"c\" does not fit on this node: vcpus: needs 3, 2 free; memory-mib: needs 8192, 4096 free"
    );
    assert!(store.vm("c").unwrap().is_none());
    assert_eq!(
        store.reserved().unwrap(),
        Resources { vcpus: 6, memory_mib: 12_288, disk_bytes: 20 << 30 }
    );
    let gone = store.delete_vm("a").unwrap().unwrap();
    assert_eq!(gone.macs, vec!["52:54:00:00:00:01"]);
    assert_eq!(
        store.reserved().unwrap(),
        Resources { vcpus: 2, memory_mib: 4096, disk_bytes: 10 << 30 }
    );
    store.reserve_vm(&vm("c", 3, 8192, &["52:54:00:00:00:01"]), &NODE).unwrap();
    assert!(store.delete_vm("nobody").unwrap().is_none());
}

#[test]
fn names_and_macs_are_never_shared_and_a_refusal_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.reserve_vm(&vm("a", 1, 512, &["52:54:00:00:00:01"]), &NODE).unwrap();
    let before = store.reserved().unwrap();
    let err = store.reserve_vm(&vm("a", 1, 512, &[]), &NODE).unwrap_err();
    assert!(matches!(err, ReserveError::Exists(ref n) if n == "a"), "{err}");
    let err = store
        .reserve_vm(&vm("b", 1, 512, &["52:54:00:00:00:02", "52:54:00:00:00:01"]), &NODE)
        .unwrap_err();
    assert_eq!(err.to_string(), "MAC address 52:54:00:00:00:01 is already used by VM \"a\"");
    // The same MAC twice in one VM is refused too, and leaves no row.
    let err = store
        .reserve_vm(&vm("c", 1, 512, &["52:54:00:00:00:03", "52:54:00:00:00:03"]), &NODE)
        .unwrap_err();
    assert!(matches!(err, ReserveError::MacInUse { .. }), "{err}");
    assert_eq!(store.reserved().unwrap(), before);
    assert_eq!(store.vms().unwrap().len(), 1);
}

#[test]
fn concurrent_requests_for_the_last_capacity_get_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    store.reserve_vm(&vm("base", 7, 1024, &[]), &NODE).unwrap();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            std::thread::spawn(move || {
                store.reserve_vm(&vm(&format!("racer-{i}"), 1, 1024, &[]), &NODE)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(matches!(r, ReserveError::DoesNotFit { .. }), "{r}");
    }
    assert_eq!(store.reserved().unwrap().vcpus, 8);
    assert_eq!(store.vms().unwrap().len(), 2);
}
