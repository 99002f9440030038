//! Customises VMs already on the node: hostname, users and their SSH keys,
//! user-data, network. The operation names each VM with its spec as it
//! should now be (`vms`); only the spec's `cloud-init` section and NIC
//! addresses may differ from what the VM was configured with. The host
//! writes the new NoCloud seed in place of the attached one; its instance
//! id changes with its content, so cloud-init applies it at the VM's next
//! boot.
//!
//! ```json
//! {"vms": [{"name": "web-1", …, "cloud-init": {"hostname": "web-1.example.net",
//!           "users": [{"name": "ops", "ssh-authorized-keys": ["ssh-ed25519 AAAA… ops"]}]}}]}
//! ```

use provd_sdk::{Error, Plugin, Report, Request, log, vm};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    vms: Vec<serde_json::Value>,
}

#[derive(Serialize)]
struct Customized {
    vm: String,
    instance_id: String,
}

struct CloudInit;

impl Plugin for CloudInit {
    fn provision(request: Request) -> Result<Report, Error> {
        let input: Input = request.input()?;
        if input.vms.is_empty() {
            return Err(Error::InvalidInput("vms: give the spec of each VM to customise".into()));
        }
        let mut done = Vec::new();
        for (i, spec) in input.vms.iter().enumerate() {
            let name = spec
                .get("name")
                .and_then(|n| n.as_str())
                .ok_or_else(|| Error::InvalidInput(format!("vms[{i}].name: missing")))?
                .to_string();
            let instance_id = vm::customize(&spec.to_string())?;
            log::info("seed rewritten", &[("vm", &name), ("instance_id", &instance_id)]);
            done.push(Customized { vm: name, instance_id });
        }
        Report::new(format!("{} VM(s) customised; cloud-init applies it at next boot", done.len()))
            .field("vms", done.len())
            .output(&done)
    }
}

provd_sdk::export_plugin!(CloudInit);
