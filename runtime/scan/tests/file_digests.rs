// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

//! Every regular non-empty file of a tree, by relative path, with the
//! BLAKE3 of its content.

#[test]
fn every_file_is_listed_by_relative_path_with_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("usr/lib")).unwrap();
    std::fs::write(root.join("usr/lib/a.so"), b"alpha").unwrap();
    std::fs::write(root.join("etc-hostname"), b"web\n").unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("usr/lib/a.so", root.join("link")).unwrap();
    let files = provd_scan::file_digests(root, 2).unwrap();
    let got: Vec<(&str, u64)> = files.iter().map(|f| (f.path.as_str(), f.size)).collect();
    assert_eq!(got, vec![("etc-hostname", 4), ("usr/lib/a.so", 5)]);
    assert_eq!(files[1].digest, *blake3::hash(b"alpha").as_bytes());
}
