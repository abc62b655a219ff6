//! The qcow2 header and its extensions: parsing and validation.
//!
//! [`Header::parse`] works on the image's first bytes only (no I/O), so
//! it can be unit-tested on crafted buffers. Every field taken from the
//! image is checked before anything is sized from it; errors name the field.

use crate::endian::{be32, be64};
use crate::error::{Error, Result};

/// The qcow2 magic, "QFI\xfb".
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Length of a version 2 header (and of the common part of v3).
pub const V2_HEADER_LEN: u32 = 72;
/// Minimum length of a version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Smallest supported cluster_bits (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported cluster_bits (2 MiB clusters, qemu's limit too).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Longest backing file name the spec allows.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Most internal snapshots the spec allows.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Incompatible feature bit 0: the image was not closed cleanly.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image was marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest clusters live in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: `compression_type` is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended (128-bit) L2 entries with subclusters.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// All incompatible bits this driver understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature bit 1: the external data file is a consistent raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

const EXT_END: u32 = 0x0000_0000;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// How compressed clusters are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (the default, called "zlib" by qemu).
    Deflate,
    /// zstd frames.
    Zstd,
}

/// Which feature bitmap a feature name table entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// `incompatible_features`.
    Incompatible,
    /// `compatible_features`.
    Compatible,
    /// `autoclear_features`.
    Autoclear,
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// The bitmap the bit belongs to.
    pub kind: FeatureKind,
    /// The bit number (0..=63).
    pub bit: u8,
    /// The feature's name.
    pub name: String,
}

/// A parsed and validated qcow2 header, with its extensions.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is stored (0: no backing file).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest disk size in bytes.
    pub size: u64,
    /// 0: none, 1: AES, 2: LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (0 for v2).
    pub incompatible: u64,
    /// Compatible feature bits (0 for v2).
    pub compatible: u64,
    /// Autoclear feature bits (0 for v2).
    pub autoclear: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// How compressed clusters are encoded.
    pub compression: CompressionType,
    /// Backing format name from the extension, if present.
    pub backing_format: Option<String>,
    /// External data file name from the extension, if present.
    pub data_file: Option<String>,
    /// The feature name table, if present.
    pub feature_names: Vec<FeatureName>,
    /// Whether a bitmaps extension is present.
    pub has_bitmaps_ext: bool,
    /// The bitmaps directory (offset, bytes) the bitmaps extension names.
    pub bitmap_directory: Option<(u64, u64)>,
    /// Number of header extensions of unknown type that were skipped.
    pub unknown_extensions: u32,
}

