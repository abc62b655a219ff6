//! The transmission phase of one connection: requests read in order,
//! executed by a small pool of workers, replies sent as each finishes (out
//! of order, matched by cookie).
//!
//! Memory is bounded per connection: a request's buffer is reserved from a
//! byte budget before its payload is read or its data fetched, so a client
//! pipelining large reads waits instead of growing the daemon. Framing
//! errors (bad magic, a write too large to skip) end the connection once
//! the requests already accepted have been answered.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use parking_lot::{Condvar, Mutex};

use super::extents;
use super::negotiate::{Negotiated, MAX_REQUEST};
use super::proto::{self, *};
use super::Export;
use crate::endian::be64_bytes;
use crate::error::{Error, ErrorKind};

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Worker threads executing one connection's requests.
    pub workers: usize,
    /// Bytes of request buffers one connection may hold at once.
    pub inflight_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            workers: 16,
            inflight_bytes: 2 * MAX_REQUEST as usize,
        }
    }
}

/// Most extents in one block-status chunk; the client asks again for the rest.
const MAX_EXTENTS: usize = 4096;

/// A byte budget: `take` blocks until the bytes fit (a request alone always fits).
struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
    cap: usize,
}

impl Budget {
    fn take(&self, n: usize) {
        let mut used = self.used.lock();
        while *used > 0 && *used + n > self.cap {
            self.freed.wait(&mut used);
        }
        *used += n;
    }
    fn give(&self, n: usize) {
        *self.used.lock() -= n;
        self.freed.notify_all();
    }
}

/// One accepted request and its write payload.
struct Job {
    req: Request,
    payload: Vec<u8>,
    cost: usize,
}

/// Serves requests from `input` until the client disconnects, sends
/// `NBD_CMD_DISC`, breaks the framing, or `input` reaches end of file (the
/// server shutting the socket down). Replies go to `output`. Every accepted
/// request is answered before this returns, and writable exports are
/// flushed.
pub fn serve<R: Read, W: Write + Send>(
    mut input: R,
    output: W,
    export: &Export,
    neg: &Negotiated,
    limits: &Limits,
) -> io::Result<()> {
    let out = Mutex::new(output);
    let budget = Budget {
        used: Mutex::new(0),
        freed: Condvar::new(),
        cap: limits.inflight_bytes.max(MAX_REQUEST as usize),
    };
    let (tx, rx) = mpsc::sync_channel::<Job>(limits.workers.max(1) * 2);
    let rx = Mutex::new(rx);
    // Set once a reply could not be sent: the client is gone or stopped
    // reading, so later replies are dropped instead of each waiting out
    // the write timeout.
    let broken = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        for _ in 0..limits.workers.max(1) {
            scope.spawn(|| loop {
                let job = { rx.lock().recv() };
                let Ok(job) = job else { break };
                let reply = execute(export, neg, &job.req, &job.payload);
                drop(job.payload);
                if !broken.load(Ordering::Relaxed) {
                    let mut o = out.lock();
                    if o.write_all(&reply).and_then(|()| o.flush()).is_err() {
                        broken.store(true, Ordering::Relaxed);
                    }
                }
                budget.give(job.cost);
            });
        }
        let r = read_requests(&mut input, &tx, &budget, &out, neg);
        drop(tx);
        r
    });
    if export.chain.is_writable() {
        if let Err(e) = export.chain.flush() {
            log::error!(
                "nbd export {}: flush at disconnect failed: {e}",
                export.name
            );
        }
    }
    result
}

fn read_requests<R: Read, W: Write>(
    input: &mut R,
    tx: &mpsc::SyncSender<Job>,
    budget: &Budget,
    out: &Mutex<W>,
    neg: &Negotiated,
) -> io::Result<()> {
    loop {
        let mut head = [0u8; REQUEST_LEN];
        match input.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = proto::parse_request(&head)
            .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m.0))?;
        if req.kind == CMD_DISC {
            return Ok(());
        }
        let too_big = req.len > MAX_REQUEST;
        if req.kind == CMD_WRITE && too_big {
            // The payload cannot be skipped cheaply: answer, then hang up.
            send_error(out, neg, req.cookie, EOVERFLOW, "write larger than 32 MiB");
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "write request larger than the maximum",
            ));
        }
        if req.kind == CMD_READ && too_big {
            send_error(out, neg, req.cookie, EOVERFLOW, "read larger than 32 MiB");
            continue;
        }
        let cost = match req.kind {
            CMD_READ | CMD_WRITE => req.len as usize,
            _ => 0,
        }
        .max(4096);
        budget.take(cost);
        let mut payload = Vec::new();
        if req.kind == CMD_WRITE {
            payload.resize(req.len as usize, 0);
            if let Err(e) = input.read_exact(&mut payload) {
                budget.give(cost);
                return match e.kind() {
                    // Gone mid-request: nothing to answer.
                    io::ErrorKind::UnexpectedEof => Ok(()),
                    _ => Err(e),
                };
            }
        }
        if tx.send(Job { req, payload, cost }).is_err() {
            budget.give(cost);
            return Ok(());
        }
    }
}

fn send_error<W: Write>(out: &Mutex<W>, neg: &Negotiated, cookie: u64, err: u32, msg: &str) {
    let bytes = error_reply(neg, cookie, err, msg);
    let mut o = out.lock();
    let _ = o.write_all(&bytes).and_then(|()| o.flush());
}

/// An error reply, structured when structured replies were negotiated.
fn error_reply(neg: &Negotiated, cookie: u64, err: u32, msg: &str) -> Vec<u8> {
    if neg.structured {
        proto::error_chunk(cookie, err, msg)
    } else {
        proto::simple_reply(cookie, err).to_vec()
    }
}

