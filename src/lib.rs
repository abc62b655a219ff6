//! vdiskfs: mount virtual-disk images (qcow2, qcow, VMDK, raw, and backing
//! chains mixing them) as flat raw files over FUSE.
//!
//! The data path, top to bottom (see `docs/architecture.md`):
//! - [`fs`]: the FUSE layer — files, attributes, reads, writes.
//! - [`chain`]: a top image and its backing files as one [`chain::Chain`].
//! - [`format`](mod@format): one driver per format, mapping guest ranges to host ranges.
//! - [`cache`]: byte-bounded LRU caches for metadata tables and decoded blocks.
//! - [`host`]: positional I/O on host files.
#![warn(missing_docs)]

pub mod cache;
pub mod chain;
pub mod cli;
pub mod compress;
pub mod daemon;
pub mod endian;
pub mod engine;
pub mod error;
pub mod format;
pub mod fs;
pub mod fuzzing;
pub mod generate;
pub mod host;
pub mod info;
pub mod lock;
pub mod logging;
pub mod map;
pub mod nbd;
pub mod overlay;
pub mod partition;
pub mod policy;
pub mod remote;

pub use error::{Error, ErrorKind, Result};
