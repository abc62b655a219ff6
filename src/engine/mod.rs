//! The write engine: mechanics shared by every writable format driver.
//!
//! - [`order`]: ordering of metadata writes against power loss — table
//!   updates are applied in memory at once and written to the host file
//!   later, in dependency stages separated by barriers (fdatasync).
//! - [`record`]: an optional recorder of every host write and barrier, for
//!   the power-cut simulation (tests/powercut.rs).

pub mod order;
pub mod record;
