//! In-flight tracking of guest clusters whose data is being written
//! outside a driver's allocation mutex.
//!
//! A first write into a cluster (allocation, copy-on-write fill from the
//! layers below, filling unallocated subclusters, writing a data file's
//! cluster before its entry says it is there) decides its plan under the
//! driver's allocation mutex, marks the cluster in flight, and does the
//! data I/O with the mutex released; under the mutex again it publishes
//! the table entry, then the mark goes. Any metadata change of an
//! in-flight cluster (another first write, a zeroing) first waits for
//! its mark to go, so it sees the published entry; changes of other
//! clusters go on meanwhile, so a slow copy-on-write read of one cluster
//! stalls only writers of that same cluster.
//!
//! Marks are taken only with the allocation mutex held (so the check of
//! [`InFlight::lock_idle`] and the mark are atomic); they may be dropped
//! without it. A waiter holds the set's own lock while it gives up the
//! allocation mutex and starts waiting, so a mark dropped in between
//! cannot be missed (lock order: allocation mutex, then the set).

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::engine::units::GuestCluster;

/// The clusters being filled, as ranges `[first, first + count)`.
#[derive(Default)]
pub struct InFlight {
    ranges: Mutex<Vec<(u64, u64)>>,
    idle: Condvar,
}

/// A range of clusters marked in flight; the mark goes when it is dropped.
#[must_use = "dropping the mark releases the clusters at once"]
pub struct Filling<'a> {
    set: &'a InFlight,
    range: (u64, u64),
}

fn overlaps(ranges: &[(u64, u64)], first: u64, count: u64) -> bool {
    ranges
        .iter()
        .any(|&(a, n)| a < first + count && first < a + n)
}

impl InFlight {
    /// An empty set.
    pub fn new() -> InFlight {
        InFlight::default()
    }

    /// Locks `mutex` (the driver's allocation mutex) once none of the
    /// `count` clusters from `first` is in flight, and returns its guard.
    pub fn lock_idle<'m, T>(
        &self,
        mutex: &'m Mutex<T>,
        first: GuestCluster,
        count: u64,
    ) -> MutexGuard<'m, T> {
        loop {
            let st = mutex.lock();
            let mut ranges = self.ranges.lock();
            if !overlaps(&ranges, first.get(), count) {
                return st;
            }
            // Give up the mutex while still holding the set: a mark
            // dropped from now on wakes this wait.
            drop(st);
            self.idle.wait(&mut ranges);
        }
    }

    /// True when any of the `count` clusters from `first` is in flight.
    pub fn busy(&self, first: GuestCluster, count: u64) -> bool {
        overlaps(&self.ranges.lock(), first.get(), count)
    }

    /// Marks `count` clusters from `first` in flight until the returned
    /// mark is dropped. The caller holds the allocation mutex (`_held`
    /// proves it) and has just checked, under it, that they were idle.
    pub fn mark<T>(
        &self,
        _held: &mut MutexGuard<'_, T>,
        first: GuestCluster,
        count: u64,
    ) -> Filling<'_> {
        let range = (first.get(), count);
        self.ranges.lock().push(range);
        Filling { set: self, range }
    }
}

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        let mut ranges = self.set.ranges.lock();
        if let Some(i) = ranges.iter().position(|&r| r == self.range) {
            ranges.swap_remove(i);
        }
        drop(ranges);
        self.set.idle.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_mark_blocks_only_its_own_clusters() {
        let set = InFlight::new();
        let m = Mutex::new(0u32);
        std::thread::scope(|s| {
            let mut st = set.lock_idle(&m, GuestCluster(4), 2);
            let mark = set.mark(&mut st, GuestCluster(4), 2);
            drop(st);
            assert!(set.busy(GuestCluster(5), 1) && !set.busy(GuestCluster(6), 3));
            // Another cluster: the mutex is free and nothing waits.
            *set.lock_idle(&m, GuestCluster(6), 1) += 1;
            let waiter = s.spawn(|| *set.lock_idle(&m, GuestCluster(5), 1) += 10);
            std::thread::sleep(Duration::from_millis(50));
            assert!(!waiter.is_finished(), "did not wait for the mark");
            drop(mark);
            waiter.join().unwrap();
        });
        assert_eq!(*m.lock(), 11);
        assert!(!set.busy(GuestCluster(0), 100));
    }
}
