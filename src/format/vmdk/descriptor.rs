//! The VMDK text descriptor: header keys, extent lines and the disk database.
//!
//! A descriptor is either a small text file of its own (`monolithicFlat`,
//! `twoGbMaxExtent*`, `vmfs*`, `seSparse`, delta links) or a text block
//! embedded in a hosted sparse extent (`monolithicSparse`,
//! `streamOptimized`). Parsing is line based and bounded; anything that is
//! not text is refused as corrupt rather than guessed at.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{Error, Result};

/// Largest descriptor accepted, in bytes (real ones are well under 10 KiB).
pub const MAX_DESCRIPTOR: u64 = 1 << 20;

/// Most extent lines accepted in one descriptor (a 2 TiB twoGbMaxExtent
/// disk has about 1024).
pub const MAX_EXTENTS: usize = 4096;

/// parentCID value meaning "no parent".
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

/// Access mode of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `RW`: readable and writable.
    ReadWrite,
    /// `RDONLY`: readable only.
    ReadOnly,
    /// `NOACCESS`: neither; reads through it fail.
    NoAccess,
}

impl Access {
    /// The keyword as written in descriptors.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::ReadWrite => "RW",
            Access::ReadOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }
}

/// Type of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// `FLAT`: raw data in a file, at an optional sector offset.
    Flat,
    /// `SPARSE`: a hosted sparse (`KDMV`) extent, or a COWD one.
    Sparse,
    /// `ZERO`: reads as zeros, no file.
    Zero,
    /// `VMFS`: raw data in a file (ESXi thick/thin disks).
    Vmfs,
    /// `VMFSSPARSE`: an ESXi COWD delta extent.
    VmfsSparse,
    /// `VMFSRDM`: a raw device mapping.
    VmfsRdm,
    /// `VMFSRAW`: a raw device.
    VmfsRaw,
    /// `SESPARSE`: an ESXi space-efficient sparse extent.
    SeSparse,
}

impl ExtentType {
    fn parse(s: &str) -> Option<ExtentType> {
        Some(match s.to_ascii_uppercase().as_str() {
            "FLAT" => ExtentType::Flat,
            "SPARSE" => ExtentType::Sparse,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "VMFSRDM" => ExtentType::VmfsRdm,
            "VMFSRAW" => ExtentType::VmfsRaw,
            "SESPARSE" => ExtentType::SeSparse,
            _ => return None,
        })
    }

    /// The keyword as written in descriptors.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtentType::Flat => "FLAT",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::VmfsRdm => "VMFSRDM",
            ExtentType::VmfsRaw => "VMFSRAW",
            ExtentType::SeSparse => "SESPARSE",
        }
    }
}

/// One extent line of a descriptor.
#[derive(Debug, Clone)]
pub struct ExtentLine {
    /// 1-based line number in the descriptor.
    pub line_no: usize,
    /// The line as written (trimmed).
    pub text: String,
    /// Access mode.
    pub access: Access,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentType,
    /// File name (absent for `ZERO`).
    pub file: Option<String>,
    /// Start sector inside the file (flat extents).
    pub offset: u64,
}

impl fmt::Display for ExtentLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "descriptor line {}: {}", self.line_no, self.text)
    }
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default)]
pub struct Descriptor {
    /// `version=`.
    pub version: Option<u32>,
    /// `encoding=`.
    pub encoding: Option<String>,
    /// `CID=` (hex).
    pub cid: Option<u32>,
    /// `parentCID=` (hex).
    pub parent_cid: Option<u32>,
    /// `createType=`.
    pub create_type: Option<String>,
    /// `parentFileNameHint=`.
    pub parent_hint: Option<String>,
    /// Extent lines in order.
    pub extents: Vec<ExtentLine>,
    /// Every `ddb.*` key.
    pub ddb: BTreeMap<String, String>,
    /// Other header keys (`isNativeSnapshot`, `changeTrackPath`, …).
    pub other: BTreeMap<String, String>,
}

