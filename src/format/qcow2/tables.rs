//! L1 and L2 tables: geometry, the L1 table, L2 entry decoding.
//!
//! Guest offsets map through two levels: the L1 entry names an L2 table
//! (one cluster), whose entry describes one guest cluster (standard,
//! compressed, zero or unallocated; with extended L2 entries, 32
//! subclusters each allocated, zero or unallocated).
//!
//! L2 tables are read in slices of at most [`SLICE_BYTES`] through the
//! shared metadata cache, keyed by the slice's host offset, so 2 MiB
//! clusters do not mean 2 MiB reads per lookup.

use crate::endian::{be64, be64s};
use crate::error::{Error, Result};
use crate::host::HostFile;

use super::header::Header;

/// Bits 9..=55 of an L1 or standard L2 entry: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry bit 62: the cluster is compressed.
pub const L2_COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 63: refcount is exactly one ("copied").
pub const L2_COPIED: u64 = 1 << 63;
/// Standard cluster descriptor bit 0: the cluster reads as zeros (v3).
pub const L2_ZERO: u64 = 1;
/// Largest L1 table qemu accepts (32 MiB), our hard cap too.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;
/// Largest L2 slice read and cached at once.
pub const SLICE_BYTES: u64 = 64 << 10;

pub use crate::engine::units::{GuestOffset, HostOffset};

/// Table geometry derived from the header.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    pub entry_bytes: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// Whether entries carry subcluster bitmaps.
    pub extended: bool,
}

/// Where one L2 table sits and which L1 index it serves.
#[derive(Debug, Clone, Copy)]
pub struct L2Ref {
    /// The L2 table's host offset (0: not allocated).
    pub table: HostOffset,
    /// Index of the guest cluster within the table.
    pub index: u64,
}

impl Geometry {
    /// The geometry of an image with this header.
    pub fn new(h: &Header) -> Geometry {
        let entry_bytes = if h.extended_l2() { 16 } else { 8 };
        Geometry {
            cluster_bits: h.cluster_bits,
            entry_bytes,
            l2_entries: h.cluster_size() / entry_bytes,
            extended: h.extended_l2(),
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The size of the allocation unit: a cluster or a subcluster.
    pub fn unit_size(&self) -> u64 {
        if self.extended {
            self.cluster_size() / SUBCLUSTERS
        } else {
            self.cluster_size()
        }
    }

    /// Guest bytes one L2 table covers.
    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries << self.cluster_bits
    }

    /// L1 entries needed for a disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// L2 entries per cached slice.
    pub fn slice_entries(&self) -> u64 {
        (SLICE_BYTES.min(self.cluster_size()) / self.entry_bytes).max(1)
    }
}

/// Reads and validates the active L1 table.
///
/// The table must be big enough for the virtual size, no bigger than
/// [`MAX_L1_BYTES`], cluster aligned, and inside the file; all of that is
/// checked before anything is allocated.
pub fn read_l1(file: &HostFile, h: &Header, geo: &Geometry) -> Result<Vec<u64>> {
    let needed = geo.l1_entries_for(h.size);
    if needed.saturating_mul(8) > MAX_L1_BYTES {
        return Err(Error::corrupt(format!(
            "virtual size {} needs {needed} L1 entries with {} byte clusters; \
             more than the {} MiB L1 limit",
            h.size,
            geo.cluster_size(),
            MAX_L1_BYTES >> 20
        )));
    }
    let l1_size = u64::from(h.l1_size);
    if l1_size < needed {
        return Err(Error::corrupt(format!(
            "l1_size is {l1_size}, too small for virtual size {} (needs {needed} entries)",
            h.size
        )));
    }
    read_l1_at(file, "L1 table", h.l1_table_offset, l1_size, needed, geo)
}

/// Reads the first `want` entries (at most `l1_size`) of the L1 table
/// `what` with `l1_size` entries at `off`, after checking the whole
/// table's size, alignment and place in the file.
pub fn read_l1_at(
    file: &HostFile,
    what: &str,
    off: u64,
    l1_size: u64,
    want: u64,
    geo: &Geometry,
) -> Result<Vec<u64>> {
    let bytes = l1_size.saturating_mul(8);
    if bytes > MAX_L1_BYTES {
        return Err(Error::corrupt(format!(
            "{what}: l1_size {l1_size} is larger than the {} MiB L1 limit",
            MAX_L1_BYTES >> 20
        )));
    }
    if l1_size == 0 {
        return Ok(Vec::new());
    }
    if off % geo.cluster_size() != 0 || off == 0 {
        return Err(Error::corrupt(format!(
            "{what}: offset {off:#x} is not a non-zero multiple of the cluster size"
        )));
    }
    match off.checked_add(bytes) {
        Some(end) if end <= file.len() => {}
        _ => {
            return Err(Error::corrupt(format!(
                "{what} ({l1_size} entries at {off:#x}) lies past the end of the file ({} bytes)",
                file.len()
            )))
        }
    }
    // Only the entries the virtual size uses matter for reading.
    let mut raw = vec![0u8; (want.min(l1_size) * 8) as usize];
    file.read_exact_at(&mut raw, off)?;
    Ok(be64s(&raw).collect())
}

/// What one allocation unit (cluster or subcluster) of an L2 entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Not allocated here: read the backing file.
    Backing,
    /// Reads as zeros.
    Zero,
    /// Stored at this host offset (of the unit's first byte).
    Data(HostOffset),
    /// The whole cluster is compressed.
    Compressed {
        /// Host offset of the compressed bytes.
        host: HostOffset,
        /// Upper bound of the compressed length in bytes.
        len: u64,
    },
}

