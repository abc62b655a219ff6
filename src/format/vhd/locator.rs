//! Parent locators of differencing VHDs: which file names the parent may
//! have, in the order we try them.
//!
//! A dynamic header carries up to eight locators, each a platform code and
//! a blob elsewhere in the file: `W2ru` (a path relative to the child,
//! UTF-16LE), `W2ku` (an absolute Windows path, UTF-16LE), `MacX` (a UTF-8
//! `file://` URL) and `Mac ` (an old Mac alias, used only when it reads as
//! a URL). The header also holds the parent's name (UTF-16BE), which
//! Windows writes as the parent's full path.
//!
//! Windows paths cannot be opened as written on this host, so they become
//! names for [`crate::policy::OpenPolicy::resolve`]: a relative path keeps
//! its directories (backslashes become slashes); an absolute one (drive
//! letter or UNC) keeps only its file name, looked up beside the child, as
//! people move a parent and its children together. An absolute URL path is
//! tried as written, then by its file name beside the child. A wrong file
//! found that way is caught by the parent UUID check.

use super::footer::{fourcc, DynHeader};
use crate::endian::le16s;
use crate::error::{Error, Result};
use crate::host::HostFile;

/// Largest locator blob we read (a path; real ones are under 1 KiB).
const MAX_LOCATOR: u32 = 64 << 10;

/// One way the child names its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Where it came from: a platform code, or `parent_name`.
    pub source: String,
    /// The name as written.
    pub written: String,
    /// The name to resolve on this host (relative to the child's directory
    /// unless absolute).
    pub name: String,
}

/// Reads every usable parent name of a differencing disk, most specific
/// first: relative locators, then URLs, then absolute Windows paths and
/// the header's parent name reduced to a file name. A locator whose blob
/// is damaged (past the end of the file, absurd length) is skipped.
pub fn candidates(file: &HostFile, header: &DynHeader) -> Result<Vec<Candidate>> {
    let mut rel = Vec::new();
    let mut abs = Vec::new();
    for loc in &header.locators {
        let Some(blob) = read_blob(file, loc.data_offset, loc.data_len)? else {
            continue;
        };
        let source = fourcc(&loc.code);
        match &loc.code {
            b"W2ru" | b"W2ku" => {
                let written = utf16le(&blob);
                if let Some((name, relative)) = windows_name(&written) {
                    let c = Candidate {
                        source,
                        written,
                        name,
                    };
                    if relative {
                        rel.push(c)
                    } else {
                        abs.push(c)
                    }
                }
            }
            b"MacX" | b"Mac " => {
                let written = String::from_utf8_lossy(&blob)
                    .trim_end_matches('\0')
                    .to_string();
                // An old `Mac ` locator is an alias record, not text: only
                // one that holds a file URL is used.
                if &loc.code == b"Mac " && !written.starts_with("file://") {
                    continue;
                }
                let Some(name) = url_path(&written) else {
                    continue;
                };
                if name.starts_with('/') {
                    // As for Windows paths: the file name beside the child too.
                    if let Some(last) = name.rsplit('/').next().filter(|l| !l.is_empty()) {
                        abs.push(Candidate {
                            source: source.clone(),
                            written: written.clone(),
                            name: last.to_string(),
                        });
                    }
                }
                rel.push(Candidate {
                    source,
                    written,
                    name,
                });
            }
            _ => {}
        }
    }
    if let Some((name, _)) = windows_name(&header.parent_name) {
        abs.push(Candidate {
            source: "parent_name".into(),
            written: header.parent_name.clone(),
            name,
        });
    }
    rel.extend(abs);
    Ok(rel)
}

/// The locator blob, or None when it does not lie inside the file.
fn read_blob(file: &HostFile, offset: u64, len: u32) -> Result<Option<Vec<u8>>> {
    let inside = offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= file.len());
    if len == 0 || len > MAX_LOCATOR || !inside {
        return Ok(None);
    }
    let mut blob = vec![0u8; len as usize];
    file.read_exact_at(&mut blob, offset)?;
    Ok(Some(blob))
}

fn utf16le(b: &[u8]) -> String {
    let units: Vec<u16> = le16s(b).take_while(|&u| u != 0).collect();
    String::from_utf16_lossy(&units)
}

/// A Windows path as a host name, and whether it was relative. Absolute
/// paths (`C:\…`, `\\server\…`, `\…`) give their last component.
fn windows_name(path: &str) -> Option<(String, bool)> {
    let p = path.trim_end_matches('\0').trim();
    if p.is_empty() {
        return None;
    }
    let b = p.as_bytes();
    let drive = b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':';
    let absolute = drive || p.starts_with('\\') || p.starts_with('/');
    let slashed = p.replace('\\', "/");
    if absolute {
        let last = slashed.rsplit('/').next().filter(|s| !s.is_empty())?;
        return Some((last.to_string(), false));
    }
    let rel = slashed.strip_prefix("./").unwrap_or(&slashed);
    Some((rel.to_string(), true))
}

/// The path of a `file://` URL (percent-decoded), or a plain relative path.
fn url_path(url: &str) -> Option<String> {
    let rest = match url.strip_prefix("file://") {
        Some(r) => r.strip_prefix("localhost").unwrap_or(r),
        None if url.contains("://") => return None,
        None => url,
    };
    let mut out = Vec::new();
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if i + 2 >= b.len() {
                return None;
            }
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).ok()?;
    let s = s.strip_prefix("./").unwrap_or(&s).to_string();
    (!s.is_empty()).then_some(s)
}

/// The error for a differencing disk none of whose names is usable.
pub fn no_parent_name() -> Error {
    Error::corrupt("differencing VHD names no usable parent (no parent locator or parent name)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_paths() {
        assert_eq!(
            windows_name(".\\fat-parent.vhd"),
            Some(("fat-parent.vhd".into(), true))
        );
        assert_eq!(
            windows_name("..\\base\\p.vhd"),
            Some(("../base/p.vhd".into(), true))
        );
        assert_eq!(
            windows_name("C:\\Projects\\dfvfs\\fat-parent.vhd"),
            Some(("fat-parent.vhd".into(), false))
        );
        assert_eq!(windows_name(""), None);
    }

    #[test]
    fn urls() {
        assert_eq!(
            url_path("file://localhost/Users/a/My%20Disk.vhd").as_deref(),
            Some("/Users/a/My Disk.vhd")
        );
        assert_eq!(url_path("file://./p.vhd").as_deref(), Some("p.vhd"));
        assert_eq!(url_path("http://x/y"), None);
        assert_eq!(url_path("file:///a%2"), None);
    }
}
