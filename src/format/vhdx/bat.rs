//! The VHDX block allocation table (BAT).
//!
//! One 64-bit entry per payload block (state in bits 0–2, file offset in
//! MiB in bits 20–63), with one sector-bitmap entry after every
//! `chunk_ratio` payload entries: a chunk is the 2^23 sectors one 1 MiB
//! bitmap block covers, so `chunk_ratio = 2^23 * logical_sector /
//! block_size`. Payload block `i` sits at index `i + i / chunk_ratio`; the
//! bitmap of chunk `c` at `c * (chunk_ratio + 1) + chunk_ratio`.
//!
//! The table is read whole at open (through the replayed log), bounded by
//! [`MAX_BAT`]; entries are decoded and checked one by one at map time, so
//! a damaged entry fails only the reads of its block.

use std::sync::atomic::{AtomicU64, Ordering};

use super::header::{Region, MIB};
use super::log::Source;
use super::metadata::Metadata;
use crate::endian::{le64_bytes, le64s};
use crate::error::{Error, Result};

/// Largest BAT read into memory (16 Mi entries: 16 TiB of 1 MiB blocks,
/// the whole 64 TiB at 4 MiB blocks and more).
pub const MAX_BAT: u64 = 128 << 20;

/// The unit the BAT is written in (through the log): one log page.
pub const PAGE: u64 = 4096;

/// Payload block state "fully present" (the state bits of an entry).
pub const FULLY_PRESENT: u64 = 6;

/// The state of a payload block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Never written: zeros, or the parent's data in a differencing disk.
    NotPresent,
    /// Content undefined: reads as zeros (one of the answers MS-VHDX allows).
    Undefined,
    /// Reads as zeros.
    Zero,
    /// Unmapped (trimmed): reads as zeros.
    Unmapped,
    /// Every sector stored at `offset`.
    Full(u64),
    /// Stored at `offset` for the sectors set in the chunk's bitmap; the
    /// others come from the parent.
    Partial(u64),
}

/// The BAT and its geometry.
pub struct Bat {
    /// Every entry of the BAT's pages (whole 4 KiB pages, so that a page
    /// written back in place carries the bytes past the last entry too);
    /// atomics so that a writer can publish entries while others read.
    entries: Vec<AtomicU64>,
    /// Payload block size.
    pub block_size: u64,
    /// Payload blocks per chunk.
    pub chunk_ratio: u64,
    /// Logical sector size.
    pub sector: u64,
    /// Payload blocks covering the disk.
    pub blocks: u64,
    differencing: bool,
}

impl Bat {
    /// Reads the BAT region, which must hold an entry for every block.
    pub fn read(src: &Source, region: &Region, md: &Metadata) -> Result<Bat> {
        let block_size = u64::from(md.block_size);
        let sector = u64::from(md.logical_sector);
        // Both factors are checked (block size 1..256 MiB, sector 512/4096):
        // the ratio is 16 ..= 32768.
        let chunk_ratio = ((1u64 << 23) * sector) / block_size;
        let blocks = md.virtual_size.div_ceil(block_size);
        let chunks = blocks.div_ceil(chunk_ratio);
        // A differencing disk has a bitmap entry for every chunk; others
        // only between payload entries (the spec's two formulas).
        let total = if md.has_parent {
            chunks * (chunk_ratio + 1)
        } else {
            blocks + (blocks - 1) / chunk_ratio
        };
        let bytes = total * 8;
        if bytes > region.length {
            return Err(Error::corrupt(format!(
                "VHDX BAT region of {} bytes cannot hold the {total} entries of a {}-byte disk",
                region.length, md.virtual_size
            )));
        }
        if bytes > MAX_BAT {
            return Err(Error::unsupported(format!(
                "VHDX BAT of {total} entries is larger than the {MAX_BAT} bytes we load"
            )));
        }
        // Whole pages: the region is 1 MiB-aligned, so they fit in it.
        let mut raw = vec![0u8; bytes.next_multiple_of(PAGE) as usize];
        src.read_at(&mut raw, region.offset)?;
        let entries = le64s(&raw).map(AtomicU64::new).collect();
        Ok(Bat {
            entries,
            block_size,
            chunk_ratio,
            sector,
            blocks,
            differencing: md.has_parent,
        })
    }

    /// The raw entry at table index `idx`.
    fn raw(&self, idx: u64) -> Result<u64> {
        self.entries
            .get(idx as usize)
            .map(|e| e.load(Ordering::Acquire))
            .ok_or_else(|| Error::corrupt(format!("VHDX BAT index {idx} out of range")))
    }

