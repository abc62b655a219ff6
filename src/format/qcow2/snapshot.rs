//! The internal snapshot table: listed by `info`, and the source of the
//! L1 table when a snapshot is loaded (`--load-snapshot`, [`find`]).
//!
//! Reading exposes the active state, so a damaged snapshot table does not
//! stop an image from opening: [`read_snapshots`] returns the entries it
//! could parse and a description of what stopped it. It never reads past
//! the end of the file, never more than [`MAX_TABLE_BYTES`], and never
//! more than [`MAX_SNAPSHOTS`] entries.
//!
//! [`SnapshotSel`] is qemu-nbd's `-l` argument: a plain string is an ID
//! first, then a name (as qemu's `bdrv_snapshot_load_tmp_by_id_or_name`);
//! `snapshot.id=ID,snapshot.name=NAME` (either or both) matches exactly,
//! both on the same entry when both are given.

use crate::endian::{be16, be32, be64};
use crate::error::{Error, Result};
use crate::format::SnapshotInfo;
use crate::host::HostFile;

use super::header::{Header, MAX_SNAPSHOTS};

/// Fixed part of a snapshot table entry.
const ENTRY_FIXED: usize = 40;
/// Largest extra data we accept per entry (qemu's limit too).
const MAX_EXTRA: u32 = 1024;
/// Hard cap on the bytes of the snapshot table we read.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// How much of the table is read at a time.
const CHUNK: usize = 256 << 10;

/// A sequential reader over part of a host file, in chunks, stopping at
/// end of file or at a byte limit.
struct Chunked<'a> {
    file: &'a HostFile,
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

impl<'a> Chunked<'a> {
    fn new(file: &'a HostFile, start: u64, limit: u64) -> Self {
        let end = start.saturating_add(limit).min(file.len());
        Chunked {
            file,
            pos: start,
            end,
            buf: Vec::new(),
            buf_start: start,
        }
    }

    /// The next `n` bytes, or None when they would pass the end.
    fn take(&mut self, n: usize) -> Result<Option<&[u8]>> {
        let Some(want_end) = self.pos.checked_add(n as u64) else {
            return Ok(None);
        };
        if want_end > self.end {
            return Ok(None);
        }
        let buf_end = self.buf_start + self.buf.len() as u64;
        if self.pos < self.buf_start || want_end > buf_end {
            let len = (self.end - self.pos).min(CHUNK.max(n) as u64) as usize;
            self.buf.resize(len, 0);
            let got = self.file.read_at_most(&mut self.buf, self.pos)?;
            self.buf.truncate(got);
            self.buf_start = self.pos;
            if got < n {
                return Ok(None);
            }
        }
        let at = (self.pos - self.buf_start) as usize;
        self.pos = want_end;
        Ok(Some(&self.buf[at..at + n]))
    }
}

/// The snapshots of the image, and the reason parsing stopped early, if it did.
pub fn read_snapshots(file: &HostFile, h: &Header) -> Result<(Vec<SnapshotInfo>, Option<String>)> {
    let (list, _, why) = read_entries(file, h)?;
    Ok((list.into_iter().map(|(s, _)| s).collect(), why))
}

/// The snapshot table's extent (bytes parsed) and each snapshot's L1
/// table (offset, entries): the metadata a write must never overwrite.
pub fn snapshot_metadata(file: &HostFile, h: &Header) -> Result<(u64, Vec<(u64, u32)>)> {
    let (list, len, _) = read_entries(file, h)?;
    Ok((len, list.into_iter().map(|(_, l1)| l1).collect()))
}

/// Snapshot entries with their L1 table (offset, entries), the bytes of
/// the table parsed, and why parsing stopped early, if it did.
#[allow(clippy::type_complexity)]
fn read_entries(
    file: &HostFile,
    h: &Header,
) -> Result<(Vec<(SnapshotInfo, (u64, u32))>, u64, Option<String>)> {
    let (list, why) = read_entries_inner(file, h)?;
    let len = list
        .last()
        .map_or(0, |&(_, _, end)| end - h.snapshots_offset);
    Ok((
        list.into_iter().map(|(s, l1, _)| (s, l1)).collect(),
        len,
        why,
    ))
}

