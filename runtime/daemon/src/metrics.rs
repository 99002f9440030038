//! `GET /metrics`: the daemon's figures in the OpenMetrics text format.
//!
//! Every family is registered when the daemon starts, and every series
//! whose labels are known then (outcomes, host calls, routes, limits, the
//! installed plugins) is created at zero, so a dashboard tells "nothing
//! happened" from "not exported". Label values come from fixed lists or
//! from what the node's administrator installed (plugin names); nothing a
//! request or a plugin writes becomes a label except a plugin's phase
//! names, of which [`MAX_PHASE_NAMES`] are kept. `docs/api.md` lists the
//! families with an alert for each that matters.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use provd_node::operations::Meter;
use provd_node::operations::{CallOutcome, HostCall};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostCallLabels {
    pub interface: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostFunction {
    pub interface: String,
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    pub plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginOutcome {
    pub plugin: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginPhase {
    pub plugin: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLimit {
    pub plugin: String,
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StackersLabel {
    /// How many VMs stack the layers: `0`, `1` or `2+`.
    pub vms: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    /// The route's template (`/v1/vms/{name}`), never the path asked for.
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `total`, `reserved`, `free` (and, for disk, `filesystem-free`).
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerOutcome {
    /// `request` (`POST /v1/gc`) or `schedule`.
    pub trigger: String,
    pub outcome: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// A metric whose family is written even while it has no series (a
/// plugin-labelled family before any plugin is installed): the encoder
/// skips empty families otherwise, and a dashboard could not tell "not
/// exported" from "nothing yet".
#[derive(Debug)]
struct Always<M>(M);

impl<M: EncodeMetric> EncodeMetric for Always<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// Outcomes of an operation.
const OPERATION_OUTCOMES: [&str; 3] = ["succeeded", "failed", "cancelled"];
/// Answers to a host call.
const CALL_OUTCOMES: [&str; 3] = ["ok", "denied", "failed"];
/// Every host call of provd's interfaces, by interface and function.
pub const HOST_CALLS: &[(&str, &str)] = &[
    ("dedup", "analyse"),
    ("dedup", "layer-entries"),
    ("dedup", "plan"),
    ("hashing", "blake3"),
    ("hashing", "hash-file"),
    ("images", "entries"),
    ("images", "fetch"),
    ("images", "read-file"),
    ("partitions", "add-file"),
    ("partitions", "create-private"),
    ("partitions", "create-privates"),
    ("partitions", "create-shared"),
    ("progress", "report"),
    ("vm", "configure"),
    ("vm", "configure-all"),
    ("vm", "customize"),
];
/// provd's own phases of an operation.
const OWN_PHASES: [&str; 3] = ["queued", "instantiate", "sync"];
/// Plugin phase names kept as labels; later ones are counted as `other`.
pub const MAX_PHASE_NAMES: usize = 32;
/// Longest plugin phase name kept as a label.
const MAX_PHASE_LEN: usize = 40;
/// Kinds of what the store holds.
const STORE_KINDS: [&str; 5] = ["objects", "images", "layers", "partitions", "vms"];

/// Every figure the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub operations: Family<Outcome, Counter>,
    pub operations_running: Gauge,
    pub operation_seconds: HistogramFamily<PluginOutcome>,
    pub phase_seconds: HistogramFamily<PluginPhase>,
    pub host_calls: Family<HostCallLabels, Counter>,
    pub host_call_seconds: HistogramFamily<HostFunction>,
    pub bundles: Family<Outcome, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: HistogramFamily<RouteLabels>,
    pub instantiation_seconds: HistogramFamily<PluginLabel>,
    pub call_seconds: HistogramFamily<PluginLabel>,
    pub traps: Family<PluginLabel, Counter>,
    pub limit_hits: Family<PluginLimit, Counter>,
    pub bytes_fetched: Counter,
    pub bytes_deduplicated: Counter,
    pub layer_bytes: Family<StackersLabel, Gauge>,
    pub vcpus: Family<StateLabel, Gauge>,
    pub memory_bytes: Family<StateLabel, Gauge>,
    pub disk_bytes: Family<StateLabel, Gauge>,
    pub store_items: Family<KindLabel, Gauge>,
    pub store_bytes: Family<KindLabel, Gauge>,
    pub gc_runs: Family<TriggerOutcome, Counter>,
    pub gc_images: Counter,
    pub gc_objects: Counter,
    pub gc_bytes: Counter,
    pub gc_last: Gauge,
    pub resident_bytes: Gauge,
    pub open_fds: Gauge,
    pub max_fds: Gauge,
    pub start_time: Gauge,
    /// Plugin phase names given a label of their own so far.
    phase_names: Mutex<HashSet<String>>,
}

/// Registers `metric` under `name`, written even while it has no series,
/// and returns it.
fn add<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: EncodeMetric + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    registry.register(name, help, Always(metric.clone()));
    metric
}

/// A histogram family whose histograms have the buckets of `make`.
fn histograms<L: Clone + std::hash::Hash + Eq>(make: fn() -> Histogram) -> HistogramFamily<L> {
    Family::new_with_constructor(make)
}

/// Buckets rising by `factor` from `start` up to at least `end`.
fn buckets(start: f64, factor: f64, end: f64) -> Vec<f64> {
    let mut n = 1u16;
    while start * factor.powi(i32::from(n) - 1) < end {
        n += 1;
    }
    exponential_buckets(start, factor, n).collect()
}

fn instantiation_histogram() -> Histogram {
    // A warm instantiation takes tens of µs, a cold one (compiling)
    // seconds.
    Histogram::new(buckets(0.000_05, 3.0, 60.0))
}

fn call_histogram() -> Histogram {
    // One plugin call: milliseconds for a query, minutes for a large
    // provisioning under its deadline.
    Histogram::new(buckets(0.001, 2.5, 1800.0))
}

fn host_call_histogram() -> Histogram {
    // A progress report takes µs, a fetch of a large image minutes.
    Histogram::new(buckets(0.000_01, 4.0, 600.0))
}

fn request_histogram() -> Histogram {
    // Reads answer in ms; a bundle upload compiles its component.
    Histogram::new(buckets(0.000_25, 2.5, 120.0))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("provd");
        let metrics = Metrics {
            operations: add(r, "operations", "Operations finished, by outcome", Family::default()),
            operations_running: add(
                r,
                "operations_running",
                "Operations running or waiting for a slot now",
                Gauge::default(),
            ),
            operation_seconds: add(
                r,
                "operation_duration_seconds",
                "Time from accepting an operation to its end, by plugin (provd for provd's own) \
                 and outcome",
                histograms(call_histogram),
            ),
            phase_seconds: add(
                r,
                "operation_phase_duration_seconds",
                "Time operations spent in each phase: provd's (queued, instantiate, sync) and \
                 those the plugin reports (other past the first 32 names)",
                histograms(call_histogram),
            ),
            host_calls: add(
                r,
                "host_calls",
                "Host calls of plugins, by interface and outcome (ok, denied, failed)",
                Family::default(),
            ),
            host_call_seconds: add(
                r,
                "host_call_duration_seconds",
                "Time the host took to answer a plugin's call, by interface and function",
                histograms(host_call_histogram),
            ),
            bundles: add(r, "bundles", "Bundle uploads, by outcome", Family::default()),
            requests: add(
                r,
                "http_requests",
                "HTTP requests, by method and status",
                Family::default(),
            ),
            request_seconds: add(
                r,
                "http_request_duration_seconds",
                "Time to answer an HTTP request, by method and route (unmatched for a path no \
                 route has)",
                histograms(request_histogram),
            ),
            instantiation_seconds: add(
                r,
                "plugin_instantiation_seconds",
                "Time to instantiate a plugin for one operation",
                histograms(instantiation_histogram),
            ),
            call_seconds: add(
                r,
                "plugin_call_seconds",
                "Time of one provision call, instantiation included",
                histograms(call_histogram),
            ),
            traps: add(
                r,
                "plugin_traps",
                "Plugin calls stopped by a trap (a panic, unreachable, a bad memory access)",
                Family::default(),
            ),
            limit_hits: add(
                r,
                "plugin_limit_hits",
                "Plugin calls stopped by one of their limits (memory, deadline, stack, ...)",
                Family::default(),
            ),
            bytes_fetched: add(
                r,
                "image_bytes_fetched",
                "Bytes of file content in images plugins fetched",
                Counter::default(),
            ),
            bytes_deduplicated: add(
                r,
                "bytes_deduplicated",
                "Bytes plans stored once instead of once per VM",
                Counter::default(),
            ),
            layer_bytes: add(
                r,
                "layer_bytes",
                "File bytes the node's layers hold, by how many VMs stack them (0, 1, 2+); \
                 those of 0 and 1 are fragmentation",
                Family::default(),
            ),
            vcpus: add(
                r,
                "node_vcpus",
                "vCPUs the node offers VMs (over-commit applied), reserved by VMs, and free",
                Family::default(),
            ),
            memory_bytes: add(
                r,
                "node_memory_bytes",
                "Memory the node offers VMs, reserved by VMs, and free",
                Family::default(),
            ),
            disk_bytes: add(
                r,
                "node_disk_bytes",
                "Disk the node offers VMs, reserved by VMs, free (bounded by the filesystem), \
                 and the data directory's filesystem-free beyond its reserve",
                Family::default(),
            ),
            store_items: add(
                r,
                "store_items",
                "What the store holds, by kind (objects, images, layers, partitions, vms)",
                Family::default(),
            ),
            store_bytes: add(
                r,
                "store_bytes",
                "Bytes of what the store holds, by kind: object files, images' file content, \
                 layers' file content, partition files, VMs' private partitions",
                Family::default(),
            ),
            gc_runs: add(
                r,
                "image_gc_runs",
                "Image collections, by trigger (request, schedule) and outcome",
                Family::default(),
            ),
            gc_images: add(
                r,
                "image_gc_removed_images",
                "Images image collections removed",
                Counter::default(),
            ),
            gc_objects: add(
                r,
                "image_gc_removed_objects",
                "Object files image collections removed",
                Counter::default(),
            ),
            gc_bytes: add(
                r,
                "image_gc_freed_bytes",
                "Bytes of object files image collections removed",
                Counter::default(),
            ),
            gc_last: add(
                r,
                "image_gc_last_run_timestamp_seconds",
                "When the last image collection ended (0: none since start)",
                Gauge::default(),
            ),
            // The process figures under the names every Prometheus client
            // library gives them, so that stock dashboards and alerts apply.
            resident_bytes: add(
                &mut root,
                "process_resident_memory_bytes",
                "Resident memory of the daemon",
                Gauge::default(),
            ),
            open_fds: add(&mut root, "process_open_fds", "Open file descriptors", Gauge::default()),
            max_fds: add(
                &mut root,
                "process_max_fds",
                "Limit of open file descriptors",
                Gauge::default(),
            ),
            start_time: add(
                &mut root,
                "process_start_time_seconds",
                "When the daemon started, in seconds since the Unix epoch",
                Gauge::default(),
            ),
            phase_names: Mutex::default(),
            registry: root,
        };
        metrics.create_known();
        metrics.set_process();
        // The start does not change: read once, not at every scrape.
        if let Some(v) = process_start_time() {
            metrics.start_time.set(gauge(v));
        }
        metrics
    }

    /// Creates, at zero, every series whose labels are known without any
    /// plugin.
    fn create_known(&self) {
        for outcome in OPERATION_OUTCOMES {
            let _ = self.operations.get_or_create(&Outcome { outcome: outcome.into() });
        }
        for outcome in ["accepted", "already-accepted", "refused"] {
            let _ = self.bundles.get_or_create(&Outcome { outcome: outcome.into() });
        }
        let interfaces: HashSet<&str> = HOST_CALLS.iter().map(|(i, _)| *i).collect();
        for interface in interfaces {
            for outcome in CALL_OUTCOMES {
                let _ = self.host_calls.get_or_create(&HostCallLabels {
                    interface: interface.into(),
                    outcome: outcome.into(),
                });
            }
        }
        for (interface, function) in HOST_CALLS {
            let _ = self.host_call_seconds.get_or_create(&HostFunction {
                interface: (*interface).into(),
                function: (*function).into(),
            });
        }
        for (method, route) in crate::api::ROUTES {
            let _ = self
                .request_seconds
                .get_or_create(&RouteLabels { method: (*method).into(), route: (*route).into() });
        }
        for trigger in ["request", "schedule"] {
            for outcome in ["succeeded", "failed"] {
                let _ = self.gc_runs.get_or_create(&TriggerOutcome {
                    trigger: trigger.into(),
                    outcome: outcome.into(),
                });
            }
        }
        self.plugin_known(provd_node::operations::BUILTIN);
    }

    /// Creates, at zero, the series of plugin `plugin`: called for every
    /// installed plugin at start and when a bundle is accepted.
    pub fn plugin_known(&self, plugin: &str) {
        let p = || plugin.to_string();
        for outcome in OPERATION_OUTCOMES {
            let _ = self
                .operation_seconds
                .get_or_create(&PluginOutcome { plugin: p(), outcome: outcome.into() });
        }
        if plugin == provd_node::operations::BUILTIN {
            return;
        }
        for phase in OWN_PHASES {
            let _ =
                self.phase_seconds.get_or_create(&PluginPhase { plugin: p(), phase: phase.into() });
        }
        let _ = self.instantiation_seconds.get_or_create(&PluginLabel { plugin: p() });
        let _ = self.call_seconds.get_or_create(&PluginLabel { plugin: p() });
        let _ = self.traps.get_or_create(&PluginLabel { plugin: p() });
        for limit in provd_node::operations::Limit::KINDS {
            let _ =
                self.limit_hits.get_or_create(&PluginLimit { plugin: p(), limit: limit.into() });
        }
    }

    /// A plugin's phase name as a label: one of the first
    /// [`MAX_PHASE_NAMES`] short plain names plugins reported; `other`
    /// past that, so a plugin cannot grow the metrics without bound, and
    /// for provd's own names, which a plugin must not feed.
    fn phase_label(&self, phase: &str) -> String {
        if OWN_PHASES.contains(&phase) {
            return "other".into();
        }
        let plain = !phase.is_empty()
            && phase.len() <= MAX_PHASE_LEN
            && phase.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !plain {
            return "other".into();
        }
        let mut names = self.phase_names.lock().unwrap_or_else(|p| p.into_inner());
        if names.contains(phase) || names.len() < MAX_PHASE_NAMES {
            names.insert(phase.to_string());
            phase.to_string()
        } else {
            "other".into()
        }
    }

    /// Sets the layer gauges from the store's figures.
    pub fn set_layer_usage(&self, usage: &provd_node::LayerUsage) {
        for (vms, bytes) in
            [("0", usage.unused_bytes), ("1", usage.single_bytes), ("2+", usage.shared_bytes)]
        {
            self.layer_bytes.get_or_create(&StackersLabel { vms: vms.into() }).set(gauge(bytes));
        }
    }

    /// Sets the capacity gauges from `GET /v1/capacity`'s figures.
    pub fn set_capacity(&self, c: &provd_wire::Capacity) {
        let set = |family: &Family<StateLabel, Gauge>, state: &str, v: u64| {
            family.get_or_create(&StateLabel { state: state.into() }).set(gauge(v));
        };
        set(&self.vcpus, "total", c.vcpus.total);
        set(&self.vcpus, "reserved", c.vcpus.reserved);
        set(&self.vcpus, "free", c.vcpus.free);
        let mib = |v: u64| v.saturating_mul(1 << 20);
        set(&self.memory_bytes, "total", mib(c.memory_mib.total));
        set(&self.memory_bytes, "reserved", mib(c.memory_mib.reserved));
        set(&self.memory_bytes, "free", mib(c.memory_mib.free));
        set(&self.disk_bytes, "total", c.disk_bytes.total);
        set(&self.disk_bytes, "reserved", c.disk_bytes.reserved);
        set(&self.disk_bytes, "free", c.disk_bytes.free);
        set(&self.disk_bytes, "filesystem-free", c.disk_bytes.filesystem_free);
    }

    /// Sets the store gauges.
    pub fn set_sizes(&self, sizes: &provd_node::StoreSizes) {
        for (kind, (items, bytes)) in STORE_KINDS.iter().zip([
            sizes.objects,
            sizes.images,
            sizes.layers,
            sizes.partitions,
            sizes.vms,
        ]) {
            let labels = KindLabel { kind: (*kind).into() };
            self.store_items.get_or_create(&labels).set(gauge(items));
            self.store_bytes.get_or_create(&labels).set(gauge(bytes));
        }
    }

    /// Reads the process figures from `/proc/self`.
    pub fn set_process(&self) {
        let process = process_figures();
        if let Some(v) = process.resident_bytes {
            self.resident_bytes.set(gauge(v));
        }
        if let Some(v) = process.open_fds {
            self.open_fds.set(gauge(v));
        }
        if let Some(v) = process.max_fds {
            self.max_fds.set(gauge(v));
        }
    }

    /// Counts one image collection.
    pub fn collected(&self, trigger: &str, result: Option<&provd_wire::GcReport>) {
        let outcome = if result.is_some() { "succeeded" } else { "failed" };
        self.gc_runs
            .get_or_create(&TriggerOutcome { trigger: trigger.into(), outcome: outcome.into() })
            .inc();
        if let Some(r) = result {
            self.gc_images.inc_by(r.images.len() as u64);
            self.gc_objects.inc_by(r.objects);
            self.gc_bytes.inc_by(r.bytes);
        }
        self.gc_last.set(gauge(provd_node::operations::unix_now()));
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    pub fn outcome(family: &Family<Outcome, Counter>, outcome: &str) {
        family.get_or_create(&Outcome { outcome: outcome.to_string() }).inc();
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[derive(Debug, Default)]
struct ProcessFigures {
    resident_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

fn process_figures() -> ProcessFigures {
    use nix::unistd::{SysconfVar, sysconf};
    let mut p = ProcessFigures::default();
    let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten().and_then(|v| u64::try_from(v).ok());
    if let (Ok(statm), Some(page)) = (std::fs::read_to_string("/proc/self/statm"), page) {
        p.resident_bytes =
            statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).map(|v| v * page);
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The directory handle read_dir holds is one of them.
        p.open_fds = Some(dir.count().saturating_sub(1) as u64);
    }
    if let Ok((soft, _)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        p.max_fds = Some(soft);
    }
    p
}

/// When the process started, in seconds since the Unix epoch.
fn process_start_time() -> Option<u64> {
    use nix::unistd::{SysconfVar, sysconf};
    let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten().and_then(|v| u64::try_from(v).ok());
    // The start: field 22 of /proc/self/stat (after the command name, which
    // may hold spaces, in parentheses), in clock ticks since boot.
    let started = std::fs::read_to_string("/proc/self/stat").ok().and_then(|stat| {
        let rest = stat.rsplit_once(')')?.1;
        rest.split_whitespace().nth(19)?.parse::<u64>().ok()
    });
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse::<u64>().ok())
    });
    let (started, boot, ticks) = (started?, boot?, ticks.filter(|t| *t > 0)?);
    Some(boot + started / ticks)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Operations report to the registry through the node's [`Meter`].
impl Meter for Metrics {
    fn operation_started(&self) {
        self.operations_running.inc();
    }

    fn operation_stopped(&self) {
        self.operations_running.dec();
    }

    fn operation_outcome(&self, plugin: &str, outcome: &str, elapsed: Duration) {
        Metrics::outcome(&self.operations, outcome);
        self.operation_seconds
            .get_or_create(&PluginOutcome { plugin: plugin.into(), outcome: outcome.into() })
            .observe(elapsed.as_secs_f64());
    }

    fn phase(&self, plugin: &str, phase: &str, elapsed: Duration) {
        self.phase_seconds
            .get_or_create(&PluginPhase { plugin: plugin.into(), phase: phase.into() })
            .observe(elapsed.as_secs_f64());
    }

    fn plugin_phase(&self, plugin: &str, phase: &str, elapsed: Duration) {
        let phase = self.phase_label(phase);
        self.phase_seconds
            .get_or_create(&PluginPhase { plugin: plugin.into(), phase })
            .observe(elapsed.as_secs_f64());
    }

    fn plugin_stopped(&self, plugin: &str, limit: Option<&provd_node::operations::Limit>) {
        match limit {
            None => self.traps.get_or_create(&PluginLabel { plugin: plugin.into() }).inc(),
            Some(limit) => self
                .limit_hits
                .get_or_create(&PluginLimit { plugin: plugin.into(), limit: limit.kind().into() })
                .inc(),
        };
    }

    fn host_call(&self, call: &HostCall) {
        self.host_calls
            .get_or_create(&HostCallLabels {
                interface: call.interface.into(),
                outcome: call.outcome.as_str().into(),
            })
            .inc();
        self.host_call_seconds
            .get_or_create(&HostFunction {
                interface: call.interface.into(),
                function: call.function.into(),
            })
            .observe(call.elapsed.as_secs_f64());
        if call.outcome == CallOutcome::Ok {
            match (call.interface, call.function) {
                ("images", "fetch") => {
                    self.bytes_fetched.inc_by(call.bytes);
                }
                ("dedup", "plan") => {
                    self.bytes_deduplicated.inc_by(call.bytes);
                }
                _ => {}
            }
        }
    }

    fn instantiated(&self, plugin: &str, elapsed: Duration) {
        self.instantiation_seconds
            .get_or_create(&PluginLabel { plugin: plugin.to_string() })
            .observe(elapsed.as_secs_f64());
    }

    fn called(&self, plugin: &str, elapsed: Duration) {
        self.call_seconds
            .get_or_create(&PluginLabel { plugin: plugin.to_string() })
            .observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn buckets_reach_their_end() {
        let b = buckets(0.001, 2.5, 1800.0);
        assert!(b.last().copied().unwrap() >= 1800.0);
        assert!(b[b.len() - 2] < 1800.0);
    }

    #[test]
    fn plugin_phase_names_are_bounded() {
        let m = Metrics::new();
        assert_eq!(m.phase_label("queued"), "other");
        assert_eq!(m.phase_label("fetch images"), "other");
        assert_eq!(m.phase_label(&"x".repeat(MAX_PHASE_LEN + 1)), "other");
        for i in 0..MAX_PHASE_NAMES {
            assert_eq!(m.phase_label(&format!("p{i}")), format!("p{i}"));
        }
        assert_eq!(m.phase_label("one-too-many"), "other");
        assert_eq!(m.phase_label("p0"), "p0");
    }

    #[test]
    fn every_family_is_exported_from_start() {
        let text = Metrics::new().encode();
        for family in [
            "provd_operations_total{outcome=\"failed\"} 0",
            "provd_host_calls_total{interface=\"images\",outcome=\"denied\"} 0",
            "provd_host_call_duration_seconds_count{interface=\"images\",function=\"fetch\"} 0",
            "provd_operation_duration_seconds_count{plugin=\"provd\",outcome=\"failed\"} 0",
            "provd_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/operations\"} 0",
            "provd_image_gc_runs_total{trigger=\"schedule\",outcome=\"failed\"} 0",
            "# TYPE provd_plugin_traps counter",
            "# TYPE provd_operation_phase_duration_seconds histogram",
            "# TYPE provd_node_vcpus gauge",
            "# TYPE provd_node_disk_bytes gauge",
            "# TYPE process_start_time_seconds gauge",
        ] {
            assert!(text.contains(family), "{family} missing from\n{text}");
        }
        assert!(!text.contains("process_start_time_seconds 0\n"), "{text}");
    }
}
