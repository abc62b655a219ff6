//! qcow2 first writes of whole clusters, in batches: the clusters that
//! need new host clusters (unallocated, compressed, zero, shared with a
//! snapshot) get host-contiguous runs allocated under the allocation
//! mutex and are marked in flight ([`crate::engine::inflight`]); their data
//! is written without the mutex, through [`crate::engine::cow`] (the
//! overlap guard and one host write per run; the data covers every new
//! cluster, so nothing is filled); under the mutex again the L2 entries
//! are written (one ordered `pwrite` per table slice) and the old
//! references dropped. Images with a data file write their clusters in
//! place, one cluster at a time (`first_write`).

use crate::engine::cow::NewRun;
use crate::engine::units::{GuestCluster, GuestOffset, HostOffset};
use crate::error::Result;
use crate::format::Below;

use super::alloc::Alloc;
use super::tables::{L2_COMPRESSED, L2_COPIED, OFFSET_MASK};
use super::write::ALL_UNITS;
use super::Qcow2;

impl Qcow2 {
    /// Writes whole clusters (`data` is a multiple of the cluster size,
    /// `pos` aligned) that need new host clusters: allocates them as
    /// host-contiguous runs under the mutex, fills them without it, then
    /// points the L2 entries at them. Returns the bytes written (at least
    /// one cluster; a cluster found writable in place is written there).
    pub(super) fn write_new_clusters(
        &self,
        data: &[u8],
        pos: u64,
        below: &dyn Below,
    ) -> Result<usize> {
        let geo = self.geo;
        let (cs, cb) = (geo.cluster_size(), geo.cluster_bits);
        let count = data.len() as u64 / cs;
        let first = GuestCluster(pos >> cb);
        let mut st = self.lock_clusters(first.get(), count);
        // Which leading clusters need a new host cluster, and their entries.
        let mut old = Vec::new();
        for i in 0..count {
            let (table, index) = self.ensure_l2(&mut st, pos + i * cs)?;
            let (e, _) = self.l2_entry(table, index)?;
            if !self.needs_new_cluster(&mut st, e)? {
                break;
            }
            old.push((table, index, e));
        }
        if old.is_empty() {
            // Writable where it is (subclusters or a zero flag to clear).
            drop(st);
            self.write_partial(&data[..cs as usize], pos, below)?;
            return Ok(cs as usize);
        }
        let count = old.len() as u64;
        let mut runs = Vec::new();
        let mut got = 0;
        while got < count {
            let (h, k) = self.alloc_clusters(&mut st, count - got)?;
            runs.push((h, k));
            got += k;
        }
        let mark = self.w().inflight.mark(&mut st, first, count);
        drop(st);

        // The data covers every new cluster: engine::cow fills nothing
        // and writes each host-contiguous run once, after the overlap guard.
        let mut filled = Ok(());
        let mut d = 0usize;
        for &(h, k) in &runs {
            let run = NewRun {
                guest: GuestOffset(pos + d as u64),
                host: h,
                count: k,
                unit: cs,
            };
            let no_fill = &mut |_: usize, _: GuestOffset, _: &mut [u8]| -> Result<()> { Ok(()) };
            filled = self.new_run(run, &data[d..], no_fill).map(|n| d += n);
            if filled.is_err() {
                break;
            }
        }

        let r = self.finish_batch(filled, &old, &runs);
        drop(mark);
        r.map(|()| (count * cs) as usize)
    }

    /// Ends a batch of in-flight clusters: links the new clusters if they
    /// were `filled`, else gives them back.
    fn finish_batch(
        &self,
        filled: Result<()>,
        old: &[(u64, u64, u64)],
        runs: &[(HostOffset, u64)],
    ) -> Result<()> {
        let cb = self.geo.cluster_bits;
        let mut st = self.w().state.lock();
        if filled.is_err() {
            // Nothing points at the new clusters yet: give them back.
            for &(h, k) in runs {
                for c in 0..k {
                    let _ = st.decref(
                        &self.file,
                        &self.caches,
                        self.cache_id,
                        h.cluster(cb).add(c),
                        false,
                    );
                }
            }
            filled
        } else {
            // A failure here leaves at worst leaked clusters.
            self.link_new_clusters(&mut st, old, runs)
        }
    }

    /// Points the entries `old` (table, index, previous entry) at the host
    /// clusters of `runs`, in order, then drops the previous references.
    fn link_new_clusters(
        &self,
        st: &mut Alloc,
        old: &[(u64, u64, u64)],
        runs: &[(HostOffset, u64)],
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let per = self.geo.slice_entries();
        let bm = if self.geo.extended { ALL_UNITS } else { 0 };
        let hosts = runs
            .iter()
            .flat_map(|&(h, k)| (0..k).map(move |c| h.get() + c * cs));
        let new: Vec<(u64, u64, u64)> = old
            .iter()
            .zip(hosts)
            .map(|(&(t, i, _), h)| (t, i, h))
            .collect();
        let mut a = 0;
        while a < new.len() {
            let (t, i0, _) = new[a];
            let mut b = a + 1;
            while b < new.len()
                && new[b].0 == t
                && new[b].1 == i0 + (b - a) as u64
                && new[b].1 / per == i0 / per
            {
                b += 1;
            }
            let ents: Vec<(u64, u64)> = new[a..b]
                .iter()
                .map(|&(_, _, h)| (h | L2_COPIED, bm))
                .collect();
            self.set_l2_entries(t, i0, &ents)?;
            a = b;
        }
        let dropped: Vec<u64> = old
            .iter()
            .map(|&(_, _, e)| e)
            .filter(|&e| e & L2_COMPRESSED != 0 || e & OFFSET_MASK != 0)
            .collect();
        if !dropped.is_empty() {
            for e in dropped {
                self.release(st, e)?;
            }
        }
        Ok(())
    }
}