#[allow(clippy::type_complexity)]
fn read_entries_inner(
    file: &HostFile,
    h: &Header,
) -> Result<(Vec<(SnapshotInfo, (u64, u32), u64)>, Option<String>)> {
    let count = h.nb_snapshots.min(MAX_SNAPSHOTS);
    let mut out = Vec::new();
    if count == 0 {
        return Ok((out, None));
    }
    let mut r = Chunked::new(file, h.snapshots_offset, MAX_TABLE_BYTES);
    for i in 0..count {
        let Some(fixed) = r.take(ENTRY_FIXED)? else {
            return Ok((out, Some(cut_short(i, count))));
        };
        let l1 = (be64(fixed, 0), be32(fixed, 8));
        let id_len = usize::from(be16(fixed, 12));
        let name_len = usize::from(be16(fixed, 14));
        let date_sec = u64::from(be32(fixed, 16));
        let date_nsec = be32(fixed, 20);
        let vm_clock_nsec = be64(fixed, 24);
        let vm_state_32 = u64::from(be32(fixed, 32));
        let extra_len = be32(fixed, 36);
        if extra_len > MAX_EXTRA {
            return Ok((
                out,
                Some(format!(
                    "snapshot {i}: extra data size {extra_len} exceeds {MAX_EXTRA} bytes"
                )),
            ));
        }
        let Some(extra) = r.take(extra_len as usize)? else {
            return Ok((out, Some(cut_short(i, count))));
        };
        let vm_state_size = if extra.len() >= 8 {
            be64(extra, 0)
        } else {
            vm_state_32
        };
        let virtual_size = if extra.len() >= 16 {
            be64(extra, 8)
        } else {
            h.size
        };
        // qemu writes all ones when it did not record the count.
        let icount = if extra.len() >= 24 {
            Some(be64(extra, 16)).filter(|&c| c != u64::MAX)
        } else {
            None
        };
        let Some(id) = r.take(id_len)? else {
            return Ok((out, Some(cut_short(i, count))));
        };
        let id = String::from_utf8_lossy(id).into_owned();
        let Some(name) = r.take(name_len)? else {
            return Ok((out, Some(cut_short(i, count))));
        };
        let name = String::from_utf8_lossy(name).into_owned();
        let used = ENTRY_FIXED + extra_len as usize + id_len + name_len;
        let pad = used.next_multiple_of(8) - used;
        out.push((
            SnapshotInfo {
                id,
                name,
                virtual_size,
                date_sec,
                date_nsec,
                vm_clock_nsec,
                icount,
                vm_state_size,
            },
            l1,
            r.pos,
        ));
        // The padding of the last entry may be missing at end of file.
        if i + 1 < count && r.take(pad)?.is_none() {
            return Ok((out, Some(cut_short(i + 1, count))));
        }
    }
    Ok((out, None))
}

fn cut_short(i: u32, count: u32) -> String {
    format!(
        "snapshot table ends (at end of file or after {} MiB) after {i} of {count} entries",
        MAX_TABLE_BYTES >> 20
    )
}

/// Which internal snapshot to load, as qemu-nbd's `-l` spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotSel {
    /// A plain string: matched against the IDs first, then the names.
    IdOrName(String),
    /// `snapshot.id=…,snapshot.name=…`: whichever are given must match.
    Exact {
        /// `snapshot.id=`.
        id: Option<String>,
        /// `snapshot.name=`.
        name: Option<String>,
    },
}

impl SnapshotSel {
    /// Parses qemu-nbd's `-l` argument. In the `snapshot.` form a comma
    /// inside a value is written twice (`,,`), as in all qemu option strings.
    pub fn parse(s: &str) -> std::result::Result<SnapshotSel, String> {
        if s.is_empty() {
            return Err("--load-snapshot needs a snapshot ID or name".into());
        }
        if !s.starts_with("snapshot.") {
            return Ok(SnapshotSel::IdOrName(s.to_string()));
        }
        let (mut id, mut name) = (None, None);
        for part in split_opts(s) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("--load-snapshot: {part:?} needs a value (snapshot.id=ID or snapshot.name=NAME)")
            })?;
            let slot = match key {
                "snapshot.id" => &mut id,
                "snapshot.name" => &mut name,
                _ => {
                    return Err(format!(
                        "--load-snapshot: unknown key {key:?} (snapshot.id= or snapshot.name=)"
                    ))
                }
            };
            *slot = Some(value.to_string());
        }
        Ok(SnapshotSel::Exact { id, name })
    }

    /// Whether `s` is the snapshot selected, by ID or name as `by_id` says
    /// (a plain string is tried by ID over the whole table first).
    fn matches(&self, s: &SnapshotInfo, by_id: bool) -> bool {
        match self {
            SnapshotSel::IdOrName(v) if by_id => s.id == *v,
            SnapshotSel::IdOrName(v) => s.name == *v,
            SnapshotSel::Exact { id, name } => {
                id.as_ref().is_none_or(|i| *i == s.id) && name.as_ref().is_none_or(|n| *n == s.name)
            }
        }
    }
}

