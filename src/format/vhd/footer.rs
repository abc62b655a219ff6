//! The VHD footer and dynamic disk header: parsing, checksums, and the
//! virtual-size rule.
//!
//! Every VHD ends with a 512-byte big-endian footer (cookie `conectix`);
//! dynamic and differencing disks also keep a copy of it at offset 0 and a
//! 1024-byte dynamic header (cookie `cxsparse`) at the footer's
//! `data_offset`, which locates the block allocation table (BAT) and, for
//! differencing disks, names the parent. Both structures carry a checksum:
//! the one's complement of the byte sum with the checksum field zeroed.
//! A bad checksum is refused, as qemu does.

use crate::endian::{be16, be16s, be32, be64};
use crate::error::{Error, Result};

/// Size of the footer (and of its copy at offset 0).
pub const FOOTER_LEN: usize = 512;
/// Size of the dynamic disk header.
pub const DYN_HEADER_LEN: usize = 1024;
/// The footer cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// The dynamic header cookie.
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";

/// Largest virtual size qemu accepts (2040 GiB, `VHD_MAX_SECTORS`); we
/// refuse larger images as it does.
pub const MAX_VIRTUAL_SIZE: u64 = 0xff00_0000 * 512;

/// Sectors of the largest CHS geometry (65535/16/255): a disk this large
/// cannot be described by CHS, so its footer size is authoritative.
const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;

/// The VHD disk types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Data stored flat from offset 0, footer at the end.
    Fixed,
    /// Blocks allocated on demand through the BAT.
    Dynamic,
    /// Dynamic, with a parent; sector bitmaps say which sectors are here.
    Differencing,
}

impl DiskType {
    /// The name used in `info` and the docs.
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// The VHD checksum of `bytes`, whose checksum field lies at `field`.
pub fn checksum(bytes: &[u8], field: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(u32::from(b)));
    !sum
}

/// Formats 16 id bytes the way libvhdi and Hyper-V tools print them.
pub fn uuid_string(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A parsed, checksum-verified footer.
#[derive(Debug, Clone)]
pub struct Footer {
    /// Offset of the dynamic header (`u64::MAX` for fixed disks).
    pub data_offset: u64,
    /// Seconds since 2000-01-01 00:00:00 UTC.
    pub timestamp: u32,
    /// Creator application, four characters (`vpc `, `win `, `qemu`, …).
    pub creator_app: [u8; 4],
    /// Creator version, major in the high 16 bits.
    pub creator_version: u32,
    /// Creator host OS (`Wi2k`, `Mac `).
    pub creator_os: [u8; 4],
    /// Size at creation.
    pub original_size: u64,
    /// Current size in bytes.
    pub current_size: u64,
    /// Cylinders, heads, sectors per track.
    pub geometry: (u16, u8, u8),
    /// The disk type.
    pub disk_type: DiskType,
    /// The disk's unique id (a differencing child names its parent by it).
    pub unique_id: [u8; 16],
    /// The saved-state flag.
    pub saved_state: bool,
}

impl Footer {
    /// Parses a 512-byte footer (or its copy), verifying cookie, type and checksum.
    pub fn parse(b: &[u8]) -> Result<Footer> {
        if b.len() < FOOTER_LEN || &b[0..8] != FOOTER_COOKIE {
            return Err(Error::corrupt(
                "not a VHD (vpc) image: no 'conectix' footer at the start or the end of the file",
            ));
        }
        let stored = be32(b, 64);
        let computed = checksum(&b[..FOOTER_LEN], 64);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "VHD footer checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let disk_type = match be32(b, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            t => {
                return Err(Error::unsupported(format!(
                    "VHD disk type {t} is not fixed (2), dynamic (3) or differencing (4)"
                )))
            }
        };
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&b[68..84]);
        Ok(Footer {
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: [b[28], b[29], b[30], b[31]],
            creator_version: be32(b, 32),
            creator_os: [b[36], b[37], b[38], b[39]],
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            geometry: (be16(b, 56), b[58], b[59]),
            disk_type,
            unique_id,
            saved_state: b[84] != 0,
        })
    }

    /// Bytes the CHS geometry describes.
    pub fn chs_size(&self) -> u64 {
        let (c, h, s) = self.geometry;
        u64::from(c) * u64::from(h) * u64::from(s) * 512
    }

    /// Whether the virtual size comes from the CHS geometry (qemu's rule):
    /// yes, unless the creator is one that sizes disks by `current_size`
    /// (Hyper-V `win `, `qem2`, Disk2vhd `d2v `, XenConverter `CTXS`,
    /// XenServer `tap\0`), or the geometry is the maximum one (which
    /// would truncate the disk).
    pub fn sized_by_chs(&self) -> bool {
        let by_current = matches!(
            &self.creator_app,
            b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0"
        );
        let (c, h, s) = self.geometry;
        let max = u64::from(c) * u64::from(h) * u64::from(s) == MAX_CHS_SECTORS;
        !by_current && !max
    }

    /// The guest size under qemu's rule, refused beyond 2040 GiB.
    pub fn virtual_size(&self) -> Result<u64> {
        let size = if self.sized_by_chs() {
            self.chs_size()
        } else {
            // qemu counts whole sectors.
            self.current_size & !511
        };
        if size > MAX_VIRTUAL_SIZE {
            return Err(Error::unsupported(format!(
                "VHD virtual size {size} exceeds the format's 2040 GiB limit"
            )));
        }
        Ok(size)
    }

    /// The creator application as text (trailing spaces and NULs kept
    /// visible as written, NULs shown as `\0`).
    pub fn creator_app_text(&self) -> String {
        fourcc(&self.creator_app)
    }

    /// The creator host OS as text.
    pub fn creator_os_text(&self) -> String {
        fourcc(&self.creator_os)
    }

    /// The creator version as `major.minor`.
    pub fn creator_version_text(&self) -> String {
        format!(
            "{}.{}",
            self.creator_version >> 16,
            self.creator_version & 0xffff
        )
    }
}

