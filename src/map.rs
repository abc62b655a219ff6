//! `vdiskfs map`: where each run of the guest disk lives in the chain, in
//! the shape of `qemu-img map` (JSON: start, length, depth, present, zero,
//! data, compressed, offset; human: the data runs and their files).
//!
//! [`locate`] is the one walk down the chain that finds the layer storing
//! a run; the NBD server's `qemu:allocation-depth` context uses it too.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::chain::{host_sparse, Chain};
use crate::error::Result;
use crate::format::Mapping;
use crate::host::HostFile;

/// The layer storing a run and how.
pub struct Located {
    /// Index of the storing layer (0: top); `None` when no layer stores
    /// the run (unallocated everywhere, or past a shorter layer's end).
    pub layer: Option<usize>,
    /// The storing layer's mapping (`Backing` when none stores it).
    pub mapping: Mapping,
    /// The run's length, at least 1 and at most the length asked for.
    pub len: u64,
}

/// Finds the layer that stores the run at `offset` (at most `max_len`
/// bytes, at least 1), walking down from the top.
pub fn locate(chain: &Chain, offset: u64, max_len: u64) -> Result<Located> {
    let mut want = max_len.max(1);
    for (idx, layer) in chain.layers().iter().enumerate() {
        let size = layer.virtual_size();
        if offset >= size {
            break;
        }
        let (m, n) = layer
            .map(offset, want.min(size - offset))
            .map_err(|e| e.with_path(layer.path()))?;
        let n = n.clamp(1, want);
        match m {
            Mapping::Backing => want = n,
            mapping => {
                return Ok(Located {
                    layer: Some(idx),
                    mapping,
                    len: n,
                })
            }
        }
    }
    Ok(Located {
        layer: None,
        mapping: Mapping::Backing,
        len: want,
    })
}

/// One entry of the map.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// The layer that answers (0: top); the bottom layer when none stores it.
    pub depth: usize,
    /// Some layer stores the run.
    pub present: bool,
    /// The run reads as zeros.
    pub zero: bool,
    /// The run holds data.
    pub data: bool,
    /// The run lies in compressed clusters.
    pub compressed: bool,
    /// Where the bytes are on the host: the file and offset.
    pub offset: Option<(Arc<HostFile>, u64)>,
}

impl Entry {
    /// Whether `next` continues this entry (qemu-img map merges such runs).
    fn continued_by(&self, next: &Entry) -> bool {
        let offsets = match (&self.offset, &next.offset) {
            (None, None) => true,
            (Some((fa, a)), Some((fb, b))) => {
                fa.path() == fb.path() && a.checked_add(self.length) == Some(*b)
            }
            _ => false,
        };
        self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && offsets
    }
}

/// The map of the whole disk, adjacent runs merged.
pub fn map(chain: &Chain) -> Result<Vec<Entry>> {
    let size = chain.size();
    let bottom = chain.layers().len().saturating_sub(1);
    let mut out: Vec<Entry> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let at = locate(chain, pos, size - pos)?;
        let len = at.len.clamp(1, size - pos);
        let depth = at.layer.unwrap_or(bottom);
        let mut e = Entry {
            start: pos,
            length: len,
            depth,
            present: at.layer.is_some(),
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        };
        match at.mapping {
            Mapping::Data { file, offset } => {
                e.data = true;
                let layer = chain.layers().get(depth);
                if layer.is_some_and(|l| host_sparse(l.as_ref())) {
                    // A raw file's holes read as zeros, at their offset, as
                    // qemu asks the host. qemu's VMDK driver calls a flat
                    // extent's holes data that reads as zeros; so do we.
                    let raw = layer.is_some_and(|l| l.format() == crate::format::Format::Raw);
                    if let Some((is_data, run)) = file.host_run(offset, len) {
                        e.length = run.clamp(1, len);
                        e.data = is_data || !raw;
                        e.zero = !is_data;
                    }
                }
                e.offset = Some((file, offset));
            }
            Mapping::Compressed(_) => {
                e.data = true;
                e.compressed = true;
            }
            Mapping::Zero | Mapping::Backing => e.zero = true,
        }
        pos += e.length;
        match out.last_mut() {
            Some(last) if last.continued_by(&e) => last.length += e.length,
            _ => out.push(e),
        }
    }
    Ok(out)
}

/// The map as `qemu-img map --output=json` prints it: one object per
/// line inside a list, keys in qemu's order.
pub fn to_json(entries: &[Entry]) -> String {
    let lines: Vec<String> = entries
        .iter()
        .map(|e| {
            let offset = e
                .offset
                .as_ref()
                .map(|(_, o)| format!(", \"offset\": {o}"))
                .unwrap_or_default();
            format!(
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}{offset}}}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            )
        })
        .collect();
    format!("[{}]\n", lines.join(",\n"))
}

/// The map as `qemu-img map` prints it for people: the runs holding data,
/// where they are mapped to and in which file.
pub fn to_human(entries: &[Entry]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
    let hex = |v: u64| {
        if v == 0 {
            "0".to_string()
        } else {
            format!("{v:#x}")
        }
    };
    let mut rows: Vec<(u64, u64, u64, Arc<HostFile>)> = Vec::new();
    for e in entries {
        let (true, Some((file, off))) = (e.data && !e.zero, &e.offset) else {
            continue;
        };
        match rows.last_mut() {
            Some((start, len, o, f))
                if f.path() == file.path() && *start + *len == e.start && *o + *len == *off =>
            {
                *len += e.length
            }
            _ => rows.push((e.start, e.length, *off, file.clone())),
        }
    }
    for (start, len, off, file) in rows {
        let _ = writeln!(
            s,
            "{:<16}{:<16}{:<16}{}",
            hex(start),
            hex(len),
            hex(off),
            file.path().display()
        );
    }
    s
}
