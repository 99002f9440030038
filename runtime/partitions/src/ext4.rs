//! ext4 image reader.
