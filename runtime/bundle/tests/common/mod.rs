//! Real components for the tests, built in-process from provd's WIT: a dummy
//! core module for a world (every import called, every export defined) with
//! the world embedded, encoded into a component by wit-component, as
//! `provctl plugin build` encodes real plugins.
#![allow(dead_code)]

use std::path::Path;

use wit_component::{ComponentEncoder, StringEncoding, dummy_module, embed_component_metadata};
use wit_parser::{LiftLowerAbi, ManglingAndAbi, Resolve};

/// Builds a component that imports `imports` (fully qualified interface
/// names, e.g. `provd:plugin/log@0.1.0` or `wasi:cli/stdout@0.2.0`) and,
/// if `provision`, exports the provisioner world's `provision` function.
pub fn component(imports: &[&str], provision: bool) -> Vec<u8> {
    let mut resolve = Resolve::default();
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit");
    resolve.push_dir(&wit).unwrap();
    // Stand-ins for WASI packages, so a fixture can import WASI interfaces
    // inside and outside the subset the engine links.
    resolve
        .push_str("wasi-cli.wit", "package wasi:cli@0.2.0;\ninterface stdout { ping: func(); }\n")
        .unwrap();
    resolve
        .push_str(
            "wasi-sockets.wit",
            "package wasi:sockets@0.2.0;\ninterface tcp { connect: func(); }\n",
        )
        .unwrap();
    let mut world = String::from(
        "package test:fixture;\n\
         world fixture {\n\
         use provd:plugin/types@0.1.0.{error, field};\n\
         record request { operation-id: string, input: string }\n\
         record report { summary: string, fields: list<field>, output: string }\n",
    );
    for import in imports {
        world.push_str(&format!("import {import};\n"));
    }
    if provision {
        world.push_str("export provision: func(request: request) -> result<report, error>;\n");
    }
    world.push_str("}\n");
    let package = resolve.push_str("fixture.wit", &world).unwrap();
    let world = resolve.select_world(&[package], Some("fixture")).unwrap();
    let mut module = dummy_module(&resolve, world, ManglingAndAbi::Legacy(LiftLowerAbi::Sync));
    embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8).unwrap();
    ComponentEncoder::default().module(&module).unwrap().validate(true).encode().unwrap()
}

/// The capabilities `HELLO_MANIFEST` declares, as imports.
pub const HELLO_IMPORTS: [&str; 3] =
    ["provd:plugin/log@0.1.0", "provd:plugin/progress@0.1.0", "provd:plugin/hashing@0.1.0"];

/// A manifest like examples/hello's.
pub const HELLO_MANIFEST: &str = "\
# The hello plugin.
name = \"hello\"
version = \"0.1.0\"
description = \"logs and hashes\"

[capabilities.log]
max-bytes = 65536

[capabilities.progress]

[capabilities.hashing]
max-input-bytes = 1048576

[limits]
memory-mib = 16
timeout-ms = 2000
";

/// A component that fits `HELLO_MANIFEST` exactly.
pub fn hello_component() -> Vec<u8> {
    component(&HELLO_IMPORTS, true)
}

pub const CREATED: u64 = 1_750_000_000;
pub const EXPIRES: u64 = CREATED + 365 * 24 * 3600;
pub const NOW: u64 = CREATED + 3600;

/// Offsets of the sections of a bundle: (header, component, signatures)
/// as start..end ranges.
pub fn sections(bundle: &[u8]) -> [std::ops::Range<usize>; 3] {
    let mut at = 10;
    let mut out = Vec::new();
    for _ in 0..3 {
        let len = u32::from_le_bytes(bundle[at..at + 4].try_into().unwrap()) as usize;
        out.push(at + 4..at + 4 + len);
        at += 4 + len;
    }
    out.try_into().unwrap()
}
