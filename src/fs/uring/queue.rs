//! One ring queue: a thread that owns its io_uring and its entries (each a
//! header buffer and a payload buffer registered with the kernel), serves
//! the requests that complete on it and commits each reply while fetching
//! the next request in the same command. Requests that may wait on image
//! I/O go to the shared pool (`Pool` in `mod.rs`) when there is one; the pool hands the
//! entry back through a channel and an eventfd the ring also waits on.
//! READs of plain stored runs are read from the image files on this same
//! ring ([`super::hostread`]): the reply is committed when the last host
//! read of the request lands, so one thread keeps many reads in flight.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use log::{debug, error};

use super::abi::{self, op};
use super::hostread::{self, Seg};
use super::serve::{may_block, serve};
use crate::fs::VdiskFs;

/// user_data of the eventfd read (entries use their index).
const WAKE: u64 = u64::MAX;

/// Tag of a host read's user_data: the tag, the entry's index (bits 16 and
/// up) and the read's index in the request (the low 16 bits).
const READ_TAG: u64 = 1 << 62;

/// One registered entry: the kernel writes a request into its buffers and
/// reads the reply from them.
struct Entry {
    header: Box<[u8]>,
    payload: Box<[u8]>,
    /// The two `struct iovec`s of REGISTER as (base, length) words, kept
    /// alive with the entry.
    iov: Box<[u64; 4]>,
    /// `commit_id` of the request this entry holds.
    commit_id: u64,
    /// The READ this entry waits for, while its host reads are in flight.
    reading: Option<Reading>,
}

/// A READ served by host reads on the ring.
struct Reading {
    unique: u64,
    /// Bytes of the reply.
    len: usize,
    /// Host reads not yet landed.
    pending: usize,
    segs: Vec<Seg>,
    /// The errno to reply with, once a read failed.
    failed: Option<i32>,
    /// Submitted with RWF_NOWAIT: page-cache hits only.
    nowait: bool,
    /// A read found its pages outside the page cache: the request goes to
    /// the pool once every read is in.
    punt: bool,
}

/// Buffers of an entry lent to a pool thread until it hands them back.
pub struct Lent {
    header: *mut u8,
    header_len: usize,
    payload: *mut u8,
    payload_len: usize,
    idx: usize,
    done: Arc<Done>,
}

// SAFETY: the ring thread does not touch an entry's buffers while they are
// lent; they are owned by the queue, which outlives every loan (it waits
// for them before exiting).
unsafe impl Send for Lent {}

