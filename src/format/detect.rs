//! Format detection by content: every format qemu knows is recognised, so
//! that nothing but a plain disk is ever served as raw.
//!
//! The head (first 4 KiB) decides for most formats; two keep their only
//! signature at the end of the file, so the last 512 bytes are read too: a
//! fixed VHD has no header copy at offset 0, only its footer, and an Apple
//! disk image ends with its `koly` trailer. The checks follow what qemu's
//! probes look at (magic plus version where qemu checks one), and are
//! strict enough that a guest's ordinary data does not match by accident
//! (a tail footer must be a fixed VHD's).
//!
//! [`refusal`] is the one-line error for the formats we recognise but do
//! not serve (QED, LUKS, bochs, cloop, dmg).

use super::{vhd, vmdk, Format};
use crate::endian::{get_be16, get_be32, get_le32};
use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;

/// How many bytes of the head detection reads.
pub const HEAD_LEN: usize = 4096;

/// How many bytes of the tail detection reads (one VHD footer / dmg trailer).
pub const TAIL_LEN: usize = 512;

/// Offset of the VDI signature in the header.
const VDI_SIGNATURE_AT: usize = 0x40;

/// The VDI signature, stored little-endian.
const VDI_SIGNATURE: u32 = 0xbeda_107f;

/// The cloop preamble qemu's probe looks for.
const CLOOP_MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

/// Detects the format of `file` from its first 4 KiB and its last 512 bytes.
pub fn detect(file: &HostFile) -> Result<Format> {
    let mut head = vec![0u8; HEAD_LEN];
    let n = file.read_at_most(&mut head, 0)?;
    head.truncate(n);
    // The tail only matters when the head names no format: not read
    // otherwise (for a remote image, one round trip fewer).
    if let Some(f) = detect_head(&head) {
        return Ok(f);
    }
    let mut tail = vec![0u8; TAIL_LEN];
    let len = file.len();
    let tail = if len >= TAIL_LEN as u64 {
        let n = file.read_at_most(&mut tail, len - TAIL_LEN as u64)?;
        tail.truncate(n);
        tail
    } else {
        Vec::new()
    };
    Ok(detect_parts(&head, &tail))
}

/// Detects a format from an image's first bytes only (up to 4 KiB).
/// Anything unrecognised is raw.
pub fn detect_bytes(head: &[u8]) -> Format {
    detect_parts(head, &[])
}

/// Detects a format from an image's head (up to 4 KiB) and its last 512
/// bytes (`tail`, empty when unknown or the file is shorter).
pub fn detect_parts(head: &[u8], tail: &[u8]) -> Format {
    if let Some(f) = detect_head(head) {
        return f;
    }
    if tail.len() == TAIL_LEN {
        // Only a fixed disk's footer: a dynamic one there, without its copy
        // at 0, could point at tables and parents.
        if vhd::probe_footer(tail) {
            return Format::Vhd;
        }
        if is_dmg_trailer(tail) {
            return Format::Dmg;
        }
    }
    Format::Raw
}

fn detect_head(head: &[u8]) -> Option<Format> {
    if head.starts_with(b"QFI\xfb") {
        let version = get_be32(head, 4)?;
        // Versions 2 and 3 are qcow2; others are refused by its driver.
        return Some(if version == 1 {
            Format::Qcow
        } else {
            Format::Qcow2
        });
    }
    if head.starts_with(b"QED\0") {
        return Some(Format::Qed);
    }
    if vhd::probe(head) {
        // A dynamic or differencing VHD: the footer's copy at offset 0.
        return Some(Format::Vhd);
    }
    if head.starts_with(b"vhdxfile") {
        return Some(Format::Vhdx);
    }
    if get_le32(head, VDI_SIGNATURE_AT) == Some(VDI_SIGNATURE) {
        // Even a header cut short is VDI: its driver refuses it by name.
        return Some(Format::Vdi);
    }
    if (head.starts_with(b"WithoutFreeSpace") || head.starts_with(b"WithouFreSpacExt"))
        && get_le32(head, 16) == Some(2)
    {
        return Some(Format::Parallels);
    }
    if is_parallels_descriptor(head) {
        return Some(Format::Parallels);
    }
    if head.starts_with(b"LUKS\xba\xbe") {
        let version = get_be16(head, 6)?;
        if version == 1 || version == 2 {
            return Some(Format::Luks);
        }
    }
    if head.starts_with(b"Bochs Virtual HD Image\0") {
        return Some(Format::Bochs);
    }
    if head.starts_with(CLOOP_MAGIC) {
        return Some(Format::Cloop);
    }
    if vmdk::probe(head) {
        return Some(Format::Vmdk);
    }
    None
}

