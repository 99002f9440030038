//! VMs: list, delete, start, stop, repack.

use anyhow::Result;
use provd_client::encode;
use provd_wire as wire;
use serde_json::{Value, json};

use super::{Target, decoded, exit_of, fan_out, load_target, print};

/// The VMs of a node, or the one deleted.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Vms {
    Deleted(Box<wire::Deleted>),
    Listed(wire::VmList),
}

pub(super) async fn vms(delete: Option<String>, target: &Target) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let results = fan_out(&nodes, &tls, |c| {
        let delete = delete.clone();
        async move {
            let (r, bad) = match delete {
                Some(name) => {
                    let (r, bad) = decoded(c.delete(&format!("/v1/vms/{}", encode(&name))).await);
                    (r.map(|d| Vms::Deleted(Box::new(d))), bad)
                }
                None => {
                    let (r, bad) = decoded(c.get("/v1/vms").await);
                    (r.map(Vms::Listed), bad)
                }
            };
            (r, bad)
        }
    })
    .await;
    print(&results, target.json, |v| match v {
        Vms::Deleted(d) => format!("deleted {}", d.deleted),
        Vms::Listed(list) => {
            let mut out = String::new();
            for vm in &list.vms {
                out.push_str(&format!(
                    "{:20} {:>3} vCPU {:>7} MiB  {}  {}  (operation {})\n",
                    vm.name,
                    vm.reserved.vcpus,
                    vm.reserved.memory_mib,
                    vm.spec.get("hypervisor").and_then(Value::as_str).unwrap_or("-"),
                    vm.state.as_deref().unwrap_or("-"),
                    vm.operation.as_deref().unwrap_or("-"),
                ));
            }
            if out.is_empty() {
                out.push_str("no VMs\n");
            }
            out
        }
    });
    Ok(exit_of(&results))
}

/// Starts VM `name` (`stop` is `None`) or stops it as `stop` says.
pub(super) async fn power(
    name: &str,
    stop: Option<wire::StopRequest>,
    target: &Target,
) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let (verb, done, body) = match &stop {
        None => ("start", "started", json!({})),
        Some(stop) => ("stop", "stopped", json!(stop)),
    };
    let path = format!("/v1/vms/{}/{verb}", encode(name));
    let results = fan_out(&nodes, &tls, |c| {
        let (path, body) = (path.clone(), body.clone());
        async move { decoded::<wire::PowerAnswer>(c.post_json(&path, &body).await) }
    })
    .await;
    print(&results, target.json, |p| {
        let what = if p.changed { done } else { "unchanged" };
        format!("{} {what}: {} (operation {})", p.vm, p.state, p.operation.id)
    });
    Ok(exit_of(&results))
}

pub(super) async fn repack(
    vms: Vec<String>,
    all: bool,
    shared_format: String,
    target: &Target,
) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let request =
        wire::RepackRequest { vms: (!all).then_some(vms), all, shared_format: Some(shared_format) };
    let body = json!(request);
    let results = fan_out(&nodes, &tls, |c| {
        let body = body.clone();
        async move { decoded::<wire::RepackAnswer>(c.post_json("/v1/repack", &body).await) }
    })
    .await;
    print(&results, target.json, |v| {
        let r = v.report().unwrap_or_default();
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let mut out = format!(
            "moved {} VM(s) onto {}, freed {} shared partition(s); shared partitions {:.1} MiB -> {:.1} MiB\n",
            r.moved.len(),
            r.partition.as_ref().map(|p| p.id.as_str()).unwrap_or("no new partition"),
            r.freed.len(),
            mib(r.shared_bytes_before),
            mib(r.shared_bytes_after),
        );
        for (what, pairs) in [("skipped", &r.skipped), ("failed", &r.failed)] {
            for (vm, why) in pairs {
                out.push_str(&format!("{what} {vm}: {why}\n"));
            }
        }
        out
    });
    Ok(exit_of(&results))
}
