//! Metadata updates of a writable VHDX: the header pair and the log.
//!
//! MS-VHDX requires every metadata change (here: BAT pages) to go through
//! the log, and the header to be updated before the first write. This
//! module owns those writes:
//!
//! - [`Headers::update`]: a new header (sequence number + 1, CRC-32C) into
//!   the slot that is *not* current, then a barrier. A cut while it is
//!   written leaves a torn copy that fails its CRC, so the old current copy
//!   still rules.
//! - [`Headers::commit`]: one batch of BAT pages through the log, as qemu
//!   does it: data barrier; header with a fresh log GUID; one log entry at
//!   the start of the log (every page of the batch, one CRC), barrier; the
//!   pages in place, barrier; header with a zero log GUID. A cut before
//!   the entry is durable loses only the batch (its blocks are not yet
//!   referenced: leaked space); a cut after it leaves a log whose replay
//!   (by us, by qemu's `check -r all` or Hyper-V) rewrites the pages.
//!   Because every commit starts a new log (a new GUID, the entry at
//!   offset 0, its tail itself), the ring never wraps and is never full: a
//!   batch is bounded by [`max_pages`] of the log, and larger ones are
//!   split into several commits.
//! - [`replay_in_place`]: the replay a writable open must do first.

use parking_lot::Mutex;

use super::header::{crc_with_zeroed, Guid, Header, HEADER_LEN, HEADER_OFFSETS};
use super::log::Source;
use crate::endian::{le64, put_le32, put_le64};
use crate::error::{Error, Result};
use crate::host::HostFile;

const SECTOR: u64 = 4096;

/// Most a replayed log may grow the file by (a real log grows it by the
/// blocks allocated since its last flush; a hostile one could name any
/// length).
const MAX_REPLAY_GROWTH: u64 = 1 << 30;

/// The header pair of a writable image: the current copy's bytes.
pub struct Headers {
    state: Mutex<Current>,
}

struct Current {
    /// The bytes of the current header.
    raw: Vec<u8>,
    /// Its slot (0 or 1).
    slot: usize,
    /// Sequence number of the next log entry.
    log_seq: u64,
}

impl Headers {
    /// Reads the current header's bytes (`header` says which copy).
    pub fn read(file: &HostFile, header: &Header) -> Result<Headers> {
        let slot = usize::from(header.copy.saturating_sub(1)).min(1);
        let mut raw = vec![0u8; HEADER_LEN];
        file.read_exact_at(&mut raw, HEADER_OFFSETS[slot])?;
        Ok(Headers {
            state: Mutex::new(Current {
                raw,
                slot,
                log_seq: 1,
            }),
        })
    }

    /// Writes a new current header into the other slot, changed by `edit`
    /// (the sequence number and checksum are set here), then a barrier.
    pub fn update(&self, file: &HostFile, edit: impl FnOnce(&mut [u8])) -> Result<Header> {
        let mut st = self.state.lock();
        Self::update_locked(&mut st, file, edit)
    }

    fn update_locked(
        st: &mut Current,
        file: &HostFile,
        edit: impl FnOnce(&mut [u8]),
    ) -> Result<Header> {
        let mut raw = st.raw.clone();
        let seq = le64(&raw, 8)
            .checked_add(1)
            .ok_or_else(|| Error::corrupt("VHDX header sequence number at its maximum"))?;
        put_le64(&mut raw, 8, seq);
        edit(&mut raw);
        let crc = crc_with_zeroed(&raw, 4);
        put_le32(&mut raw, 4, crc);
        let slot = 1 - st.slot;
        file.write_all_at(&raw, HEADER_OFFSETS[slot])?;
        file.sync_data()?;
        let h = Header::parse(&raw, slot as u8 + 1)?;
        st.raw = raw;
        st.slot = slot;
        Ok(h)
    }

    /// The header as last written.
    pub fn current(&self) -> Result<Header> {
        let st = self.state.lock();
        Header::parse(&st.raw, st.slot as u8 + 1)
    }

    /// Writes `pages` (file offset, 4 KiB page) through the log, then in
    /// place; see the module documentation. `pages` must fit one entry
    /// ([`max_pages`]).
    pub fn commit(&self, file: &HostFile, pages: &[(u64, Vec<u8>)]) -> Result<()> {
        if pages.is_empty() {
            return Ok(());
        }
        let mut st = self.state.lock();
        let cur = Header::parse(&st.raw, st.slot as u8 + 1)?;
        let log_len = u64::from(cur.log_length);
        if (pages.len() as u64) > max_pages(log_len) {
            return Err(Error::corrupt(format!(
                "VHDX log of {log_len} bytes cannot hold {} pages",
                pages.len()
            )));
        }
        cur.check_log_area(file.len())?;
        // Whatever the pages point at is durable before the log can be.
        file.sync_data()?;
        // The entry records the file's length, which replay checks.
        let file_len = file
            .file()
            .metadata()
            .map_err(|e| Error::io("cannot stat", e).with_path(file.path()))?
            .len();
        let guid = new_guid();
        Self::update_locked(&mut st, file, |h| h[48..64].copy_from_slice(&guid.0))?;
        let seq = st.log_seq;
        st.log_seq += 1;
        let entry = build_entry(guid, seq, file_len, pages);
        file.write_all_at(&entry, cur.log_offset)?;
        file.sync_data()?;
        for (offset, page) in pages {
            file.write_all_at(page, *offset)?;
        }
        file.sync_data()?;
        Self::update_locked(&mut st, file, |h| h[48..64].fill(0))?;
        Ok(())
    }
}

