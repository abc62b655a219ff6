//! The 48-byte qcow version 1 header and the backing file name it points at.
//!
//! Layout (all fields big-endian):
//!
//! | offset | size | field                 |
//! |-------:|-----:|-----------------------|
//! |      0 |    4 | magic `QFI\xfb`       |
//! |      4 |    4 | version (1)           |
//! |      8 |    8 | backing_file_offset   |
//! |     16 |    4 | backing_file_size     |
//! |     20 |    4 | mtime                 |
//! |     24 |    8 | size (guest bytes)    |
//! |     32 |    1 | cluster_bits          |
//! |     33 |    1 | l2_bits               |
//! |     34 |    2 | padding               |
//! |     36 |    4 | crypt_method          |
//! |     40 |    8 | l1_table_offset       |
//!
//! Parsing validates every field against the limits qemu enforces, plus a
//! hard cap on the L1 table so that no image can make us allocate much.

use crate::endian::{be32, be64};
use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;

/// Length of the version 1 header.
pub const HEADER_LEN: usize = 48;

/// The qcow magic, `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Smallest and largest `cluster_bits` qemu accepts (512 B .. 64 KiB).
pub const CLUSTER_BITS: std::ops::RangeInclusive<u8> = 9..=16;

/// Smallest and largest `l2_bits` qemu accepts: L2 tables of 512 B .. 64 KiB
/// (each entry is 8 bytes, so 2^6 .. 2^13 entries).
pub const L2_BITS: std::ops::RangeInclusive<u8> = 6..=13;

/// Longest backing file name qemu reads.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Largest L1 table we load, in bytes. qemu itself allows ~2 GiB; real
/// images stay far below this (with the smallest geometry qemu creates,
/// 32 MiB of L1 covers 8 PiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;

/// `crypt_method` values.
pub const CRYPT_NONE: u32 = 0;
/// AES-CBC with a key derived from a password (not supported).
pub const CRYPT_AES: u32 = 1;

/// A parsed and validated version 1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Offset of the backing file name, 0 for none.
    pub backing_file_offset: u64,
    /// Length of the backing file name in bytes.
    pub backing_file_size: u32,
    /// Modification time of the backing file when the image was made.
    pub mtime: u32,
    /// Guest size in bytes as recorded.
    pub size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u8,
    /// log2 of the number of entries in an L2 table.
    pub l2_bits: u8,
    /// 0 for none, 1 for AES.
    pub crypt_method: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
}

