// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Partitions over what the node already holds: VMs arriving one at a time
//! stack the node's layers and boot exactly, files added to a private
//! partition, repacks (whole and interrupted at every step), and a stack
//! that would reach another tenant's partition.

use provd_dedup::{Plan, Policy, analyze};
use provd_partitions::{
    BuildOptions, PartitionError, PrivateFormat, SharedFormat, VmImage, build_all, build_private,
    build_shared, verify_vm,
};
use provd_store::{ImageRecord, PartitionRecord, Store};

mod common;
use common::*;

/// One request of one VM on the node as it stands: planned against the
/// layers the node holds, built, and its figures.
fn one_vm_request(b: &Built, vm: &str, image: &ImageRecord) -> (Plan, provd_partitions::Layout) {
    let vms = vec![VmImage { vm: vm.to_string(), image: image.clone() }];
    let entries = vec![(vm.to_string(), b.store().entries(image, 0, u64::MAX).unwrap())];
    let node = provd_partitions::node_layers(b.store(), 1_000_000, &|_| true).unwrap();
    let policy = Policy { min_layer_bytes: 0, layer_unique_files: true, ..Policy::default() };
    let plan = provd_dedup::plan_on_node(&entries, &node, &policy).unwrap();
    let layout =
        build_all(b.store(), &plan, &vms, SharedFormat::Erofs, PrivateFormat::Ext4, None, &opts())
            .unwrap();
    (plan, layout)
}

#[tokio::test(flavor = "multi_thread")]
async fn vms_arriving_one_at_a_time_stack_what_the_node_holds_and_boot_exactly() {
    let b = prepared().await;
    let (web, db) = (b.vms[0].image.clone(), b.vms[1].image.clone());
    let image_bytes = |image: &ImageRecord| image.bytes;

    // web-1 alone: its files form a layer of its own on a new partition.
    let (plan, first) = one_vm_request(&b, "web-1", &web);
    let p1 = first.shared.clone().unwrap();
    assert_eq!(plan.shares["web-1"].new_shared_bytes, image_bytes(&web));
    assert_eq!(plan.shares["web-1"].private_bytes, 0);

    // web-2 alone: everything from the node; no shared partition built,
    // not one file byte stored again.
    let (plan, second) = one_vm_request(&b, "web-2", &web);
    assert!(second.shared.is_none());
    assert_eq!(plan.stored_bytes, 0);
    assert_eq!(plan.shares["web-2"].node_bytes, image_bytes(&web));
    assert_eq!(b.store().stack_of(&second.private[0].id).unwrap()[0].shared, p1.id);

    // db alone: web's layer with what db lacks hidden, and db's own files
    // on a second shared partition.
    let (plan, third) = one_vm_request(&b, "db-1", &db);
    let p3 = third.shared.clone().unwrap();
    let share = &plan.shares["db-1"];
    assert!(share.whiteouts > 0, "{share:?}");
    assert!(share.node_bytes > 0 && share.new_shared_bytes > 0, "{share:?}");
    assert_eq!(share.node_bytes + share.new_shared_bytes + share.private_bytes, image_bytes(&db));
    assert_eq!(plan.stored_bytes, share.new_shared_bytes + share.private_bytes);
    let db_partitions: Vec<String> =
        b.store().partitions_of_vm("db-1").unwrap().into_iter().map(|p| p.id).collect();
    assert!(db_partitions.contains(&p1.id) && db_partitions.contains(&p3.id));
    assert_eq!(b.store().partition(&p1.id).unwrap().unwrap().vms, ["db-1", "web-1", "web-2"]);

    for vm in ["web-1", "web-2", "db-1"] {
        let report = verify_vm(b.store(), vm, &opts()).unwrap();
        assert!(report.is_exact(), "{vm}: {:#?}", report.mismatches);
    }
    assert_eq!(
        verify_vm(b.store(), "db-1", &opts()).unwrap().shared,
        [p1.id.clone(), p3.id.clone()]
    );

    // Its whiteouts are names of one inode, as overlayfs makes its own.
    let img = provd_formats::ext4::Ext4Image::open(&partition_file(b.store(), &third.private[0]))
        .unwrap();
    let whiteouts: Vec<_> = img
        .entries(true)
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.kind == provd_domain::image::EntryKind::CharDevice && e.device == Some((0, 0))
        })
        .collect();
    assert_eq!(whiteouts.len() as u64, share.whiteouts);
    assert!(
        whiteouts.iter().all(|w| w.ino == whiteouts[0].ino && w.nlink as usize == whiteouts.len()),
        "{whiteouts:?}"
    );

    // The kernel's overlay shows db exactly its image from two shared
    // partitions and its whiteouts.
    let shared = [partition_file(b.store(), &p1), partition_file(b.store(), &p3)];
    if let Some(seen) = assemble(&b, &third.private[0], &shared).await {
        let want: Vec<String> =
            b.store().entries(&db, 0, u64::MAX).unwrap().iter().map(comparable).collect();
        assert_eq!(seen, want);
    }

    // A shared partition a stack names cannot go; it goes with the last
    // VM stacking it, and nothing else is left.
    let err = b.store().remove_partition(&p1.id).unwrap_err();
    assert!(err.to_string().contains("stack"), "{err}");
    b.store().release_vm("web-1").unwrap();
    b.store().release_vm("web-2").unwrap();
    assert!(b.store().partition(&p1.id).unwrap().is_some(), "db-1 still stacks it");
    assert!(verify_vm(b.store(), "db-1", &opts()).unwrap().is_exact());
    let removed = b.store().release_vm("db-1").unwrap();
    assert_eq!(removed.len(), 3, "db's private partition and both shared ones");
    b.assert_no_partitions();
}

