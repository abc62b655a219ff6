//! The VHDX metadata log, replayed in memory.
//!
//! VHDX updates its metadata (BAT, sector bitmaps, metadata region) through
//! a write-ahead log: a circular buffer of entries, each a header, a list of
//! descriptors (write this 4 KiB page / zero this range) and the data pages,
//! all under one CRC-32C and one sequence number. After a crash the file
//! itself may hold stale metadata until the log is replayed; the header's
//! log GUID is non-zero exactly while the log may hold unreplayed entries.
//!
//! Read-only, we never write, so instead of replaying in place the
//! replayed writes become an [`Overlay`]: an interval map of file ranges to
//! page contents or zeros, applied on top of every read of the file
//! ([`Source`]), and consulted by the driver before it sends a payload read
//! straight to the host file. A writable open then applies that overlay to
//! the file (`journal::replay_in_place`).
//!
//! Finding what to replay (MS-VHDX "log replay"): every valid entry whose
//! successor (the entry right after it in the buffer) has the next sequence
//! number forms a chain; the active sequence ends at the valid entry with
//! the highest sequence number whose `tail` field points at an entry of its
//! own chain, and is replayed from that tail to the head, in order.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::header::{crc_with_zeroed, Guid, Header};
use crate::endian::{le32, le64};
use crate::error::{Error, Result};
use crate::host::HostFile;

const SECTOR: usize = 4096;
/// Logs larger than this are refused rather than read into memory
/// (Hyper-V and qemu write 1 MiB logs).
pub const MAX_LOG: u64 = 64 << 20;
/// Bytes of entries checksummed per byte of log before we give up.
const CRC_BUDGET_PER_LOG_BYTE: u64 = 64;

/// One piece of the overlay: the bytes of `[start, end)` once the log is applied.
#[derive(Debug, Clone)]
struct Piece {
    end: u64,
    /// `None` reads as zeros.
    data: Option<Arc<[u8]>>,
}

/// File ranges whose content the log replaces, non-overlapping.
#[derive(Debug, Default, Clone)]
pub struct Overlay {
    pieces: BTreeMap<u64, Piece>,
}

/// What the overlay holds at one file offset.
pub enum Hit<'a> {
    /// Not overlaid: the file's own bytes, up to `next` (the start of the
    /// next overlaid range, or `u64::MAX`).
    File {
        /// Where the next overlaid range starts.
        next: u64,
    },
    /// Zeros up to `end`.
    Zero {
        /// End of the zero range.
        end: u64,
    },
    /// Logged data: `data` starts at file offset `start`.
    Data {
        /// File offset of `data[0]`.
        start: u64,
        /// The page.
        data: &'a [u8],
    },
}

impl Overlay {
    /// True when the log replaced nothing.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Number of overlaid ranges.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// The end of the last overlaid range (0 when empty).
    pub fn end(&self) -> u64 {
        self.pieces.values().map(|p| p.end).max().unwrap_or(0)
    }

    /// Every overlaid range: `(start, end, data)`, `None` for zeros (for
    /// replaying the log in place).
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64, Option<&[u8]>)> {
        self.pieces
            .iter()
            .map(|(&s, p)| (s, p.end, p.data.as_deref()))
    }

    /// Records that `[start, end)` now reads as `data` (or zeros).
    fn put(&mut self, start: u64, end: u64, data: Option<Arc<[u8]>>) {
        let hit: Vec<u64> = self
            .pieces
            .range(..end)
            .filter(|(_, p)| p.end > start)
            .map(|(&s, _)| s)
            .collect();
        for s in hit {
            let Some(p) = self.pieces.remove(&s) else {
                continue;
            };
            if s < start {
                let keep = p.data.as_ref().map(|d| d[..(start - s) as usize].into());
                self.pieces.insert(
                    s,
                    Piece {
                        end: start,
                        data: keep,
                    },
                );
            }
            if p.end > end {
                let keep = p.data.as_ref().map(|d| d[(end - s) as usize..].into());
                self.pieces.insert(
                    end,
                    Piece {
                        end: p.end,
                        data: keep,
                    },
                );
            }
        }
        self.pieces.insert(start, Piece { end, data });
    }

    /// What lies at `offset`.
    pub fn at(&self, offset: u64) -> Hit<'_> {
        if let Some((&s, p)) = self.pieces.range(..=offset).next_back() {
            if p.end > offset {
                return match &p.data {
                    Some(d) => Hit::Data { start: s, data: d },
                    None => Hit::Zero { end: p.end },
                };
            }
        }
        let next = self
            .pieces
            .range(offset..)
            .next()
            .map_or(u64::MAX, |(&s, _)| s);
        Hit::File { next }
    }

    /// Applies the overlay to `buf`, which holds the file's bytes at `offset`.
    pub fn patch(&self, buf: &mut [u8], offset: u64) {
        let end = offset.saturating_add(buf.len() as u64);
        let first = self
            .pieces
            .range(..=offset)
            .next_back()
            .map_or(offset, |(&s, _)| s);
        for (&s, p) in self.pieces.range(first..end) {
            let lo = s.max(offset);
            let hi = p.end.min(end);
            if lo >= hi {
                continue;
            }
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match &p.data {
                Some(d) => dst.copy_from_slice(&d[(lo - s) as usize..(hi - s) as usize]),
                None => dst.fill(0),
            }
        }
    }
}

