//! What a range of an export holds, in the terms of NBD's metadata
//! contexts: `base:allocation` (data, or a hole that reads as zeros) and
//! `qemu:allocation-depth` (which layer of the chain stores the range: 1 is
//! the top image, 2 its backing file, …; 0 no layer), both from the chain's
//! mapping without reading any data.

use crate::chain::{Chain, Status};
use crate::error::Result;

use super::proto::{CTX_ALLOCATION_DEPTH, CTX_BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};

/// Holes shorter than this are sent as data in structured reads: a chunk
/// header costs more than the zeros.
const MIN_HOLE_CHUNK: u64 = 4096;

/// The extents of context `ctx` over `len` bytes at `offset`, as (length,
/// flags) pairs, adjacent equal flags merged, at most `max` of them. They
/// never reach past the request; the last may stop short of its end.
pub fn extents(
    chain: &Chain,
    ctx: u32,
    offset: u64,
    len: u64,
    max: usize,
) -> Result<Vec<(u32, u32)>> {
    let end = offset.saturating_add(len).min(chain.size());
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let (flags, n) = match ctx {
            CTX_BASE_ALLOCATION => match chain.status(pos, end - pos)? {
                (Status::Data, n) => (0, n),
                (Status::Hole, n) => (STATE_HOLE | STATE_ZERO, n),
            },
            CTX_ALLOCATION_DEPTH => depth(chain, pos, end - pos)?,
            _ => (0, end - pos),
        };
        let n = n.clamp(1, end - pos);
        match out.last_mut() {
            Some((l, f)) if *f == flags && u32::try_from((*l as u64) + n).is_ok() => *l += n as u32,
            _ => {
                if out.len() == max {
                    break;
                }
                // `len` came from a u32, so a single run fits.
                out.push((n.min(u32::MAX as u64) as u32, flags));
            }
        }
        pos += n;
    }
    Ok(out)
}

/// The depth of the layer that stores the run at `offset` (at most
/// `max_len` bytes; 1 is the top, 0 none), and the run's length.
pub fn depth(chain: &Chain, offset: u64, max_len: u64) -> Result<(u32, u64)> {
    let at = crate::map::locate(chain, offset, max_len)?;
    Ok((at.layer.map_or(0, |i| i as u32 + 1), at.len))
}

/// How a structured read of `len` bytes at `offset` is cut: (offset,
/// length, is a hole) runs covering it exactly. A mapping error makes the
/// whole range one data run, so that the read itself reports it.
pub fn read_runs(chain: &Chain, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = offset + len;
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let (hole, n) = match chain.status(pos, end - pos) {
            Ok((s, n)) => (s == Status::Hole, n.clamp(1, end - pos)),
            Err(_) => return vec![(offset, len, false)],
        };
        let hole = hole && n >= MIN_HOLE_CHUNK;
        match runs.last_mut() {
            Some((_, l, h)) if *h == hole => *l += n,
            _ => runs.push((pos, n, hole)),
        }
        pos += n;
    }
    runs
}