/// True when `head` looks like the start of a text descriptor: mostly
/// printable text with `# Disk DescriptorFile`, or a `createType=` or
/// `version=` line among its first lines.
pub fn looks_like_descriptor(head: &[u8]) -> bool {
    let head = &head[..head.len().min(4096)];
    let text_end = head.iter().position(|&b| b == 0).unwrap_or(head.len());
    if text_end < 16 {
        return false;
    }
    let text = &head[..text_end];
    let bad = text
        .iter()
        .filter(|&&b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')) || b == 0x7f)
        .count();
    if bad > 0 {
        return false;
    }
    let s = String::from_utf8_lossy(text);
    let signed = s.trim_start().starts_with("# Disk DescriptorFile");
    // Anything after the text must be NUL padding only, except in a
    // signed descriptor: qemu leaves the old tail after the NUL when it
    // rewrites a descriptor with a shorter CID.
    if head[text_end..].iter().any(|&b| b != 0) {
        return signed;
    }
    if signed {
        return true;
    }
    let mut seen = 0;
    for line in s.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        seen += 1;
        if seen > 8 {
            break;
        }
        let key = line.split('=').next().unwrap_or("").trim();
        if line.contains('=') && (key == "createType" || key == "version" && seen == 1) {
            // Require a second clue for a bare `version=` line.
            return key == "createType" || s.contains("createType");
        }
    }
    false
}

/// Strips NUL padding and checks that `raw` is text.
fn as_text(raw: &[u8]) -> Result<String> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let body = &raw[..end];
    if let Some(pos) = body
        .iter()
        .position(|&b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r' | 0x0c)) || b == 0x7f)
    {
        return Err(Error::corrupt(format!(
            "descriptor is not text (control byte {:#04x} at offset {pos})",
            body[pos]
        )));
    }
    if raw[end..].iter().any(|&b| b != 0) {
        // qemu leaves the old tail after the NUL when it rewrites an
        // embedded descriptor with a shorter CID; like qemu, the text ends
        // at the first NUL.
        log::debug!("vmdk descriptor: bytes after the NUL at offset {end} ignored");
    }
    Ok(String::from_utf8_lossy(body).into_owned())
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        v[1..v.len() - 1].to_string()
    } else {
        v.to_string()
    }
}

fn parse_hex_u32(v: &str) -> Option<u32> {
    let v = v.trim();
    let v = v.strip_prefix("0x").unwrap_or(v);
    u32::from_str_radix(v, 16).ok()
}

/// Parses descriptor bytes (a whole descriptor file or an embedded block).
pub fn parse(raw: &[u8]) -> Result<Descriptor> {
    if raw.len() as u64 > MAX_DESCRIPTOR {
        return Err(Error::corrupt(format!(
            "descriptor of {} bytes is larger than the {MAX_DESCRIPTOR}-byte limit",
            raw.len()
        )));
    }
    let text = as_text(raw)?;
    let mut d = Descriptor::default();
    for (idx, line) in text.split('\n').enumerate() {
        let line_no = idx + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(
            first.to_ascii_uppercase().as_str(),
            "RW" | "RDONLY" | "NOACCESS"
        ) {
            if d.extents.len() >= MAX_EXTENTS {
                return Err(Error::corrupt(format!(
                    "descriptor has more than {MAX_EXTENTS} extent lines"
                )));
            }
            d.extents.push(parse_extent(line, line_no)?);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            log::debug!("vmdk descriptor line {line_no} ignored: {line}");
            continue;
        };
        let key = key.trim();
        let value = unquote(value);
        match key {
            "version" => d.version = value.trim().parse().ok(),
            "encoding" => d.encoding = Some(value),
            "CID" => d.cid = parse_hex_u32(&value),
            "parentCID" => d.parent_cid = parse_hex_u32(&value),
            "createType" => d.create_type = Some(value),
            "parentFileNameHint" => d.parent_hint = Some(value),
            k if k.starts_with("ddb.") => {
                d.ddb.insert(k.to_string(), value);
            }
            k => {
                d.other.insert(k.to_string(), value);
            }
        }
    }
    Ok(d)
}

