//! VM configuration: specs, renderers and cloud-init seeds.

pub mod cloudinit;
pub mod render;
pub mod spec;
