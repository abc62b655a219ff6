//! The append allocator shared by every format that grows its file to
//! allocate (qcow v1, VMDK sparse extents, VHD, VDI, VHDX): new space is
//! taken at a frontier at the end of the file and never reused, so a crash
//! leaks space at worst and never hands one block to two owners.
//!
//! It also tracks *pending* allocation units (clusters, grains, blocks —
//! the driver chooses the unit): a writer that decides to allocate unit
//! `u` marks it pending under the lock, fills and writes the new space
//! without the lock, then publishes the table entry and settles the unit.
//! Any other writer touching a pending unit waits for it to settle, so two
//! first writes into one unit both land and neither allocates twice.
//!
//! The protocol, as every driver uses it:
//! 1. `let mut st = appender.lock();` — if `st.is_pending(u)`,
//!    `appender.wait(&mut st)` and start over (the table changed);
//! 2. decide the run from the table, `st.reserve(len, align)` its space,
//!    `appender.claim(&mut st, units)` — the returned [`Claim`] settles
//!    the units when dropped, whatever happens after;
//! 3. drop the lock, fill and write the data;
//! 4. lock again, write the table entries (ordered writes, see
//!    [`crate::engine::order`]), publish them, drop the claim.
//!
//! qcow2 does not use it: its refcounts let it reuse freed clusters (see
//! `format::qcow2::alloc`), but it follows the same pending protocol.

use std::collections::HashSet;
use std::ops::Range;

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::engine::units::HostOffset;

/// The allocation state of one growable host file.
pub struct Appender {
    state: Mutex<AppendState>,
    /// Signalled whenever pending units are settled.
    settled: Condvar,
    /// Host offsets at or after this were allocated by this writer: no
    /// entry written before it was opened can point there.
    first_own: u64,
}

/// What the allocation lock protects.
pub struct AppendState {
    /// Next free host offset.
    frontier: u64,
    /// Largest host offset (exclusive) the format can address.
    limit: u64,
    /// Units being allocated outside the lock.
    pending: HashSet<u64>,
}

/// Units marked pending by one allocation; settled when dropped.
#[must_use = "dropping a claim settles its units at once"]
pub struct Claim<'a> {
    appender: &'a Appender,
    units: Range<u64>,
}

impl Appender {
    /// An allocator whose frontier starts at `frontier` (the end of
    /// everything in use, rounded as the format requires) and may not pass
    /// `limit`.
    pub fn new(frontier: u64, limit: u64) -> Appender {
        Appender {
            state: Mutex::new(AppendState {
                frontier,
                limit,
                pending: HashSet::new(),
            }),
            settled: Condvar::new(),
            first_own: frontier,
        }
    }

    /// Takes the allocation lock; every table change happens under it.
    pub fn lock(&self) -> MutexGuard<'_, AppendState> {
        self.state.lock()
    }

    /// Waits (releasing the lock meanwhile) until some pending units are
    /// settled; the caller must look at the table again afterwards.
    pub fn wait(&self, st: &mut MutexGuard<'_, AppendState>) {
        self.settled.wait(st);
    }

    /// Waits until none of `units` is pending.
    pub fn wait_for(&self, st: &mut MutexGuard<'_, AppendState>, units: Range<u64>) {
        while units.clone().any(|u| st.pending.contains(&u)) {
            self.settled.wait(st);
        }
    }

    /// Marks `units` pending until the returned claim is dropped.
    pub fn claim(&self, st: &mut AppendState, units: Range<u64>) -> Claim<'_> {
        st.pending.extend(units.clone());
        Claim {
            appender: self,
            units,
        }
    }

    /// The frontier when the image was opened: host space at or past it
    /// was allocated by this writer.
    pub fn first_own(&self) -> HostOffset {
        HostOffset(self.first_own)
    }

    /// The current frontier.
    pub fn frontier(&self) -> HostOffset {
        HostOffset(self.state.lock().frontier)
    }
}

impl AppendState {
    /// True while unit `u` is being allocated by another writer.
    pub fn is_pending(&self, u: u64) -> bool {
        self.pending.contains(&u)
    }

    /// Reserves `len` bytes at the frontier, aligned to `align` (a power
    /// of two or any non-zero value); `None` when the file cannot grow
    /// that far. Returns the host offset.
    pub fn reserve(&mut self, len: u64, align: u64) -> Option<HostOffset> {
        let host = round_up(self.frontier, align)?;
        let end = host.checked_add(len).filter(|&e| e <= self.limit)?;
        self.frontier = end;
        Some(HostOffset(host))
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut st = self.appender.state.lock();
        for u in self.units.clone() {
            st.pending.remove(&u);
        }
        drop(st);
        self.appender.settled.notify_all();
    }
}

/// `x` rounded up to a multiple of `align` (non-zero); `None` on overflow.
pub fn round_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? / align * align)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reserve_aligns_and_respects_the_limit() {
        let a = Appender::new(1000, 1 << 20);
        let mut st = a.lock();
        assert_eq!(st.reserve(512, 4096), Some(HostOffset(4096)));
        assert_eq!(st.reserve(100, 1), Some(HostOffset(4608)));
        assert_eq!(st.reserve(1 << 20, 1), None);
        // A refused reservation leaves the frontier alone.
        assert_eq!(st.reserve(10, 1), Some(HostOffset(4708)));
        drop(st);
        assert_eq!(a.first_own(), HostOffset(1000));
        assert_eq!(a.frontier(), HostOffset(4718));
    }

    #[test]
    fn reserve_never_overflows() {
        let a = Appender::new(u64::MAX - 10, u64::MAX);
        assert_eq!(a.lock().reserve(1, 4096), None);
        assert_eq!(a.lock().reserve(100, 1), None);
    }

    #[test]
    fn a_claim_blocks_others_until_dropped() {
        let a = Arc::new(Appender::new(0, u64::MAX));
        let mut st = a.lock();
        let claim = a.claim(&mut st, 5..8);
        assert!(st.is_pending(6) && !st.is_pending(8));
        drop(st);
        let other = {
            let a = a.clone();
            std::thread::spawn(move || {
                let mut st = a.lock();
                a.wait_for(&mut st, 0..10);
                st.is_pending(5)
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!other.is_finished());
        drop(claim);
        assert!(!other.join().unwrap());
    }
}
