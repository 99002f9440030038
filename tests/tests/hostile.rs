// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Bad plugins and bad inputs: each is contained with an error that names
//! what went wrong, and the same engine serves the next call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use provd_domain::{Manifest, ManifestError, NodePolicy};
use provd_engine::{
    CollectingObserver, EngineConfig, InvokeError, Limit, LoadError, PluginError, Request, Source,
};
use provd_host::{Engine, Plugin};
use provd_tests::HOSTILE;

/// A manifest for the hostile fixture, which imports every capability;
/// `capabilities` replaces the default capability tables.
fn manifest(capabilities: &str, limits: &str) -> Manifest {
    let capabilities = if capabilities.is_empty() {
        "[capabilities.log]\n[capabilities.progress]\n[capabilities.hashing]\n"
    } else {
        capabilities
    };
    Manifest::from_toml(&format!(
        "name = \"hostile\"\nversion = \"0.1.0\"\n{capabilities}[limits]\n{limits}"
    ))
    .unwrap()
}

fn engine_with(policy: NodePolicy) -> Engine {
    provd_host::engine(EngineConfig { policy, ..EngineConfig::default() }, None).unwrap()
}

async fn hostile(engine: &Engine, limits: &str) -> Plugin {
    engine.load(&manifest("", limits), HOSTILE.wasm()).await.unwrap()
}

async fn call(
    engine: &Engine,
    plugin: &Plugin,
    input: &str,
) -> (Result<provd_engine::Outcome, InvokeError>, Arc<CollectingObserver>) {
    let observer = Arc::new(CollectingObserver::default());
    let request = Request { operation_id: "op".into(), input: input.into() };
    (engine.provision(plugin, request, observer.clone()).await, observer)
}

