//! Frees that cannot race reads: a host cluster whose last reference was
//! dropped is handed out again only after every read or in-place write
//! that may have looked up the old reference has finished.
//!
//! A reader (the chain's `read_layer`, one mapped run at a time) holds a
//! [`ReadPin`] of the layer from its `map` call until the run's bytes are
//! read (pread, or decompression); the lock-free in-place writes of a
//! driver hold one from their table lookup to their `pwrite`. A driver
//! that has removed a reference calls [`ReadGate::wait_for_readers`]
//! before the cluster may become free: it waits until every pin taken
//! before the call is released. Pins taken afterwards see the new table
//! entry (tables are updated in memory and on disk before the call), so
//! none of them can reach the freed cluster. This is an epoch scheme with
//! two epochs, built on a fair reader-writer lock: a waiting free blocks
//! new pins only until the older ones are gone.
//!
//! Pins never nest on one layer: a run that falls through to the layer
//! below drops its pin before reading there.

use parking_lot::{RwLock, RwLockReadGuard};

/// The gate of one writable layer.
#[derive(Default)]
pub struct ReadGate {
    lock: RwLock<()>,
}

/// Held while a looked-up host range is being read or written in place.
pub struct ReadPin<'a> {
    _guard: RwLockReadGuard<'a, ()>,
}

impl ReadGate {
    /// A gate with no pins.
    pub fn new() -> ReadGate {
        ReadGate::default()
    }

    /// Pins the current table state until the pin is dropped.
    pub fn pin(&self) -> ReadPin<'_> {
        ReadPin {
            _guard: self.lock.read(),
        }
    }

    /// Returns once every pin taken before the call was dropped.
    pub fn wait_for_readers(&self) {
        drop(self.lock.write());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn waits_for_older_pins_only() {
        let g = ReadGate::new();
        let released = AtomicBool::new(false);
        std::thread::scope(|s| {
            let pin = g.pin();
            let h = s.spawn(|| {
                g.wait_for_readers();
                assert!(released.load(Ordering::SeqCst), "did not wait for the pin");
            });
            std::thread::sleep(Duration::from_millis(50));
            released.store(true, Ordering::SeqCst);
            drop(pin);
            h.join().unwrap();
        });
        // No pins: returns at once.
        g.wait_for_readers();
    }
}
