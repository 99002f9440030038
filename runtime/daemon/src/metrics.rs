//! `GET /metrics`: the daemon's figures in the Prometheus text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use provd_node::operations::Meter;
use provd_node::operations::{CallOutcome, HostCall};
use std::time::Duration;

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
pub struct PluginLabel {
    pub plugin: String,
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

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every figure the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub operations: Family<Outcome, Counter>,
    pub operations_running: Gauge,
    pub host_calls: Family<HostCallLabels, Counter>,
    pub bundles: Family<Outcome, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub instantiation_seconds: HistogramFamily<PluginLabel>,
    pub call_seconds: HistogramFamily<PluginLabel>,
    pub bytes_fetched: Counter,
    pub bytes_deduplicated: Counter,
    pub layer_bytes: Family<StackersLabel, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 7 minutes: a warm instantiation to a long provisioning.
    Histogram::new(exponential_buckets(0.000_05, 3.0, 16))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("provd");
        let operations = Family::<Outcome, Counter>::default();
        registry.register("operations", "Operations finished, by outcome", operations.clone());
        let operations_running = Gauge::default();
        registry.register(
            "operations_running",
            "Operations running now",
            operations_running.clone(),
        );
        let host_calls = Family::<HostCallLabels, Counter>::default();
        registry.register(
            "host_calls",
            "Host calls of plugins, by interface and outcome (ok, denied, failed)",
            host_calls.clone(),
        );
        let bundles = Family::<Outcome, Counter>::default();
        registry.register("bundles", "Bundle uploads, by outcome", bundles.clone());
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests, by method and status", requests.clone());
        let instantiation_seconds: HistogramFamily<PluginLabel> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "plugin_instantiation_seconds",
            "Time to instantiate a plugin for one operation",
            instantiation_seconds.clone(),
        );
        let call_seconds: HistogramFamily<PluginLabel> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "plugin_call_seconds",
            "Time of one provision call, instantiation included",
            call_seconds.clone(),
        );
        let bytes_fetched = Counter::default();
        registry.register(
            "image_bytes_fetched",
            "Bytes of file content in images plugins fetched",
            bytes_fetched.clone(),
        );
        let bytes_deduplicated = Counter::default();
        registry.register(
            "bytes_deduplicated",
            "Bytes plans stored once instead of once per VM",
            bytes_deduplicated.clone(),
        );
        let layer_bytes = Family::<StackersLabel, Gauge>::default();
        registry.register(
            "layer_bytes",
            "File bytes the node's layers hold, by how many VMs stack them (0, 1, 2+); \
             those of 0 and 1 are fragmentation",
            layer_bytes.clone(),
        );
        Metrics {
            registry,
            operations,
            operations_running,
            host_calls,
            bundles,
            requests,
            instantiation_seconds,
            call_seconds,
            bytes_fetched,
            bytes_deduplicated,
            layer_bytes,
        }
    }

    /// Sets the layer gauges from the store's figures.
    pub fn set_layer_usage(&self, usage: &provd_node::LayerUsage) {
        for (vms, bytes) in
            [("0", usage.unused_bytes), ("1", usage.single_bytes), ("2+", usage.shared_bytes)]
        {
            self.layer_bytes
                .get_or_create(&StackersLabel { vms: vms.into() })
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
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

    fn operation_outcome(&self, outcome: &str) {
        Metrics::outcome(&self.operations, outcome);
    }

    fn host_call(&self, call: &HostCall) {
        self.host_calls
            .get_or_create(&HostCallLabels {
                interface: call.interface.into(),
                outcome: call.outcome.as_str().into(),
            })
            .inc();
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
