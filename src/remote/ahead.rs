//! Opening remote backing files ahead of need.
//!
//! A chain is opened link by link: a layer's driver reads its header, then
//! its tables, and only then does the chain opener open the backing file
//! the header names. Over a network each of those steps is a round trip.
//! Here a backing object starts opening (its first ranged GET in flight)
//! as soon as the layer naming it has parsed its header, while that
//! layer's tables are still arriving ([`crate::host::HostFile::prefetch`]),
//! so the links overlap: a chain of N remote links costs about N + 1
//! sequential round trips rather than 2N or more.
//!
//! [`open_ahead`] spawns the open on the network runtime and files it
//! under the URL; `take`, called by [`super::RemoteFile::open`], hands it
//! over. Entries are used once and expire after [`FRESH`] (a file opened
//! ahead whose chain then failed must not serve a stale size and ETag to a
//! later open), and at most [`MAX_PENDING`] are kept.
//!
//! Only URLs the open policy allows get here: the caller,
//! [`crate::format::OpenCtx::open_ahead`], resolves the name through
//! [`crate::policy::OpenPolicy::resolve`] first. Opening ahead is switched
//! on per thread by [`scope`], which the chain opener sets when it will
//! follow backing files (not with `single_link`), so a hint never makes a
//! request the real open would not make.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::task::JoinHandle;

use super::{store, RemoteFile};
use crate::error::Result;

/// How long an open started ahead stays usable.
pub const FRESH: Duration = Duration::from_secs(30);

/// Most opens filed at once (older ones are dropped beyond).
pub const MAX_PENDING: usize = 64;

type Pending = (Instant, JoinHandle<Result<Arc<RemoteFile>>>);

fn pending() -> &'static Mutex<HashMap<String, Pending>> {
    static P: OnceLock<Mutex<HashMap<String, Pending>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
}

/// Restores the previous setting of [`scope`] when dropped.
#[derive(Debug)]
pub struct Scope(bool);

impl Drop for Scope {
    fn drop(&mut self) {
        ENABLED.with(|e| e.set(self.0));
    }
}

/// Allows (or forbids) opening ahead on this thread until the returned
/// guard is dropped.
pub fn scope(enabled: bool) -> Scope {
    Scope(ENABLED.with(|e| e.replace(enabled)))
}

/// True when opening ahead is allowed on this thread (see [`scope`]).
pub fn enabled() -> bool {
    ENABLED.with(|e| e.get())
}

/// Starts opening the object at `url` in the background, unless an open
/// of it is already pending. Failures are dropped here: the real open
/// repeats the request and reports them.
pub fn open_ahead(url: &str) {
    let Ok(rt) = super::runtime() else { return };
    let mut map = pending().lock();
    let now = Instant::now();
    map.retain(|_, (at, h)| {
        let keep = now.duration_since(*at) < FRESH;
        if !keep {
            h.abort();
        }
        keep
    });
    if map.contains_key(url) || map.len() >= MAX_PENDING {
        return;
    }
    let Ok(obj) = store::Object::parse(url) else {
        return;
    };
    let task = rt.spawn(RemoteFile::open_obj(url.to_string(), obj));
    map.insert(url.to_string(), (now, task));
}

/// The file opened ahead at `url`, waiting for it if still under way;
/// `None` if there is none, it is stale, or it failed.
pub(super) fn take(rt: &tokio::runtime::Runtime, url: &str) -> Option<Arc<RemoteFile>> {
    let (at, task) = pending().lock().remove(url)?;
    if at.elapsed() >= FRESH {
        task.abort();
        return None;
    }
    match rt.block_on(task) {
        Ok(Ok(file)) => Some(file),
        _ => None,
    }
}
