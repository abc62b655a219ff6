//! The fixed structures at the start of a VHDX file: the file type
//! identifier, the two headers and the two region tables, plus the GUID
//! type and CRC-32C check every VHDX structure shares.
//!
//! Layout (MS-VHDX): the identifier at 0 (`vhdxfile` and a UTF-16 creator
//! string), header copies at 64 KiB and 128 KiB, region table copies at
//! 192 KiB and 256 KiB. Each header and table carries a CRC-32C computed
//! with its own checksum field zeroed. The current header is the valid copy
//! with the higher sequence number (the other is the one being replaced
//! when an update was cut short); the region tables are identical copies,
//! and the first valid one is used.

use std::fmt;

use super::log::Source;
use crate::endian::{be16, be32, le16, le16_bytes, le16s, le32, le32_bytes, le64};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// The file type identifier signature at offset 0.
pub const SIGNATURE: &[u8; 8] = b"vhdxfile";

/// One MiB: the alignment of regions, payload blocks and the log.
pub const MIB: u64 = 1 << 20;

/// File offsets of the two header copies.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Bytes of one header copy.
pub const HEADER_LEN: usize = 4096;
const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
const REGION_LEN: usize = 64 << 10;
const REGION_MAX_ENTRIES: u32 = 2047;

/// A GUID as stored on disk (Microsoft mixed-endian byte order).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Builds a GUID from its usual textual fields.
    pub const fn new(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
        let a = le32_bytes(a);
        let b = le16_bytes(b);
        let c = le16_bytes(c);
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }

    /// Builds a GUID from its textual form read as one hex number
    /// (`0xaaaaaaaa_bbbb_cccc_dddd_dddddddddddd`), so constants read as the
    /// spec writes them.
    pub const fn from_u128(v: u128) -> Guid {
        let d = (v as u64).to_be_bytes();
        Guid::new((v >> 96) as u32, (v >> 80) as u16, (v >> 64) as u16, d)
    }

    /// Reads a GUID from 16 bytes at `at` of `b` (the caller checked the length).
    pub fn read(b: &[u8], at: usize) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[at..at + 16]);
        Guid(g)
    }

    /// True for the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses the textual form, with or without braces.
    pub fn parse(s: &str) -> Option<Guid> {
        let s = s.trim().trim_start_matches('{').trim_end_matches('}');
        let hex: String = s.chars().filter(|&c| c != '-').collect();
        if hex.len() != 32 || s.len() != 36 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let byte = |i: usize| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok();
        let mut t = [0u8; 16];
        for (i, v) in t.iter_mut().enumerate() {
            *v = byte(i)?;
        }
        let a = be32(&t, 0);
        let b = be16(&t, 4);
        let c = be16(&t, 6);
        let mut d = [0u8; 8];
        d.copy_from_slice(&t[8..]);
        Some(Guid::new(a, b, c, d))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-",
            le32(g, 0),
            le16(g, 4),
            le16(g, 6),
            g[8],
            g[9]
        )?;
        for b in &g[10..] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The BAT region.
pub const BAT_REGION: Guid = Guid::from_u128(0x2dc27766_f623_4200_9d64_115e9bfd4a08);
/// The metadata region.
pub const METADATA_REGION: Guid = Guid::from_u128(0x8b7ca206_4790_4b9a_b8fe_575f050f886e);

/// CRC-32C of `block` with its 4-byte checksum field at `at` taken as zero.
pub fn crc_with_zeroed(block: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&block[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &block[at + 4..])
}

/// Decodes a UTF-16LE string, stopping at the first NUL.
pub fn utf16le(b: &[u8]) -> String {
    let units: Vec<u16> = le16s(b).take_while(|&u| u != 0).collect();
    String::from_utf16_lossy(&units)
}

/// True when `head` starts with the VHDX file type identifier.
pub fn probe(head: &[u8]) -> bool {
    head.len() >= 8 && &head[..8] == SIGNATURE
}

/// The creator string of the file type identifier (who made the file).
pub fn read_creator(file: &HostFile) -> Result<String> {
    let mut b = [0u8; 520];
    let n = file.read_at_most(&mut b, 0)?;
    if n < 8 || !probe(&b[..n]) {
        return Err(Error::corrupt(
            "no VHDX file type identifier ('vhdxfile') at offset 0",
        ));
    }
    Ok(utf16le(&b[8..n]))
}

