//! qcow2 zeroing (discard, `fallocate` punch and zero-range): whole
//! clusters become zero or unallocated entries, whole subclusters get
//! their zero bits, and the rest is written as zeros.
//!
//! An entry change runs under the allocation mutex once the cluster is
//! not in flight; the host cluster that loses its reference is released
//! by the next flush (`Qcow2::release`), after the change is durable and
//! every read that may still use it is done. A data file's cluster stays
//! at its guest offset and is punched at once.

use crate::error::Result;
use crate::format::Below;

use super::tables::{L2_COMPRESSED, L2_ZERO, OFFSET_MASK};
use super::write::{units, ALL_UNITS};
use super::Qcow2;

impl Qcow2 {
    /// Makes the whole cluster at `pos` read as zeros.
    pub(super) fn zero_cluster(&self, pos: u64, below: &dyn Below) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let df = self.data_file.is_some();
        let v2 = self.header.version < 3;
        if v2 && self.w().has_backing {
            // No zero flag in v2: zeros must be stored to hide the backing file.
            let n = cs.min(self.header.size - pos) as usize;
            return self.write_cluster(&vec![0u8; n], pos, below);
        }
        let mut st = self.lock_clusters(pos >> geo.cluster_bits, 1);
        let l1e = self.l1.read()[(pos / geo.l2_coverage()) as usize];
        if l1e & OFFSET_MASK == 0 && !self.w().has_backing {
            return Ok(());
        }
        let (table, index) = self.ensure_l2(&mut st, pos)?;
        let (e, bm) = self.l2_entry(table, index)?;
        let (ne, nbm) = match (v2, geo.extended) {
            (true, _) => (0, 0),
            (false, true) => (0, ALL_UNITS << 32),
            (false, false) => (L2_ZERO, 0),
        };
        if (e, bm) == (ne, nbm) {
            return Ok(());
        }
        self.guard_old_data(e, pos)?;
        self.set_l2_entry(table, index, ne, nbm)?;
        if let Some(d) = &self.data_file {
            // Under the mutex: a data file's cluster is reused at once, at
            // the same guest offset, by the next write into it.
            d.punch_hole(pos, cs)?;
        }
        if !df {
            self.release(&mut st, e)?;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `pos` inside one cluster of an image with
    /// subclusters: whole subclusters by their zero bits, the rest by writes.
    pub(super) fn zero_subclusters(&self, pos: u64, len: u64, below: &dyn Below) -> Result<()> {
        let geo = self.geo;
        let (cs, unit) = (geo.cluster_size(), geo.unit_size());
        let (off, end) = (pos % cs, pos % cs + len);
        let (a, b) = (off.div_ceil(unit) * unit, end / unit * unit);
        let cstart = pos - off;
        let zeros = |from: u64, to: u64| -> Result<()> {
            if from < to {
                self.write_cluster(&vec![0u8; (to - from) as usize], cstart + from, below)?;
            }
            Ok(())
        };
        if a >= b {
            return zeros(off, end);
        }
        {
            let mut st = self.lock_clusters(pos >> geo.cluster_bits, 1);
            let (table, index) = self.ensure_l2(&mut st, pos)?;
            let (e, bm) = self.l2_entry(table, index)?;
            if e & L2_COMPRESSED != 0 {
                drop(st);
                return zeros(off, end);
            }
            let mask = units(a / unit, b / unit);
            let alloc = bm & ALL_UNITS & !mask;
            let zero = (bm >> 32) | mask;
            let df = self.data_file.is_some();
            let drop_host = alloc == 0 && !df && e & OFFSET_MASK != 0;
            let ne = if drop_host { 0 } else { e };
            if (ne, alloc | zero << 32) != (e, bm) {
                if drop_host {
                    self.guard_old_data(e, pos)?;
                }
                self.set_l2_entry(table, index, ne, alloc | zero << 32)?;
                if drop_host {
                    self.release(&mut st, e)?;
                }
                if let Some(d) = &self.data_file {
                    d.punch_hole(cstart + a, b - a)?;
                }
            }
        }
        zeros(off, a)?;
        zeros(b, end)
    }
}
