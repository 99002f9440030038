//! Partitions built from a sharing plan.

pub mod erofs;
pub mod ext4;
pub mod reader;