/// One VHDX header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Which copy (1 or 2) this is.
    pub copy: u8,
    /// Sequence number: the copy with the higher one is current.
    pub sequence: u64,
    /// Changes on the first write to the file after open.
    pub file_write_guid: Guid,
    /// Changes on the first write of guest data; children record it.
    pub data_write_guid: Guid,
    /// Zero when the log is empty; otherwise the GUID of the active log.
    pub log_guid: Guid,
    /// Log format version (0).
    pub log_version: u16,
    /// Header format version (1).
    pub version: u16,
    /// Log length in bytes (a multiple of 1 MiB).
    pub log_length: u32,
    /// Log offset in bytes (a multiple of 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Parses one header copy; errors say why it is not valid.
    pub fn parse(b: &[u8], copy: u8) -> Result<Header> {
        if b.len() < HEADER_LEN {
            return Err(Error::corrupt(format!("header {copy} is truncated")));
        }
        let b = &b[..HEADER_LEN];
        if &b[0..4] != b"head" {
            return Err(Error::corrupt(format!(
                "header {copy} has no 'head' signature"
            )));
        }
        if crc_with_zeroed(b, 4) != le32(b, 4) {
            return Err(Error::corrupt(format!("header {copy} fails its CRC-32C")));
        }
        Ok(Header {
            copy,
            sequence: le64(b, 8),
            file_write_guid: Guid::read(b, 16),
            data_write_guid: Guid::read(b, 32),
            log_guid: Guid::read(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }

    /// Reads both copies and returns the current one: the valid copy with
    /// the higher sequence number.
    pub fn read_current(file: &HostFile) -> Result<Header> {
        let mut valid: Vec<(Header, Vec<u8>)> = Vec::new();
        let mut why = Vec::new();
        for (i, &off) in HEADER_OFFSETS.iter().enumerate() {
            let mut b = vec![0u8; HEADER_LEN];
            let n = file.read_at_most(&mut b, off)?;
            match Header::parse(&b[..n], i as u8 + 1) {
                Ok(h) => valid.push((h, b)),
                Err(e) => why.push(e.message().to_string()),
            }
        }
        let best = match valid.as_slice() {
            [(h1, b1), (h2, b2)] => {
                if h1.sequence > h2.sequence {
                    Some(h1.clone())
                } else if h2.sequence > h1.sequence {
                    Some(h2.clone())
                } else if b1 == b2 {
                    // Disk2vhd writes two identical headers; qemu accepts them.
                    Some(h1.clone())
                } else {
                    return Err(Error::corrupt(format!(
                        "the two VHDX headers differ but share sequence number {}, so neither is current",
                        h1.sequence
                    )));
                }
            }
            [(h, _), ..] => Some(h.clone()),
            [] => None,
        };
        let h = best
            .ok_or_else(|| Error::corrupt(format!("no valid VHDX header ({})", why.join("; "))))?;
        if h.version != 1 {
            return Err(Error::unsupported(format!(
                "VHDX header version {} (only version 1 exists)",
                h.version
            )));
        }
        Ok(h)
    }

    /// Checks the log fields against the file; a zero log GUID means the
    /// log is empty and its location does not matter.
    pub fn check_log(&self, file_len: u64) -> Result<()> {
        if self.log_guid.is_zero() {
            return Ok(());
        }
        if self.log_version != 0 {
            return Err(Error::unsupported(format!(
                "VHDX log version {}",
                self.log_version
            )));
        }
        let len = u64::from(self.log_length);
        if len == 0 || len % MIB != 0 || self.log_offset % MIB != 0 || self.log_offset < MIB {
            return Err(Error::corrupt(format!(
                "VHDX log at {:#x} of {len} bytes is not 1 MiB-aligned",
                self.log_offset
            )));
        }
        match self.log_offset.checked_add(len) {
            Some(end) if end <= file_len => Ok(()),
            _ => Err(Error::corrupt(format!(
                "VHDX log at {:#x} of {len} bytes lies past the end of the file ({file_len} bytes)",
                self.log_offset
            ))),
        }
    }
}

/// One region table entry.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// What the region holds.
    pub guid: Guid,
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Whether a reader must understand this region.
    pub required: bool,
}

/// The region table: where the BAT and the metadata live.
#[derive(Debug, Clone)]
pub struct Regions {
    /// The BAT region.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
    /// Every entry, known or not (for `info`).
    pub all: Vec<Region>,
}

impl Regions {
    /// Parses one region table copy.
    pub fn parse(b: &[u8], copy: u8) -> Result<Regions> {
        if b.len() < REGION_LEN {
            return Err(Error::corrupt(format!("region table {copy} is truncated")));
        }
        let b = &b[..REGION_LEN];
        if &b[0..4] != b"regi" {
            return Err(Error::corrupt(format!(
                "region table {copy} has no 'regi' signature"
            )));
        }
        if crc_with_zeroed(b, 4) != le32(b, 4) {
            return Err(Error::corrupt(format!(
                "region table {copy} fails its CRC-32C"
            )));
        }
        let count = le32(b, 8);
        if count > REGION_MAX_ENTRIES {
            return Err(Error::corrupt(format!(
                "region table {copy} has {count} entries (at most {REGION_MAX_ENTRIES})"
            )));
        }
        let mut all = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let e = 16 + 32 * i;
            all.push(Region {
                guid: Guid::read(b, e),
                offset: le64(b, e + 16),
                length: u64::from(le32(b, e + 24)),
                required: le32(b, e + 28) & 1 != 0,
            });
        }
        let mut bat = None;
        let mut metadata = None;
        for r in &all {
            let slot = if r.guid == BAT_REGION {
                &mut bat
            } else if r.guid == METADATA_REGION {
                &mut metadata
            } else if r.required {
                return Err(Error::unsupported(format!(
                    "VHDX region {} is marked required but unknown",
                    r.guid
                )));
            } else {
                continue;
            };
            if slot.is_some() {
                return Err(Error::corrupt(format!(
                    "region table {copy} lists region {} twice",
                    r.guid
                )));
            }
            *slot = Some(*r);
        }
        let (Some(bat), Some(metadata)) = (bat, metadata) else {
            return Err(Error::corrupt(format!(
                "region table {copy} lacks the BAT or the metadata region"
            )));
        };
        Ok(Regions { bat, metadata, all })
    }

    /// Reads the first valid region table copy and checks its regions
    /// against the file's length as the log leaves it.
    pub fn read(src: &Source) -> Result<Regions> {
        let end = src.end;
        let mut why = Vec::new();
        for (i, &off) in REGION_OFFSETS.iter().enumerate() {
            let mut b = vec![0u8; REGION_LEN];
            src.read_at(&mut b, off)?;
            match Regions::parse(&b, i as u8 + 1) {
                Ok(r) => {
                    for reg in [r.bat, r.metadata] {
                        check_region(&reg, end)?;
                    }
                    let (a, b) = (r.bat, r.metadata);
                    if a.offset < b.offset + b.length && b.offset < a.offset + a.length {
                        return Err(Error::corrupt(format!(
                            "the VHDX BAT region ({:#x}+{}) overlaps the metadata region ({:#x}+{})",
                            a.offset, a.length, b.offset, b.length
                        )));
                    }
                    return Ok(r);
                }
                Err(e) if e.kind() == crate::ErrorKind::Unsupported => return Err(e),
                Err(e) => why.push(e.message().to_string()),
            }
        }
        Err(Error::corrupt(format!(
            "no valid VHDX region table ({})",
            why.join("; ")
        )))
    }
}

