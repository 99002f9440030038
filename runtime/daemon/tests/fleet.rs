// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! A node as a fleet operator sees it: Debian's Prometheus, started here,
//! scrapes the daemon over mutual TLS with a reader's certificate, answers
//! PromQL about its operations and evaluates the alerts docs/api.md gives;
//! the daemon's JSON log parses line
//! by line; images are deleted and collected through the API, on request
//! and on a schedule, never one a VM or a running operation uses.

mod common;

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::Duration;

use common::{client, code, finished, imager, node, partitions_params, spec, wait_until};
use provd_client::{Client, encode};
use provd_tests::{IMAGER, SHARED_PARTITION};
use serde_json::{Value, json};

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on 127.0.0.1:`port` over plain HTTP: status and body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// The value of PromQL `query`'s single series, if it has one.
fn promql(port: u16, query: &str) -> Option<f64> {
    let (status, body) = http_get(port, &format!("/api/v1/query?query={}", encode(query)))?;
    assert_eq!(status, 200, "{query}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let result = v["data"]["result"].as_array()?;
    assert!(result.len() <= 1, "{query}: {body}");
    result.first()?["value"][1].as_str()?.parse().ok()
}

/// Prometheus scraping the node every second, as `prometheus.yml` would
/// have it on a real fleet: HTTPS, the node's CA, a client certificate.
struct Prometheus {
    child: std::process::Child,
    port: u16,
}

impl Prometheus {
    fn start(dir: &Path, target: &str, ca: &Path, cert: &Path, key: &Path) -> Prometheus {
        let port = free_port();
        let rules = documented_alerts(dir);
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [{rules:?}]\nscrape_configs:\n\
                 - job_name: provd\n  scheme: https\n  tls_config:\n    ca_file: {ca:?}\n\
                 \x20   cert_file: {cert:?}\n    key_file: {key:?}\n\
                 \x20 static_configs:\n  - targets: [{target:?}]\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = std::process::Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Prometheus { child, port };
        for _ in 0..300 {
            if http_get(port, "/-/ready").is_some_and(|(s, _)| s == 200) {
                return p;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
        panic!("prometheus did not become ready:\n{log}");
    }

    /// Waits until `query` gives `want` (Prometheus scrapes once a second).
    fn wait_for(&self, query: &str, want: impl Fn(f64) -> bool) -> f64 {
        let mut last = None;
        for _ in 0..120 {
            last = promql(self.port, query);
            if last.is_some_and(&want) {
                return last.unwrap();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("{query}: last {last:?}");
    }
}

/// The families of the table in docs/api.md's Metrics section, with their
/// types.
fn documented_families() -> Vec<(String, String)> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md")).unwrap();
    let section = doc.split_once("\n## Metrics").expect("docs/api.md has no Metrics section").1;
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| {
            let mut cells = l.strip_prefix("| `")?.split(" | ");
            let name = cells.next()?.strip_suffix('`')?;
            let kind = cells.next()?;
            Some((name.to_string(), kind.to_string()))
        })
        .collect()
}

/// The alerting rules docs/api.md gives operators, as a rules file that
/// `promtool` has checked.
fn documented_alerts(dir: &Path) -> std::path::PathBuf {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md")).unwrap();
    let section = doc.split_once("### Alerts").expect("docs/api.md has no Alerts section").1;
    let yaml = section.split_once("```yaml\n").unwrap().1.split_once("```").unwrap().0;
    let file = dir.join("alerts.yml");
    std::fs::write(&file, yaml).unwrap();
    let out = std::process::Command::new("/usr/bin/promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool refuses the documented rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    file
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_node_over_mutual_tls_and_every_log_line_is_json() {
    assert!(Path::new(PROMETHEUS).exists(), "Debian's prometheus is missing: run scripts/setup.sh");
    let dir = tempfile::tempdir().unwrap();
    let extra = "[access]\nadmins = [\"manager-1\"]\nreaders = [\"prometheus\"]\n\
                 [log]\nformat = \"json\"\n";
    let mut node = node(dir.path(), extra);
    // The partition writers' debug events come from blocking threads: they
    // must carry their operation as much as the async steps' events do.
    node.terminate();
    node.log_filter = Some("info,provd_partitions=debug".into());
    node.restart().unwrap();
    let c = client(&node);

    // Every family is exported before anything happened, at zero where
    // its labels are known.
    let fresh = c.get_text("/metrics").await.unwrap();
    for family in [
        "provd_operations_total{outcome=\"succeeded\"} 0",
        "provd_operation_duration_seconds_count{plugin=\"provd\",outcome=\"failed\"} 0",
        "provd_host_call_duration_seconds_count{interface=\"dedup\",function=\"plan\"} 0",
        "provd_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/gc\"} 0",
        "provd_node_vcpus{state=\"total\"} 16",
        "provd_node_vcpus{state=\"free\"} 16",
        "provd_node_memory_bytes{state=\"reserved\"} 0",
        "provd_store_items{kind=\"vms\"} 0",
        "provd_image_gc_runs_total{trigger=\"request\",outcome=\"succeeded\"} 0",
        "# TYPE provd_plugin_traps counter",
        "# TYPE provd_plugin_limit_hits counter",
        "# TYPE provd_operation_phase_duration_seconds histogram",
        "# TYPE process_open_fds gauge",
    ] {
        assert!(fresh.contains(family), "{family} not in\n{fresh}");
    }
    // Every family docs/api.md lists is exported, with the type it gives,
    // before anything was observed: a dashboard can tell zero from absent.
    let documented = documented_families();
    assert!(documented.len() >= 30, "{documented:?}");
    for (name, kind) in &documented {
        // OpenMetrics names a counter family without its `_total`.
        let family = if kind == "counter" { name.trim_end_matches("_total") } else { name };
        let line = format!("# TYPE {family} {kind}\n");
        assert!(fresh.contains(&line), "{line:?} not in\n{fresh}");
    }

    // The quick start's flow: the shared-partition bundle deployed, VMs
    // provisioned in one request, then one more on its own, one deleted.
    let manifest = std::fs::read_to_string(SHARED_PARTITION.dir().join("plugin.toml")).unwrap();
    c.deploy(node.bundle(&manifest, &SHARED_PARTITION.wasm())).await.unwrap();
    let images = dir.path().join("images");
    let request = json!({"plugin": "shared-partition",
        "vms": [spec("web-1", &images.join("web")), spec("db-1", &images.join("db"))],
        "params": {"min-layer-bytes": 0}});
    let done = finished(&c, &request).await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:#?}");
    let request = json!({"plugin": "shared-partition", "vms": [spec("web-2", &images.join("web"))],
                         "params": {"min-layer-bytes": 0}});
    assert_eq!(finished(&c, &request).await.state.as_str(), "succeeded");
    c.delete("/v1/vms/db-1").await.unwrap();

    // The plugin's series were created when its bundle was accepted.
    let text = c.get_text("/metrics").await.unwrap();
    assert!(
        text.contains(
            "provd_plugin_limit_hits_total{plugin=\"shared-partition\",limit=\"deadline\"} 0"
        ),
        "{text}"
    );

    // Prometheus scrapes with a reader's certificate: the node is up, the
    // operations are counted with their outcome, their durations observed.
    let reader = node.pki.client("prometheus", "prometheus").unwrap();
    let target = c.base().trim_start_matches("https://").trim_end_matches('/').to_string();
    let prom = Prometheus::start(dir.path(), &target, &node.pki.ca_pem, &reader.cert, &reader.key);
    prom.wait_for("up{job=\"provd\"}", |v| v == 1.0);
    // Two plugin operations and the deletion (provd's own).
    prom.wait_for("provd_operations_total{outcome=\"succeeded\"}", |v| v == 3.0);
    prom.wait_for(
        "provd_operation_duration_seconds_count{plugin=\"shared-partition\",outcome=\"succeeded\"}",
        |v| v == 2.0,
    );
    prom.wait_for(
        "provd_operation_duration_seconds_sum{plugin=\"shared-partition\",outcome=\"succeeded\"}",
        |v| v > 0.0,
    );
    prom.wait_for(
        "sum(provd_operation_phase_duration_seconds_count{plugin=\"shared-partition\",\
         phase=\"instantiate\"})",
        |v| v == 2.0,
    );
    prom.wait_for(
        "provd_host_call_duration_seconds_count{interface=\"images\",function=\"fetch\"}",
        |v| v == 3.0,
    );
    prom.wait_for("provd_node_vcpus{state=\"reserved\"}", |v| v == 2.0);
    prom.wait_for("provd_store_items{kind=\"vms\"}", |v| v == 2.0);
    prom.wait_for("provd_store_items{kind=\"images\"}", |v| v == 2.0);
    prom.wait_for("process_resident_memory_bytes", |v| v > 1e6);
    prom.wait_for("time() - process_start_time_seconds", |v| (0.0..600.0).contains(&v));
    prom.wait_for(
        "sum(provd_http_request_duration_seconds_count{route=\"/metrics\",method=\"GET\"})",
        |v| v >= 2.0,
    );
    // Every documented alert evaluates against the node's real series.
    let mut unhealthy = Vec::new();
    for _ in 0..60 {
        let (_, body) = http_get(prom.port, "/api/v1/rules").unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        let rules: Vec<&Value> = v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        assert!(rules.len() >= 10, "{body}");
        unhealthy = rules
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if unhealthy.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(unhealthy.is_empty(), "{unhealthy:?}");
    // No series is named after a VM.
    let text = c.get_text("/metrics").await.unwrap();
    assert!(!text.contains("web-1") && !text.contains("db-1"), "{text}");
    drop(prom);

    // Every line the daemon wrote is one JSON object, and the operation's
    // lines say which operation, actor and plugin.
    node.terminate();
    let log = std::fs::read_to_string(&node.log).unwrap();
    let mut with_operation = 0;
    let mut plugin_records = 0;
    let mut written = 0;
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        for key in ["time", "level", "target", "message"] {
            assert!(v[key].is_string(), "{key} missing: {line}");
        }
        if v["operation"].is_string() {
            with_operation += 1;
            assert_eq!(v["actor"], "manager-1", "{line}");
        }
        if v["message"] == "private image written" {
            written += 1;
            assert!(v["operation"].is_string(), "{line}");
            assert_eq!(v["plugin"], "shared-partition", "{line}");
        }
        if v["plugin_level"].is_string() {
            plugin_records += 1;
            assert_eq!(v["plugin"], "shared-partition", "{line}");
            assert!(v["operation"].is_string() && v["fields"].is_object(), "{line}");
        }
    }
    assert!(with_operation >= 6, "{log}");
    assert!(plugin_records >= 1, "no plugin log record in\n{log}");
    // One private partition for each of the three VMs provisioned.
    assert_eq!(written, 3, "{log}");
    assert!(log.contains("\"message\":\"operation finished\""), "{log}");
}

/// A node with the imager plugin, an image no VM uses (`old`), and a
/// client of it.
async fn imager_node(dir: &Path, extra: &str) -> (provd_tests::daemon::TestNode, Client) {
    let old = dir.join("images/old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("only-old.bin"), vec![9u8; 200_000]).unwrap();
    let node = node(dir, extra);
    let c = client(&node);
    c.deploy(node.bundle(&imager("1.0.0", &dir.join("images")), &IMAGER.wasm())).await.unwrap();
    (node, c)
}

async fn held(c: &Client) -> Vec<(String, bool)> {
    let list: provd_wire::ImageList = c.get("/v1/images").await.unwrap().decode().unwrap();
    let mut out: Vec<(String, bool)> = list
        .images
        .into_iter()
        .map(|i| {
            let name = i.reference.rsplit('/').next().unwrap().to_string();
            (name, i.in_use)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn images_are_collected_through_the_api_and_never_one_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, c) = imager_node(dir.path(), "").await;
    let images = dir.path().join("images");
    let reference = |name: &str| format!("dir:{}", images.join(name).display());

    // web is a VM's; db is held by an operation that runs; old was only
    // fetched.
    let request = json!({"plugin": "imager", "vms": [spec("web-1", &images.join("web"))],
                         "params": partitions_params(false)});
    assert_eq!(finished(&c, &request).await.state.as_str(), "succeeded");
    let request = json!({"plugin": "imager", "params": {"op": "fetch", "image": reference("old")}});
    assert_eq!(finished(&c, &request).await.state.as_str(), "succeeded");
    let mut params = partitions_params(false);
    params["pause_after"] = json!(0);
    let request =
        json!({"plugin": "imager", "vms": [spec("db-1", &images.join("db"))], "params": params});
    let running =
        c.provision(&request).await.unwrap().body["operation"]["id"].as_str().unwrap().to_string();
    wait_until(&c, &running, |op| op.phase.as_deref() == Some("paused")).await;
    assert_eq!(held(&c).await, [("db".into(), true), ("old".into(), false), ("web".into(), true)]);

    // Neither the VM's image nor the running operation's can be deleted.
    let path = |name: &str| format!("/v1/images?reference={}", encode(&reference(name)));
    let (status, code_, message) = code(c.delete(&path("web")).await.unwrap_err());
    assert_eq!((status, code_.as_str()), (409, "in-use"), "{message}");
    assert!(message.contains("web-1"), "{message}");
    let (status, code_, message) = code(c.delete(&path("db")).await.unwrap_err());
    assert_eq!((status, code_.as_str()), (409, "in-use"), "{message}");
    assert!(message.contains("running operation"), "{message}");
    let (status, _, _) = code(c.delete(&path("nothing")).await.unwrap_err());
    assert_eq!(status, 404);
    let (status, code_, _) = code(c.delete("/v1/images").await.unwrap_err());
    assert_eq!((status, code_.as_str()), (400, "invalid-request"));

    // A collection of everything unused, while the operation runs: old
    // goes with the file only it had, the two in use stay.
    let objects_before = count_objects(&node.data);
    let gc = c.post_json("/v1/gc", &json!({"max-age-secs": 0})).await.unwrap();
    let report: provd_wire::GcAnswer = gc.decode().unwrap();
    let removed: Vec<&str> = report.gc.images.iter().map(|i| i.reference.as_str()).collect();
    assert_eq!(removed, [reference("old").as_str()], "{:?}", report.gc);
    assert_eq!(report.gc.images[0].reason, "age");
    assert_eq!(report.gc.in_use, 2, "{:?}", report.gc);
    assert_eq!((report.gc.objects, report.gc.bytes), (1, 200_000), "{:?}", report.gc);
    assert_eq!(count_objects(&node.data), objects_before - 1);
    assert_eq!(held(&c).await, [("db".into(), true), ("web".into(), true)]);

    // Once the operation ends, its image is no longer held.
    c.post_json(&format!("/v1/operations/{running}/cancel"), &json!({})).await.unwrap();
    let ended = c.wait(&running, |_| {}).await.unwrap();
    assert_eq!(ended.state.as_str(), "cancelled");
    assert_eq!(held(&c).await, [("db".into(), false), ("web".into(), true)]);
    let deleted = c.delete(&path("db")).await.unwrap().body;
    assert_eq!(deleted["reference"], reference("db"));
    assert!(deleted["objects"].as_u64().unwrap() >= 1, "{deleted}");

    // In the metrics and the audit trail.
    let text = c.get_text("/metrics").await.unwrap();
    for line in [
        "provd_image_gc_runs_total{trigger=\"request\",outcome=\"succeeded\"} 1",
        "provd_image_gc_removed_images_total 1",
        "provd_image_gc_freed_bytes_total 200000",
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    let audit = c.get("/v1/audit?limit=1000").await.unwrap().body;
    let rows = audit["audit"].as_array().unwrap().clone();
    let kinds: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r["kind"] == "image" || r["kind"] == "image-gc")
        .map(|r| (r["kind"].as_str().unwrap().into(), r["outcome"].as_str().unwrap().into()))
        .collect();
    for want in [("image-gc", "succeeded"), ("image", "refused"), ("image", "deleted")] {
        assert!(kinds.contains(&(want.0.into(), want.1.into())), "{want:?} not in {kinds:?}");
    }

    // On a schedule with a byte budget: the next unused image goes by
    // itself, the VM's stays whatever the budget.
    let request = json!({"plugin": "imager", "params": {"op": "fetch", "image": reference("old")}});
    assert_eq!(finished(&c, &request).await.state.as_str(), "succeeded");
    node.terminate();
    let mut config = std::fs::read_to_string(&node.config).unwrap();
    config.push_str("\n[images]\nmax-bytes = 1\ngc-interval-secs = 1\n");
    std::fs::write(&node.config, config).unwrap();
    node.restart().unwrap();
    let c = client(&node);
    for _ in 0..100 {
        if held(&c).await == [("web".into(), true)] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(held(&c).await, [("web".into(), true)]);
    let text = c.get_text("/metrics").await.unwrap();
    let runs: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("provd_image_gc_runs_total{trigger=\"schedule\",outcome=\"succeeded\"} ")
        })
        .unwrap()
        .parse()
        .unwrap();
    assert!(runs >= 1.0, "{text}");
    let audit = c.get("/v1/audit?kind=image-gc&limit=1000").await.unwrap().body;
    let scheduled: Vec<&Value> = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["actor"] == "provd" && r["function"] == "schedule")
        .collect();
    assert!(
        scheduled.iter().any(|r| r["detail"].as_str().unwrap().contains(&reference("old"))),
        "{audit:#}"
    );

    // The store's figures are its object files, as a budget counts them.
    let text = c.get_text("/metrics").await.unwrap();
    let figure = |name: &str| -> u64 {
        text.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().parse().unwrap()
    };
    assert_eq!(figure("provd_store_items{kind=\"objects\"} ") as usize, count_objects(&node.data));
    assert_eq!(figure("provd_store_bytes{kind=\"objects\"} "), object_bytes(&node.data));
}

/// Bytes of the object files in the store.
fn object_bytes(data: &Path) -> u64 {
    fn sum(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                if e.file_type().unwrap().is_dir() {
                    sum(&e.path())
                } else {
                    e.metadata().unwrap().len()
                }
            })
            .sum()
    }
    sum(&data.join("objects"))
}

/// Object files in the store.
fn count_objects(data: &Path) -> usize {
    walk(&data.join("objects"))
}

fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
        .unwrap_or(0)
}

/// Collections back to back, removing every unused image, while VMs are
/// provisioned one after another and all but the last two deleted, so
/// that their images are collected and fetched again meanwhile: every
/// operation succeeds, and the VMs left have partitions that give back
/// their images exactly.
#[tokio::test(flavor = "multi_thread")]
async fn collections_throughout_provisioning_leave_every_vm_whole() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let (mut node, c) = imager_node(dir.path(), "").await;
    let images = dir.path().join("images");
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let c = client(&node);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut runs = 0u32;
            while !stop.load(Ordering::Relaxed) {
                c.post_json("/v1/gc", &json!({"max-age-secs": 0})).await.unwrap();
                runs += 1;
            }
            runs
        })
    };
    let order = ["web", "web", "db", "db", "web", "db", "web", "db"];
    for (i, img) in order.iter().enumerate() {
        let vm = format!("vm-{i}");
        let request = json!({"plugin": "imager", "vms": [spec(&vm, &images.join(img))],
                             "params": partitions_params(false)});
        let done = finished(&c, &request).await;
        assert_eq!(done.state.as_str(), "succeeded", "{vm}: {done:#?}");
        if i + 2 < order.len() {
            c.delete(&format!("/v1/vms/{vm}")).await.unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let runs = collector.await.unwrap();
    let text = c.get_text("/metrics").await.unwrap();
    let removed: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("provd_image_gc_removed_images_total "))
        .unwrap()
        .parse()
        .unwrap();
    println!("{runs} collections removed {removed} images");
    assert!(runs >= 8 && removed >= 1.0, "{runs} collections, {removed} images removed");
    assert_eq!(held(&c).await, [("db".into(), true), ("web".into(), true)]);
    node.terminate();
    let store = provd_store::Store::open(&node.data).unwrap();
    for vm in ["vm-6", "vm-7"] {
        let v = provd_partitions::verify_vm(&store, vm, &Default::default()).unwrap();
        assert!(v.is_exact(), "{vm}: {:?}", v.mismatches);
    }
    assert!(store.missing_objects().unwrap().is_empty());
}
