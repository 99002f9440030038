// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! provctl's plugin commands, run as a user would run them.

use std::path::Path;
use std::process::{Command, Output};

use provd_tests::{HELLO, HOSTILE, SHARED_PARTITION};

fn provctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_provctl")).args(args).output().unwrap()
}

fn stdout_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn hello_files() -> (String, String, String) {
    let dir = HELLO.dir();
    (
        HELLO.component.to_string(),
        dir.join("plugin.toml").display().to_string(),
        dir.join("request.json").display().to_string(),
    )
}

#[test]
fn run_prints_the_report_logs_and_progress_as_json() {
    let (component, manifest, request) = hello_files();
    let out = provctl(&[
        "plugin",
        "run",
        "--component",
        &component,
        "--manifest",
        &manifest,
        "--input",
        &request,
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    assert_eq!(v["report"]["summary"], "hello, node-7: hashed 3 items");
    assert_eq!(v["report"]["fields"]["items"], "3");
    assert_eq!(v["report"]["output"][2]["blake3"], blake3::hash(b"vm-c").to_hex().as_str());
    assert_eq!(v["progress"].as_array().unwrap().len(), 4);
    assert_eq!(v["logs"][0]["message"], "hello");
    assert_eq!(v["logs"][0]["fields"]["name"], "node-7");
    assert_eq!(v["plugin"]["capabilities"]["hashing"]["max-input-bytes"], 1048576);
}

#[test]
fn run_in_human_form_shows_the_summary() {
    let (component, manifest, request) = hello_files();
    let out = provctl(&[
        "plugin",
        "run",
        "--component",
        &component,
        "--manifest",
        &manifest,
        "--input",
        &request,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("report: hello, node-7: hashed 3 items"), "{text}");
    assert!(text.contains("[progress] hash-items 3/3"), "{text}");
}

#[test]
fn a_plugin_stopped_by_a_limit_fails_with_the_limit_named() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("plugin.toml");
    std::fs::write(&manifest, "name = \"hostile\"\nversion = \"0.1.0\"\n[capabilities.log]\n[capabilities.progress]\n[capabilities.hashing]\n[limits]\ntimeout-ms = 200\n").unwrap();
    let request = dir.path().join("request.json");
    std::fs::write(&request, r#"{"input": "loop"}"#).unwrap();
    let args = [
        "plugin",
        "run",
        "--component",
        HOSTILE.component,
        "--manifest",
        manifest.to_str().unwrap(),
        "--input",
        request.to_str().unwrap(),
    ];
    let out = provctl(&args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("plugin stopped: deadline: the call ran past 200ms"), "{stderr}");

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = provctl(&json_args);
    assert!(!out.status.success());
    let v = stdout_json(&out);
    assert_eq!(v["error"]["kind"], "limit");
}

#[test]
fn check_lists_imports_and_refuses_undeclared_ones() {
    let (component, manifest, _) = hello_files();
    let out =
        provctl(&["plugin", "check", "--component", &component, "--manifest", &manifest, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    let imports: Vec<&str> =
        v["imports"].as_array().unwrap().iter().map(|i| i.as_str().unwrap()).collect();
    assert!(imports.contains(&"provd:plugin/hashing@0.1.0"), "{imports:?}");

    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("plugin.toml");
    std::fs::write(&bare, "name = \"hello\"\nversion = \"0.1.0\"\n").unwrap();
    let out = provctl(&[
        "plugin",
        "check",
        "--component",
        &component,
        "--manifest",
        bare.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "component imports interfaces its grant does not allow: provd:plugin/log@0.1.0"
        ),
        "{stderr}"
    );
}

#[test]
fn a_bad_manifest_is_refused_with_its_path_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("plugin.toml");
    std::fs::write(&manifest, "name = \"x\"\nversion = \"0.1.0\"\n[limits]\nmemory-mib = 0\n")
        .unwrap();
    let out = provctl(&[
        "plugin",
        "check",
        "--component",
        HOSTILE.component,
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("plugin.toml: `limits.memory-mib` must be at least 1"), "{stderr}");
    assert!(stderr.contains(manifest.to_str().unwrap()), "{stderr}");
}

#[test]
fn build_produces_the_component_of_a_crate() {
    let out = provctl(&["plugin", "build", HELLO.dir, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    let path = v["component"].as_str().unwrap();
    assert!(Path::new(path).exists());
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(v["blake3"], blake3::hash(&bytes).to_hex().as_str());
    // A component, not a core module: layer 1 in the preamble.
    assert_eq!(&bytes[..4], b"\0asm");
    assert_eq!(bytes[6..8], [1, 0]);
}

#[test]
fn images_are_imported_listed_inspected_and_removed() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "node\n").unwrap();
    std::fs::write(tree.join("etc/motd"), "hello\n").unwrap();
    let data = work.path().join("data");
    let data = data.to_str().unwrap();
    let tree = tree.to_str().unwrap();

    let out = provctl(&["image", "import", tree, "--data-dir", data, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    assert_eq!(v[0]["reference"], format!("dir:{tree}"));
    assert_eq!(v[0]["files"], 2);

    let v = stdout_json(&provctl(&["image", "ls", "--data-dir", data, "--json"]));
    assert_eq!(v.as_array().unwrap().len(), 1);

    let v = stdout_json(&provctl(&[
        "image",
        "inspect",
        tree,
        "--entries",
        "--data-dir",
        data,
        "--json",
    ]));
    let paths: Vec<&str> =
        v["entries"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["etc", "etc/hostname", "etc/motd"]);
    assert_eq!(v["entries"][1]["hash"], format!("blake3:{}", blake3::hash(b"node\n").to_hex()));

    let out = provctl(&["image", "import", "/nonexistent/image.tar", "--data-dir", data]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file or directory"));

    let v = stdout_json(&provctl(&["image", "rm", tree, "--data-dir", data, "--json"]));
    assert_eq!(v[0]["freed_objects"], 2);
    let v = stdout_json(&provctl(&["image", "gc", "--data-dir", data, "--json"]));
    assert_eq!(v["missing_objects"].as_array().unwrap().len(), 0);
}

#[test]
fn dedup_plan_finds_what_the_vms_share() {
    let work = tempfile::tempdir().unwrap();
    for (name, host) in [("a", "a\n"), ("b", "b\n")] {
        let root = work.path().join(name);
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::write(root.join("usr/lib/libc.so"), vec![7u8; 100_000]).unwrap();
        std::fs::write(root.join("hostname"), host).unwrap();
    }
    let data = work.path().join("data");
    let data = data.to_str().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    assert!(provctl(&["image", "import", a, b, "--data-dir", data]).status.success());
    let out = provctl(&[
        "dedup",
        "plan",
        "--data-dir",
        data,
        "--vm",
        &format!("vm-a={a}"),
        "--vm",
        &format!("vm-b={b}"),
        "--vm",
        &format!("vm-c={a}"),
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    assert_eq!(v["analysis"]["naive_bytes"], 300_006);
    assert_eq!(v["analysis"]["distinct_content_bytes"], 100_004);
    assert_eq!(v["plan"]["layers"][0]["vms"], serde_json::json!(["vm-a", "vm-b", "vm-c"]));
    assert_eq!(v["plan"]["layers"][0]["bytes"], 100_000);
    assert_eq!(v["plan"]["layers"][1]["vms"], serde_json::json!(["vm-a", "vm-c"]));
    assert_eq!(v["plan"]["stored_bytes"], 100_004);

    let out = provctl(&["dedup", "plan", "--data-dir", data, "--vm", "nonsense"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("write NAME=REFERENCE"));
}

#[test]
fn check_shows_the_grant_of_plugins_that_need_node_services_against_a_nodes_policy() {
    let flagship = SHARED_PARTITION.dir().join("plugin.toml");
    let manifest = flagship.to_str().unwrap();
    // `provctl plugin check` of the flagship plugin, with `extra` arguments.
    let check = |extra: &[&str]| {
        let mut args = vec![
            "plugin",
            "check",
            "--component",
            SHARED_PARTITION.component,
            "--manifest",
            manifest,
        ];
        args.extend_from_slice(extra);
        provctl(&args)
    };
    // The flagship plugin declares images, dedup, partitions and vm.
    let out = check(&["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    for capability in ["images", "dedup", "partitions", "vm"] {
        assert!(!v["capabilities"][capability].is_null(), "{capability}: {v}");
    }
    assert_eq!(v["checked-against"], "provd's default policy");

    // Against a node's provd.toml: its ceilings decide.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("provd.toml");
    let write = |policy: &str| {
        std::fs::write(
            &config,
            format!(
                "data-dir = \"data\"\nlisten = \"127.0.0.1:0\"\ntrusted-keys = [\"k.pub\"]\n\
                 [tls]\ncert = \"c.pem\"\nkey = \"c.key\"\nclient-ca = \"ca.pem\"\n[policy]\n{policy}"
            ),
        )
        .unwrap();
    };
    let against = ["--config", config.to_str().unwrap()];
    write("image-sources = [\"dir:/srv/images/*\"]\n");
    let out = check(&against);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("checked against the policy of {}", config.display())),
        "{text}"
    );
    assert!(text.contains("provd:plugin/vm@0.1.0"), "{text}");
    write("max-vm-vcpus = 1\nmax-memory-mib = 1\n");
    let out = check(&against);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("limits.memory-mib"), "{stderr}");
}

#[test]
fn console_log_keeps_a_vmms_serial_output_capped_and_rotated() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    // The VMM's side, as Cloud Hypervisor's `Socket` serial mode has it: it
    // listens on serial.sock in the VM's directory.
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("serial.sock")).unwrap();
    let printed: Vec<u8> = (0..25_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let sent = printed.clone();
    let vmm = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(&sent).unwrap();
    });
    let vm_dir = dir.path().to_str().unwrap();
    let out = provctl(&[
        "vm",
        "console-log",
        vm_dir,
        "--max-bytes",
        "10000",
        "--keep",
        "1",
        "--wait",
        "10",
        "--once",
    ]);
    vmm.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cur = std::fs::read(dir.path().join("serial.log")).unwrap();
    let older = std::fs::read(dir.path().join("serial.log.1")).unwrap();
    assert!(!dir.path().join("serial.log.2").exists());
    assert_eq!((older.len(), cur.len()), (10_000, 5_000));
    assert_eq!([older, cur].concat(), printed[10_000..]);

    // No VMM: a clear error naming the socket, after the wait.
    std::fs::remove_file(dir.path().join("serial.sock")).unwrap();
    let out = provctl(&["vm", "console-log", vm_dir, "--wait", "0", "--once"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no VMM listens on") && err.contains("serial.sock"), "{err}");
}
