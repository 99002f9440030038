//! What a node holds and records: images, the audit trail, its health.

use anyhow::Result;
use provd_client::encode;
use provd_wire as wire;

use super::{Target, decoded, exit_of, fan_out, load_target, print};

/// The images of a node, or the one deleted.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Images {
    Deleted(wire::ImageDeleted),
    Listed(wire::ImageList),
}

pub(super) async fn images(delete: Option<String>, target: &Target) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let results = fan_out(&nodes, &tls, |c| {
        let delete = delete.clone();
        async move {
            match delete {
                Some(r) => {
                    let (r, bad) =
                        decoded(c.delete(&format!("/v1/images?reference={}", encode(&r))).await);
                    (r.map(Images::Deleted), bad)
                }
                None => {
                    let (r, bad) = decoded(c.get("/v1/images").await);
                    (r.map(Images::Listed), bad)
                }
            }
        }
    })
    .await;
    print(&results, target.json, |v| match v {
        Images::Deleted(d) => {
            format!("deleted {}: freed {} objects, {} bytes\n", d.reference, d.objects, d.bytes)
        }
        Images::Listed(list) => {
            let mut out = String::new();
            for i in &list.images {
                out.push_str(&format!(
                    "{}  {} files, {} bytes{}\n",
                    i.reference,
                    i.files,
                    i.bytes,
                    if i.in_use { "  (in use)" } else { "" }
                ));
            }
            if out.is_empty() {
                out.push_str("no images\n");
            }
            out
        }
    });
    Ok(exit_of(&results))
}

pub(super) async fn gc(request: wire::GcRequest, target: &Target) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let body = serde_json::to_value(&request)?;
    let results = fan_out(&nodes, &tls, |c| {
        let body = body.clone();
        async move { decoded::<wire::GcAnswer>(c.post_json("/v1/gc", &body).await) }
    })
    .await;
    print(&results, target.json, |v| {
        let g = &v.gc;
        let mut out = format!(
            "removed {} images, {} objects, {} bytes; {} in use kept; {} bytes of objects left\n",
            g.images.len(),
            g.objects,
            g.bytes,
            g.in_use,
            g.object_bytes
        );
        for i in &g.images {
            out.push_str(&format!("  {} ({}, {} bytes)\n", i.reference, i.reason, i.freed_bytes));
        }
        out
    });
    Ok(exit_of(&results))
}

pub(super) async fn audit(
    filters: [(&str, Option<String>); 4],
    limit: u32,
    target: &Target,
) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let mut query = vec![format!("limit={limit}")];
    for (k, v) in filters {
        if let Some(v) = v {
            query.push(format!("{k}={}", encode(&v)));
        }
    }
    let path = format!("/v1/audit?{}", query.join("&"));
    let results = fan_out(&nodes, &tls, |c| {
        let path = path.clone();
        async move { decoded::<wire::AuditList>(c.get(&path).await) }
    })
    .await;
    print(&results, target.json, |v| {
        let mut out = String::new();
        for a in &v.audit {
            let what = match (&a.interface, &a.function) {
                (Some(i), Some(f)) => format!("{i}.{f}"),
                (None, Some(f)) => f.clone(),
                _ => a.kind.clone(),
            };
            let times = if a.count > 1 { format!(" x{}", a.count) } else { String::new() };
            let or_dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "#{} {} {} {}@{} {} {what}{times} {} {}\n",
                a.id,
                a.at,
                a.actor,
                or_dash(&a.plugin),
                or_dash(&a.version),
                or_dash(&a.operation),
                a.outcome,
                a.args.as_deref().unwrap_or(""),
            ));
        }
        out
    });
    Ok(exit_of(&results))
}

pub(super) async fn health(target: &Target) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let results =
        fan_out(&nodes, &tls, |c| async move { decoded::<wire::Health>(c.get("/healthz").await) })
            .await;
    print(&results, target.json, |v| {
        format!("{} (provd {}, {} running)", v.status, v.version, v.running_operations)
    });
    Ok(exit_of(&results))
}