impl Lent {
    /// Serves the request in the lent buffers and hands the entry back.
    pub fn run(self, fs: &VdiskFs) {
        // SAFETY: see `unsafe impl Send`: exclusive access until handed back.
        let (header, payload) = unsafe {
            (
                std::slice::from_raw_parts_mut(self.header, self.header_len),
                std::slice::from_raw_parts_mut(self.payload, self.payload_len),
            )
        };
        serve(fs, header, payload);
        let _ = self.done.tx.send(self.idx);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a valid buffer to our eventfd.
        unsafe { libc::write(self.done.event.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// Where pool threads hand entries back to a queue.
struct Done {
    tx: mpsc::Sender<usize>,
    event: OwnedFd,
}

/// A queue ready to register: its ring is created before INIT so that a
/// kernel without io_uring is found out before the flag is negotiated.
pub struct Queue {
    qid: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    entries: Vec<Entry>,
}

impl Queue {
    /// A queue with `depth` entries of `payload` bytes each.
    pub fn new(qid: u16, depth: usize, payload: usize) -> std::io::Result<Queue> {
        // Not COOP_TASKRUN: the kernel completes a fetch through task work
        // on this thread, which must wake it while it waits for completions.
        // Room for the entries' commands and a batch of host reads (more
        // wait in the submission loop, see `push`).
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build((depth as u32 * 4).next_power_of_two())?;
        let entries = (0..depth)
            .map(|_| {
                let mut header = vec![0u8; abi::HEADER_SZ].into_boxed_slice();
                let mut payload = vec![0u8; payload].into_boxed_slice();
                let iov = Box::new([
                    header.as_mut_ptr() as u64,
                    header.len() as u64,
                    payload.as_mut_ptr() as u64,
                    payload.len() as u64,
                ]);
                Entry {
                    header,
                    payload,
                    iov,
                    commit_id: 0,
                    reading: None,
                }
            })
            .collect();
        Ok(Queue { qid, ring, entries })
    }

    /// Registers every entry on `dev`; the kernel's errno if it refuses.
    /// Success has no completion: an entry's first completion is a request.
    pub fn register(&mut self, dev: RawFd) -> Result<(), i32> {
        for (i, e) in self.entries.iter().enumerate() {
            let sqe = opcode::UringCmd80::new(types::Fd(dev), abi::CMD_REGISTER)
                .cmd(abi::cmd_req(0, self.qid))
                .addr(Some(e.iov.as_ptr() as u64))
                .build()
                .user_data(i as u64);
            let sqe = with_len(sqe, 2);
            // SAFETY: the iovecs and the buffers they point to live as long
            // as the queue, which outlives every command it submits.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                return Err(libc::ENOSPC);
            }
        }
        self.ring
            .submit()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        // A refusal completes at once, inline with the submission.
        for cqe in self.ring.completion() {
            if cqe.result() < 0 {
                return Err(-cqe.result());
            }
        }
        Ok(())
    }

    /// Serves requests until the kernel tears the ring down (unmount) and
    /// every entry has come back.
    pub fn run(mut self, dev: RawFd, fs: Arc<VdiskFs>, pool: Option<mpsc::Sender<Lent>>) {
        let (tx, rx) = mpsc::channel();
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let event = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        let pool = if event < 0 { None } else { pool };
        let done = (event >= 0).then(|| {
            Arc::new(Done {
                tx,
                // SAFETY: a fresh fd we own.
                event: unsafe { OwnedFd::from_raw_fd(event) },
            })
        });
        // Leaked: the kernel may still hold the last eventfd read when the
        // ring is closed, and closing cancels it asynchronously.
        let wake_buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
        let mut armed = false;
        let mut live = self.entries.len();
        let mut lent = 0usize;
        let host_reads = std::env::var_os("VDISKFS_URING_HOSTREAD").is_none_or(|v| v != "0");
        while live > 0 {
            if let (Some(d), false) = (&done, armed) {
                let sqe =
                    opcode::Read::new(types::Fd(d.event.as_raw_fd()), wake_buf.as_mut_ptr(), 8)
                        .build()
                        .user_data(WAKE);
                // SAFETY: wake_buf is never freed.
                if unsafe { self.ring.submission().push(&sqe.into()) }.is_ok() {
                    armed = true;
                }
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    error!(
                        "io_uring queue {}: {e}; its requests are abandoned",
                        self.qid
                    );
                    // The kernel may still write into the entries: never free them.
                    std::mem::forget(std::mem::take(&mut self.entries));
                    break;
                }
            }
            let all: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            // Host reads that landed, and READs that become host reads,
            // first: what is left is served below.
            // A lone request (queue depth 1) may wait for the disk on the
            // ring; with others about, only page-cache hits are read here
            // and misses go to the pool, whose blocking preads keep the
            // kernel's readahead (io_uring's non-blocking buffered reads
            // skip most of it, docs/fuse-uring.md).
            let requests = all
                .iter()
                .filter(|&&(ud, res)| ud != WAKE && ud & READ_TAG == 0 && res >= 0)
                .count();
            let alone = requests == 1
                && lent == 0
                && pool.is_some()
                && self.entries.iter().all(|e| e.reading.is_none());
            let nowait = pool.is_some() && !alone;
            let mut cqes = Vec::with_capacity(all.len());
            let mut punted = Vec::new();
            for (ud, res) in all {
                if ud != WAKE && ud & READ_TAG != 0 {
                    punted.extend(self.read_landed(dev, ud, res));
                } else if !(host_reads
                    && ud != WAKE
                    && res >= 0
                    && self.start_read(dev, &fs, ud, nowait))
                {
                    cqes.push((ud, res));
                }
            }
            for idx in punted {
                if self.hand_off(dev, &fs, idx, &pool, &done) {
                    lent += 1;
                }
            }
            // Requests of this batch that may wait on image I/O: all but the
            // last go to the pool (several in flight reach the disk at
            // once), the last is served here (a lone request, as at queue
            // depth 1, costs no hand-off).
            let mut blocking_left = cqes
                .iter()
                .filter(|&&(ud, res)| {
                    ud != WAKE
                        && res >= 0
                        && may_block(
                            abi::InHeader::decode(&self.entries[ud as usize].header).opcode,
                        )
                })
                .count();
            for (ud, res) in cqes {
                if ud == WAKE {
                    armed = false;
                    while let Ok(idx) = rx_try(&done, &rx) {
                        lent -= 1;
                        self.commit(dev, idx);
                    }
                    continue;
                }
                let idx = ud as usize;
                if res < 0 {
                    // Teardown (ENOTCONN on unmount or abort) or a refused
                    // commit: the entry is gone either way.
                    if res != -libc::ENOTCONN && res != -libc::ECONNABORTED {
                        error!("io_uring queue {} entry {idx}: errno {}", self.qid, -res);
                    }
                    live -= 1;
                    continue;
                }
                let e = &mut self.entries[idx];
                e.commit_id = abi::ent_in_out(&e.header).0;
                let opcode = abi::InHeader::decode(&e.header).opcode;
                let blocking = may_block(opcode);
                if blocking {
                    blocking_left -= 1;
                }
                if blocking && blocking_left > 0 {
                    if self.hand_off(dev, &fs, idx, &pool, &done) {
                        lent += 1;
                    }
                } else {
                    serve(&fs, &mut e.header, &mut e.payload);
                    self.commit(dev, idx);
                }
            }
        }
        // Loans still out point into our buffers: wait for them.
        while lent > 0 {
            if rx.recv().is_err() {
                break;
            }
            lent -= 1;
        }
        debug!("io_uring queue {} stopped", self.qid);
    }

    /// Lends entry `idx` to the pool (true), or serves it here and commits
    /// it when there is no pool or the pool is gone (false).
    fn hand_off(
        &mut self,
        dev: RawFd,
        fs: &VdiskFs,
        idx: usize,
        pool: &Option<mpsc::Sender<Lent>>,
        done: &Option<Arc<Done>>,
    ) -> bool {
        let e = &mut self.entries[idx];
        if let (Some(p), Some(d)) = (pool, done) {
            let loan = Lent {
                header: e.header.as_mut_ptr(),
                header_len: e.header.len(),
                payload: e.payload.as_mut_ptr(),
                payload_len: e.payload.len(),
                idx,
                done: d.clone(),
            };
            match p.send(loan) {
                Ok(()) => return true,
                Err(mpsc::SendError(loan)) => loan.run_inline(fs),
            }
        } else {
            serve(fs, &mut e.header, &mut e.payload);
        }
        self.commit(dev, idx);
        false
    }

    /// Commits the reply in entry `idx` and fetches its next request.
    fn commit(&mut self, dev: RawFd, idx: usize) {
        let sqe = opcode::UringCmd80::new(types::Fd(dev), abi::CMD_COMMIT_AND_FETCH)
            .cmd(abi::cmd_req(self.entries[idx].commit_id, self.qid))
            .build()
            .user_data(idx as u64);
        // SAFETY: the entry's buffers (registered before) outlive the command.
        unsafe { self.push(&sqe) };
    }

    /// Queues `sqe`, handing what is queued to the kernel first when the
    /// submission queue is full.
    ///
    /// # Safety
    /// Whatever `sqe` points to must stay valid until its completion.
    unsafe fn push(&mut self, sqe: &squeue::Entry128) {
        loop {
            // SAFETY: the caller's promise.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                error!("io_uring queue {}: {e}", self.qid);
                return;
            }
        }
    }

    /// Serves the request in entry `ud` with host reads on this ring when
    /// it is a READ of plain stored runs ([`hostread::plan`]); false when
    /// it must be served the usual way. With `nowait` the reads take
    /// page-cache hits only (RWF_NOWAIT); a miss sends the request to the
    /// pool ([`Queue::read_landed`]).
    fn start_read(&mut self, dev: RawFd, fs: &VdiskFs, ud: u64, nowait: bool) -> bool {
        let idx = ud as usize;
        let e = &mut self.entries[idx];
        let h = abi::InHeader::decode(&e.header);
        if h.opcode != op::READ {
            return false;
        }
        let arg = &e.header[abi::IN_OUT_SZ..abi::ENT_IN_OUT_OFF];
        let (offset, size) = (abi::u64_at(arg, 8), abi::u32_at(arg, 16) as usize);
        let Some(plan) = hostread::plan(fs, h.nodeid, offset, size, &mut e.payload) else {
            return false;
        };
        e.commit_id = abi::ent_in_out(&e.header).0;
        if plan.segs.is_empty() {
            abi::encode_reply(&mut e.header, h.unique, 0, plan.len as u32);
            self.commit(dev, idx);
            return true;
        }
        let base = e.payload.as_mut_ptr();
        let sqes: Vec<squeue::Entry128> = plan
            .segs
            .iter()
            .enumerate()
            .map(|(s, seg)| {
                // SAFETY: the plan keeps every read inside the payload.
                let to = unsafe { base.add(seg.at) };
                opcode::Read::new(types::Fd(seg.fd), to, seg.len as u32)
                    .offset(seg.host)
                    .rw_flags(if nowait { libc::RWF_NOWAIT } else { 0 })
                    .build()
                    .user_data(READ_TAG | (idx as u64) << 16 | s as u64)
                    .into()
            })
            .collect();
        e.reading = Some(Reading {
            unique: h.unique,
            len: plan.len,
            pending: sqes.len(),
            segs: plan.segs,
            failed: None,
            nowait,
            punt: false,
        });
        for sqe in &sqes {
            // SAFETY: the payload is not touched until the last read lands;
            // the file is held by the entry's `Reading` until then.
            unsafe { self.push(sqe) };
        }
        true
    }

    /// A host read landed: a short or failed one is finished with a plain
    /// pread (zeros past the end of the file, or the error named in the
    /// log); the reply is committed when the request's last read is in.
    /// A non-blocking read that missed the page cache (or got part of it)
    /// marks the request for the pool: its index is returned once every
    /// read of it is in.
    fn read_landed(&mut self, dev: RawFd, ud: u64, res: i32) -> Option<usize> {
        let idx = ((ud & !READ_TAG) >> 16) as usize;
        let s = (ud & 0xffff) as usize;
        let e = self.entries.get_mut(idx)?;
        let r = e.reading.as_mut()?;
        let seg = r.segs.get(s)?;
        let got = usize::try_from(res).unwrap_or(0).min(seg.len);
        if r.nowait && got < seg.len {
            r.punt = true;
        } else if got < seg.len {
            let rest = &mut e.payload[seg.at + got..seg.at + seg.len];
            if let Some(f) = &seg.file {
                if let Err(err) = f.read_zero_fill_at(rest, seg.host + got as u64) {
                    error!(
                        "read of {} bytes at host {:#x}: {err}",
                        rest.len(),
                        seg.host
                    );
                    r.failed = Some(err.errno());
                }
            }
        }
        r.pending -= 1;
        if r.pending == 0 {
            let (unique, len, failed) = (r.unique, r.len, r.failed);
            let punt = r.punt;
            e.reading = None;
            if punt {
                return Some(idx);
            }
            match failed {
                Some(errno) => abi::encode_reply(&mut e.header, unique, errno, 0),
                None => abi::encode_reply(&mut e.header, unique, 0, len as u32),
            }
            self.commit(dev, idx);
        }
        None
    }
}

impl Lent {
    /// Gives the buffers back unserved-by-pool: served here instead.
    fn run_inline(self, fs: &VdiskFs) {
        // SAFETY: as in `run`.
        let (header, payload) = unsafe {
            (
                std::slice::from_raw_parts_mut(self.header, self.header_len),
                std::slice::from_raw_parts_mut(self.payload, self.payload_len),
            )
        };
        serve(fs, header, payload);
    }
}

fn rx_try(done: &Option<Arc<Done>>, rx: &mpsc::Receiver<usize>) -> Result<usize, ()> {
    if done.is_none() {
        return Err(());
    }
    rx.try_recv().map_err(|_| ())
}

/// Sets `sqe->len` (the iovec count of REGISTER), which the `io-uring`
/// crate's `UringCmd80` has no setter for.
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: Entry128 is repr(C): the 64-byte io_uring_sqe then 64 bytes
    // of command data; `len` is the u32 at byte 24 of io_uring_sqe.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: same layout back; every bit pattern is a valid SQE value.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}
