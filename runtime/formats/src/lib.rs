//! The filesystem formats provd reads and writes itself, each in one
//! place with its on-disk constants:
//!
//! - `ext4`: the reader of ext4 images (private partitions, ext4 shared
//!   partitions), used to verify them and to read back what a guest wrote;
//!   `ext4_writer`: the writer of private partitions, journal included;
//! - `erofs`: the EROFS reader; `erofs_writer`: the EROFS writer that builds
//!   shared partitions straight from content objects; `erofs_format`: the
//!   on-disk layout both share;
//! - `reader`: what the readers report, one entry per inode reachable from
//!   the root.
//!
//! Nothing here knows about images, plans or the store: `provd-partitions`
//! lays partitions out and builds them with these.

pub mod erofs;
mod erofs_format;
pub mod erofs_writer;
pub mod ext4;
pub mod ext4_writer;
pub mod reader;
mod writer_input;