/// The image file as the replayed log leaves it.
pub struct Source {
    /// The host file.
    pub file: Arc<HostFile>,
    /// The replayed log.
    pub overlay: Overlay,
    /// The file's length once the log is applied.
    pub end: u64,
    /// What became of the log: `None` when it was empty (zero log GUID).
    pub log: Option<LogState>,
}

/// The outcome of log replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogState {
    /// The active sequence, up to the head entry with this sequence number,
    /// was replayed.
    Replayed {
        /// Sequence number of the head entry.
        head: u64,
        /// Number of entries replayed.
        entries: usize,
    },
    /// The header names a log but no valid sequence was found. MS-VHDX
    /// calls such a file corrupt; qemu opens it with nothing replayed
    /// (no update survives to be applied: the state after a crash between
    /// setting the log GUID and flushing the first entry), and so do we,
    /// saying so in `info` and the log.
    NoValidSequence,
}

impl Source {
    /// Reads `buf.len()` bytes at `offset` through the overlay (zeros past the end).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_zero_fill_at(buf, offset)?;
        self.overlay.patch(buf, offset);
        Ok(())
    }

    /// Opens `file` with its log (if any) replayed into an overlay.
    pub fn open(file: Arc<HostFile>, header: &Header) -> Result<Source> {
        let mut src = Source {
            end: file.len(),
            file,
            overlay: Overlay::default(),
            log: None,
        };
        if header.log_guid.is_zero() {
            return Ok(src);
        }
        header.check_log(src.file.len())?;
        let len = u64::from(header.log_length);
        if len > MAX_LOG {
            return Err(Error::unsupported(format!(
                "VHDX log of {len} bytes is larger than the {MAX_LOG} bytes we replay"
            )));
        }
        let mut log = vec![0u8; len as usize];
        src.file.read_exact_at(&mut log, header.log_offset)?;
        let Some((head, entries)) = active_sequence(&log, header.log_guid)? else {
            log::warn!(
                "{}: the VHDX log GUID is set but the log holds no valid sequence; nothing replayed",
                src.file.path().display()
            );
            src.log = Some(LogState::NoValidSequence);
            return Ok(src);
        };
        let count = entries.len();
        // The head entry's LastFileOffset: every structure fits below it.
        let last_file_offset = entries.last().map_or(0, |e| e.last_file_offset);
        {
            for e in entries {
                // The file was this long when the entry was written: a
                // shorter one lost data the log does not hold (qemu refuses
                // it too).
                if e.flushed_file_offset > src.file.len() {
                    return Err(Error::corrupt(format!(
                        "VHDX log entry {} expects a file of at least {} bytes; it has {} (truncated)",
                        e.seq,
                        e.flushed_file_offset,
                        src.file.len()
                    )));
                }
                for w in e.writes {
                    match w {
                        Write::Page { offset, data } => {
                            src.overlay.put(offset, offset + SECTOR as u64, Some(data))
                        }
                        Write::Zero { offset, len } => src.overlay.put(offset, offset + len, None),
                    }
                }
            }
            src.end = src.end.max(last_file_offset).max(src.overlay.end());
            src.log = Some(LogState::Replayed {
                head,
                entries: count,
            });
        }
        Ok(src)
    }
}

/// One write an entry makes.
enum Write {
    Page { offset: u64, data: Arc<[u8]> },
    Zero { offset: u64, len: u64 },
}

