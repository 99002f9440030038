//! cloud-init NoCloud seeds.
