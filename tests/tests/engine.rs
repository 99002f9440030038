// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The engine on well-behaved plugins: the hello example end to end, the
//! artifact cache, and capability enforcement at load time.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use provd_domain::{Manifest, NodePolicy};
use provd_engine::{
    CacheOutcome, CollectingObserver, EngineConfig, InvokeError, Level, LoadError, PluginError,
    Request, Source,
};
use provd_testkit::Harness;
use provd_tests::{HELLO, HOSTILE};

fn hello_manifest() -> Manifest {
    let text = std::fs::read_to_string(HELLO.dir().join("plugin.toml")).unwrap();
    Manifest::from_toml(&text).unwrap()
}

fn request(input: &str) -> Request {
    Request { operation_id: "op-1".into(), input: input.into() }
}

#[tokio::test]
async fn hello_logs_reports_progress_and_hashes_through_the_host() {
    let harness = Harness::new().unwrap();
    let plugin = harness.engine().load(&hello_manifest(), HELLO.wasm()).await.unwrap();
    let run = harness.run(&plugin, r#"{"name":"node-7","items":["vm-a","vm-b"]}"#).await;
    let outcome = run.result.unwrap();

    assert_eq!(outcome.report.summary, "hello, node-7: hashed 2 items");
    assert_eq!(outcome.report.fields.len(), 1);
    assert_eq!(outcome.report.fields[0].key, "items");
    assert_eq!(outcome.report.fields[0].value, "2");
    // The digests the plugin got from the host are real BLAKE3 digests.
    let output: serde_json::Value = serde_json::from_str(&outcome.report.output).unwrap();
    for (i, item) in ["vm-a", "vm-b"].iter().enumerate() {
        assert_eq!(output[i]["item"], *item);
        assert_eq!(output[i]["blake3"], blake3::hash(item.as_bytes()).to_hex().as_str());
    }

    let logs = run.observer.logs();
    let hello = logs.iter().find(|r| r.message == "hello").expect("the hello record");
    assert_eq!(hello.level, Level::Info);
    assert_eq!(hello.source, Source::Log);
    assert_eq!(
        hello.fields,
        vec![("name".into(), "node-7".into()), ("operation".into(), "test-op".into())]
    );
    assert_eq!(logs.iter().filter(|r| r.level == Level::Debug).count(), 2);
    let stdout: Vec<_> = logs.iter().filter(|r| r.source == Source::Stdout).collect();
    assert_eq!(stdout.len(), 1);
    assert_eq!(stdout[0].message, "hello plugin done with 2 items");

    let progress: Vec<_> =
        run.observer.progress_events().iter().map(|p| (p.phase.clone(), p.done, p.total)).collect();
    let phase = || "hash-items".to_string();
    assert_eq!(progress, vec![(phase(), 0, Some(2)), (phase(), 1, Some(2)), (phase(), 2, Some(2))]);
    assert_eq!(outcome.log.dropped_records, 0);
}

#[tokio::test]
async fn plugin_errors_reach_the_caller_as_values() {
    let harness = Harness::new().unwrap();
    let plugin = harness.engine().load(&hello_manifest(), HELLO.wasm()).await.unwrap();
    let run = harness.run(&plugin, r#"{"name":"x","colour":"red"}"#).await;
    match run.result {
        Err(InvokeError::Plugin(PluginError::InvalidInput(m))) => {
            assert!(m.contains("unknown field `colour`"), "{m}")
        }
        other => panic!("expected invalid input, got {other:?}"),
    }
    let run = harness.run(&plugin, r#"{"name":""}"#).await;
    assert!(matches!(
        run.result,
        Err(InvokeError::Plugin(PluginError::InvalidInput(m))) if m == "input.name: must not be empty"
    ));
}

#[tokio::test]
async fn components_are_compiled_once_and_cached_privately() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = EngineConfig { cache_dir: Some(cache.clone()), ..EngineConfig::default() };
    let manifest = hello_manifest();

    let engine = provd_host::engine(config.clone(), None).unwrap();
    let first = engine.load(&manifest, HELLO.wasm()).await.unwrap();
    assert_eq!(first.cache_outcome(), CacheOutcome::Compiled);
    let second = engine.load(&manifest, HELLO.wasm()).await.unwrap();
    assert_eq!(second.cache_outcome(), CacheOutcome::Memory);
    drop(engine);

    let engine = provd_host::engine(config, None).unwrap();
    let third = engine.load(&manifest, HELLO.wasm()).await.unwrap();
    assert_eq!(third.cache_outcome(), CacheOutcome::Disk);
    let observer = Arc::new(CollectingObserver::default());
    let outcome =
        engine.provision(&third, request(r#"{"name":"cached"}"#), observer).await.unwrap();
    assert_eq!(outcome.report.summary, "hello, cached: hashed 0 items");

    // One artifact, named by the component's digest, in a directory only
    // provd's user can enter.
    let engine_dirs: Vec<_> =
        std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(engine_dirs.len(), 1);
    let mode = std::fs::metadata(&engine_dirs[0]).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let artifacts: Vec<_> = std::fs::read_dir(&engine_dirs[0])
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(artifacts, vec![format!("{}.cwasm", third.digest_hex())]);
}

#[tokio::test]
async fn an_undeclared_capability_is_refused_before_instantiation() {
    let engine = provd_host::engine(EngineConfig::default(), None).unwrap();
    // hello imports log, progress and hashing; this manifest grants only log.
    let manifest =
        Manifest::from_toml("name = \"hello\"\nversion = \"0.1.0\"\n[capabilities.log]\n").unwrap();
    let err = engine.load(&manifest, HELLO.wasm()).await.unwrap_err();
    let LoadError::UndeclaredImports(offending) = &err else { panic!("{err}") };
    assert_eq!(offending.len(), 2, "{offending:?}");
    assert!(offending[0].starts_with("provd:plugin/progress@0.1.0 (capability `progress`"));
    assert!(offending[1].starts_with("provd:plugin/hashing@0.1.0 (capability `hashing`"));
    assert!(err.to_string().contains("not declared in plugin.toml"), "{err}");
}

#[tokio::test]
async fn a_grant_links_only_what_it_names() {
    let engine = provd_host::engine(EngineConfig::default(), None).unwrap();
    let plugin = engine.load(&hello_manifest(), HELLO.wasm()).await.unwrap();
    let provd_imports: Vec<_> =
        plugin.imports().iter().filter(|i| i.starts_with("provd:")).cloned().collect();
    assert_eq!(
        provd_imports,
        [
            "provd:plugin/types@0.1.0",
            "provd:plugin/log@0.1.0",
            "provd:plugin/progress@0.1.0",
            "provd:plugin/hashing@0.1.0"
        ]
    );
    assert!(plugin.imports().iter().all(|i| !i.starts_with("wasi:sockets")));
}

#[tokio::test]
async fn interfaces_provd_does_not_offer_are_refused_by_name() {
    let engine = provd_host::engine(EngineConfig::default(), None).unwrap();
    let manifest = Manifest::from_toml("name = \"evil\"\nversion = \"0.1.0\"\n").unwrap();
    let wasm = wat::parse_str(
        r#"(component
             (import "wasi:sockets/tcp@0.2.0" (instance))
             (import "evil:net/exfiltrate@1.0.0" (instance)))"#,
    )
    .unwrap();
    let err = engine.load(&manifest, wasm).await.unwrap_err();
    let LoadError::UndeclaredImports(offending) = &err else { panic!("{err}") };
    assert_eq!(
        offending,
        &[
            "wasi:sockets/tcp@0.2.0 (not provided by provd)".to_string(),
            "evil:net/exfiltrate@1.0.0 (not provided by provd)".to_string(),
        ]
    );
}

#[tokio::test]
async fn a_component_without_the_provision_export_is_refused() {
    let engine = provd_host::engine(EngineConfig::default(), None).unwrap();
    let manifest = Manifest::from_toml("name = \"empty\"\nversion = \"0.1.0\"\n").unwrap();
    let err = engine.load(&manifest, wat::parse_str("(component)").unwrap()).await.unwrap_err();
    assert!(matches!(err, LoadError::WrongWorld(_)), "{err}");
    assert!(err.to_string().contains("provision"), "{err}");
}

#[tokio::test]
async fn pooling_is_used_when_the_machine_allows_it_and_optional_otherwise() {
    let pooled = provd_host::engine(EngineConfig::default(), None).unwrap();
    let on_demand =
        provd_host::engine(EngineConfig { pooling: false, ..EngineConfig::default() }, None)
            .unwrap();
    assert!(!on_demand.pooling());
    // Both serve the same plugin the same way.
    for engine in [&pooled, &on_demand] {
        let manifest = Manifest::from_toml(
            "name = \"m\"\nversion = \"0.1.0\"\n[capabilities.hashing]\n\
             [capabilities.log]\n[capabilities.progress]\n",
        )
        .unwrap();
        let plugin = engine.load(&manifest, HOSTILE.wasm()).await.unwrap();
        let observer = Arc::new(CollectingObserver::default());
        let outcome = engine.provision(&plugin, request("ok"), observer).await.unwrap();
        assert_eq!(outcome.report.summary, "fine");
    }
    println!("pooling allocator in use on this machine: {}", pooled.pooling());
}

#[tokio::test]
async fn the_policy_refuses_a_manifest_that_asks_too_much() {
    let policy = NodePolicy { max_memory_bytes: 32 << 20, ..NodePolicy::default() };
    let harness = Harness::with_policy(policy).unwrap();
    let manifest = Manifest::from_toml(
        "name = \"big\"\nversion = \"0.1.0\"\n[limits]\nmemory-mib = 64\ntimeout-ms = 99999999\n",
    )
    .unwrap();
    let err = harness.engine().load(&manifest, HELLO.wasm()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugin big asks for more than this node allows: limits.memory-mib = 64 exceeds the \
         node's 32; limits.timeout-ms = 99999999 exceeds the node's 600000"
    );
}

#[tokio::test]
async fn without_address_space_for_the_pool_the_engine_falls_back_to_on_demand() {
    // A pool for a million concurrent instances needs far more virtual
    // memory than any machine has, so reserving it fails.
    let policy = NodePolicy { max_concurrent_invocations: 1_000_000, ..NodePolicy::default() };
    let engine =
        provd_host::engine(EngineConfig { policy, ..EngineConfig::default() }, None).unwrap();
    assert!(!engine.pooling());
    let plugin = engine.load(&hello_manifest(), HELLO.wasm()).await.unwrap();
    let observer = Arc::new(CollectingObserver::default());
    let outcome = engine.provision(&plugin, request(r#"{"name":"n"}"#), observer).await.unwrap();
    assert_eq!(outcome.report.summary, "hello, n: hashed 0 items");
}

/// An observer with a bug: it panics on the first progress event.
struct PanickingObserver;

impl provd_engine::Observer for PanickingObserver {
    fn log(&self, _: &provd_engine::LogRecord) {}
    fn progress(&self, _: &provd_engine::ProgressEvent) {
        panic!("observer bug");
    }
}

#[tokio::test]
async fn a_panic_in_host_code_ends_only_that_call() {
    let engine = provd_host::engine(EngineConfig::default(), None).unwrap();
    let plugin = engine.load(&hello_manifest(), HELLO.wasm()).await.unwrap();
    let result =
        engine.provision(&plugin, request(r#"{"name":"n"}"#), Arc::new(PanickingObserver)).await;
    match result {
        Err(InvokeError::Host(m)) => assert_eq!(m, "host panic: observer bug"),
        other => panic!("expected a host failure, got {other:?}"),
    }
    let observer = Arc::new(CollectingObserver::default());
    let outcome = engine.provision(&plugin, request(r#"{"name":"n"}"#), observer).await.unwrap();
    assert_eq!(outcome.report.summary, "hello, n: hashed 0 items");
}
