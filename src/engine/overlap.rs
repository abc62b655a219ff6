//! Metadata overlap protection (qemu's `overlap-check`), shared by every
//! writable format.
//!
//! A [`MetadataMap`] holds the host byte ranges of every metadata structure
//! of one image file (headers, tables, directories), filled by the driver
//! at open and kept up to date as it allocates or frees tables. Before any
//! data write (in place, into a new cluster, a copy-on-write fill, zeros
//! written as bytes, a hole punched where data was) the driver calls
//! [`MetadataMap::guard`] with the host range. A range that touches
//! metadata means the image's own tables point guest data at its
//! metadata: a corrupt or hostile image. The write then fails with
//! [`ErrorKind::Corrupt`] (EIO) before a byte is written, an error line
//! names the file, the guest and host offsets and the structure hit, the
//! driver's `on_trip` hook runs once (qcow2 v3 sets its corrupt bit), and
//! every later write to the image fails the same way, as qemu stops using
//! an image it found corrupt.
//!
//! Lookups run on every write, so they are cheap: ranges up to one
//! cluster long (L2 tables, refcount blocks, grain tables — nearly all of
//! them) sit in a map ordered by start, where a range query over
//! `(start - longest, end)` finds the candidates; the few longer ones (L1
//! and refcount tables, grain directories, snapshot tables) are scanned
//! in a short list.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;

use crate::engine::units::{GuestOffset, HostOffset};
use crate::error::{Error, ErrorKind, Result};

/// Ranges at most this long go into the ordered map; longer ones into
/// the list (2 MiB: the largest qcow2 cluster).
const SHORT: u64 = 2 << 20;

/// A kind of metadata structure, named in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Structure {
    /// The image header (qcow2: its whole first cluster, extensions and
    /// backing name included; qcow: header and backing name; VMDK: the
    /// sparse extent header).
    Header,
    /// The active L1 table (qcow2, qcow).
    L1Table,
    /// An active L2 table (qcow2, qcow).
    L2Table,
    /// The qcow2 refcount table.
    RefcountTable,
    /// A qcow2 refcount block.
    RefcountBlock,
    /// The qcow2 snapshot table.
    SnapshotTable,
    /// The L1 table of an internal snapshot.
    SnapshotL1Table,
    /// An L2 table reached only from an internal snapshot.
    SnapshotL2Table,
    /// The qcow2 bitmaps directory.
    BitmapDirectory,
    /// The table of one qcow2 persistent bitmap.
    BitmapTable,
    /// A data cluster of one qcow2 persistent bitmap.
    BitmapData,
    /// A VMDK descriptor embedded in a sparse extent.
    Descriptor,
    /// The primary VMDK grain directory.
    GrainDirectory,
    /// The redundant VMDK grain directory.
    RedundantGrainDirectory,
    /// A VMDK grain table (primary or redundant).
    GrainTable,
    /// A VHD footer (the copy at offset 0 or the one at the end).
    Footer,
    /// A block allocation table (VHD BAT, VDI block map).
    Bat,
    /// The sector bitmap in front of a VHD block.
    SectorBitmap,
    /// The VHDX log.
    VhdxLog,
    /// The VHDX block allocation table.
    VhdxBat,
    /// The VHDX metadata region.
    VhdxMetadata,
}

