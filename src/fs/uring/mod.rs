//! FUSE over io_uring (Linux 6.14+, `enable_uring`): the transport that
//! replaces read(2)/write(2) on /dev/fuse with io_uring commands, one queue
//! per possible CPU, each served by its own thread that owns its ring and
//! its registered buffers (pinned to its CPU with `VDISKFS_URING_PIN=1`).
//! fuser still mounts, negotiates INIT (with `FUSE_OVER_IO_URING`) and keeps
//! reading /dev/fuse for what the kernel never sends on the ring
//! (interrupts, forgets). READs of plain stored runs are read from the
//! image files on the ring itself (`hostread.rs`: page-cache hits, or the
//! disk for a lone request); other requests that may wait on image I/O go
//! to a small pool when several are pending, so a ring thread does not
//! block on the disk (`VDISKFS_URING_INLINE=1` serves everything on the
//! ring threads, `VDISKFS_URING_HOSTREAD=0` turns host reads off, both for
//! measurement). The protocol as used here: docs/fuse-uring.md.

pub mod abi;
mod hostread;
mod queue;
mod serve;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use log::{debug, info};

use super::{VdiskFs, MAX_REQUEST};
use queue::{Lent, Queue};

/// Entries per queue: the requests one CPU's queue can hold at once. All
/// CPUs together get at least 32 (a QD32 client), each queue at least 2.
fn depth(queues: usize) -> usize {
    (64 / queues.max(1)).clamp(2, 16)
}

/// Number of queues the kernel requires: one per possible CPU.
pub fn possible_cpus() -> usize {
    // "0-3" or "0,2-5": the highest number plus one.
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split([',', '-'])
                .filter_map(|n| n.parse::<usize>().ok())
                .max()
        })
        .map(|m| m + 1)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Rings created before INIT, waiting for the kernel's answer.
pub struct Prepared {
    queues: Vec<Queue>,
}

/// Whether the io_uring transport may be tried at all: the module parameter
/// is on (a kernel without it has no such file).
pub fn enabled_in_kernel() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|s| s.trim() == "Y" || s.trim() == "1")
}

/// Creates one ring per possible CPU with its entries' buffers.
pub fn prepare() -> std::io::Result<Prepared> {
    let n = possible_cpus();
    let payload = MAX_REQUEST as usize;
    let queues = (0..n)
        .map(|q| Queue::new(q as u16, depth(n), payload))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(Prepared { queues })
}

/// The running transport: its queue threads and its pool.
pub struct Ring {
    threads: Vec<JoinHandle<()>>,
    /// The /dev/fuse descriptor the commands go to; closed after the threads.
    _dev: OwnedFd,
}

impl Ring {
    /// Waits for every queue thread (they stop when the kernel tears the
    /// ring down at unmount) and for the pool.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Registers every queue's entries on `dev` (after INIT agreed on
/// `FUSE_OVER_IO_URING`) and starts serving; the kernel's errno if it
/// refused a registration (it then stays on /dev/fuse).
pub fn start(
    mut prepared: Prepared,
    dev: OwnedFd,
    fs: Arc<VdiskFs>,
    pool_threads: usize,
) -> Result<Ring, i32> {
    for q in &mut prepared.queues {
        q.register(dev.as_raw_fd())?;
    }
    let inline = std::env::var_os("VDISKFS_URING_INLINE").is_some_and(|v| v == "1");
    let pool = (!inline && pool_threads > 0).then(|| spawn_pool(pool_threads, fs.clone()));
    let n = prepared.queues.len();
    let pin = std::env::var_os("VDISKFS_URING_PIN").is_some_and(|v| v == "1");
    let mut threads = Vec::with_capacity(n);
    for (qid, q) in prepared.queues.into_iter().enumerate() {
        let (fs, raw, pool) = (fs.clone(), dev.as_raw_fd(), pool.clone());
        let t = std::thread::Builder::new()
            .name(format!("uring-{qid}"))
            .spawn(move || {
                if pin {
                    pin_to_cpu(qid);
                }
                q.run(raw, fs, pool)
            })
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EAGAIN))?;
        threads.push(t);
    }
    info!(
        "serving FUSE over io_uring: {n} queues of {} entries{}",
        depth(n),
        if pool.is_some() {
            format!(", {pool_threads} I/O workers")
        } else {
            ", I/O inline".into()
        }
    );
    Ok(Ring { threads, _dev: dev })
}

/// Threads serving lent entries; they end when every queue has gone.
fn spawn_pool(n: usize, fs: Arc<VdiskFs>) -> mpsc::Sender<Lent> {
    let (tx, rx) = mpsc::channel::<Lent>();
    let rx = Arc::new(parking_lot::Mutex::new(rx));
    for i in 0..n {
        let (rx, fs) = (rx.clone(), fs.clone());
        let _ = std::thread::Builder::new()
            .name(format!("uring-io-{i}"))
            .spawn(move || loop {
                let job = rx.lock().recv();
                match job {
                    Ok(job) => job.run(&fs),
                    Err(_) => break,
                }
            });
    }
    tx
}

/// Pins the calling thread to `cpu`: the kernel queues a request on the
/// queue of the CPU its submitter runs on, so the queue's thread is best
/// woken there. Best effort (the CPU may be offline or outside our set).
fn pin_to_cpu(cpu: usize) {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    // set() refuses a CPU number beyond the set's size.
    if set.set(cpu).is_err() || sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).is_err() {
        debug!("cannot pin io_uring queue {cpu} to its CPU");
    }
}
