// Tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The scan's figures against an independent computation with `find`,
//! `stat` and `sha256sum`, on trees made of real files of this machine.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use provd_scan::{ScanOptions, scan};

/// Copies up to `limit` regular files from `from` (recursively) into `to`.
fn copy_some(from: &Path, to: &Path, limit: usize, skip_every: usize) -> usize {
    let mut copied = 0;
    let mut stack = vec![from.to_path_buf()];
    let mut i = 0;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                i += 1;
                if skip_every > 0 && i % skip_every == 0 {
                    continue;
                }
                let rel = e.path().strip_prefix(from).unwrap().to_path_buf();
                let dest = to.join(rel);
                std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
                if std::fs::copy(e.path(), &dest).is_ok() {
                    copied += 1;
                }
                if copied >= limit {
                    return copied;
                }
            }
        }
    }
    copied
}

/// Per tree: (inode → (size, sha256)) of regular non-empty files, by tools.
fn independent(root: &Path) -> HashMap<u64, (u64, String)> {
    let out = Command::new("bash")
        .arg("-c")
        .arg("find . -type f -size +0 -printf '%i %s %p\\0' | while IFS=' ' read -r -d '' ino size path; do printf '%s %s %s\\n' \"$ino\" \"$size\" \"$(sha256sum \"$path\" | cut -d' ' -f1)\"; done")
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut it = l.split(' ');
            let ino = it.next().unwrap().parse().unwrap();
            let size = it.next().unwrap().parse().unwrap();
            (ino, (size, it.next().unwrap().to_string()))
        })
        .collect()
}

#[test]
fn figures_match_an_independent_sha256_computation() {
    let work = tempfile::tempdir().unwrap();
    let roots: Vec<PathBuf> = (0..3).map(|i| work.path().join(format!("root{i}"))).collect();
    let source = Path::new("/usr/share");
    for (i, root) in roots.iter().enumerate() {
        std::fs::create_dir_all(root).unwrap();
        // Overlapping but different selections of real files.
        copy_some(source, root, 1500, i + 3);
        std::fs::write(root.join("own-file"), format!("only in {i}")).unwrap();
        std::fs::write(root.join("empty"), "").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("a-symlink")).unwrap();
    }
    // A hard link: two names, one file.
    std::fs::hard_link(roots[0].join("own-file"), roots[0].join("own-file-link")).unwrap();
    // The same content under a different path in another tree.
    std::fs::write(roots[1].join("moved"), "only in 0").unwrap();

    let report = scan(&roots, &ScanOptions::default()).unwrap();

    let per_tree: Vec<HashMap<u64, (u64, String)>> = roots.iter().map(|r| independent(r)).collect();
    let mut holders: HashMap<(u64, String), HashSet<usize>> = HashMap::new();
    for (t, files) in per_tree.iter().enumerate() {
        for content in files.values() {
            holders.entry(content.clone()).or_default().insert(t);
        }
    }
    let shared: HashMap<&(u64, String), usize> =
        holders.iter().filter(|(_, t)| t.len() >= 2).map(|(c, t)| (c, t.len())).collect();
    assert!(shared.len() > 100, "the fixture shares too little: {}", shared.len());
    assert_eq!(report.shared_contents, shared.len() as u64);
    assert_eq!(report.shared_bytes_once, shared.keys().map(|(s, _)| s).sum::<u64>());
    assert_eq!(
        report.shared_bytes_as_copies,
        shared.iter().map(|((s, _), n)| s * *n as u64).sum::<u64>()
    );
    for (t, files) in per_tree.iter().enumerate() {
        let tree = &report.trees[t];
        assert_eq!(tree.files, files.len() as u64, "tree {t}");
        assert_eq!(tree.bytes, files.values().map(|(s, _)| s).sum::<u64>(), "tree {t}");
        let unique: u64 = files.values().filter(|c| !shared.contains_key(c)).map(|(s, _)| s).sum();
        assert_eq!(tree.unique_bytes, unique, "tree {t}");
    }
    // Ruled out by size alone: fewer files hashed than exist.
    let total: u64 = report.trees.iter().map(|t| t.files).sum();
    assert!(report.files_hashed < total);
    println!(
        "{} shared contents, {} bytes once, {} hashed of {} files",
        report.shared_contents, report.shared_bytes_once, report.files_hashed, total
    );
}

#[test]
fn groups_list_every_name_per_tree() {
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    std::fs::create_dir_all(a.join("x")).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(a.join("x/lib.so"), "same").unwrap();
    std::fs::hard_link(a.join("x/lib.so"), a.join("lib-link.so")).unwrap();
    std::fs::write(b.join("lib.so"), "same").unwrap();
    std::fs::write(b.join("other"), "diff").unwrap(); // same size, other content
    let report =
        scan(&[a.clone(), b.clone()], &ScanOptions { groups: true, ..ScanOptions::default() })
            .unwrap();
    assert_eq!(report.shared_contents, 1);
    assert_eq!(report.groups.len(), 1);
    let g = &report.groups[0];
    assert_eq!(g.blake3, blake3::hash(b"same").to_hex().as_str());
    assert_eq!(
        g.paths,
        vec![(0, vec![a.join("lib-link.so"), a.join("x/lib.so")]), (1, vec![b.join("lib.so")])]
    );
    assert!(scan(&[work.path().join("missing")], &ScanOptions::default()).is_err());
}

#[test]
fn a_rescan_with_the_cache_reads_only_what_changed() {
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    for root in [&a, &b] {
        std::fs::create_dir_all(root).unwrap();
        for i in 0..20 {
            std::fs::write(root.join(format!("f{i}")), format!("content {i:04}")).unwrap();
        }
    }
    let cache_file = work.path().join("cache");
    let roots = vec![a.clone(), b.clone()];
    let cache = provd_scan::HashCache::load(&cache_file).unwrap();
    let first = provd_scan::scan_with_cache(&roots, &ScanOptions::default(), &cache).unwrap();
    cache.save(&cache_file).unwrap();
    assert_eq!((first.files_hashed, first.files_cached), (40, 0));

    // One file changes (same size, other content): only it is read again,
    // and the answer follows the change.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(b.join("f3"), "CONTENT 0003").unwrap();
    let cache = provd_scan::HashCache::load(&cache_file).unwrap();
    let second = provd_scan::scan_with_cache(&roots, &ScanOptions::default(), &cache).unwrap();
    assert_eq!((second.files_hashed, second.files_cached), (40, 39));
    assert_eq!(second.shared_contents, 19);
    assert_eq!(
        second,
        provd_scan::scan(&roots, &ScanOptions::default())
            .map(|r| provd_scan::Report { files_cached: 39, ..r })
            .unwrap()
    );

    // A damaged cache file is only slower, never wrong.
    std::fs::write(&cache_file, "garbage\n1 2 3\n").unwrap();
    let cache = provd_scan::HashCache::load(&cache_file).unwrap();
    let third = provd_scan::scan_with_cache(&roots, &ScanOptions::default(), &cache).unwrap();
    assert_eq!((third.files_cached, third.shared_contents), (0, 19));
}
