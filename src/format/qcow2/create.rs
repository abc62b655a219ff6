//! Creating new qcow2 images (overlays for `--overlay` and `--snapshot`).
//!
//! Layout of a new image, in clusters: the header (with its extensions and
//! the backing file name), the refcount table, the refcount blocks, the
//! L1 table (all zeros). Every one of those clusters has refcount 1;
//! nothing else is allocated. Refcount blocks and table are sized for the
//! metadata only: the write path grows them as clusters get allocated.

use crate::endian::{put_be32, put_be64};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::host::HostFile;

use super::header::{MAGIC, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use super::refcount::rc_set;
use super::tables::MAX_L1_BYTES;

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Guest size in bytes.
    pub virtual_size: u64,
    /// log2 of the cluster size (9..=21); 16 for 64 KiB.
    pub cluster_bits: u32,
    /// Backing file name to record (as it should be resolved: relative to
    /// the new image's directory, or absolute).
    pub backing_file: Option<String>,
    /// Backing format to record.
    pub backing_format: Option<Format>,
}

/// Header length written: through the compression type byte, padded to 8.
const HEADER_LEN: usize = 112;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;

/// Writes a new, empty qcow2 (version 3, 16-bit refcounts) into `file`,
/// which must be empty and open for writing.
pub fn create(file: &HostFile, opts: &CreateOptions) -> Result<()> {
    create_inner(file, opts).map_err(|e| e.with_path(file.path()))
}

fn create_inner(file: &HostFile, opts: &CreateOptions) -> Result<()> {
    let bits = opts.cluster_bits;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(Error::invalid(format!(
            "cluster_bits {bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
        )));
    }
    if !file.is_empty() {
        return Err(Error::invalid(
            "the file to create an image in is not empty",
        ));
    }
    let cs = 1u64 << bits;
    let l2_coverage = (cs / 8) << bits;
    let l1_entries = opts.virtual_size.div_ceil(l2_coverage);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(Error::invalid(format!(
            "virtual size {} is too large for {cs} byte clusters",
            opts.virtual_size
        )));
    }
    let head = header_cluster(opts, l1_entries, cs)?;

    // Clusters: header | refcount table (rt) | blocks (rb) | L1 (l1c).
    let l1c = (l1_entries * 8).div_ceil(cs).max(1);
    let per_block = (cs * 8) >> REFCOUNT_ORDER;
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + rb + l1c;
        let need_rb = total.div_ceil(per_block);
        let need_rt = (need_rb * 8).div_ceil(cs);
        if need_rb <= rb && need_rt <= rt {
            break;
        }
        rb = rb.max(need_rb);
        rt = rt.max(need_rt);
    }
    let total = 1 + rt + rb + l1c;
    let (rt_at, rb_at, l1_at) = (cs, (1 + rt) * cs, (1 + rt + rb) * cs);

    let mut head = head;
    put_be64(&mut head, 40, l1_at);
    put_be64(&mut head, 48, rt_at);
    put_be32(&mut head, 56, rt as u32);

    let mut table = vec![0u8; (rt * cs) as usize];
    for i in 0..rb {
        let at = rb_at + i * cs;
        put_be64(&mut table, (i * 8) as usize, at);
    }
    let mut blocks = vec![0u8; (rb * cs) as usize];
    for c in 0..total {
        let (b, i) = ((c / per_block) as usize, c % per_block);
        let block = &mut blocks[b * cs as usize..(b + 1) * cs as usize];
        rc_set(block, i, REFCOUNT_ORDER, 1);
    }
    file.file()
        .set_len(total * cs)
        .map_err(|e| Error::io("cannot size the new image", e))?;
    file.write_all_at(&table, rt_at)?;
    file.write_all_at(&blocks, rb_at)?;
    // The header last: until it is written the file is no qcow2 image.
    file.write_all_at(&head, 0)?;
    file.sync_data()
}

/// The first cluster: header fields that do not depend on the layout,
/// extensions, backing file name.
fn header_cluster(opts: &CreateOptions, l1_entries: u64, cs: u64) -> Result<Vec<u8>> {
    let mut h = vec![0u8; cs as usize];
    h[0..4].copy_from_slice(&MAGIC);
    put_be32(&mut h, 4, 3);
    put_be32(&mut h, 20, cs.trailing_zeros());
    put_be64(&mut h, 24, opts.virtual_size);
    put_be32(&mut h, 36, l1_entries as u32);
    put_be32(&mut h, 96, REFCOUNT_ORDER);
    put_be32(&mut h, 100, HEADER_LEN as u32);
    let mut pos = HEADER_LEN;
    let Some(name) = &opts.backing_file else {
        return Ok(h);
    };
    if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
        return Err(Error::invalid(format!(
            "backing file name must be 1..={MAX_BACKING_NAME} bytes"
        )));
    }
    let fmt = opts.backing_format.map(|f| f.name());
    let ext_len = fmt.map_or(0, |f| 8 + f.len().div_ceil(8) * 8);
    // Extensions, the end marker, then the name, all in the first cluster.
    if pos + ext_len + 8 + name.len() > cs as usize {
        return Err(Error::invalid(format!(
            "backing file name of {} bytes does not fit in the first {cs} byte cluster",
            name.len()
        )));
    }
    if let Some(f) = fmt {
        put_be32(&mut h, pos, EXT_BACKING_FORMAT);
        put_be32(&mut h, pos + 4, f.len() as u32);
        h[pos + 8..pos + 8 + f.len()].copy_from_slice(f.as_bytes());
        pos += ext_len;
    }
    pos += 8; // end-of-extensions marker: zeros
    h[pos..pos + name.len()].copy_from_slice(name.as_bytes());
    put_be64(&mut h, 8, pos as u64);
    put_be32(&mut h, 16, name.len() as u32);
    Ok(h)
}
