//! The write engine: mechanics shared by every writable format driver,
//! kept out of the drivers.
//!
//! - [`append`]: the append allocator of formats that grow their file
//!   (frontier, pending units, claims).
//! - [`cow`]: copy-on-write data writes into freshly allocated runs.
//! - [`inflight`]: guest clusters being filled outside the allocation
//!   mutex (first writes into other clusters go on in parallel).
//! - [`order`]: ordering of metadata writes against power loss — table
//!   updates are applied in memory at once and written to the host file
//!   later, in dependency stages separated by barriers (fdatasync).
//! - [`overlap`]: metadata overlap protection (no data write lands on a
//!   header, table or directory).
//! - [`reclaim`]: frees that wait for the reads that may still use a
//!   freed cluster.
//! - [`table_cache`]: generation-checked caching of tables a writer
//!   changes (no reader ever re-caches a stale copy).
//! - [`record`]: an optional recorder of every host write and barrier, for
//!   the power-cut simulation (tests/suite/powercut.rs).
//! - [`units`]: offset newtypes (guest and host offsets and clusters).

pub mod append;
pub mod cow;
pub mod inflight;
pub mod order;
pub mod overlap;
pub mod reclaim;
pub mod record;
pub mod table_cache;
pub mod units;