    /// The state of payload block `block`, with its file offset checked
    /// against `end` (the file's length once the log is applied).
    pub fn payload(&self, block: u64, end: u64) -> Result<State> {
        let e = self.raw(block + block / self.chunk_ratio)?;
        let offset = (e >> 20) * MIB;
        let located = |o: u64| -> Result<u64> {
            if o < MIB || o >= end {
                return Err(Error::corrupt(format!(
                    "VHDX BAT entry of block {block} points at {o:#x}, outside the file ({end} bytes)"
                )));
            }
            Ok(o)
        };
        Ok(match e & 7 {
            0 => State::NotPresent,
            1 => State::Undefined,
            2 => State::Zero,
            // 5 is the unmapped state of the v0.95 draft, still read by qemu.
            3 | 5 => State::Unmapped,
            6 => State::Full(located(offset)?),
            7 if self.differencing => State::Partial(located(offset)?),
            s => {
                return Err(Error::corrupt(format!(
                    "VHDX BAT entry of block {block} has invalid state {s}"
                )))
            }
        })
    }

    /// The file offset of the sector bitmap of the chunk holding `block`.
    pub fn bitmap(&self, block: u64, end: u64) -> Result<u64> {
        let chunk = block / self.chunk_ratio;
        let e = self.raw(chunk * (self.chunk_ratio + 1) + self.chunk_ratio)?;
        let offset = (e >> 20) * MIB;
        if e & 7 != 6 {
            return Err(Error::corrupt(format!(
                "VHDX block {block} is partially present but its sector bitmap is not (state {})",
                e & 7
            )));
        }
        if offset < MIB || offset.checked_add(MIB).is_none_or(|x| x > end) {
            return Err(Error::corrupt(format!(
                "VHDX sector bitmap of block {block} at {offset:#x} lies outside the file ({end} bytes)"
            )));
        }
        Ok(offset)
    }

    /// Byte offset, inside its chunk's bitmap, of the bit of the first
    /// sector of `block`.
    pub fn bitmap_bit(&self, block: u64) -> u64 {
        (block % self.chunk_ratio) * (self.block_size / self.sector)
    }

    /// Points payload block `block` at host offset `host` (a multiple of
    /// 1 MiB) as fully present; returns the index of the BAT page that
    /// changed. The caller serialises writers.
    pub fn set_full(&self, block: u64, host: u64) -> Result<u64> {
        let idx = block + block / self.chunk_ratio;
        let e = self
            .entries
            .get(idx as usize)
            .ok_or_else(|| Error::corrupt(format!("VHDX BAT index {idx} out of range")))?;
        e.store((host / MIB) << 20 | FULLY_PRESENT, Ordering::Release);
        Ok(idx * 8 / PAGE)
    }

    /// The file offset a block in a zero, unmapped or undefined state
    /// still carries (qemu's fixed disks: every block is "zero" at its
    /// place), when it is at least 1 MiB; unchecked otherwise.
    pub fn zero_block_offset(&self, block: u64) -> Option<u64> {
        let e = self.raw(block + block / self.chunk_ratio).ok()?;
        let offset = (e >> 20) * MIB;
        (matches!(e & 7, 1 | 2 | 3 | 5) && offset >= MIB).then_some(offset)
    }

    /// The bytes of BAT page `page` as the table now stands in memory.
    pub fn page(&self, page: u64) -> Vec<u8> {
        let per = (PAGE / 8) as usize;
        let first = page as usize * per;
        let mut out = Vec::with_capacity(PAGE as usize);
        for e in self.entries.iter().skip(first).take(per) {
            out.extend_from_slice(&le64_bytes(e.load(Ordering::Acquire)));
        }
        out.resize(PAGE as usize, 0);
        out
    }

    /// Host offsets of every stored payload or bitmap block, for the
    /// writer's first free offset and metadata map (unchecked: damaged
    /// entries are refused when used).
    pub fn stored(&self) -> Vec<u64> {
        self.entries
            .iter()
            .map(|e| e.load(Ordering::Acquire))
            .filter(|e| matches!(e & 7, 6 | 7))
            .map(|e| (e >> 20) * MIB)
            .collect()
    }

    /// Counts of payload blocks per state, for `info`.
    pub fn census(&self, end: u64) -> [u64; 5] {
        // not present/undefined/zero/unmapped, full, partial, damaged, bitmaps
        let mut c = [0u64; 5];
        for b in 0..self.blocks {
            match self.payload(b, end) {
                Ok(State::Full(_)) => c[1] += 1,
                Ok(State::Partial(_)) => c[2] += 1,
                Ok(_) => c[0] += 1,
                Err(_) => c[3] += 1,
            }
        }
        let chunks = self.blocks.div_ceil(self.chunk_ratio);
        for ch in 0..chunks {
            let idx = ch * (self.chunk_ratio + 1) + self.chunk_ratio;
            if self.raw(idx).is_ok_and(|e| e & 7 == 6) {
                c[4] += 1;
            }
        }
        c
    }
}
