//! The persistent dirty bitmaps directory, read for `info` only.
//!
//! vdiskfs neither uses nor updates bitmaps; `info` lists them (name,
//! granularity, flags) as `qemu-img info` does. The directory is read with
//! its size checked against qemu's own limit and the file's end, and every
//! entry against the bytes read, so a damaged directory yields a reason,
//! never a panic or a large allocation.

use serde_json::{json, Value};

use crate::endian::{be16, be32};
use crate::host::HostFile;

use super::header::{Header, AUTOCLEAR_BITMAPS};

/// Largest bitmap directory accepted (qemu's limit too).
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Fixed part of a directory entry.
const ENTRY_FIXED: usize = 24;
/// Flag bit 0: the bitmap was in use (not saved cleanly).
const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap tracks every write.
const FLAG_AUTO: u32 = 1 << 1;

/// The bitmaps as qemu's `format-specific` lists them (`name`,
/// `granularity`, `flags`), or why the directory could not be read. An
/// image whose bitmaps extension is not marked consistent (autoclear bit
/// 0 clear, e.g. after an old qemu wrote it) has none, as qemu sees it.
pub fn read_bitmaps(file: &HostFile, h: &Header) -> Result<Vec<Value>, String> {
    let Some((offset, size)) = h.bitmap_directory else {
        return Ok(Vec::new());
    };
    if h.autoclear & AUTOCLEAR_BITMAPS == 0 {
        return Ok(Vec::new());
    }
    if size > MAX_DIRECTORY_BYTES {
        return Err(format!(
            "bitmap directory of {size} bytes exceeds {MAX_DIRECTORY_BYTES}"
        ));
    }
    if offset.checked_add(size).is_none_or(|end| end > file.len()) {
        return Err(format!(
            "bitmap directory at {offset} ({size} bytes) passes the end of the file"
        ));
    }
    let mut dir = vec![0u8; size as usize];
    file.read_exact_at(&mut dir, offset)
        .map_err(|e| format!("bitmap directory: {e}"))?;
    parse_directory(&dir)
}

fn parse_directory(dir: &[u8]) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let Some(fixed) = dir.get(pos..pos + ENTRY_FIXED) else {
            return Err(format!("bitmap directory entry at {pos} is cut short"));
        };
        let flags = be32(fixed, 12);
        let granularity_bits = fixed[17];
        let name_size = usize::from(be16(fixed, 18));
        let extra = be32(fixed, 20) as usize;
        let name_at = pos + ENTRY_FIXED + extra;
        let Some(name) = dir.get(name_at..name_at + name_size) else {
            return Err(format!("bitmap directory entry at {pos} is cut short"));
        };
        if granularity_bits > 63 {
            return Err(format!(
                "bitmap directory entry at {pos}: granularity 2^{granularity_bits}"
            ));
        }
        let mut names = Vec::new();
        if flags & FLAG_IN_USE != 0 {
            names.push("in-use");
        }
        if flags & FLAG_AUTO != 0 {
            names.push("auto");
        }
        out.push(json!({
            "name": String::from_utf8_lossy(name),
            "granularity": 1u64 << granularity_bits,
            "flags": names,
        }));
        pos = (name_at + name_size).next_multiple_of(8);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endian::{put_be16, put_be32};

    fn entry(name: &str, flags: u32, bits: u8) -> Vec<u8> {
        let mut e = vec![0u8; ENTRY_FIXED];
        put_be32(&mut e, 12, flags);
        e[16] = 1;
        e[17] = bits;
        put_be16(&mut e, 18, name.len() as u16);
        e.extend_from_slice(name.as_bytes());
        e.resize(e.len().next_multiple_of(8), 0);
        e
    }

    #[test]
    fn entries_and_damage() {
        let mut dir = entry("a", FLAG_AUTO, 16);
        dir.extend(entry("bb", FLAG_IN_USE | FLAG_AUTO, 20));
        let v = parse_directory(&dir).unwrap();
        assert_eq!(v[0]["name"], "a");
        assert_eq!(v[0]["granularity"], 65536);
        assert_eq!(v[1]["flags"], json!(["in-use", "auto"]));
        dir.truncate(dir.len() - 10);
        assert!(parse_directory(&dir).is_err());
    }
}