fn ext_string(what: &str, data: &[u8]) -> Result<String> {
    String::from_utf8(data.to_vec())
        .map_err(|_| Error::corrupt(format!("{what} header extension is not valid UTF-8")))
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Width of a refcount entry in bits.
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order
    }

    /// Whether extended L2 entries (subclusters) are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }

    /// The name the feature table gives a bit, if any.
    pub fn feature_name(&self, kind: FeatureKind, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| f.name.as_str())
    }

    /// Parses the header from the image's first bytes. `head` should hold
    /// the whole first cluster (or the whole file, if shorter): header
    /// extensions live there.
    pub fn parse(head: &[u8]) -> Result<Header> {
        if head.len() < V2_HEADER_LEN as usize {
            return Err(Error::corrupt(format!(
                "file is {} bytes, too short for a qcow2 header ({V2_HEADER_LEN} bytes)",
                head.len()
            )));
        }
        if head[0..4] != MAGIC {
            return Err(Error::corrupt("not a qcow2 image (bad magic)"));
        }
        let version = be32(head, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "qcow2 version {version} is not supported (only 2 and 3)"
            )));
        }
        let cluster_bits = be32(head, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::corrupt(format!(
                "cluster_bits is {cluster_bits}; it must be {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} \
                 (cluster sizes 512 B to 2 MiB)"
            )));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(head, 8),
            backing_file_size: be32(head, 16),
            cluster_bits,
            size: be64(head, 24),
            crypt_method: be32(head, 32),
            l1_size: be32(head, 36),
            l1_table_offset: be64(head, 40),
            refcount_table_offset: be64(head, 48),
            refcount_table_clusters: be32(head, 56),
            nb_snapshots: be32(head, 60),
            snapshots_offset: be64(head, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: CompressionType::Deflate,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            has_bitmaps_ext: false,
            bitmap_directory: None,
            unknown_extensions: 0,
        };
        let cluster_size = h.cluster_size();
        let mut compression_type = 0u8;
        if version == 3 {
            if head.len() < V3_MIN_HEADER_LEN as usize {
                return Err(Error::corrupt(format!(
                    "file is {} bytes, too short for a qcow2 v3 header ({V3_MIN_HEADER_LEN} bytes)",
                    head.len()
                )));
            }
            h.incompatible = be64(head, 72);
            h.compatible = be64(head, 80);
            h.autoclear = be64(head, 88);
            h.refcount_order = be32(head, 96);
            h.header_length = be32(head, 100);
            if h.header_length < V3_MIN_HEADER_LEN {
                return Err(Error::corrupt(format!(
                    "header_length is {}; a v3 header is at least {V3_MIN_HEADER_LEN} bytes",
                    h.header_length
                )));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(Error::corrupt(format!(
                    "header_length {} is larger than the cluster size {cluster_size}",
                    h.header_length
                )));
            }
            if h.header_length as usize > head.len() {
                return Err(Error::corrupt(format!(
                    "header_length {} runs past the end of the file ({} bytes)",
                    h.header_length,
                    head.len()
                )));
            }
            if h.header_length > 104 {
                compression_type = head[104];
            }
        }
        if h.refcount_order > 6 {
            return Err(Error::corrupt(format!(
                "refcount_order is {}; it must be 0..=6 (refcount widths 1 to 64 bits)",
                h.refcount_order
            )));
        }
        if h.crypt_method != 0 {
            let how = match h.crypt_method {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(Error::new(
                crate::error::ErrorKind::Encrypted,
                format!(
                    "image is encrypted (crypt_method {} = {how}); vdiskfs does not decrypt",
                    h.crypt_method
                ),
            ));
        }
        h.parse_extensions(head)?;
        h.check_features(compression_type)?;
        if h.backing_file_offset != 0 && h.backing_file_size > MAX_BACKING_NAME {
            return Err(Error::corrupt(format!(
                "backing_file_size is {}; backing file names are at most {MAX_BACKING_NAME} bytes",
                h.backing_file_size
            )));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::corrupt(format!(
                "nb_snapshots is {}; at most {MAX_SNAPSHOTS} snapshots are allowed",
                h.nb_snapshots
            )));
        }
        if h.nb_snapshots > 0 && h.snapshots_offset % cluster_size != 0 {
            return Err(Error::corrupt(format!(
                "snapshots_offset {:#x} is not aligned to the cluster size",
                h.snapshots_offset
            )));
        }
        Ok(h)
    }

    /// Walks the header extensions between the header and the end of the
    /// extension area (the backing file name, or the end of the first cluster).
    fn parse_extensions(&mut self, head: &[u8]) -> Result<()> {
        let mut end = (self.cluster_size() as usize).min(head.len());
        if self.backing_file_offset != 0 {
            end = end.min(usize::try_from(self.backing_file_offset).unwrap_or(usize::MAX));
        }
        let mut pos = self.header_length as usize;
        while pos + 8 <= end {
            let kind = be32(head, pos);
            let len = be32(head, pos + 4) as usize;
            let data_start = pos + 8;
            if kind == EXT_END {
                break;
            }
            if len > end - data_start {
                return Err(Error::corrupt(format!(
                    "header extension {kind:#010x} at offset {pos:#x} has length {len}, \
                     which runs past the extension area (ends at {end:#x})"
                )));
            }
            let data = &head[data_start..data_start + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(ext_string("backing format", data)?);
                }
                EXT_DATA_FILE => self.data_file = Some(ext_string("data file name", data)?),
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let kind = match entry[0] {
                            0 => FeatureKind::Incompatible,
                            1 => FeatureKind::Compatible,
                            2 => FeatureKind::Autoclear,
                            _ => continue,
                        };
                        let raw = &entry[2..48];
                        let n = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                        self.feature_names.push(FeatureName {
                            kind,
                            bit: entry[1],
                            name: String::from_utf8_lossy(&raw[..n]).into_owned(),
                        });
                    }
                }
                EXT_BITMAPS => {
                    self.has_bitmaps_ext = true;
                    // nb_bitmaps, reserved, directory size, directory offset.
                    if data.len() >= 24 {
                        self.bitmap_directory = Some((be64(data, 16), be64(data, 8)));
                    }
                }
                // Encryption is refused from crypt_method before we get here.
                EXT_CRYPTO => {}
                _ => self.unknown_extensions += 1,
            }
            pos = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Checks feature bits and the fields that depend on them.
    fn check_features(&mut self, compression_type: u8) -> Result<()> {
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bits: Vec<String> = (0..64u8)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| match self.feature_name(FeatureKind::Incompatible, b) {
                    Some(name) => format!("bit {b} ({name})"),
                    None => format!("bit {b}"),
                })
                .collect();
            return Err(Error::unsupported(format!(
                "unknown incompatible feature {}",
                bits.join(", ")
            )));
        }
        if self.incompatible & INCOMPAT_COMPRESSION != 0 {
            self.compression =
                match compression_type {
                    1 => CompressionType::Zstd,
                    0 => return Err(Error::corrupt(
                        "compression type feature bit is set but compression_type is 0 (deflate)",
                    )),
                    other => {
                        return Err(Error::unsupported(format!(
                            "compression_type {other} is not supported (0 = deflate, 1 = zstd)"
                        )))
                    }
                };
        } else if compression_type != 0 {
            return Err(Error::corrupt(format!(
                "compression_type is {compression_type} but the compression type feature bit is clear"
            )));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(Error::corrupt(format!(
                "extended L2 entries need clusters of at least 16 KiB; cluster_bits is {}",
                self.cluster_bits
            )));
        }
        if self.has_data_file() && self.data_file.is_none() {
            return Err(Error::corrupt(
                "image uses an external data file but has no data file name extension",
            ));
        }
        if !self.has_data_file() && self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 {
            return Err(Error::corrupt(
                "data_file_raw is set but the image has no external data file",
            ));
        }
        Ok(())
    }

    /// Feature names for `info`.
    pub fn feature_list(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.compression == CompressionType::Zstd {
            f.push("compression_type=zstd".to_string());
        }
        if self.extended_l2() {
            f.push("extended_l2".into());
        }
        if self.has_data_file() {
            f.push("data_file".into());
        }
        if self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 {
            f.push("data_file_raw".into());
        }
        if self.incompatible & INCOMPAT_DIRTY != 0 {
            f.push("dirty".into());
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            f.push("corrupt".into());
        }
        if self.compatible & COMPAT_LAZY_REFCOUNTS != 0 {
            f.push("lazy_refcounts".into());
        }
        if self.has_bitmaps_ext || self.autoclear & AUTOCLEAR_BITMAPS != 0 {
            f.push("bitmaps".into());
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endian::{put_be32, put_be64};
    use crate::error::ErrorKind;

    fn v3(cluster_bits: u32) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[0..4].copy_from_slice(&MAGIC);
        put_be32(&mut h, 4, 3);
        put_be32(&mut h, 20, cluster_bits);
        put_be64(&mut h, 24, 1u64 << 20);
        put_be32(&mut h, 96, 4);
        put_be32(&mut h, 100, 112);
        h
    }

    #[test]
    fn minimal_v3_parses() {
        let h = Header::parse(&v3(16)).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.compression, CompressionType::Deflate);
    }

    #[test]
    fn bad_fields_are_refused_with_their_kind() {
        for bits in [8u32, 22, 0, 63] {
            let e = Header::parse(&v3(bits)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "cluster_bits {bits}");
            assert!(e.message().contains("cluster_bits"));
        }
        let mut h = v3(16);
        put_be32(&mut h, 96, 7);
        assert_eq!(Header::parse(&h).unwrap_err().kind(), ErrorKind::Corrupt);
        let mut h = v3(16);
        put_be32(&mut h, 32, 2);
        assert_eq!(Header::parse(&h).unwrap_err().kind(), ErrorKind::Encrypted);
        assert_eq!(
            Header::parse(&v3(16)[..80]).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn unknown_incompatible_bit_is_named_from_the_feature_table() {
        let mut h = v3(16);
        put_be64(&mut h, 72, 1u64 << 9);
        // Feature table extension with one entry: incompatible bit 9 "frobnicate".
        put_be32(&mut h, 112, EXT_FEATURE_TABLE);
        put_be32(&mut h, 116, 48);
        h[120] = 0;
        h[121] = 9;
        h[122..132].copy_from_slice(b"frobnicate");
        let e = Header::parse(&h).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("bit 9 (frobnicate)"), "{e}");
    }

    #[test]
    fn overlong_extension_is_refused() {
        let mut h = v3(12);
        put_be32(&mut h, 112, EXT_BACKING_FORMAT);
        put_be32(&mut h, 116, 100_000);
        assert_eq!(Header::parse(&h).unwrap_err().kind(), ErrorKind::Corrupt);
    }
}
