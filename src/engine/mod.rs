//! The shared write engine: mechanics every writable format uses, kept
//! out of the drivers.
//!
//! - [`overlap`]: metadata overlap protection (no data write lands on a
//!   header, table or directory).

pub mod overlap;