impl Header {
    /// Checks that the log area named by this header lies inside the file
    /// (the log GUID may be zero: we are about to write it).
    fn check_log_area(&self, file_len: u64) -> Result<()> {
        let len = u64::from(self.log_length);
        let fits = self
            .log_offset
            .checked_add(len)
            .is_some_and(|e| e <= file_len);
        if len < SECTOR * 2 || self.log_offset % SECTOR != 0 || self.log_offset == 0 || !fits {
            return Err(Error::corrupt(format!(
                "VHDX log at {:#x} of {len} bytes is not usable for writing",
                self.log_offset
            )));
        }
        Ok(())
    }
}

/// Descriptor sectors of an entry of `n` descriptors (a 64-byte header,
/// then 32 bytes each).
fn desc_sectors(n: u64) -> u64 {
    (64 + 32 * n).div_ceil(SECTOR)
}

/// The most pages one log entry holds in a log of `log_len` bytes.
pub fn max_pages(log_len: u64) -> u64 {
    let sectors = log_len / SECTOR;
    let mut n = sectors.saturating_sub(1);
    while n > 0 && desc_sectors(n) + n > sectors {
        n -= 1;
    }
    n
}

/// One log entry (sequence number `seq` of log `guid`, for a file of
/// `file_len` bytes) meant for the start of the log, its tail itself: descriptors
/// for `pages`, then their data sectors (MS-VHDX 2.3.1: a data sector
/// keeps bytes 8..4092 of its page; the descriptor keeps the first 8 and
/// the last 4, whose place holds the signature and the sequence number).
pub fn build_entry(guid: Guid, seq: u64, file_len: u64, pages: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let n = pages.len() as u64;
    let ds = desc_sectors(n);
    let len = (ds + n) * SECTOR;
    let mut e = vec![0u8; len as usize];
    e[0..4].copy_from_slice(b"loge");
    put_le32(&mut e, 8, len as u32);
    // tail (12..16) = 0: this entry is the whole active sequence.
    put_le64(&mut e, 16, seq);
    put_le32(&mut e, 24, n as u32);
    e[32..48].copy_from_slice(&guid.0);
    put_le64(&mut e, 48, file_len);
    put_le64(&mut e, 56, file_len);
    for (i, (offset, page)) in pages.iter().enumerate() {
        let d = 64 + 32 * i;
        e[d..d + 4].copy_from_slice(b"desc");
        e[d + 4..d + 8].copy_from_slice(&page[4092..4096]);
        e[d + 8..d + 16].copy_from_slice(&page[0..8]);
        put_le64(&mut e, d + 16, *offset);
        put_le64(&mut e, d + 24, seq);
        let s = ((ds + i as u64) * SECTOR) as usize;
        e[s..s + 4].copy_from_slice(b"data");
        put_le32(&mut e, s + 4, (seq >> 32) as u32);
        e[s + 8..s + 4092].copy_from_slice(&page[8..4092]);
        put_le32(&mut e, s + 4092, seq as u32);
    }
    let crc = crc_with_zeroed(&e, 4);
    put_le32(&mut e, 4, crc);
    e
}

/// Applies a replayed log to the file itself (MS-VHDX: before any write):
/// pages written, zeroed ranges punched, the file grown to the length the
/// log expects (at most `MAX_REPLAY_GROWTH` more); then a barrier and a
/// header with a zero log GUID (emptying the log). Returns the new current
/// header.
pub fn replay_in_place(src: &Source, headers: &Headers) -> Result<Header> {
    let file = &src.file;
    let len = file.len();
    if src.end > len.saturating_add(MAX_REPLAY_GROWTH) {
        return Err(Error::corrupt(format!(
            "VHDX log would grow the file from {len} to {} bytes",
            src.end
        )));
    }
    for (start, end, data) in src.overlay.ranges() {
        match data {
            Some(d) => file.write_all_at(d, start)?,
            // Past the end, growing the file makes the zeros.
            None if start < len => file.punch_hole(start, end.min(len) - start)?,
            None => {}
        }
    }
    if src.end > len {
        file.set_len(src.end)?;
    }
    file.sync_data()?;
    headers.update(file, |h| h[48..64].fill(0))
}

/// A random GUID (version 4) from the kernel's generator.
pub fn new_guid() -> Guid {
    let mut g = [0u8; 16];
    if getrandom::fill(&mut g).is_err() {
        // Unreachable on Linux ≥ 3.17; a clock-derived GUID still
        // differs from the previous one, which is all the format needs.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        g = t.to_le_bytes();
    }
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    Guid(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_1_mib_log_holds_two_hundred_and_fifty_pages() {
        let n = max_pages(1 << 20);
        assert_eq!(desc_sectors(n) + n, 256);
        assert!(desc_sectors(n + 1) + n + 1 > 256);
    }

    #[test]
    fn guids_differ() {
        assert_ne!(new_guid(), new_guid());
    }
}