struct Entry {
    seq: u64,
    length: u64,
    tail: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    writes: Vec<Write>,
}

/// Copies `len` bytes of the circular `log` starting at `at`.
fn circular(log: &[u8], at: u64, len: u64) -> Vec<u8> {
    let n = log.len() as u64;
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = at % n;
    while (out.len() as u64) < len {
        let take = (n - pos).min(len - out.len() as u64);
        out.extend_from_slice(&log[pos as usize..(pos + take) as usize]);
        pos = (pos + take) % n;
    }
    out
}

/// Parses and fully validates the entry at `at`; `None` if it is not one.
/// Each checksummed entry spends its length from `budget`; `Err(())` when
/// the budget runs out.
fn parse_entry(
    log: &[u8],
    at: u64,
    guid: Guid,
    budget: &mut u64,
) -> std::result::Result<Option<Entry>, ()> {
    let Some(rest) = budget.checked_sub(entry_cost(log, at, guid)) else {
        return Err(());
    };
    *budget = rest;
    Ok(parse_checked(log, at, guid))
}

/// The bytes checksumming the entry at `at` would cost (0 when its header
/// is not even plausible: wrong signature or another log's GUID).
fn entry_cost(log: &[u8], at: u64, guid: Guid) -> u64 {
    let h = &log[at as usize..at as usize + SECTOR];
    if &h[0..4] == b"loge" && Guid::read(h, 32) == guid {
        u64::from(le32(h, 8)).min(log.len() as u64)
    } else {
        0
    }
}

fn parse_checked(log: &[u8], at: u64, guid: Guid) -> Option<Entry> {
    let n = log.len() as u64;
    let h = &log[at as usize..at as usize + SECTOR];
    if &h[0..4] != b"loge" {
        return None;
    }
    let length = u64::from(le32(h, 8));
    let tail = u64::from(le32(h, 12));
    let seq = le64(h, 16);
    let count = u64::from(le32(h, 24));
    if length == 0 || length % SECTOR as u64 != 0 || length > n || tail % SECTOR as u64 != 0 {
        return None;
    }
    if tail >= n || seq == 0 || Guid::read(h, 32) != guid {
        return None;
    }
    let desc_sectors = (64 + 32 * count).div_ceil(SECTOR as u64);
    if desc_sectors * SECTOR as u64 > length {
        return None;
    }
    let bytes = circular(log, at, length);
    if crc_with_zeroed(&bytes, 4) != le32(&bytes, 4) {
        return None;
    }
    let mut writes = Vec::with_capacity(count.min(1024) as usize);
    let mut data_at = desc_sectors * SECTOR as u64;
    for i in 0..count as usize {
        let d = &bytes[64 + 32 * i..96 + 32 * i];
        if le64(d, 24) != seq {
            return None;
        }
        let offset = le64(d, 16);
        if offset % SECTOR as u64 != 0 {
            return None;
        }
        match &d[0..4] {
            b"zero" => {
                let len = le64(d, 8);
                if len == 0 || len % SECTOR as u64 != 0 || offset.checked_add(len).is_none() {
                    return None;
                }
                writes.push(Write::Zero { offset, len });
            }
            b"desc" => {
                offset.checked_add(SECTOR as u64)?;
                if data_at + SECTOR as u64 > length {
                    return None;
                }
                let s = &bytes[data_at as usize..data_at as usize + SECTOR];
                let sector_seq = (u64::from(le32(s, 4)) << 32) | u64::from(le32(s, 4092));
                if &s[0..4] != b"data" || sector_seq != seq {
                    return None;
                }
                // The sector's signature and sequence halves stand in for the
                // page's first 8 and last 4 bytes, which the descriptor keeps.
                let mut page = vec![0u8; SECTOR];
                page[..8].copy_from_slice(&d[8..16]);
                page[8..4092].copy_from_slice(&s[8..4092]);
                page[4092..].copy_from_slice(&d[4..8]);
                writes.push(Write::Page {
                    offset,
                    data: page.into(),
                });
                data_at += SECTOR as u64;
            }
            _ => return None,
        }
    }
    Some(Entry {
        seq,
        length,
        tail,
        flushed_file_offset: le64(h, 48),
        last_file_offset: le64(h, 56),
        writes,
    })
}