fn parse_extent(line: &str, line_no: usize) -> Result<ExtentLine> {
    let bad = |why: &str| {
        Err(Error::corrupt(format!(
            "invalid extent at descriptor line {line_no} ({why}): {line}"
        )))
    };
    let mut rest = line;
    let next_token = |rest: &mut &str| -> Option<String> {
        let s = rest.trim_start();
        if s.is_empty() {
            return None;
        }
        let end = s.find(char::is_whitespace).unwrap_or(s.len());
        let tok = s[..end].to_string();
        *rest = &s[end..];
        Some(tok)
    };
    let access = match next_token(&mut rest).map(|t| t.to_ascii_uppercase()) {
        Some(t) if t == "RW" => Access::ReadWrite,
        Some(t) if t == "RDONLY" => Access::ReadOnly,
        Some(t) if t == "NOACCESS" => Access::NoAccess,
        _ => return bad("unknown access mode"),
    };
    let Some(sectors) = next_token(&mut rest).and_then(|t| t.parse::<u64>().ok()) else {
        return bad("size is not a number of sectors");
    };
    let Some(kind) = next_token(&mut rest).and_then(|t| ExtentType::parse(&t)) else {
        return bad("unknown extent type");
    };
    let mut file = None;
    let trimmed = rest.trim_start();
    if let Some(after) = trimmed.strip_prefix('"') {
        let Some(close) = after.find('"') else {
            return bad("unterminated file name");
        };
        file = Some(after[..close].to_string());
        rest = &after[close + 1..];
    } else if !trimmed.is_empty() && kind != ExtentType::Zero {
        // Tolerate an unquoted name without spaces.
        file = next_token(&mut rest);
    }
    let mut offset = 0;
    if let Some(tok) = next_token(&mut rest) {
        match tok.parse::<u64>() {
            Ok(n) => offset = n,
            Err(_) => return bad("extent offset is not a number"),
        }
    }
    // Further fields (partition UUID, device id) are ignored.
    if kind != ExtentType::Zero && file.as_deref().is_none_or(str::is_empty) {
        return bad("missing file name");
    }
    if offset != 0 && !matches!(kind, ExtentType::Flat | ExtentType::Vmfs) {
        return bad("only flat extents take an offset");
    }
    Ok(ExtentLine {
        line_no,
        text: line.to_string(),
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mixed_extents_and_keys() {
        let d = parse(
            b"# Disk DescriptorFile\nversion=1\nCID=0a0b0c0d\nparentCID=ffffffff\n\
              createType=\"twoGbMaxExtentFlat\"\n\
              RW 100 FLAT \"a b.vmdk\" 7\nRDONLY 50 SPARSE \"s.vmdk\"\nNOACCESS 10 ZERO\n\
              ddb.adapterType = \"ide\"\n",
        )
        .unwrap();
        assert_eq!(d.cid, Some(0x0a0b0c0d));
        assert_eq!(d.parent_cid, Some(NO_PARENT_CID));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some("a b.vmdk"));
        assert_eq!(d.extents[0].offset, 7);
        assert_eq!(d.extents[1].access, Access::ReadOnly);
        assert_eq!(d.extents[2].kind, ExtentType::Zero);
        assert_eq!(d.ddb["ddb.adapterType"], "ide");
    }

    #[test]
    fn garbage_is_refused() {
        assert!(parse(b"\x01\x02binary\xff").is_err());
        assert!(parse(b"RW 10 FLAT \"x").is_err());
        assert!(!looks_like_descriptor(&[0x5a; 4096]));
        assert!(looks_like_descriptor(b"# Disk DescriptorFile\nversion=1\n"));
        assert!(looks_like_descriptor(b"version=1\ncreateType=\"vmfs\"\n"));
        assert!(!looks_like_descriptor(b"version=1\nhello there\n"));
        // qemu's CID rewrite leaves the old tail after the NUL.
        let t = b"# Disk DescriptorFile\nversion=1\nCID=1234567\n\0\n\0\0";
        assert!(looks_like_descriptor(t));
        assert_eq!(parse(t).unwrap().cid, Some(0x1234567));
        assert!(!looks_like_descriptor(
            b"version=1\ncreateType=\"vmfs\"\n\0data"
        ));
    }
}
