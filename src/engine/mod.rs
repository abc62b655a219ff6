//! The shared write engine: mechanics every writable format uses, kept
//! out of the drivers.
//!
//! - [`overlap`]: metadata overlap protection (no data write lands on a
//!   header, table or directory).
//! - [`reclaim`]: frees that wait for the reads that may still use a
//!   freed cluster.

pub mod overlap;
pub mod reclaim;
