//! The qcow (version 1) driver: reads, and in-place writes ([`mod@write`]).
//!
//! qcow v1 is qcow2's ancestor: a 48-byte header ([`header`]), a two-level
//! table mapping guest clusters to host offsets ([`table`]), optional
//! deflate compression per cluster, an optional backing file (named, with
//! no recorded format), and AES encryption (refused: we do not decrypt).
//! There are no refcounts, snapshots or zero clusters.
//!
//! [`Qcow::map`] answers with long runs: consecutive clusters of one L2
//! table that are all unallocated, or allocated at consecutive host
//! offsets, come back as one mapping; an unallocated L1 entry covers its
//! whole L2 range (and its unallocated neighbours). A damaged entry fails
//! only the reads that need it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::Value;

use super::{BackingSpec, CompressedBlock, Format, Layer, LayerInfo, Mapping, OpenCtx, WriteLayer};
use crate::compress::{self, Method};
use crate::error::{Error, Result};
use crate::host::HostFile;

pub mod header;
pub mod table;
pub mod write;

use header::{Header, HEADER_LEN};
use table::{raw_entry, Entry, Tables};

/// Opens a qcow version 1 image.
pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Arc<dyn Layer>> {
    let layer = Qcow::open(file.clone(), ctx).map_err(|e| e.with_path(file.path()))?;
    Ok(Arc::new(layer))
}

/// An open qcow version 1 image.
pub struct Qcow {
    file: Arc<HostFile>,
    header: Header,
    tables: Tables,
    backing: Option<String>,
    cache_id: u64,
    /// The end of the host file as the driver knows it: its length at
    /// open, grown by every allocation (reserved before any entry points
    /// into it).
    end: AtomicU64,
    /// The write side, when opened writable.
    writer: Option<write::Writer>,
}

impl Qcow {
    /// Parses the header, loads the L1 table and reads the backing name.
    pub fn open(file: Arc<HostFile>, ctx: &OpenCtx<'_>) -> Result<Qcow> {
        let mut head = [0u8; HEADER_LEN];
        let n = file.read_at_most(&mut head, 0)?;
        let header = Header::parse(&head[..n], file.len())?;
        let backing = header.backing_name(&file)?;
        let cache_id = ctx.caches.new_layer_id();
        let tables = Tables::load(&file, &header, ctx.caches.clone(), cache_id)?;
        let writer = if ctx.writable {
            Some(write::Writer::new(&file, &header, &tables)?)
        } else {
            None
        };
        Ok(Qcow {
            end: AtomicU64::new(file.len()),
            file,
            header,
            tables,
            backing,
            cache_id,
            writer,
        })
    }

    /// The end of the host file as the driver knows it.
    fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Checks a data cluster's host offset before the chain reads it.
    fn check_data(&self, host: u64) -> Result<()> {
        if host % 512 != 0 {
            return Err(Error::corrupt(format!(
                "L2 entry points at unaligned host offset {host:#x}"
            )));
        }
        if host >= self.end() {
            return Err(Error::corrupt(format!(
                "L2 entry points at host offset {host:#x}, past the end of the file ({} bytes)",
                self.end()
            )));
        }
        Ok(())
    }

    /// Checks a compressed cluster's location before it is decoded.
    fn check_compressed(&self, offset: u64, size: u64) -> Result<()> {
        if size == 0 {
            return Err(Error::corrupt(format!(
                "compressed cluster at host offset {offset:#x} has length 0"
            )));
        }
        if offset >= self.file.len() {
            return Err(Error::corrupt(format!(
                "compressed cluster at host offset {offset:#x} lies past the end of the file ({} bytes)",
                self.file.len()
            )));
        }
        Ok(())
    }

    /// Whether a raw entry continues a run started by `first` at the
    /// cluster `k` clusters further on.
    fn continues(&self, first: Entry, raw: u64, k: u64) -> bool {
        let g = self.tables.geometry();
        match (first, g.decode(raw)) {
            (Entry::Unallocated, Entry::Unallocated) => true,
            (Entry::Data(start), Entry::Data(host)) => {
                start.checked_add(k << g.cluster_bits) == Some(host)
                    && self.check_data(host).is_ok()
            }
            _ => false,
        }
    }