/// Finds the active sequence: the head's sequence number and its entries
/// from the tail to the head.
fn active_sequence(log: &[u8], guid: Guid) -> Result<Option<(u64, Vec<Entry>)>> {
    let n = log.len() as u64;
    let mut entries: HashMap<u64, Entry> = HashMap::new();
    // A real log checksums a few times its own length (entries of older
    // laps included; those of earlier sessions carry another GUID and cost
    // nothing); a crafted one claiming a full-log entry at every sector
    // would cost n^2 / 4096 bytes of CRC, 1 TiB for a 64 MiB log.
    let mut budget = CRC_BUDGET_PER_LOG_BYTE * n + MAX_LOG;
    for at in (0..n).step_by(SECTOR) {
        match parse_entry(log, at, guid, &mut budget) {
            Ok(Some(e)) => {
                entries.insert(at, e);
            }
            Ok(None) => {}
            Err(()) => {
                return Err(Error::corrupt(format!(
                    "VHDX log of {n} bytes holds too many overlapping entries to replay"
                )))
            }
        }
    }
    // next[at]: the entry that continues the chain from `at`.
    let mut next: HashMap<u64, u64> = HashMap::new();
    for (&at, e) in &entries {
        let nx = (at + e.length) % n;
        if entries.get(&nx).map(|f| f.seq) == e.seq.checked_add(1) {
            next.insert(at, nx);
        }
    }
    // Heads of chains, memoised from the highest sequence number down
    // (sequence numbers rise along a chain, so chains cannot loop).
    let mut head_of: HashMap<u64, u64> = HashMap::new();
    let mut order: Vec<u64> = entries.keys().copied().collect();
    order.sort_by_key(|at| std::cmp::Reverse(entries[at].seq));
    for &at in &order {
        let h = match next.get(&at) {
            Some(nx) => head_of.get(nx).copied().unwrap_or(*nx),
            None => at,
        };
        head_of.insert(at, h);
    }
    let Some(best) = order.iter().copied().find(|&h| {
        let t = entries[&h].tail;
        entries.contains_key(&t)
            && head_of.get(&t) == Some(&h)
            && entries[&t].seq <= entries[&h].seq
    }) else {
        return Ok(None);
    };
    let head_seq = entries[&best].seq;
    let mut at = entries[&best].tail;
    let mut out = Vec::new();
    loop {
        // The chain from the tail reaches the head by construction.
        let (Some(e), nx) = (entries.remove(&at), next.get(&at).copied()) else {
            return Ok(None);
        };
        let done = e.seq == head_seq;
        out.push(e);
        if done {
            return Ok(Some((head_seq, out)));
        }
        let Some(nx) = nx else {
            return Ok(None);
        };
        at = nx;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endian::{put_le32, put_le64};

    fn page(v: u8) -> Option<Arc<[u8]>> {
        Some(vec![v; SECTOR].into())
    }

    #[test]
    fn later_writes_replace_earlier_ones_piecewise() {
        let mut o = Overlay::default();
        o.put(0, 4096, page(1));
        o.put(8192, 8192 + 4096, page(2));
        o.put(2048, 10240, None);
        let mut buf = vec![9u8; 16384];
        o.patch(&mut buf, 0);
        assert!(buf[..2048].iter().all(|&b| b == 1));
        assert!(buf[2048..10240].iter().all(|&b| b == 0));
        assert!(buf[10240..12288].iter().all(|&b| b == 2));
        assert!(buf[12288..].iter().all(|&b| b == 9));
        assert!(matches!(o.at(4096), Hit::Zero { end: 10240 }));
        assert!(matches!(o.at(10240), Hit::Data { start: 10240, .. }));
        assert!(matches!(o.at(12288), Hit::File { next: u64::MAX }));
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn a_log_of_overlapping_full_length_entries_is_refused_quickly() {
        let n = 4 << 20;
        let guid = Guid(*b"0123456789abcdef");
        let mut log = vec![0u8; n];
        for at in (0..n).step_by(SECTOR) {
            let h = &mut log[at..at + SECTOR];
            h[0..4].copy_from_slice(b"loge");
            put_le32(h, 8, n as u32);
            put_le64(h, 16, 1);
            h[32..48].copy_from_slice(&guid.0);
        }
        let started = std::time::Instant::now();
        assert!(active_sequence(&log, guid).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Entries of another log cost nothing and replay nothing.
        assert!(matches!(active_sequence(&log, Guid::default()), Ok(None)));
    }
}