#[tokio::test(flavor = "multi_thread")]
async fn added_files_are_checked_recorded_and_verified() {
    let b = prepared().await;
    let layout = b.build(SharedFormat::Erofs, PrivateFormat::Ext4).unwrap();
    let web = &layout.private[0];
    assert_eq!(web.vms, vec!["web"]);
    let add = |path: &str, content: &[u8], mode: u32| {
        provd_partitions::add_file(b.store(), &web.id, path, content, mode, &opts())
    };
    add("etc/hostname", b"web-7\n", 0o644).unwrap();
    add("var/lib/web/seed.txt", b"seed", 0o600).unwrap();
    // In folders the layers give, which upper/ does not hold: made there
    // with the image's metadata, so the view stays the image's.
    add("usr/share/doc/added", b"new\n", 0o644).unwrap();
    let report = verify_vm(b.store(), "web", &opts()).unwrap();
    assert!(report.is_exact(), "{:#?}", report.mismatches);
    let before = std::fs::read(b.store().partition_path(&web.id).unwrap().join(&web.file)).unwrap();
    for (path, mode, expected) in [
        ("../etc/passwd", 0o644, "not a normalised relative path"),
        ("etc/$(reboot)", 0o644, "only A-Z a-z 0-9"),
        ("etc/shadow", 0o4755, "only permission bits 0777"),
        ("no/such/dir/file", 0o644, "not a directory of the VM's image"),
        ("usr/bin", 0o644, "a dir is there"),
    ] {
        let err = add(path, b"x", mode).unwrap_err();
        assert!(err.to_string().contains(expected), "{path}: {err}");
    }
    let err =
        add("etc/big", &vec![0; provd_partitions::MAX_ADDED_FILE_BYTES + 1], 0o644).unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
    let shared = layout.shared.as_ref().unwrap();
    let err = provd_partitions::add_file(b.store(), &shared.id, "etc/x", b"x", 0o644, &opts())
        .unwrap_err();
    assert!(err.to_string().contains("is shared"), "{err}");
    // The refusals changed nothing.
    let after = std::fs::read(b.store().partition_path(&web.id).unwrap().join(&web.file)).unwrap();
    assert!(before == after);
    assert_eq!(b.store().staging_files().unwrap(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_gets_one_private_partition_stacked_only_on_its_own_plans_layers() {
    let b = prepared().await;
    let shared = build_shared(b.store(), &b.plan, &b.vms, SharedFormat::Erofs, &opts()).unwrap();
    // Another plan (web and dev only) numbers its layers from 0 too, with
    // other content.
    let entries: Vec<_> = b
        .vms
        .iter()
        .filter(|v| v.vm != "db")
        .map(|v| (v.vm.clone(), b.store().entries(&v.image, 0, u64::MAX).unwrap()))
        .collect();
    let other = analyze(&entries).unwrap().plan(&Policy {
        min_layer_bytes: 0,
        max_layers_per_vm: 8,
        share_across_paths: false,
        ..Policy::default()
    });
    assert_eq!(other.layers[0].id, b.plan.layers[0].id);
    assert_ne!(other.layers[0].entries, b.plan.layers[0].entries);
    let err = build_private(
        b.store(),
        &other,
        &b.vms,
        "web",
        Some(&shared),
        PrivateFormat::Ext4,
        None,
        &opts(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("of this plan"), "{err}");
    // Its own plan: one private partition, and no second one.
    build_private(
        b.store(),
        &b.plan,
        &b.vms,
        "web",
        Some(&shared),
        PrivateFormat::Ext4,
        None,
        &opts(),
    )
    .unwrap();
    let err = build_private(
        b.store(),
        &b.plan,
        &b.vms,
        "web",
        Some(&shared),
        PrivateFormat::Ext4,
        None,
        &opts(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("already has private partition"), "{err}");
    // Deleting by a name that is not a VM name touches nothing.
    for bad in ["..", "/", "", "a/b"] {
        assert!(provd_vm::delete(b.store(), bad).is_err(), "{bad:?}");
    }
    assert!(b.node.data.join("partitions").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn content_under_other_paths_is_stored_once_and_every_vm_verifies() {
    let b = prepared().await;
    let entries: Vec<_> = b
        .vms
        .iter()
        .map(|v| (v.vm.clone(), b.store().entries(&v.image, 0, u64::MAX).unwrap()))
        .collect();
    let wide =
        analyze(&entries).unwrap().plan(&Policy { share_across_paths: true, ..Policy::default() });
    // Each VM's copy of the library under its own path moved into its alias
    // layer, stored once with the shared one.
    assert!(
        wide.stored_bytes + 3 * 300_000 - 300_000 <= b.plan.stored_bytes + 300_000,
        "{} vs {}",
        wide.stored_bytes,
        b.plan.stored_bytes
    );
    assert!(wide.stored_bytes < b.plan.stored_bytes);
    for v in &b.vms {
        assert!(!wide.private[&v.vm].iter().any(|e| e.path.ends_with("libcopy.so")));
    }
    let layout = build_all(
        b.store(),
        &wide,
        &b.vms,
        SharedFormat::Erofs,
        PrivateFormat::Ext4,
        None,
        &opts(),
    )
    .unwrap();
    for v in &b.vms {
        let report = verify_vm(b.store(), &v.vm, &opts()).unwrap();
        assert!(report.is_exact(), "{}: {:#?}", v.vm, report.mismatches);
    }
    // The shared partition holds the library's bytes once, not four times.
    let shared = layout.shared.unwrap();
    assert!(shared.bytes < 2 * 300_000 + 1_000_000, "{}", shared.bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repack_packs_the_layers_in_use_into_one_partition_and_every_vm_sees_the_same() {
    let b = prepared().await;
    let (web, db, dev) = (b.vms[0].image.clone(), b.vms[1].image.clone(), b.vms[2].image.clone());
    // One request per VM: web, db, dev, web, db, dev.
    for (i, image) in [&web, &db, &dev, &web, &db, &dev].into_iter().enumerate() {
        let (plan, _) = one_vm_request(&b, &format!("vm-{i}"), image);
        // Each image's files are stored once however many of its VMs come.
        if i >= 3 {
            assert_eq!(plan.stored_bytes, 0, "vm-{i}: {:?}", plan.shares);
        }
    }
    let shared_before: Vec<PartitionRecord> = b
        .store()
        .partitions()
        .unwrap()
        .into_iter()
        .filter(|p| p.role == provd_store::PartitionRole::Shared)
        .collect();
    assert_eq!(shared_before.len(), 3, "web's, db's own and dev's own layers");
    // Half the VMs go: web's first layer is still used, partly.
    for vm in ["vm-0", "vm-2", "vm-4"] {
        b.store().release_vm(vm).unwrap();
    }
    let usage = b.store().layer_usage().unwrap();
    let before: u64 = b
        .store()
        .partitions()
        .unwrap()
        .iter()
        .filter(|p| p.role == provd_store::PartitionRole::Shared)
        .map(|p| p.bytes)
        .sum();

    let done = provd_node::repack::repack(b.store(), None, SharedFormat::Erofs, &opts()).unwrap();
    assert_eq!(done.moved, ["vm-1", "vm-3", "vm-5"], "{done:#?}");
    assert!(done.failed.is_empty() && done.skipped.is_empty(), "{done:#?}");
    let shared_after: Vec<PartitionRecord> = b
        .store()
        .partitions()
        .unwrap()
        .into_iter()
        .filter(|p| p.role == provd_store::PartitionRole::Shared)
        .collect();
    assert_eq!(shared_after.len(), 1, "every old shared partition freed");
    assert_eq!(Some(&shared_after[0]), done.partition.as_ref());
    assert_eq!(done.shared_bytes_before, before);
    assert!(done.shared_bytes_after <= before, "{done:#?}");
    assert_eq!(shared_after[0].vms, ["vm-1", "vm-3", "vm-5"]);
    let after = b.store().layer_usage().unwrap();
    assert!(after.unused_bytes == 0 && after.bytes <= usage.bytes, "{usage:?} → {after:?}");
    for vm in ["vm-1", "vm-3", "vm-5"] {
        let report = verify_vm(b.store(), vm, &opts()).unwrap();
        assert!(report.is_exact(), "{vm}: {:#?}", report.mismatches);
        assert_eq!(report.shared, [shared_after[0].id.clone()]);
    }
    // The kernel's overlay agrees for the VM with whiteouts (db on web's
    // layer, now cut to what db sees).
    let private = b
        .store()
        .partitions_of_vm("vm-1")
        .unwrap()
        .into_iter()
        .find(|p| p.role == provd_store::PartitionRole::Private)
        .unwrap();
    if let Some(seen) = assemble(&b, &private, &[partition_file(b.store(), &shared_after[0])]).await
    {
        let want: Vec<String> =
            b.store().entries(&db, 0, u64::MAX).unwrap().iter().map(comparable).collect();
        assert_eq!(seen, want);
    }
    // A VM arriving after the repack stacks the repacked layers.
    let (plan, _) = one_vm_request(&b, "vm-6", &dev);
    assert_eq!(plan.stored_bytes, 0, "{:?}", plan.shares);
    assert!(verify_vm(b.store(), "vm-6", &opts()).unwrap().is_exact());
    for vm in ["vm-1", "vm-3", "vm-5", "vm-6"] {
        b.store().release_vm(vm).unwrap();
    }
    b.assert_no_partitions();
}

/// A repack stopped at each of its steps (as a crash would leave it) is
/// settled at the next start: every VM boots from a complete stack it
/// carries, and no shared partition is left that nothing names.
#[tokio::test(flavor = "multi_thread")]
async fn a_repack_interrupted_at_any_step_is_settled_at_the_next_start() {
    use provd_partitions::repack::{moved_manifest, plan_repack, rewrite_boot_files};
    let b = prepared().await;
    let (web, db) = (b.vms[0].image.clone(), b.vms[1].image.clone());
    for (i, image) in [&web, &db, &web].into_iter().enumerate() {
        one_vm_request(&b, &format!("vm-{i}"), image);
    }
    b.store().release_vm("vm-0").unwrap();
    let shared_ids = |store: &Store| -> Vec<String> {
        let mut ids: Vec<String> = store
            .partitions()
            .unwrap()
            .into_iter()
            .filter(|p| p.role == provd_store::PartitionRole::Shared)
            .map(|p| p.id)
            .collect();
        ids.sort();
        ids
    };
    let before = shared_ids(b.store());
    let all_exact = |b: &Built| {
        for vm in ["vm-1", "vm-2"] {
            let report = verify_vm(b.store(), vm, &opts()).unwrap();
            assert!(report.is_exact(), "{vm}: {:#?}", report.mismatches);
        }
    };
    for step in 0..3 {
        let planned = plan_repack(b.store(), None).unwrap();
        assert_eq!(planned.moves.len(), 2);
        let shared =
            build_shared(b.store(), &planned.plan, &planned.vms, SharedFormat::Erofs, &opts())
                .unwrap();
        let mv = &planned.moves[0];
        let (manifest, rows) = moved_manifest(mv, &planned.plan, &shared).unwrap();
        if step >= 1 {
            let json = serde_json::to_string_pretty(&manifest).unwrap();
            b.store().begin_restack(&mv.private.id, &rows, &json).unwrap();
        }
        // At step 2 the boot files are rewritten, with what the partition
        // carries changed as a guest could change it (its image and digest
        // here): the node keeps its own manifest, not that text.
        let mut tampered = manifest.clone();
        tampered.image = "dir:/guest-says-so".into();
        tampered.image_digest = "0".repeat(64);
        if step >= 2 {
            rewrite_boot_files(b.store(), &mv.private, &tampered, &opts()).unwrap();
        }
        // The next start: moves settled, unused shared partitions freed.
        provd_node::repack::recover(b.store()).unwrap();
        b.store().free_unused_shared().unwrap();
        all_exact(&b);
        assert!(b.store().pending_restacks().unwrap().is_empty());
        let now = shared_ids(b.store());
        if step < 2 {
            assert_eq!(now, before, "step {step}: the new partition is gone, nothing moved");
        } else {
            assert!(now.contains(&shared.id), "step {step}: {} carries it", mv.vm);
            assert_eq!(b.store().stack_of(&mv.private.id).unwrap()[0].shared, shared.id);
            let stored = b.store().partition(&mv.private.id).unwrap().unwrap().manifest;
            let stored: provd_partitions::PrivateManifest = serde_json::from_str(&stored).unwrap();
            assert_eq!(stored, manifest, "step {step}: the node's own manifest is stored");
        }
    }
    // A full repack then leaves one shared partition.
    let done = provd_node::repack::repack(b.store(), None, SharedFormat::Erofs, &opts()).unwrap();
    assert_eq!(done.moved.len(), 2, "{done:#?}");
    assert_eq!(shared_ids(b.store()).len(), 1);
    all_exact(&b);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stack_reaching_another_tenants_partition_is_refused_whatever_the_plan_says() {
    let b = prepared().await;
    let web = b.vms[0].image.clone();
    // web-1 of tenant a: its files on a shared partition of domain tenant:a.
    let of = |t: &str| BuildOptions { domain: format!("tenant:{t}"), ..opts() };
    let vms = vec![VmImage { vm: "web-1".into(), image: web.clone() }];
    let entries = vec![("web-1".to_string(), b.store().entries(&web, 0, u64::MAX).unwrap())];
    let policy = Policy { min_layer_bytes: 0, layer_unique_files: true, ..Policy::default() };
    let plan = provd_dedup::plan_on_node(&entries, &[], &policy).unwrap();
    let shared =
        provd_partitions::build_shared(b.store(), &plan, &vms, SharedFormat::Erofs, &of("a"))
            .unwrap();
    assert_eq!(shared.domain, "tenant:a");

    // A plan for tenant b made against every layer, as a forged plan would
    // be: it stacks a's layer, and building b's private partition on it is
    // refused, naming the partition and its domain.
    let vms = vec![VmImage { vm: "web-2".into(), image: web.clone() }];
    let entries = vec![("web-2".to_string(), b.store().entries(&web, 0, u64::MAX).unwrap())];
    let all = provd_partitions::node_layers(b.store(), 1_000_000, &|_| true).unwrap();
    let forged = provd_dedup::plan_on_node(&entries, &all, &policy).unwrap();
    assert_eq!(forged.shares["web-2"].node_bytes, web.bytes);
    let err =
        build_private(b.store(), &forged, &vms, "web-2", None, PrivateFormat::Ext4, None, &of("b"))
            .unwrap_err();
    assert!(matches!(err, PartitionError::OtherDomain { .. }), "{err}");
    assert!(err.to_string().contains(&shared.id) && err.to_string().contains("tenant:a"), "{err}");
    assert!(b.store().partitions_of_vm("web-2").unwrap().is_empty());

    // The layers tenant b may see hold nothing of a's; tenant a's own VM
    // stacks them.
    let visible_to_b = provd_partitions::node_layers(b.store(), 1_000_000, &|d| {
        provd_domain::trust::may_see("b", d)
    })
    .unwrap();
    assert!(visible_to_b.is_empty());
    let private =
        build_private(b.store(), &forged, &vms, "web-2", None, PrivateFormat::Ext4, None, &of("a"))
            .unwrap();
    assert_eq!(private.domain, "tenant:a");
}