/// The NBD error for a failed chain operation.
fn errno_of(e: &Error) -> u32 {
    match e.kind() {
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::OutOfRange | ErrorKind::InvalidInput => EINVAL,
        _ => match e.errno() {
            libc::ENOSPC | libc::EDQUOT => ENOSPC,
            libc::ENOMEM => ENOMEM,
            libc::EROFS | libc::EPERM | libc::EACCES => EPERM,
            _ => EIO,
        },
    }
}

/// Executes one request; returns the whole reply's bytes.
pub fn execute(export: &Export, neg: &Negotiated, req: &Request, payload: &[u8]) -> Vec<u8> {
    let chain = &export.chain;
    let size = chain.size();
    let fail = |err: u32, msg: &str| error_reply(neg, req.cookie, err, msg);
    let ok = || proto::simple_reply(req.cookie, 0).to_vec();
    let in_range = req
        .offset
        .checked_add(req.len as u64)
        .is_some_and(|e| e <= size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && !chain.is_writable() {
        return fail(EPERM, "the export is read-only");
    }
    if matches!(
        req.kind,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
    ) {
        if !in_range {
            let err = if writes { ENOSPC } else { EINVAL };
            return fail(err, "request beyond the end of the export");
        }
        if req.len == 0 {
            return fail(EINVAL, "zero-length request");
        }
    }
    // After a change (even a failed one, which may have changed part of
    // the range): shown to the mount's files, then flushed if asked (FUA).
    let fua = |r: crate::Result<()>| {
        if let Some(on_write) = &export.on_write {
            on_write(req.offset, u64::from(req.len));
        }
        r.and_then(|()| {
            if req.flags & CMD_FLAG_FUA != 0 {
                chain.flush()
            } else {
                Ok(())
            }
        })
    };
    let done = |r: crate::Result<()>| match r {
        Ok(()) => ok(),
        Err(e) => {
            log::warn!("nbd export {}: {e}", export.name);
            fail(errno_of(&e), e.message())
        }
    };
    match req.kind {
        CMD_READ => read(export, neg, req),
        CMD_WRITE => done(fua(chain.write_at(payload, req.offset))),
        CMD_FLUSH => done(chain.flush()),
        CMD_TRIM => done(fua(chain.write_zeroes(req.offset, req.len as u64))),
        CMD_WRITE_ZEROES => {
            if req.flags & CMD_FLAG_NO_HOLE != 0 {
                if req.flags & CMD_FLAG_FAST_ZERO != 0 {
                    // Allocated zeros mean writing them: not fast.
                    return fail(ENOTSUP, "allocated zeroes are not fast");
                }
                done(fua(write_zero_data(export, req.offset, req.len as u64)))
            } else {
                done(fua(chain.write_zeroes(req.offset, req.len as u64)))
            }
        }
        CMD_BLOCK_STATUS => block_status(export, neg, req),
        _ => fail(EINVAL, "unknown command"),
    }
}

/// Zeros written as data (WRITE_ZEROES with NO_HOLE), a MiB at a time.
fn write_zero_data(export: &Export, offset: u64, len: u64) -> crate::Result<()> {
    let zeros = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        export.chain.write_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn read(export: &Export, neg: &Negotiated, req: &Request) -> Vec<u8> {
    let chain = &export.chain;
    let len = req.len as usize;
    if !neg.structured {
        let mut v = Vec::with_capacity(16 + len);
        v.extend_from_slice(&proto::simple_reply(req.cookie, 0));
        v.resize(16 + len, 0);
        return match chain.read_at(&mut v[16..], req.offset) {
            Ok(()) => v,
            Err(e) => {
                log::warn!("nbd export {}: {e}", export.name);
                proto::simple_reply(req.cookie, errno_of(&e)).to_vec()
            }
        };
    }
    // Structured: holes as OFFSET_HOLE chunks, the rest as OFFSET_DATA.
    let runs = extents::read_runs(chain, req.offset, req.len as u64);
    let mut v = Vec::with_capacity(runs.len() * 32 + len);
    let last = runs.len().saturating_sub(1);
    for (i, (off, n, hole)) in runs.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        if hole {
            v.extend_from_slice(&proto::hole_chunk(req.cookie, flags, off, n as u32));
            continue;
        }
        v.extend_from_slice(&proto::chunk_header(
            req.cookie,
            flags,
            REPLY_TYPE_OFFSET_DATA,
            8 + n as u32,
        ));
        v.extend_from_slice(&be64_bytes(off));
        let at = v.len();
        v.resize(at + n as usize, 0);
        if let Err(e) = chain.read_at(&mut v[at..], off) {
            log::warn!("nbd export {}: {e}", export.name);
            // Nothing was sent yet: the error replaces the whole reply.
            return proto::error_chunk(req.cookie, errno_of(&e), e.message());
        }
    }
    v
}

fn block_status(export: &Export, neg: &Negotiated, req: &Request) -> Vec<u8> {
    if neg.contexts.is_empty() {
        return error_reply(neg, req.cookie, EINVAL, "no metadata context selected");
    }
    let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    let mut v = Vec::new();
    let last = neg.contexts.len() - 1;
    for (i, &ctx) in neg.contexts.iter().enumerate() {
        let found = extents::extents(&export.chain, ctx, req.offset, req.len as u64, max);
        let list = match found {
            Ok(l) => l,
            Err(e) => {
                log::warn!("nbd export {}: {e}", export.name);
                return proto::error_chunk(req.cookie, errno_of(&e), e.message());
            }
        };
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        v.extend_from_slice(&proto::status_chunk(req.cookie, flags, ctx, &list));
    }
    v
}