fn check_region(r: &Region, end: u64) -> Result<()> {
    let name = if r.guid == BAT_REGION {
        "BAT"
    } else {
        "metadata"
    };
    if r.offset % MIB != 0 || r.offset < MIB || r.length == 0 || r.length % MIB != 0 {
        return Err(Error::corrupt(format!(
            "VHDX {name} region at {:#x} of {} bytes is not 1 MiB-aligned",
            r.offset, r.length
        )));
    }
    match r.offset.checked_add(r.length) {
        Some(e) if e <= end => Ok(()),
        _ => Err(Error::corrupt(format!(
            "VHDX {name} region at {:#x} of {} bytes lies past the end of the file ({end} bytes)",
            r.offset, r.length
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endian::put_le32;

    #[test]
    fn guid_text_round_trips() {
        assert_eq!(
            BAT_REGION.to_string(),
            "2dc27766-f623-4200-9d64-115e9bfd4a08"
        );
        assert_eq!(
            BAT_REGION.0[..4],
            [0x66, 0x77, 0xc2, 0x2d],
            "first field little-endian on disk"
        );
        assert_eq!(
            Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A08}"),
            Some(BAT_REGION)
        );
        assert_eq!(Guid::parse("2dc27766f6234200"), None);
    }

    #[test]
    fn crc_ignores_the_checksum_field() {
        let mut b = vec![7u8; 64];
        let c = crc_with_zeroed(&b, 4);
        put_le32(&mut b, 4, c);
        assert_eq!(crc_with_zeroed(&b, 4), c);
        b[4..8].fill(0);
        assert_eq!(crc32c::crc32c(&b), c);
    }
}