impl std::fmt::Display for SnapshotSel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotSel::IdOrName(v) => write!(f, "with ID or name {v:?}"),
            SnapshotSel::Exact { id, name } => match (id, name) {
                (Some(i), Some(n)) => write!(f, "with ID {i:?} and name {n:?}"),
                (Some(i), None) => write!(f, "with ID {i:?}"),
                (None, Some(n)) => write!(f, "named {n:?}"),
                (None, None) => write!(f, "(no ID or name given)"),
            },
        }
    }
}

/// Splits a qemu option string at single commas; `,,` stands for a comma.
fn split_opts(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(p) = out.last_mut() {
                    p.push(',');
                }
            } else {
                out.push(String::new());
            }
        } else if let Some(p) = out.last_mut() {
            p.push(c);
        }
    }
    out
}

/// The snapshot `sel` selects, with its L1 table (offset, entries).
///
/// A damaged table is an error here: the user asked for a snapshot the
/// image cannot describe. An unknown one is an error listing those there are.
pub fn find(file: &HostFile, h: &Header, sel: &SnapshotSel) -> Result<(SnapshotInfo, (u64, u32))> {
    if let SnapshotSel::Exact {
        id: None,
        name: None,
    } = sel
    {
        return Err(Error::invalid(
            "--load-snapshot needs snapshot.id= or snapshot.name=",
        ));
    }
    let (list, _, why) = read_entries(file, h)?;
    let hit = list
        .iter()
        .find(|(s, _)| sel.matches(s, true))
        .or_else(|| list.iter().find(|(s, _)| sel.matches(s, false)));
    if let Some((s, l1)) = hit {
        return Ok((s.clone(), *l1));
    }
    if let Some(why) = why {
        return Err(Error::corrupt(format!(
            "no snapshot {sel} among the readable ones: {why}"
        )));
    }
    let available = if list.is_empty() {
        "the image has no snapshots".to_string()
    } else {
        let names: Vec<String> = list
            .iter()
            .take(20)
            .map(|(s, _)| format!("{} {:?}", s.id, s.name))
            .collect();
        let more = if list.len() > 20 {
            format!(" and {} more", list.len() - 20)
        } else {
            String::new()
        };
        format!("available (ID name): {}{more}", names.join(", "))
    };
    Err(Error::new(
        crate::error::ErrorKind::NotFound,
        format!("no snapshot {sel}; {available}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_parse_as_qemu_nbd_spells_them() {
        assert_eq!(
            SnapshotSel::parse("s1"),
            Ok(SnapshotSel::IdOrName("s1".into()))
        );
        assert_eq!(
            SnapshotSel::parse("snapshot.id=2,snapshot.name=a,,b"),
            Ok(SnapshotSel::Exact {
                id: Some("2".into()),
                name: Some("a,b".into())
            })
        );
        assert_eq!(
            SnapshotSel::parse("snapshot.name=x"),
            Ok(SnapshotSel::Exact {
                id: None,
                name: Some("x".into())
            })
        );
        assert!(SnapshotSel::parse("").is_err());
        let e = SnapshotSel::parse("snapshot.size=3").unwrap_err();
        assert!(e.contains("unknown key \"snapshot.size\""), "{e}");
        assert!(SnapshotSel::parse("snapshot.id").is_err());
    }

    #[test]
    fn a_plain_string_matches_ids_before_names() {
        let info = |id: &str, name: &str| SnapshotInfo {
            id: id.into(),
            name: name.into(),
            virtual_size: 0,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            icount: None,
            vm_state_size: 0,
        };
        let sel = SnapshotSel::IdOrName("2".into());
        assert!(sel.matches(&info("2", "x"), true));
        assert!(!sel.matches(&info("1", "2"), true));
        assert!(sel.matches(&info("1", "2"), false));
        let both = SnapshotSel::Exact {
            id: Some("1".into()),
            name: Some("a".into()),
        };
        assert!(both.matches(&info("1", "a"), true));
        assert!(!both.matches(&info("1", "b"), true));
    }
}
