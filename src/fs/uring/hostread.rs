//! Host reads on the ring: a READ whose guest range maps to plain stored
//! runs (raw files, qcow2 data clusters, VMDK grains, zeros, across a
//! backing chain) becomes IORING_OP_READ submissions on the image files,
//! issued by the queue thread that owns the FUSE request straight into the
//! entry's payload buffer, so one thread keeps many requests in flight
//! instead of blocking on the disk. Anything else (compressed runs, remote
//! or O_DIRECT files, writable layers whose clusters may be freed while a
//! read is in flight, a request split into too many pieces) is left to
//! the usual path: [`plan`] answers `None`.
//!
//! A page-cache hit completes inside the submission (io_uring tries a
//! non-blocking read first), so a cached read costs one copy and no wakeup;
//! when other requests are about, the queue asks for hits only and sends a
//! miss to its pool (`queue.rs`: blocking preads keep the kernel's
//! readahead, which io_uring's buffered reads mostly skip). Planning
//! never reads the disk itself: it runs under
//! [`crate::host::without_blocking_reads`], so a mapping that needs a
//! table not in the cache (an L2 table, a grain table, a sector bitmap,
//! any table of a remote layer) fails and the request goes to the pool,
//! whose read caches the table for the next plan.

use std::os::fd::RawFd;
use std::sync::Arc;

use crate::chain::Chain;
use crate::format::Mapping;
use crate::fs::VdiskFs;
use crate::host::HostFile;

/// Pieces of one request beyond which it is served the usual way (a
/// read that fragmented is better served by one thread than by a storm of
/// small submissions).
const MAX_SEGS: usize = 32;

/// One host read of a request: `len` bytes of `fd` at `host` into the
/// payload at `at`.
#[derive(Debug, Clone)]
pub struct Seg {
    /// The image file, held until the read lands (and for the rest of a
    /// short read, finished with a plain pread).
    pub file: Option<Arc<HostFile>>,
    /// Its descriptor.
    pub fd: RawFd,
    /// Offset in the host file.
    pub host: u64,
    /// Offset in the reply payload.
    pub at: usize,
    /// Bytes to read.
    pub len: usize,
}

/// A READ ready to be submitted: its host reads (zero runs already filled
/// in the payload) and the reply length.
#[derive(Debug, Default)]
pub struct Plan {
    /// The host reads, at most [`MAX_SEGS`].
    pub segs: Vec<Seg>,
    /// Bytes of the reply (short only at the end of the disk).
    pub len: usize,
}

/// Plans the READ of `size` bytes of `ino` at `offset` into `payload`
/// (filling its zero runs); `None` when it must be served the usual way.
pub fn plan(fs: &VdiskFs, ino: u64, offset: u64, size: usize, payload: &mut [u8]) -> Option<Plan> {
    let disk = fs.tree.disk(ino)?;
    let (chain, base, end) = (&*disk.chain, disk.base(), disk.size());
    let size = size.min(payload.len());
    let len = if offset >= end {
        0
    } else {
        (size as u64).min(end - offset) as usize
    };
    let mut plan = Plan {
        segs: Vec::new(),
        len,
    };
    if len > 0 {
        walk(
            chain,
            base.checked_add(offset)?,
            len,
            &mut plan.segs,
            payload,
        )?;
    }
    Some(plan)
}

/// Maps `len` guest bytes at `pos` into `segs` (payload position 0 on),
/// through [`crate::map::locate`], the walk that finds the layer storing
/// each run; zero and unstored runs are filled in `payload` here.
fn walk(
    chain: &Chain,
    pos: u64,
    len: usize,
    segs: &mut Vec<Seg>,
    payload: &mut [u8],
) -> Option<()> {
    // A layer that may free clusters pins its tables for the duration of
    // a read; a pin cannot be held across completions without stalling
    // the thread that frees (and this thread behind it).
    if chain.layers().iter().any(|l| l.pin_reads().is_some()) {
        return None;
    }
    let mut done = 0usize;
    while done < len {
        let p = pos.checked_add(done as u64)?;
        // locate's run is at least 1 and at most the length asked for.
        let run = crate::host::without_blocking_reads(|| {
            crate::map::locate(chain, p, (len - done) as u64)
        })
        .ok()?;
        let n = run.len as usize;
        match run.mapping {
            Mapping::Data { file, offset } => {
                let fd = file.plain_read_fd()?;
                push(
                    segs,
                    Seg {
                        file: Some(file.clone()),
                        fd,
                        host: offset,
                        at: done,
                        len: n,
                    },
                );
            }
            // Backing: no layer stores it (or past a shorter layer's end).
            Mapping::Zero | Mapping::Backing => payload[done..done + n].fill(0),
            Mapping::Compressed(_) => return None,
        }
        if segs.len() > MAX_SEGS {
            return None;
        }
        done += n;
    }
    Some(())
}

/// Appends `s`, merged into the last read when it continues it in the
/// same file and the payload (a raw file, consecutive clusters).
fn push(segs: &mut Vec<Seg>, s: Seg) {
    if let Some(last) = segs.last_mut() {
        if last.fd == s.fd
            && last.at + last.len == s.at
            && last.host.checked_add(last.len as u64) == Some(s.host)
        {
            last.len += s.len;
            return;
        }
    }
    segs.push(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(fd: RawFd, host: u64, at: usize, len: usize) -> Seg {
        Seg {
            file: None,
            fd,
            host,
            at,
            len,
        }
    }

    fn shape(v: &[Seg]) -> Vec<(RawFd, u64, usize, usize)> {
        v.iter().map(|s| (s.fd, s.host, s.at, s.len)).collect()
    }

    #[test]
    fn planning_never_reads_a_table_and_plans_once_it_is_cached() {
        use crate::fs::tests::{disk, new_image, open, MIB};
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path());
        let d = disk(&open(&path, true));
        d.write(MIB, &[7; 4096], false).unwrap();
        d.flush().unwrap();
        drop(d);
        let chain = open(&path, false);
        let (mut payload, mut segs) = (vec![1u8; 8192], Vec::new());
        // The L2 table is not cached: planning must not read it (the
        // request goes to the pool) and fills nothing.
        assert!(walk(&chain, MIB, 8192, &mut segs, &mut payload).is_none());
        assert!(segs.is_empty() && payload.iter().all(|&b| b == 1));
        // A read the usual way caches the table: now one host read.
        chain.read_at(&mut payload, MIB).unwrap();
        walk(&chain, MIB, 8192, &mut segs, &mut payload).unwrap();
        assert_eq!(segs.len(), 1);
        assert_eq!((segs[0].at, segs[0].len), (0, 8192));
        let mut got = vec![0u8; 8192];
        let file = segs[0].file.as_ref().unwrap();
        file.read_exact_at(&mut got, segs[0].host).unwrap();
        assert!(got[..4096].iter().all(|&b| b == 7) && got[4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn contiguous_runs_of_one_file_merge_and_others_do_not() {
        let mut v = Vec::new();
        push(&mut v, seg(3, 100, 0, 10));
        push(&mut v, seg(3, 110, 10, 5));
        assert_eq!(shape(&v), vec![(3, 100, 0, 15)]);
        // A gap in the host file, another file, a gap in the payload.
        push(&mut v, seg(3, 200, 15, 5));
        push(&mut v, seg(4, 205, 20, 5));
        push(&mut v, seg(4, 210, 30, 5));
        assert_eq!(v.len(), 4);
    }
}
