//! provd's HTTP API, version 1, as types (`docs/api.md` is the reference).
//!
//! The daemon answers with these, `provd-client` decodes into them and
//! provctl reads their fields: only this crate knows the JSON shape. Field
//! names are kebab-case on the wire. Requests refuse unknown fields;
//! responses accept them, so a newer node's extra fields do not break an
//! older manager.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An answer body of the API. The daemon answers only with types that
/// implement it, so nothing else reaches the wire.
pub trait Body: Serialize {}

macro_rules! bodies {
    ($($t:ty),* $(,)?) => { $(impl Body for $t {})* };
}

bodies!(
    ErrorBody,
    Health,
    BundleAnswer,
    BundleList,
    Activated,
    OperationAnswer,
    OperationList,
    CancelAnswer,
    Progress,
    VmList,
    VmAnswer,
    Deleted,
    PowerAnswer,
    RepackAnswer,
    ImageList,
    ImageDeleted,
    GcAnswer,
    Capacity,
    LayerPage,
    EntryPage,
    AuditList,
);

/// Every error: `{"error": {"code": "<stable-code>", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Health {
    pub status: String,
    pub version: String,
    pub running_operations: u64,
}

/// A bundle the node accepted: `POST /v1/bundles` answers
/// `{"bundle": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub signer: String,
    /// False when the same bundle had been accepted before.
    pub new: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleAnswer {
    pub bundle: Accepted,
}

/// One bundle of `GET /v1/bundles`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Bundle {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub signer: String,
    pub active: bool,
    pub accepted_at: i64,
    pub expires: u64,
    /// The grant the node gave it, as JSON text.
    pub grant: String,
    /// Its `plugin.toml`.
    pub manifest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleList {
    pub bundles: Vec<Bundle>,
}

/// `POST /v1/plugins/{name}/activate` and `.../rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activated {
    pub plugin: String,
    pub active: String,
    pub previous: String,
}

/// The body of `POST /v1/plugins/{name}/activate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    pub version: String,
}

/// The body of `POST /v1/operations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OperationRequest {
    pub plugin: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// VM specs, each a JSON object (`docs/vm-spec.md`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<Value>,
    /// The plugin's parameters: a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Run `version` even though it is not the active one (audited).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_inactive: bool,
    /// Start the libvirt VMs the operation configures, on a node that hands
    /// them to libvirt.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub start: bool,
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl OperationState {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationState::Running => "running",
            OperationState::Succeeded => "succeeded",
            OperationState::Failed => "failed",
            OperationState::Cancelled => "cancelled",
        }
    }
}

/// Why an operation failed: a stable code and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationFailure {
    pub code: String,
    pub message: Option<String>,
}

/// An operation, as every answer that names one gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Operation {
    pub id: String,
    /// The key as its manager sent it.
    pub idempotency_key: Option<String>,
    pub plugin: String,
    pub version: String,
    pub actor: String,
    pub state: OperationState,
    pub phase: Option<String>,
    pub done: Option<u64>,
    pub total: Option<u64>,
    /// The plugin's report (JSON), when it succeeded.
    pub report: Option<Value>,
    pub error: Option<OperationFailure>,
    pub vms: Vec<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    /// Increases with every change while it runs (long polls wait on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// `{"operation": ...}`: what starting, reading or following one answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationAnswer {
    pub operation: Operation,
}

/// `GET /v1/operations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationList {
    pub operations: Vec<Operation>,
}

/// `POST /v1/operations/{id}/cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelAnswer {
    pub operation: Operation,
    /// `requested`: the plugin stops at its next host call.
    pub cancel: String,
}

/// A running operation's progress, as the `progress` server-sent event
/// carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub seq: u64,
    pub state: OperationState,
    pub phase: Option<String>,
    pub done: u64,
    pub total: Option<u64>,
}

/// vCPUs, memory and disk, reserved or needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Resources {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_bytes: u64,
}

/// A partition a VM uses, in `GET /v1/vms/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPartition {
    pub id: String,
    pub role: String,
    pub format: String,
    pub bytes: u64,
}

/// A VM configured on the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Vm {
    pub name: String,
    pub operation: Option<String>,
    pub macs: Vec<String>,
    pub reserved: Resources,
    pub created_at: i64,
    /// Its spec as recorded (JSON).
    pub spec: Value,
    /// Only in `GET /v1/vms/{name}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<VmPartition>>,
    /// Its domain's state in the node's libvirt (`running`, `shut off`,
    /// `undefined`, …), on a node that hands VMs to libvirt; `unknown`
    /// when libvirt did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// `GET /v1/vms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmList {
    pub vms: Vec<Vm>,
    pub reserved: Resources,
}

/// `GET /v1/vms/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmAnswer {
    pub vm: Vm,
}

/// `DELETE /v1/vms/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: String,
    pub operation: Operation,
}

/// The body of `POST /v1/vms/{name}/stop`, which may be empty.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StopRequest {
    /// Stop at once (`virsh destroy`) instead of asking the guest.
    #[serde(default)]
    pub force: bool,
    /// How long the guest has to shut down when asked (default 60).
    pub timeout_seconds: Option<u64>,
}

/// `POST /v1/vms/{name}/start` and `POST /v1/vms/{name}/stop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PowerAnswer {
    pub vm: String,
    /// The domain's state afterwards, in `virsh domstate`'s words.
    pub state: String,
    /// False when the domain already was as asked.
    pub changed: bool,
    pub operation: Operation,
}