/// Four bytes as text, non-printable bytes escaped.
pub fn fourcc(b: &[u8; 4]) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                (c as char).to_string()
            } else {
                format!("\\x{c:02x}")
            }
        })
        .collect()
}

/// One parent locator entry of a dynamic header.
#[derive(Debug, Clone)]
pub struct LocatorEntry {
    /// Platform code (`W2ku`, `W2ru`, `Mac `, `MacX`, …).
    pub code: [u8; 4],
    /// Length in bytes of the locator data.
    pub data_len: u32,
    /// Host offset of the locator data.
    pub data_offset: u64,
}

/// A parsed, checksum-verified dynamic disk header.
#[derive(Debug, Clone)]
pub struct DynHeader {
    /// Host offset of the BAT.
    pub table_offset: u64,
    /// Entries the BAT holds.
    pub max_table_entries: u32,
    /// Guest bytes per block (a power of two, at least 512).
    pub block_size: u32,
    /// The parent's unique id (differencing disks).
    pub parent_uuid: [u8; 16],
    /// The parent's modification time (seconds since 2000).
    pub parent_timestamp: u32,
    /// The parent's name (UTF-16BE in the image).
    pub parent_name: String,
    /// The non-empty parent locator entries.
    pub locators: Vec<LocatorEntry>,
}

impl DynHeader {
    /// Parses a 1024-byte dynamic header, verifying cookie, checksum and block size.
    pub fn parse(b: &[u8]) -> Result<DynHeader> {
        if b.len() < DYN_HEADER_LEN || &b[0..8] != DYN_COOKIE {
            return Err(Error::corrupt(
                "VHD dynamic header not found ('cxsparse' cookie missing at the footer's data offset)",
            ));
        }
        let stored = be32(b, 36);
        let computed = checksum(&b[..DYN_HEADER_LEN], 36);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "VHD dynamic header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let block_size = be32(b, 32);
        if block_size < 512 || !block_size.is_power_of_two() {
            return Err(Error::corrupt(format!(
                "VHD block size {block_size} is not a power of two of at least 512"
            )));
        }
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&b[40..56]);
        let units: Vec<u16> = be16s(&b[64..576]).take_while(|&u| u != 0).collect();
        let parent_name = String::from_utf16_lossy(&units);
        let locators = (0..8)
            .map(|i| 576 + 24 * i)
            .filter(|&at| be32(b, at) != 0)
            .map(|at| LocatorEntry {
                code: [b[at], b[at + 1], b[at + 2], b[at + 3]],
                data_len: be32(b, at + 8),
                data_offset: be64(b, at + 16),
            })
            .collect();
        Ok(DynHeader {
            table_offset: be64(b, 16),
            max_table_entries: be32(b, 28),
            block_size,
            parent_uuid,
            parent_timestamp: be32(b, 56),
            parent_name,
            locators,
        })
    }

    /// Bytes of the sector bitmap in front of each block (one bit per
    /// sector, padded to a whole sector).
    pub fn bitmap_len(&self) -> u64 {
        (u64::from(self.block_size) / 512)
            .div_ceil(8)
            .next_multiple_of(512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endian::{put_be16, put_be32, put_be64};

    fn footer(app: &[u8; 4], geometry: (u16, u8, u8), current: u64) -> Vec<u8> {
        let mut b = vec![0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        b[28..32].copy_from_slice(app);
        put_be64(&mut b, 48, current);
        put_be16(&mut b, 56, geometry.0);
        b[58] = geometry.1;
        b[59] = geometry.2;
        put_be32(&mut b, 60, 2);
        let c = checksum(&b, 64);
        put_be32(&mut b, 64, c);
        b
    }

    #[test]
    fn size_rule_follows_the_creator() {
        let f = Footer::parse(&footer(b"vpc ", (121, 4, 17), 4212736 + 4096)).unwrap();
        assert_eq!(f.virtual_size().unwrap(), 121 * 4 * 17 * 512);
        let f = Footer::parse(&footer(b"win ", (301, 4, 17), 10485760)).unwrap();
        assert_eq!(f.virtual_size().unwrap(), 10485760);
        let f = Footer::parse(&footer(b"qemu", (65535, 16, 255), 1 << 40)).unwrap();
        assert_eq!(f.virtual_size().unwrap(), 1 << 40);
    }

    #[test]
    fn bad_checksum_is_refused() {
        let mut b = footer(b"vpc ", (1, 1, 1), 512);
        b[100] ^= 1;
        let e = Footer::parse(&b).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn uuid_text() {
        let id = [
            0x5f, 0xa2, 0x1a, 0x55, 0xf3, 0x94, 0xaa, 0x4d, 0x99, 0x58, 0x19, 0x51, 0xa6, 0x7d,
            0x55, 0x40,
        ];
        assert_eq!(uuid_string(&id), "5fa21a55-f394-aa4d-9958-1951a67d5540");
    }
}