/// How entries are interpreted, beyond the geometry.
#[derive(Debug, Clone, Copy)]
pub struct EntryRules {
    /// qcow2 version (v2 has no zero flag).
    pub version: u32,
    /// An external data file is used (offset 0 + bit 63 is allocated, no compression).
    pub data_file: bool,
    /// Length of the file data offsets point into (None: not checked).
    pub data_len: Option<u64>,
    /// Length of the image file (compressed data lives there).
    pub image_len: u64,
}

/// Decodes a compressed cluster descriptor into (host offset, max length).
pub fn compressed_descriptor(entry: u64, cluster_bits: u32) -> Result<(u64, u64)> {
    // The offset takes the low `70 - cluster_bits` bits; the count of
    // additional 512-byte sectors takes the rest of bits 0..=61.
    let x = 70 - cluster_bits;
    let off = entry & ((1u64 << x) - 1);
    if off >> 56 != 0 {
        return Err(Error::corrupt(format!(
            "compressed cluster offset {off:#x} uses reserved bits above bit 55"
        )));
    }
    let sectors = ((entry & ((1u64 << 62) - 1)) >> x) + 1;
    let len = sectors * 512 - (off & 511);
    Ok((off, len))
}

/// Decodes unit `sub` (subcluster index, 0 without extended L2) of an entry.
pub fn classify(entry: u64, bitmap: u64, sub: u32, geo: &Geometry, r: &EntryRules) -> Result<Unit> {
    if entry & L2_COMPRESSED != 0 {
        if r.data_file {
            return Err(Error::corrupt(
                "compressed cluster in an image with an external data file",
            ));
        }
        let (off, len) = compressed_descriptor(entry, geo.cluster_bits)?;
        if off >= r.image_len {
            return Err(Error::corrupt(format!(
                "compressed cluster at {off:#x} lies past the end of the file ({} bytes)",
                r.image_len
            )));
        }
        return Ok(Unit::Compressed {
            host: HostOffset(off),
            len,
        });
    }
    let host = entry & OFFSET_MASK;
    let allocated = host != 0 || (r.data_file && entry & L2_COPIED != 0);
    let unit_host = if geo.extended {
        let alloc = bitmap & (1u64 << sub) != 0;
        let zero = bitmap & (1u64 << (sub + 32)) != 0;
        match (alloc, zero) {
            (true, true) => {
                return Err(Error::corrupt(format!(
                    "subcluster {sub} is marked both allocated and zero"
                )))
            }
            (false, true) => return Ok(Unit::Zero),
            (false, false) => return Ok(Unit::Backing),
            (true, false) if !allocated => {
                return Err(Error::corrupt(format!(
                    "subcluster {sub} is allocated but its cluster has no host offset"
                )))
            }
            (true, false) => host + u64::from(sub) * geo.unit_size(),
        }
    } else {
        if entry & L2_ZERO != 0 {
            if r.version < 3 {
                return Err(Error::corrupt("zero cluster flag set in a version 2 image"));
            }
            return Ok(Unit::Zero);
        }
        if !allocated {
            return Ok(Unit::Backing);
        }
        host
    };
    if host % geo.cluster_size() != 0 {
        return Err(Error::corrupt(format!(
            "L2 entry host offset {host:#x} is not aligned to the cluster size"
        )));
    }
    if let Some(len) = r.data_len {
        if unit_host >= len {
            return Err(Error::corrupt(format!(
                "data cluster at {host:#x} lies past the end of the file ({len} bytes)"
            )));
        }
    }
    Ok(Unit::Data(HostOffset(unit_host)))
}

