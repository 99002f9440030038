// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Images running operations hold are kept from removal, and so is one an
//! operation took or released after a collection looked at what VMs use.

use std::sync::Arc;

use provd_domain::image::{Entry, EntryKind};
use provd_store::{NewImage, Store, StoreError};

/// Imports an image of one file with content `data` under `reference`.
fn import(store: &Store, reference: &str, data: &[u8]) {
    let mut writer = store.writer();
    let hash = writer.add(&mut &data[..], data.len() as u64, "f").unwrap();
    let entry = Entry {
        path: "f".into(),
        kind: EntryKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: data.len() as u64,
        hash: Some(hash),
        link_target: None,
        device: None,
    };
    let image = NewImage { reference: reference.into(), source: "dir".into(), source_digest: None };
    store.commit_image(writer, &image, &[entry]).unwrap();
}

#[test]
fn a_held_image_or_one_held_since_the_clock_was_read_stays() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    import(&store, "dir:/a", b"only a");
    import(&store, "dir:/b", b"only b");

    // Held now: kept, whatever the clock.
    let hold = store.hold_image("dir:/a");
    let clock = store.hold_clock();
    assert!(matches!(clock.remove_unheld_image("dir:/a"), Err(StoreError::InUse(_))));
    assert_eq!(store.held_images().into_iter().collect::<Vec<_>>(), ["dir:/a"]);

    // Released after the clock was read: the operation may have given a VM
    // the image meanwhile, so this collection keeps it.
    drop(hold);
    assert!(store.held_images().is_empty());
    let err = clock.remove_unheld_image("dir:/a").unwrap_err();
    assert!(err.to_string().contains("meanwhile"), "{err}");
    drop(clock);
    // A collection that reads the clock after the release removes it.
    let freed = store.hold_clock().remove_unheld_image("dir:/a").unwrap();
    assert_eq!((freed.objects, freed.bytes), (1, 6));

    // Taken and released before the clock was read: removed.
    drop(store.hold_image("dir:/b"));
    let clock = store.hold_clock();
    assert_eq!(clock.remove_unheld_image("dir:/b").unwrap().objects, 1);
    assert!(store.images().unwrap().is_empty());
    assert!(matches!(clock.remove_unheld_image("dir:/b"), Err(StoreError::NotFound(_))));
}