    fn map_inner(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let g = self.tables.geometry();
        let end = offset.saturating_add(max_len);
        let l2_offset = self
            .tables
            .l1_entry(offset)
            .ok_or_else(|| Error::corrupt("guest offset beyond the L1 table"))?;
        if l2_offset == 0 {
            // Skip over this and any further unallocated L1 entries.
            let mut next = (g.l1_index(offset) + 1) << (g.cluster_bits + g.l2_bits);
            while next < end && self.tables.l1_entry(next) == Some(0) {
                next += g.l2_span();
            }
            return Ok((Mapping::Backing, next.min(end) - offset));
        }
        let table = self.tables.l2_table(&self.file, l2_offset, self.end())?;
        let table_end = (g.l1_index(offset) + 1) << (g.cluster_bits + g.l2_bits);
        let limit = end.min(table_end);
        let in_cluster = g.in_cluster(offset);
        let cluster_start = offset - in_cluster;
        let first_idx = g.l2_index(offset);
        let first = g.decode(raw_entry(&table, first_idx));
        if let Entry::Compressed { offset: host, size } = first {
            self.check_compressed(host, size)?;
            let block = CompressedBlock {
                guest_start: cluster_start,
                len: g.cluster_size(),
                key: host,
                host_offset: host,
                host_len: size,
            };
            let n = (g.cluster_size() - in_cluster).min(end - offset);
            return Ok((Mapping::Compressed(block), n));
        }
        if let Entry::Data(host) = first {
            self.check_data(host)?;
        }
        // Extend the run over following clusters of this L2 table.
        let mut run_end = cluster_start + g.cluster_size();
        let mut k = 1u64;
        while run_end < limit {
            let raw = raw_entry(&table, first_idx + k as usize);
            if !self.continues(first, raw, k) {
                break;
            }
            run_end += g.cluster_size();
            k += 1;
        }
        let n = run_end.min(limit) - offset;
        let mapping = match first {
            Entry::Data(host) => Mapping::Data {
                file: self.file.clone(),
                offset: host + in_cluster,
            },
            _ => Mapping::Backing,
        };
        Ok((mapping, n))
    }
}

impl Layer for Qcow {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn format(&self) -> Format {
        Format::Qcow
    }

    fn virtual_size(&self) -> u64 {
        self.header.virtual_size()
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        self.map_inner(offset, max_len)
            .map_err(|e| e.at_guest(offset).with_path(self.file.path()))
    }

    fn decompress(&self, block: &CompressedBlock, out: &mut [u8]) -> Result<()> {
        let cluster = self.tables.geometry().cluster_size();
        if out.len() as u64 > cluster || block.len != cluster {
            return Err(Error::corrupt(format!(
                "compressed block of {} bytes does not match the cluster size {cluster}",
                out.len()
            )));
        }
        self.check_compressed(block.host_offset, block.host_len)?;
        // The length field is masked to the cluster bits, so this bound
        // holds for any entry; the file bound stops reads at EOF.
        let want = block
            .host_len
            .min(cluster)
            .min(self.file.len() - block.host_offset);
        let mut input = vec![0u8; want as usize];
        let got = self.file.read_at_most(&mut input, block.host_offset)?;
        compress::decompress(Method::Deflate, &input[..got], out, false)
            .map_err(|e| e.at_host(block.host_offset).with_path(self.file.path()))
    }

    fn backing(&self) -> Option<BackingSpec> {
        self.backing.as_ref().map(|name| BackingSpec {
            name: name.clone(),
            format: None,
            parent_cid: None,
        })
    }

    fn info(&self) -> LayerInfo {
        let mut info = LayerInfo::new(Format::Qcow, self.virtual_size());
        info.subformat = Some("v1".into());
        info.cluster_size = Some(self.header.cluster_size());
        let d = &mut info.details;
        d.insert("l2_bits".into(), Value::from(self.header.l2_bits));
        d.insert(
            "backing_file".into(),
            self.backing.clone().map_or(Value::Null, Value::from),
        );
        d.insert("backing_file_mtime".into(), Value::from(self.header.mtime));
        let enc = if self.header.crypt_method == header::CRYPT_NONE {
            "none"
        } else {
            "aes"
        };
        d.insert("encryption".into(), Value::from(enc));
        d.insert("l1_size".into(), Value::from(self.tables.l1_len()));
        info
    }

    fn host_files(&self) -> Vec<Arc<HostFile>> {
        vec![self.file.clone()]
    }

    fn cache_id(&self) -> u64 {
        self.cache_id
    }

    fn as_write(&self) -> Option<&dyn WriteLayer> {
        match &self.writer {
            Some(_) if self.file.writable() => Some(self as &dyn WriteLayer),
            _ => None,
        }
    }
}