impl Structure {
    /// The name used in messages ("refcount table", …).
    pub fn name(self) -> &'static str {
        match self {
            Structure::Header => "header",
            Structure::L1Table => "active L1 table",
            Structure::L2Table => "active L2 table",
            Structure::RefcountTable => "refcount table",
            Structure::RefcountBlock => "refcount block",
            Structure::SnapshotTable => "snapshot table",
            Structure::SnapshotL1Table => "snapshot L1 table",
            Structure::SnapshotL2Table => "snapshot L2 table",
            Structure::BitmapDirectory => "bitmap directory",
            Structure::BitmapTable => "bitmap table",
            Structure::BitmapData => "bitmap data cluster",
            Structure::Descriptor => "embedded descriptor",
            Structure::GrainDirectory => "grain directory",
            Structure::RedundantGrainDirectory => "redundant grain directory",
            Structure::GrainTable => "grain table",
            Structure::Footer => "footer",
            Structure::Bat => "block allocation table",
            Structure::SectorBitmap => "sector bitmap",
            Structure::VhdxLog => "VHDX log",
            Structure::VhdxBat => "VHDX BAT",
            Structure::VhdxMetadata => "VHDX metadata region",
        }
    }
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata range a write would have hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// What lives there.
    pub what: Structure,
    /// The structure's first host byte.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
}

#[derive(Default)]
struct Ranges {
    /// Short ranges by (start, kind) → end.
    short: BTreeMap<(u64, Structure), u64>,
    /// The longest range in `short`.
    longest: u64,
    /// Long ranges: (start, end, kind).
    long: Vec<(u64, u64, Structure)>,
}

/// The `guest` of [`MetadataMap::guard`] for a host range that is being
/// allocated or freed rather than written for a guest offset.
pub const NO_GUEST: GuestOffset = GuestOffset(u64::MAX);

/// Called once when a write is refused (qcow2 v3: set the corrupt bit).
pub type OnTrip = Box<dyn Fn() -> Result<()> + Send + Sync>;

/// The metadata ranges of one host file, and whether a write already hit
/// one of them.
pub struct MetadataMap {
    path: PathBuf,
    ranges: RwLock<Ranges>,
    tripped: AtomicBool,
    on_trip: Option<OnTrip>,
}

impl MetadataMap {
    /// An empty map for the image file at `path`.
    pub fn new(path: &Path) -> MetadataMap {
        MetadataMap {
            path: path.to_path_buf(),
            ranges: RwLock::new(Ranges::default()),
            tripped: AtomicBool::new(false),
            on_trip: None,
        }
    }

    /// The host file the map describes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets what runs once when the first overlapping write is refused.
    pub fn set_on_trip(&mut self, f: OnTrip) {
        self.on_trip = Some(f);
    }

    /// Records `len` bytes at `start` as `what` (an empty range is ignored;
    /// a range past `u64::MAX` is clamped).
    pub fn add(&self, start: u64, len: u64, what: Structure) {
        if len == 0 {
            return;
        }
        let end = start.saturating_add(len);
        let mut r = self.ranges.write();
        if len <= SHORT {
            let e = r.short.entry((start, what)).or_insert(end);
            *e = (*e).max(end);
            r.longest = r.longest.max(len);
        } else {
            r.long.push((start, end, what));
        }
    }

    /// Forgets the `what` range starting at `start` (a freed table).
    pub fn remove(&self, start: u64, what: Structure) {
        let mut r = self.ranges.write();
        r.short.remove(&(start, what));
        r.long.retain(|&(s, _, w)| (s, w) != (start, what));
    }

    /// The first metadata range that `[host, host + len)` touches, if any.
    pub fn find(&self, host: u64, len: u64) -> Option<Hit> {
        if len == 0 {
            return None;
        }
        let end = host.saturating_add(len);
        let r = self.ranges.read();
        let lo = host.saturating_sub(r.longest);
        let first = Structure::Header;
        for (&(s, what), &e) in r.short.range((lo, first)..(end, first)) {
            if e > host {
                return Some(Hit {
                    what,
                    start: s,
                    len: e - s,
                });
            }
        }
        r.long
            .iter()
            .find(|&&(s, e, _)| s < end && e > host)
            .map(|&(s, e, what)| Hit {
                what,
                start: s,
                len: e - s,
            })
    }

    /// Number of ranges recorded (for tests and `debug` logs).
    pub fn len(&self) -> usize {
        let r = self.ranges.read();
        r.short.len() + r.long.len()
    }

