//! VM configuration: specs, renderers and cloud-init seeds, and the VMs a
//! node holds (configured from a spec and the attachments the partitions
//! crate resolved, customised, deleted).

mod access;
pub use access::prepare_handover;
pub mod boot;
pub mod cloudinit;
mod configure;
pub mod console;
mod customize;
pub mod iso9660;
pub mod qemu;
pub mod render;
pub mod spec;

pub use configure::{
    CLOUD_HYPERVISOR_FIRMWARE, Configured, Hosting, VmError, capacity_of, check_grant, configure,
    delete, domain_uuid, libvirt_domain, parse, recorded_spec, rerender, shared_device,
};
pub use customize::{
    Customized, customize, end_customization, recover_customizations, restore_seed,
};
