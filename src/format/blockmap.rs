//! Mapping through a flat table of fixed-size blocks, shared by the formats
//! that have one (VDI's block map, the Parallels BAT): guest block `i`
//! lives wherever entry `i` says, or nowhere.
//!
//! [`map_blocks`] turns per-block answers into the long runs the chain
//! wants: consecutive blocks that are all unallocated, all zero, or stored
//! at consecutive host offsets come back as one mapping. A damaged entry
//! fails the read that needs it, and ends the run before it otherwise.

use std::sync::Arc;

use super::Mapping;
use crate::error::Result;
use crate::host::HostFile;

/// What one table entry says about its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Not stored here: the layer below answers (zeros if none).
    Unallocated,
    /// Reads as zeros, hiding the layers below.
    Zero,
    /// Stored at this host byte offset.
    Data(u64),
}

/// Most entries one call looks at: keeps every call bounded whatever the
/// table holds (a run longer than this is answered in several calls).
const MAX_RUN_BLOCKS: u64 = 1 << 16;

/// Maps the run at guest `offset` (at most `max_len` bytes) for a table of
/// `entries` blocks of `block_size` bytes, where `entry(i)` answers for
/// block `i` (and checks the host offset it returns). Past the table's end
/// everything is [`Block::Zero`], in one run.
pub fn map_blocks(
    file: &Arc<HostFile>,
    block_size: u64,
    entries: u64,
    offset: u64,
    max_len: u64,
    entry: impl Fn(u64) -> Result<Block>,
) -> Result<(Mapping, u64)> {
    let first_idx = offset / block_size;
    if first_idx >= entries {
        return Ok((Mapping::Zero, max_len));
    }
    let table_end = entries.saturating_mul(block_size);
    let end = offset.saturating_add(max_len).min(table_end);
    let in_block = offset % block_size;
    let first = entry(first_idx)?;
    let mut run_end = (first_idx + 1).saturating_mul(block_size);
    let mut k = 1u64;
    while run_end < end && k < MAX_RUN_BLOCKS {
        let Ok(next) = entry(first_idx + k) else {
            break;
        };
        let continues = match (first, next) {
            (Block::Unallocated, Block::Unallocated) | (Block::Zero, Block::Zero) => true,
            (Block::Data(a), Block::Data(b)) => {
                k.checked_mul(block_size).and_then(|d| a.checked_add(d)) == Some(b)
            }
            _ => false,
        };
        if !continues {
            break;
        }
        run_end = run_end.saturating_add(block_size);
        k += 1;
    }
    let n = run_end.min(end) - offset;
    let mapping = match first {
        Block::Unallocated => Mapping::Backing,
        Block::Zero => Mapping::Zero,
        Block::Data(host) => Mapping::Data {
            file: file.clone(),
            offset: host + in_block,
        },
    };
    Ok((mapping, n))
}