impl Header {
    /// Parses and validates the header from the first bytes of the file.
    /// `file_len` bounds the L1 table.
    pub fn parse(bytes: &[u8], file_len: u64) -> Result<Header> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::corrupt(format!(
                "qcow header is truncated: the file has {} bytes, the header needs {HEADER_LEN}",
                bytes.len()
            )));
        }
        if bytes[0..4] != MAGIC {
            return Err(Error::corrupt("not a qcow image (bad magic)"));
        }
        let version = be32(bytes, 4);
        if version != 1 {
            return Err(Error::unsupported(format!(
                "qcow version {version} is not version 1 (the qcow2 driver handles 2 and 3)"
            )));
        }
        let h = Header {
            backing_file_offset: be64(bytes, 8),
            backing_file_size: be32(bytes, 16),
            mtime: be32(bytes, 20),
            size: be64(bytes, 24),
            cluster_bits: bytes[32],
            l2_bits: bytes[33],
            crypt_method: be32(bytes, 36),
            l1_table_offset: be64(bytes, 40),
        };
        h.validate(file_len)?;
        Ok(h)
    }

    fn validate(&self, file_len: u64) -> Result<()> {
        if !CLUSTER_BITS.contains(&self.cluster_bits) {
            return Err(Error::corrupt(format!(
                "qcow cluster_bits {} is out of range (must be {}..={}: clusters of 512 B to 64 KiB)",
                self.cluster_bits,
                CLUSTER_BITS.start(),
                CLUSTER_BITS.end()
            )));
        }
        if !L2_BITS.contains(&self.l2_bits) {
            return Err(Error::corrupt(format!(
                "qcow l2_bits {} is out of range (must be {}..={}: L2 tables of 512 B to 64 KiB)",
                self.l2_bits,
                L2_BITS.start(),
                L2_BITS.end()
            )));
        }
        match self.crypt_method {
            CRYPT_NONE => {}
            CRYPT_AES => {
                return Err(Error::new(
                    ErrorKind::Encrypted,
                    "qcow image is AES-encrypted (crypt_method 1); vdiskfs does not decrypt \
                     (qemu-img convert with the key can make a plain copy)",
                ))
            }
            other => {
                return Err(Error::corrupt(format!(
                    "qcow crypt_method {other} is not a known encryption method"
                )))
            }
        }
        if self.size <= 1 {
            return Err(Error::corrupt(format!(
                "qcow size {} is too small (qemu requires at least 2 bytes)",
                self.size
            )));
        }
        let l1_bytes = self.l1_entries()?.saturating_mul(8);
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "qcow size {} bytes needs an L1 table of {l1_bytes} bytes, more than the {} MiB limit",
                self.size,
                MAX_L1_BYTES >> 20
            )));
        }
        let l1_end = self.l1_table_offset.checked_add(l1_bytes);
        if l1_end.is_none_or(|end| end > file_len) {
            return Err(Error::corrupt(format!(
                "qcow L1 table ({l1_bytes} bytes at offset {:#x}) lies past the end of the file ({file_len} bytes)",
                self.l1_table_offset
            )));
        }
        Ok(())
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest bytes one L1 entry (one L2 table) covers, as a shift.
    pub fn l1_shift(&self) -> u32 {
        u32::from(self.cluster_bits) + u32::from(self.l2_bits)
    }

    /// Number of L1 entries the recorded size needs.
    pub fn l1_entries(&self) -> Result<u64> {
        let span = 1u64 << self.l1_shift();
        let rounded = self
            .size
            .checked_add(span - 1)
            .ok_or_else(|| Error::corrupt(format!("qcow size {} is too large", self.size)))?;
        Ok(rounded >> self.l1_shift())
    }

    /// The guest size qemu exposes: the recorded size in whole 512-byte sectors.
    pub fn virtual_size(&self) -> u64 {
        self.size & !511
    }

    /// Reads the backing file name, if the header names one. A name cut at
    /// a NUL byte is read up to it, as qemu does; an empty name means none.
    pub fn backing_name(&self, file: &HostFile) -> Result<Option<String>> {
        if self.backing_file_offset == 0 {
            return Ok(None);
        }
        let len = self.backing_file_size;
        if len > MAX_BACKING_NAME {
            return Err(Error::corrupt(format!(
                "qcow backing file name is {len} bytes long, more than {MAX_BACKING_NAME}"
            )));
        }
        let end = self.backing_file_offset.checked_add(u64::from(len));
        if end.is_none_or(|e| e > file.len()) {
            return Err(Error::corrupt(format!(
                "qcow backing file name ({len} bytes at offset {:#x}) lies past the end of the file",
                self.backing_file_offset
            )));
        }
        let mut name = vec![0u8; len as usize];
        file.read_exact_at(&mut name, self.backing_file_offset)?;
        if let Some(nul) = name.iter().position(|&b| b == 0) {
            name.truncate(nul);
        }
        if name.is_empty() {
            return Ok(None);
        }
        String::from_utf8(name)
            .map(Some)
            .map_err(|_| Error::corrupt("qcow backing file name is not valid UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endian::{put_be32, put_be64};

    fn header(cluster_bits: u8, l2_bits: u8, size: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        put_be32(&mut h, 4, 1);
        put_be64(&mut h, 24, size);
        h[32] = cluster_bits;
        h[33] = l2_bits;
        put_be64(&mut h, 40, 48);
        h
    }

    #[test]
    fn parses_a_plain_header() {
        let h = Header::parse(&header(12, 9, 4 << 20), 1 << 20).unwrap();
        assert_eq!(h.cluster_size(), 4096);
        assert_eq!(h.l1_entries().unwrap(), 2);
        assert_eq!(h.virtual_size(), 4 << 20);
    }

    #[test]
    fn refuses_out_of_range_fields() {
        for (cb, l2) in [(8, 9), (17, 9), (12, 5), (12, 14)] {
            let e = Header::parse(&header(cb, l2, 1 << 20), 1 << 20).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{cb} {l2}");
        }
        let e = Header::parse(&header(12, 9, 1), 1 << 20).unwrap_err();
        assert!(e.message().contains("too small"));
        let e = Header::parse(&header(12, 9, u64::MAX), 1 << 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        let e = Header::parse(&header(12, 9, 1 << 40), 1 << 20).unwrap_err();
        assert!(e.message().contains("L1"), "{e}");
        let e = Header::parse(&header(12, 9, 1 << 20), 40).unwrap_err();
        assert!(e.message().contains("past the end"), "{e}");
        let e = Header::parse(&header(12, 9, 1 << 20)[..47], 47).unwrap_err();
        assert!(e.message().contains("truncated"), "{e}");
    }

    #[test]
    fn refuses_encryption() {
        let mut h = header(12, 9, 1 << 20);
        h[39] = 1;
        assert_eq!(
            Header::parse(&h, 1 << 20).unwrap_err().kind(),
            ErrorKind::Encrypted
        );
        h[39] = 2;
        assert_eq!(
            Header::parse(&h, 1 << 20).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
}
