//! A provd plugin written from scratch, the model to copy: it refuses VMs
//! whose images carry a file the operator forbids (a private key left in
//! an image, a debugging backdoor), before anything is built for them.
//!
//! Input: the operation's VM specs and the paths to refuse.
//!
//! ```json
//! {"vms": [{"name": "web-1", "image": "oci://…", …}], "forbidden": ["root/.ssh/id_rsa"]}
//! ```
//!
//! For each VM it fetches the image through the host and asks the host to
//! hash each forbidden path (`hashing::hash_file`): found means refused,
//! `not-found` means absent. Nothing is copied into the plugin. The report
//! lists every VM with what was found; any finding makes the call fail
//! with `denied`, naming each VM and path.

use provd_sdk::{Error, Plugin, Report, Request, hashing, images, log};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    vms: Vec<Vm>,
    forbidden: Vec<String>,
}

/// The fields of a VM spec this plugin reads; the others are ignored.
#[derive(Deserialize)]
struct Vm {
    name: String,
    image: String,
}

#[derive(Serialize)]
struct Finding {
    vm: String,
    image: String,
    /// Forbidden paths the image carries, with their BLAKE3 digest.
    found: Vec<(String, String)>,
}

struct ImageGuard;

impl Plugin for ImageGuard {
    fn provision(request: Request) -> Result<Report, Error> {
        let input: Input = request.input()?;
        if input.forbidden.is_empty() {
            return Err(Error::InvalidInput("forbidden: list at least one path".into()));
        }
        let mut findings = Vec::new();
        for vm in &input.vms {
            let image = images::fetch(&vm.image)?;
            let mut found = Vec::new();
            for path in &input.forbidden {
                match hashing::hash_file(&image.reference, path) {
                    Ok(digest) => found.push((path.clone(), digest)),
                    Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            log::info("checked", &[("vm", &vm.name), ("found", &found.len())]);
            findings.push(Finding { vm: vm.name.clone(), image: image.reference, found });
        }
        let refused: Vec<String> = findings
            .iter()
            .flat_map(|f| f.found.iter().map(move |(p, _)| format!("{}: {p}", f.vm)))
            .collect();
        if !refused.is_empty() {
            return Err(Error::Denied(format!(
                "forbidden files in images: {}",
                refused.join(", ")
            )));
        }
        Report::new(format!("{} VM(s) checked, no forbidden file", findings.len()))
            .field("vms", findings.len())
            .output(&findings)
    }
}

provd_sdk::export_plugin!(ImageGuard);