/// Whether `head` starts a Parallels bundle's DiskDescriptor.xml.
pub fn is_parallels_descriptor(head: &[u8]) -> bool {
    let text = &head[..head.len().min(1024)];
    let trimmed = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&[][..], |i| &text[i..]);
    trimmed.starts_with(b"<?xml")
        && text
            .windows(b"<Parallels_disk_image".len())
            .any(|w| w == b"<Parallels_disk_image")
}

/// Whether `tail` (512 bytes) is an Apple disk image's `koly` trailer.
fn is_dmg_trailer(tail: &[u8]) -> bool {
    tail.starts_with(b"koly") && get_be32(tail, 8) == Some(512)
}

/// The one-line refusal for a recognised format vdiskfs does not serve.
pub fn refusal(format: Format) -> Error {
    let what = match format {
        Format::Luks => {
            return Error::new(
                ErrorKind::Encrypted,
                "is a LUKS-encrypted image (format luks); vdiskfs does not decrypt",
            )
        }
        Format::Qed => "a QED image",
        Format::Bochs => "a Bochs image",
        Format::Cloop => "a cloop image",
        Format::Dmg => "an Apple disk image",
        _ => "an image",
    };
    Error::unsupported(format!(
        "is {what} (format {}), which vdiskfs does not read; convert it with qemu-img convert -O qcow2",
        format.name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endian::{le32_bytes, put_be32, put_le32};

    fn footer(disk_type: u32) -> Vec<u8> {
        let mut f = vec![0u8; 512];
        f[..8].copy_from_slice(b"conectix");
        put_be32(&mut f, 60, disk_type);
        let sum = f.iter().fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
        put_be32(&mut f, 64, !sum);
        f
    }

    #[test]
    fn detection_is_by_content() {
        assert_eq!(detect_bytes(b"QFI\xfb\0\0\0\x03rest"), Format::Qcow2);
        assert_eq!(detect_bytes(b"QFI\xfb\0\0\0\x02rest"), Format::Qcow2);
        assert_eq!(detect_bytes(b"QFI\xfb\0\0\0\x01rest"), Format::Qcow);
        assert_eq!(detect_bytes(b"QED\0rest"), Format::Qed);
        assert_eq!(detect_bytes(b"conectix rest"), Format::Vhd);
        assert_eq!(detect_bytes(b"vhdxfile rest"), Format::Vhdx);
        assert_eq!(detect_bytes(b"LUKS\xba\xbe\0\x02"), Format::Luks);
        assert_eq!(detect_bytes(b"LUKS\xba\xbe\0\x07"), Format::Raw);
        assert_eq!(detect_bytes(b"hello world"), Format::Raw);
        assert_eq!(detect_bytes(b""), Format::Raw);
        let mut vdi = vec![0u8; 512];
        put_le32(&mut vdi, 0x40, VDI_SIGNATURE);
        assert_eq!(detect_bytes(&vdi), Format::Vdi);
        let mut ploop = b"WithouFreSpacExt".to_vec();
        ploop.extend_from_slice(&le32_bytes(2));
        assert_eq!(detect_bytes(&ploop), Format::Parallels);
        ploop[16] = 3;
        assert_eq!(detect_bytes(&ploop), Format::Raw);
        assert_eq!(detect_bytes(CLOOP_MAGIC), Format::Cloop);
        assert_eq!(
            detect_bytes(b"<?xml version='1.0'?>\n<Parallels_disk_image>"),
            Format::Parallels
        );
    }

    #[test]
    fn tail_signatures() {
        let head = [0u8; 4096];
        assert_eq!(detect_parts(&head, &footer(2)), Format::Vhd);
        // A dynamic disk's footer at the end, without its copy at 0, is
        // not taken for a fixed disk.
        assert_eq!(detect_parts(&head, &footer(3)), Format::Raw);
        assert_eq!(detect_parts(&head, &footer(7)), Format::Raw, "bad type");
        let mut koly = vec![0u8; 512];
        koly[..4].copy_from_slice(b"koly");
        put_be32(&mut koly, 8, 512);
        assert_eq!(detect_parts(&head, &koly), Format::Dmg);
        // The head wins over the tail.
        assert_eq!(
            detect_parts(b"QFI\xfb\0\0\0\x03", &footer(2)),
            Format::Qcow2
        );
    }

    #[test]
    fn refusals_name_the_format() {
        for f in [
            Format::Qed,
            Format::Luks,
            Format::Bochs,
            Format::Cloop,
            Format::Dmg,
        ] {
            let e = refusal(f);
            assert!(e.to_string().contains(f.name()), "{e}");
        }
    }
}