    /// True when no range is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a write was refused for overlapping metadata since open.
    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::Acquire)
    }

    /// Fails once a write was refused for overlapping metadata: called
    /// first by every write and zeroing, so that nothing (not even a table
    /// entry) changes in an image found corrupt.
    pub fn refuse_if_tripped(&self) -> Result<()> {
        if self.tripped() {
            return Err(Error::corrupt(
                "the image was found corrupt (a write would have overwritten its metadata); \
                 no further writes are made to it",
            )
            .with_path(&self.path));
        }
        Ok(())
    }

    /// Checks a data write of `len` bytes at host offset `host` (for guest
    /// offset `guest`) before it is issued: see the module documentation.
    pub fn guard(&self, host: HostOffset, len: u64, guest: GuestOffset) -> Result<()> {
        self.refuse_if_tripped()?;
        let host = host.get();
        let Some(hit) = self.find(host, len) else {
            return Ok(());
        };
        let what = if guest == NO_GUEST {
            format!("reuse of {len} bytes at host offset {host:#x} as free space")
        } else {
            format!("a write of {len} bytes for guest offset {guest:#x} at host offset {host:#x}")
        };
        let msg = format!(
            "preventing {what}: it overlaps the {} ({} bytes at {:#x}); the image is corrupt",
            hit.what, hit.len, hit.start
        );
        log::error!("{}: {msg}", self.path.display());
        if !self.tripped.swap(true, Ordering::AcqRel) {
            if let Some(f) = &self.on_trip {
                if let Err(e) = f() {
                    log::error!(
                        "{}: cannot mark the image corrupt: {e}",
                        self.path.display()
                    );
                }
            }
        }
        Err(Error::new(ErrorKind::Corrupt, msg).with_path(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> MetadataMap {
        let m = MetadataMap::new(Path::new("img"));
        m.add(0, 65536, Structure::Header);
        m.add(0x30000, 65536, Structure::RefcountTable);
        m.add(0x10000 * 8, 4 << 20, Structure::L1Table);
        for k in 0..100u64 {
            m.add(0x100_0000 + k * 0x2_0000, 65536, Structure::L2Table);
        }
        m
    }

    #[test]
    fn finds_every_touching_range_and_nothing_else() {
        let m = map();
        assert_eq!(m.find(0, 1).map(|h| h.what), Some(Structure::Header));
        assert_eq!(m.find(0xffff, 1).map(|h| h.what), Some(Structure::Header));
        assert_eq!(m.find(0x10000, 0x20000), None);
        assert_eq!(
            m.find(0x2ffff, 2).map(|h| h.what),
            Some(Structure::RefcountTable)
        );
        assert_eq!(m.find(0x40000, 0x40000), None);
        assert_eq!(m.find(0x90000, 1).map(|h| h.what), Some(Structure::L1Table));
        assert_eq!(m.find(0x100_0000 + 0x1_0000, 0x1_0000), None);
        let h = m.find(0x100_0000 + 0x1_ffff, 2).unwrap();
        assert_eq!((h.what, h.start), (Structure::L2Table, 0x102_0000));
        assert_eq!(m.find(u64::MAX - 1, 10), None);
        assert_eq!(m.find(5, 0), None);
        m.remove(0x30000, Structure::RefcountTable);
        assert_eq!(m.find(0x30000, 1), None);
    }

    #[test]
    fn a_hit_refuses_this_and_every_later_write_and_trips_once() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        let mut m = map();
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        m.set_on_trip(Box::new(move || {
            n2.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }));
        m.guard(HostOffset(0x40000), 4096, GuestOffset(0)).unwrap();
        let e = m
            .guard(HostOffset(0x30000), 4096, GuestOffset(0x5000))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.to_string().contains("refcount table"), "{e}");
        assert!(e.to_string().contains("0x5000"), "{e}");
        assert!(m.guard(HostOffset(0x40000), 4096, GuestOffset(0)).is_err());
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert!(m.tripped());
    }
}