/// Reads entry `i` (and its bitmap) from an L2 slice's raw bytes.
pub fn entry_at(slice: &[u8], i: usize, geo: &Geometry) -> (u64, u64) {
    let at = i * geo.entry_bytes as usize;
    let word = |o: usize| be64(slice, o);
    let bitmap = if geo.extended { word(at + 8) } else { 0 };
    (word(at), bitmap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(bits: u32, extended: bool) -> Geometry {
        let entry_bytes = if extended { 16 } else { 8 };
        Geometry {
            cluster_bits: bits,
            entry_bytes,
            l2_entries: (1 << bits) / entry_bytes,
            extended,
        }
    }

    const RULES: EntryRules = EntryRules {
        version: 3,
        data_file: false,
        data_len: Some(1 << 30),
        image_len: 1 << 30,
    };

    #[test]
    fn compressed_split_depends_on_cluster_bits() {
        // 64 KiB clusters: 54 offset bits, 8 sector-count bits.
        let e = L2_COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(
            compressed_descriptor(e, 16).unwrap(),
            (0x12345, 4 * 512 - 0x145)
        );
        // 512-byte clusters: 61 offset bits, bits 56..61 must be clear.
        assert!(compressed_descriptor(1u64 << 58, 9).is_err());
        // 2 MiB clusters: 49 offset bits, 13 count bits.
        let e = (0x1fffu64 << 49) | 512;
        assert_eq!(compressed_descriptor(e, 21).unwrap(), (512, 0x2000 * 512));
    }

    #[test]
    fn standard_entries() {
        let g = geo(16, false);
        assert_eq!(classify(0, 0, 0, &g, &RULES).unwrap(), Unit::Backing);
        assert_eq!(
            classify(L2_ZERO | 0x10000, 0, 0, &g, &RULES).unwrap(),
            Unit::Zero
        );
        assert_eq!(
            classify(L2_COPIED | 0x30000, 0, 0, &g, &RULES).unwrap(),
            Unit::Data(HostOffset(0x30000))
        );
        assert!(classify(0x30200, 0, 0, &g, &RULES).is_err());
        assert!(classify(1 << 40, 0, 0, &g, &RULES).is_err());
        let v2 = EntryRules {
            version: 2,
            ..RULES
        };
        assert!(classify(L2_ZERO, 0, 0, &g, &v2).is_err());
    }

    #[test]
    fn subclusters() {
        let g = geo(16, true);
        let e = 0x40000;
        let bm = 0b10 | (1u64 << 32);
        assert_eq!(classify(e, bm, 0, &g, &RULES).unwrap(), Unit::Zero);
        assert_eq!(
            classify(e, bm, 1, &g, &RULES).unwrap(),
            Unit::Data(HostOffset(0x40000 + 2048))
        );
        assert_eq!(classify(e, bm, 2, &g, &RULES).unwrap(), Unit::Backing);
        assert!(classify(e, 1 | (1 << 32), 0, &g, &RULES).is_err());
        assert!(classify(0, 1, 0, &g, &RULES).is_err());
    }
}
