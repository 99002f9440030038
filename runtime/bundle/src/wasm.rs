//! What a component is made of, read with wasmparser alone.

use wasmparser::{
    ComponentExternalKind, ComponentTypeRef, Encoding, Parser, Payload, TypeBounds, Validator,
    WasmFeatures,
};

/// The WASI interfaces and type-only provd interfaces the engine links for
/// every plugin: one list, in the domain crate, for the engine and the audit.
pub use provd_domain::{ALWAYS_LINKED, WASI_INTERFACES};

/// The WASI version prefix the engine serves (`check_imports`).
pub(crate) const WASI_VERSION_PREFIX: &str = "0.2.";

/// A component's top-level imports and exports.
#[derive(Debug, Default)]
pub(crate) struct Interface {
    pub imports: Vec<String>,
    /// Export names with their kinds.
    pub exports: Vec<(String, ComponentExternalKind)>,
}

/// Refuses what is not a component: not wasm, or a core module. Mirrors the
/// engine's `check_header`, so a bundle is refused for the same reasons.
pub(crate) fn check_preamble(wasm: &[u8]) -> Result<(), String> {
    match wasm.get(..8) {
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => Ok(()),
        Some([0, b'a', b's', b'm', _, _, 0, 0]) => {
            Err("this is a core WebAssembly module, not a component: build for wasm32-wasip2 or \
             encode the module with the WASI reactor adapter (provctl plugin build does both)"
                .into())
        }
        _ => Err("not WebAssembly: the bytes do not start with the wasm magic".into()),
    }
}

/// Validates the whole component. Every proposal is enabled: this checks
/// that the bytes are well formed, not which features a node compiles,
/// which is the engine's decision at load time.
pub(crate) fn validate(wasm: &[u8]) -> Result<(), String> {
    check_preamble(wasm)?;
    Validator::new_with_features(WasmFeatures::all())
        .validate_all(wasm)
        .map(|_| ())
        .map_err(|e| format!("invalid component: {e}"))
}

/// Reads the top-level imports and exports. Nested modules and components
/// are skipped: only the outermost component's imports are what a host
/// links, and only its exports are what a host calls.
pub(crate) fn interface(wasm: &[u8]) -> Result<Interface, String> {
    check_preamble(wasm)?;
    let mut out = Interface::default();
    // Depth of nesting: `ModuleSection`/`ComponentSection` open a nested
    // parser whose payloads follow inline, closed by its `End`.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|e| format!("cannot read the component: {e}"))?;
        match payload {
            Payload::Version { encoding, .. } if depth == 0 && encoding != Encoding::Component => {
                return Err("not a component".into());
            }
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    let import = import.map_err(|e| format!("cannot read an import: {e}"))?;
                    // A type import with an equality bound (how a world's
                    // `use`d types are encoded) only names a type the
                    // component already defines: nothing is linked for it,
                    // and wasmtime does not list it among the imports
                    // `check_imports` inspects.
                    if let ComponentTypeRef::Type(TypeBounds::Eq(_)) = import.ty {
                        continue;
                    }
                    out.imports.push(import.name.name.to_string());
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    let export = export.map_err(|e| format!("cannot read an export: {e}"))?;
                    out.exports.push((export.name.name.to_string(), export.kind));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The name of an export kind, as WIT and `wasm-tools` say it.
pub(crate) fn kind_name(kind: ComponentExternalKind) -> &'static str {
    match kind {
        ComponentExternalKind::Module => "module",
        ComponentExternalKind::Func => "func",
        ComponentExternalKind::Value => "value",
        ComponentExternalKind::Type => "type",
        ComponentExternalKind::Instance => "instance",
        ComponentExternalKind::Component => "component",
    }
}
