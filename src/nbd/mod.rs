//! Serving chains over NBD (the Network Block Device protocol), so that
//! other hosts, VMs and tools (qemu, nbd-client, nbdcopy, nbdfuse) reach
//! the same disks a mount shows.
//!
//! - [`proto`]: the wire format, pure (parsing and encoding).
//! - [`negotiate`]: the handshake up to the export a client selects.
//! - [`transmit`]: one connection's requests, executed by a worker pool.
//! - [`extents`]: allocation and allocation depth for block status.
//! - [`server`]: listeners, allow-list, limits, stopping.
//! - [`tls`]: TLS credentials and sessions (`NBD_OPT_STARTTLS`).
//! - [`cmd`]: the `vdiskfs serve` command.
//!
//! See `docs/nbd.md` for the protocol as implemented and its limits.

use std::sync::Arc;

use crate::chain::Chain;

pub mod cmd;
pub mod extents;
pub mod negotiate;
pub mod proto;
pub mod server;
pub mod tls;
pub mod transmit;

/// One named export: a chain as one disk.
pub struct Export {
    /// The export name clients select (the image's file stem).
    pub name: String,
    /// A one-line description for `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// The disk.
    pub chain: Arc<Chain>,
    /// Called with the range after a write, trim or write-zeroes succeeded
    /// (`mount --nbd`: the FUSE files showing the disk drop what the kernel
    /// caches of it and recount their blocks).
    pub on_write: Option<OnWrite>,
}

/// What an export calls after a change of `[offset, offset + len)`.
pub type OnWrite = Arc<dyn Fn(u64, u64) + Send + Sync>;

impl Export {
    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.chain.size()
    }

    /// The transmission flags advertised for this export. Multiple
    /// connections are always consistent: they share one chain (one cache,
    /// one write engine), so a flush on any of them covers the writes of all.
    pub fn flags(&self) -> u16 {
        use proto::*;
        let base = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
        if self.chain.is_writable() {
            base | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO
        } else {
            base | TFLAG_READ_ONLY
        }
    }
}

/// The export name of an image: its file name without the last extension
/// (`disk.qcow2` → `disk`), as in a mount directory.
pub fn export_name(image: &std::path::Path) -> crate::Result<String> {
    let raw = crate::cli::exposed_name(image)?;
    let raw = raw.to_string_lossy();
    Ok(raw.strip_suffix(".raw").unwrap_or(&raw).to_string())
}
