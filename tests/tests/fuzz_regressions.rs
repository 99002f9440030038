// Tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Every committed fuzz input, seed or crash found once, through the same
//! target functions `cargo fuzz` runs (`fuzz/src/lib.rs`, included here), so
//! that a fixed crash stays fixed without a fuzzer.

use std::path::Path;

#[path = "../../fuzz/src/lib.rs"]
mod targets;

fn target(name: &str) -> fn(&[u8]) {
    match name {
        "manifest" => targets::manifest,
        "bundle" => targets::bundle,
        "vm_spec" => targets::vm_spec,
        "reference" => targets::reference,
        "archive" => targets::archive,
        "oci_manifest" => targets::oci_manifest,
        "ext4" => targets::ext4,
        "erofs" => targets::erofs,
        "api_operation" => targets::api_operation,
        "domain_xml" => targets::domain_xml,
        other => panic!("fuzz input for an unknown target {other:?}"),
    }
}

#[test]
fn every_committed_fuzz_input_runs_without_a_crash() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut ran = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(dirs) = std::fs::read_dir(fuzz.join(kind)) else { continue };
        for dir in dirs {
            let dir = dir.unwrap().path();
            if !dir.is_dir() {
                continue;
            }
            let run = target(&dir.file_name().unwrap().to_string_lossy());
            for input in std::fs::read_dir(&dir).unwrap() {
                let input = input.unwrap().path();
                eprintln!("{}", input.display());
                run(&std::fs::read(&input).unwrap());
                ran += 1;
            }
        }
    }
    assert!(ran >= 9, "only {ran} inputs under fuzz/seeds and fuzz/regressions");
}
