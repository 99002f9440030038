//! VM configuration: specs, renderers and cloud-init seeds.

pub mod boot;
pub mod cloudinit;
pub mod console;
pub mod iso9660;
pub mod node;
pub mod qemu;
pub mod render;
pub mod repack;
pub mod spec;