/// The body of `POST /v1/repack`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RepackRequest {
    /// The stopped VMs to move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<String>>,
    /// Every VM on the node instead (all of them stopped).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// The new shared partition's format (`erofs` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_format: Option<String>,
}

/// `POST /v1/repack`: what the repack did (null when it did not run) and
/// its operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepackAnswer {
    pub repack: Option<Value>,
    pub operation: Operation,
}

/// An image the node holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Image {
    pub reference: String,
    pub digest: String,
    pub source: String,
    pub source_digest: Option<String>,
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    pub created_at: i64,
    /// When an operation last fetched it.
    #[serde(default)]
    pub used_at: Option<i64>,
    /// Whether a VM or a running operation uses it: such an image is never
    /// deleted or collected.
    #[serde(default)]
    pub in_use: bool,
}

/// `DELETE /v1/images?reference=...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageDeleted {
    pub reference: String,
    /// Object files removed (those no other image uses) and their bytes.
    pub objects: u64,
    pub bytes: u64,
}

/// `POST /v1/gc`: what to collect; unset fields take `[images]` of
/// `provd.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GcRequest {
    /// Remove unused images not fetched for this many seconds.
    #[serde(default)]
    pub max_age_secs: Option<u64>,
    /// Remove unused images, least recently used first, until the store's
    /// object files take at most this many bytes.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

/// An image a collection removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemovedImage {
    pub reference: String,
    /// `age` or `budget`.
    pub reason: String,
    /// Bytes of object files its removal freed.
    pub freed_bytes: u64,
}

/// What one image collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcReport {
    pub images: Vec<RemovedImage>,
    /// Object files removed (those of removed images and any no image
    /// referenced) and their bytes.
    pub objects: u64,
    pub bytes: u64,
    /// Images kept because a VM or a running operation uses them.
    pub in_use: u64,
    /// The store's object bytes after the collection.
    pub object_bytes: u64,
    /// The age and budget the collection applied.
    pub max_age_secs: Option<u64>,
    pub max_bytes: Option<u64>,
}

/// `POST /v1/gc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcAnswer {
    pub gc: GcReport,
}

/// `GET /v1/images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageList {
    pub images: Vec<Image>,
}

/// One resource of `GET /v1/capacity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Headroom {
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
}

/// Disk in `GET /v1/capacity`: `free` is also bounded by the filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskHeadroom {
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
    pub filesystem_free: u64,
}

/// `GET /v1/capacity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Capacity {
    pub vcpus: Headroom,
    pub memory_mib: Headroom,
    pub disk_bytes: DiskHeadroom,
    pub vms: u64,
}

/// A layer new VMs may stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub partition: String,
    pub layer: String,
    pub digest: String,
    pub files: u64,
    pub bytes: u64,
    pub format: String,
    pub vms: Vec<String>,
    /// Its trust domain; a node from before domains names none, and its
    /// layers are the default tenant's.
    #[serde(default = "legacy_domain")]
    pub domain: String,
}

fn legacy_domain() -> String {
    "tenant:default".into()
}

/// `GET /v1/layers`: a page, and where the next starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPage {
    pub layers: Vec<Layer>,
    pub total: u64,
    /// `partition/layer` to pass as `after`; null on the last page.
    pub next: Option<String>,
}

/// A regular file of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerFile {
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

/// `GET /v1/layers/{partition}/{layer}/entries`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryPage {
    pub entries: Vec<LayerFile>,
    pub total: u64,
    /// The `after` of the next page; null on the last page.
    pub next: Option<u64>,
}

/// An entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub kind: String,
    pub plugin: Option<String>,
    pub version: Option<String>,
    pub operation: Option<String>,
    pub interface: Option<String>,
    pub function: Option<String>,
    pub args: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
    pub count: u64,
}

/// `GET /v1/audit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditList {
    pub audit: Vec<AuditEntry>,
}

impl Operation {
    /// Whether it has ended (succeeded, failed or cancelled).
    pub fn finished(&self) -> bool {
        self.state != OperationState::Running
    }

    /// The stable code of why it failed.
    pub fn error_code(&self) -> Option<&str> {
        self.error.as_ref().map(|e| e.code.as_str())
    }

    /// What the failure says.
    pub fn error_message(&self) -> Option<&str> {
        self.error.as_ref().and_then(|e| e.message.as_deref())
    }

    /// A field of the plugin's report (`summary`, `output`, ...); null
    /// when the report or the field is absent.
    pub fn report_field(&self, key: &str) -> &Value {
        static NULL: Value = Value::Null;
        self.report.as_ref().and_then(|r| r.get(key)).unwrap_or(&NULL)
    }
}

/// The new shared partition a repack built, as its report names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepackedPartition {
    pub id: String,
    pub bytes: u64,
}

/// What a repack did: the report of its operation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RepackReport {
    /// The new shared partition (none when no VM could be moved).
    pub partition: Option<RepackedPartition>,
    pub moved: Vec<String>,
    /// VMs left where they are, with the reason.
    pub skipped: Vec<(String, String)>,
    /// VMs whose move failed, with the error; they keep their stack.
    pub failed: Vec<(String, String)>,
    /// Shared partitions freed.
    pub freed: Vec<String>,
    pub shared_bytes_before: u64,
    pub shared_bytes_after: u64,
}

impl RepackAnswer {
    /// The repack's report, when it ran.
    pub fn report(&self) -> Option<RepackReport> {
        self.repack.as_ref().and_then(|r| RepackReport::deserialize(r).ok())
    }
}
