//! A recorder of host I/O: every write, punched hole, length change and
//! barrier (fdatasync) that goes through one [`HostFile`], in order.
//!
//! Attached at run time with [`HostFile::set_recorder`]; recording does not
//! change what is written or when. The power-cut simulation
//! (tests/suite/powercut.rs) replays a recorded log cut at random points. A
//! recorder made with [`Recorder::ignoring_barriers`] leaves barriers out
//! of the log, as if the fdatasyncs had not happened: replays then show
//! what power loss does to an image written without barriers.

use parking_lot::Mutex;

#[cfg(doc)]
use crate::host::HostFile;

/// One recorded host operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `data` written at `offset`.
    Write {
        /// Host file offset.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// A hole punched (reads as zeros afterwards).
    Punch {
        /// Host file offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The file's length set.
    SetLen(u64),
    /// A completed fdatasync: everything before it is durable.
    Barrier,
}

/// The log of one file's host I/O.
#[derive(Debug, Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
    ignore_barriers: bool,
}

impl Recorder {
    /// A recorder of everything.
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// A recorder that leaves barriers out of the log.
    pub fn ignoring_barriers() -> Recorder {
        Recorder {
            ignore_barriers: true,
            ..Recorder::default()
        }
    }

    /// Appends `e` to the log.
    pub fn record(&self, e: Event) {
        if e == Event::Barrier && self.ignore_barriers {
            return;
        }
        self.events.lock().push(e);
    }

    /// How many events the log holds.
    pub fn len(&self) -> usize {
        self.events.lock().len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the log.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().clone()
    }
}