/// The engine still answers a well-behaved call.
async fn still_serving(engine: &Engine, plugin: &Plugin) {
    let (result, _) = call(engine, plugin, "ok").await;
    assert_eq!(result.unwrap().report.summary, "fine");
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_at_its_deadline() {
    let engine = engine_with(NodePolicy::default());
    let plugin = hostile(&engine, "timeout-ms = 300\n").await;
    let start = Instant::now();
    let (result, _) = call(&engine, &plugin, "loop").await;
    let elapsed = start.elapsed();
    match result {
        Err(InvokeError::Limit(Limit::Deadline { timeout })) => {
            assert_eq!(timeout, Duration::from_millis(300))
        }
        other => panic!("expected the deadline, got {other:?}"),
    }
    let overshoot = elapsed.saturating_sub(Duration::from_millis(300));
    println!("infinite loop stopped after {elapsed:?}: overshoot {overshoot:?}");
    // Not a performance check: a deadline that never fired would have hung
    // the test, one that fired early would fail here.
    assert!(elapsed >= Duration::from_millis(300));
    still_serving(&engine, &plugin).await;
}

#[tokio::test]
async fn memory_grow_is_refused_at_the_instance_total() {
    let engine = engine_with(NodePolicy::default());
    let plugin = hostile(&engine, "memory-mib = 16\n").await;
    let (result, _) = call(&engine, &plugin, "grow").await;
    match result {
        Err(InvokeError::Limit(Limit::Memory { requested, allowed })) => {
            assert_eq!(allowed, 16 << 20);
            assert!(requested > allowed);
        }
        other => panic!("expected the memory limit, got {other:?}"),
    }
    let err_text = call(&engine, &plugin, "grow").await.0.unwrap_err().to_string();
    assert!(err_text.contains("memory limit"), "{err_text}");
    still_serving(&engine, &plugin).await;
}

#[tokio::test]
async fn an_allocation_bomb_is_stopped_at_the_memory_limit() {
    let engine = engine_with(NodePolicy::default());
    let plugin = hostile(&engine, "memory-mib = 32\n").await;
    let (result, _) = call(&engine, &plugin, "alloc").await;
    assert!(
        matches!(result, Err(InvokeError::Limit(Limit::Memory { allowed, .. })) if allowed == 32 << 20),
        "{result:?}"
    );
    still_serving(&engine, &plugin).await;
}

#[tokio::test]
async fn unbounded_recursion_hits_the_stack_limit() {
    let engine = engine_with(NodePolicy::default());
    let plugin = hostile(&engine, "").await;
    let (result, _) = call(&engine, &plugin, "recurse").await;
    assert!(matches!(result, Err(InvokeError::Limit(Limit::Stack))), "{result:?}");
    still_serving(&engine, &plugin).await;
}

#[tokio::test]
async fn shadow_stack_exhaustion_is_a_contained_trap() {
    // The guest's own stack in linear memory overflows into address zero and
    // below: wasm bounds checks catch it; nothing outside the instance moves.
    let engine = engine_with(NodePolicy::default());
    let plugin = hostile(&engine, "").await;
    let (result, _) = call(&engine, &plugin, "recurse-shadow").await;
    match result {
        Err(InvokeError::Trap(m)) => assert!(m.contains("out of bounds memory access"), "{m}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    still_serving(&engine, &plugin).await;
}

#[tokio::test]
async fn a_panic_in_the_plugin_is_a_trap_with_its_message() {
    let engine = engine_with(NodePolicy::default());
    let plugin = hostile(&engine, "").await;
    let (result, observer) = call(&engine, &plugin, "panic").await;
    match result {
        Err(InvokeError::Trap(message)) => {
            assert!(message.contains("deliberate panic from the hostile fixture"), "{message}")
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    // The panic message also reached the plugin's log, from stderr.
    assert!(
        observer
            .logs()
            .iter()
            .any(|r| r.source == Source::Stderr && r.message.contains("deliberate panic"))
    );
    still_serving(&engine, &plugin).await;
}

#[tokio::test]
async fn a_host_call_argument_over_the_hostcall_budget_traps() {
    let policy = NodePolicy { max_hostcall_bytes: 1 << 20, ..NodePolicy::default() };
    let engine = engine_with(policy);
    let caps = "[capabilities.log]\n[capabilities.progress]\n\
                [capabilities.hashing]\nmax-input-bytes = 8388608\n";
    let plugin = engine.load(&manifest(caps, ""), HOSTILE.wasm()).await.unwrap();
    let (result, _) = call(&engine, &plugin, "hash:4194304").await;
    assert!(matches!(result, Err(InvokeError::Limit(Limit::HostcallBytes))), "{result:?}");
    // Just under the budget is fine.
    let (result, _) = call(&engine, &plugin, "hash:1000000").await;
    let digest = blake3::hash(&vec![7u8; 1_000_000]).to_hex().to_string();
    let report = result.unwrap().report;
    assert_eq!(report.fields[0].value, digest);
    still_serving(&engine, &plugin).await;
}

#[tokio::test]
async fn a_hash_input_over_the_grant_traps_naming_the_parameter() {
    let engine = engine_with(NodePolicy::default());
    let caps = "[capabilities.log]\n[capabilities.progress]\n\
                [capabilities.hashing]\nmax-input-bytes = 1000\n";
    let plugin = engine.load(&manifest(caps, ""), HOSTILE.wasm()).await.unwrap();
    let (result, _) = call(&engine, &plugin, "hash:1001").await;
    match result {
        Err(InvokeError::Limit(Limit::Capability { name, requested, allowed })) => {
            assert_eq!((name, requested, allowed), ("hashing.max-input-bytes", 1001, 1000))
        }
        other => panic!("expected the hashing limit, got {other:?}"),
    }
    let (result, _) = call(&engine, &plugin, "hash:1000").await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn resource_handles_are_bounded() {
    let policy = NodePolicy { max_handles: 100, ..NodePolicy::default() };
    let engine = engine_with(policy);
    let plugin = hostile(&engine, "").await;
    let (result, _) = call(&engine, &plugin, "handles:50").await;
    assert_eq!(result.unwrap().report.fields[0].value, "50");
    let (result, _) = call(&engine, &plugin, "handles:1000").await;
    assert!(matches!(result, Err(InvokeError::Limit(Limit::Count { .. }))), "{result:?}");
    still_serving(&engine, &plugin).await;
}

#[tokio::test]
async fn log_flooding_is_cut_at_the_budget_and_counted() {
    let engine = engine_with(NodePolicy::default());
    let caps = "[capabilities.log]\nmax-bytes = 10000\n[capabilities.progress]\n\
                [capabilities.hashing]\n";
    let plugin = engine.load(&manifest(caps, ""), HOSTILE.wasm()).await.unwrap();
    for (input, source) in [("log-flood:1000", Source::Log), ("print-flood:1000", Source::Stdout)] {
        let (result, observer) = call(&engine, &plugin, input).await;
        let outcome = result.unwrap();
        let logs = observer.logs();
        let kept: usize = logs
            .iter()
            .map(|r| {
                r.message.len() + r.fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            })
            .sum();
        assert!(kept <= 10_000, "{input}: kept {kept} bytes");
        assert!(logs.iter().all(|r| r.source == source));
        assert!(!logs.is_empty());
        assert_eq!(outcome.log.dropped_records as usize + logs.len(), 1000, "{input}");
    }
}

#[tokio::test]
async fn host_calls_refuse_bad_arguments_as_values() {
    let engine = engine_with(NodePolicy::default());
    let plugin = hostile(&engine, "").await;
    let (result, _) = call(&engine, &plugin, "bad-progress").await;
    let report = result.unwrap().report;
    assert_eq!(report.summary, "host refused");
    assert_eq!(report.fields[0].value, "invalid input: phase phase: done (5) exceeds total (1)");

    let (result, _) = call(&engine, &plugin, "refuse").await;
    assert!(matches!(result, Err(InvokeError::Plugin(PluginError::Denied(_)))), "{result:?}");
}

#[tokio::test]
async fn concurrent_misbehaviour_does_not_disturb_good_calls() {
    let engine = Arc::new(engine_with(NodePolicy::default()));
    let plugin = hostile(&engine, "timeout-ms = 500\nmemory-mib = 16\n").await;
    let mut tasks = Vec::new();
    for input in ["loop", "grow", "recurse", "panic", "ok", "ok", "ok", "loop"] {
        let engine = engine.clone();
        let plugin = plugin.clone();
        tasks.push(tokio::spawn(async move { (input, call(&engine, &plugin, input).await.0) }));
    }
    for task in tasks {
        let (input, result) = task.await.unwrap();
        assert_eq!(input == "ok", result.is_ok(), "{input}: {result:?}");
    }
}

#[tokio::test]
async fn files_that_are_not_components_are_refused_clearly() {
    let engine = engine_with(NodePolicy::default());
    let manifest = Manifest::from_toml("name = \"x\"\nversion = \"0.1.0\"\n").unwrap();

    let err = engine.load(&manifest, b"#!/bin/sh\necho hi\n".to_vec()).await.unwrap_err();
    assert!(matches!(err, LoadError::NotWasm), "{err}");

    let core = wat::parse_str("(module (func (export \"f\")))").unwrap();
    let err = engine.load(&manifest, core).await.unwrap_err();
    assert!(matches!(err, LoadError::CoreModule), "{err}");
    assert!(err.to_string().contains("core WebAssembly module, not a component"));

    let mut truncated = HOSTILE.wasm();
    truncated.truncate(truncated.len() / 2);
    let err = engine.load(&manifest, truncated).await.unwrap_err();
    assert!(matches!(err, LoadError::Compile(_)), "{err}");

    let policy = NodePolicy { max_component_bytes: 1000, ..NodePolicy::default() };
    let small = engine_with(policy);
    let err = small.load(&manifest, HOSTILE.wasm()).await.unwrap_err();
    assert!(matches!(err, LoadError::TooLarge { limit: 1000, .. }), "{err}");
}

#[test]
fn manifests_with_unknown_fields_or_out_of_range_limits_are_refused() {
    let cases = [
        ("name = \"a\"\nversion = \"1.0.0\"\nunknown = true\n", "unknown field `unknown`"),
        ("name = \"a\"\nversion = \"1.0.0\"\n[capabilities.sockets]\n", "unknown field `sockets`"),
        (
            "name = \"a\"\nversion = \"1.0.0\"\n[capabilities.log]\nmax-lines = 3\n",
            "unknown field `max-lines`",
        ),
        (
            "name = \"a\"\nversion = \"1.0.0\"\n[limits]\nmemory-mib = 0\n",
            "`limits.memory-mib` must be at least 1",
        ),
        ("name = \"a\"\nversion = \"1.0.0\"\n[limits]\ninstances = 99999999999\n", "instances"),
        ("name = \"Bad Name\"\nversion = \"1.0.0\"\n", "`name`"),
        ("version = \"1.0.0\"\n", "missing field `name`"),
    ];
    for (text, expected) in cases {
        let err = Manifest::from_toml(text).unwrap_err();
        assert!(err.to_string().contains(expected), "{text:?}: {err}");
    }
    let over =
        Manifest::from_toml("name = \"a\"\nversion = \"1.0.0\"\n[limits]\nmemory-mib = 4096\n")
            .unwrap()
            .grant(&NodePolicy::default())
            .unwrap_err();
    assert_eq!(over.violations[0].field, "limits.memory-mib");
    assert!(matches!(Manifest::from_toml(&"#".repeat(70_000)), Err(ManifestError::TooLarge(_))));
}
