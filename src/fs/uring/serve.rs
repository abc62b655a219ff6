//! One ring request served: the request decoded from an entry's header and
//! payload buffers, the matching operation of the [`Tree`](crate::fs::Tree) called (the same
//! ones the classic path calls), and the reply encoded in place: reads land
//! straight in the payload buffer the kernel copies from.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use fuser::Errno;

use super::abi::{self, op, u32_at, u64_at, Attr, InHeader, Out};
use crate::fs::{Stat, VdiskFs, Xattr};

/// Whether a request may wait on image I/O (and so goes to the pool when
/// there is one, keeping the ring thread free).
pub fn may_block(opcode: u32) -> bool {
    matches!(
        opcode,
        op::READ | op::WRITE | op::FSYNC | op::FALLOCATE | op::LSEEK
    )
}

fn attr(a: &Stat) -> Attr {
    let kind = if a.dir { libc::S_IFDIR } else { libc::S_IFREG };
    let t = a
        .time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Attr {
        ino: a.ino,
        size: a.size,
        blocks: a.blocks,
        time: (t.as_secs(), t.subsec_nanos()),
        mode: kind | u32::from(a.perm),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        blksize: a.blksize,
    }
}

/// The NUL-terminated name at the start of a request payload.
fn name(payload: &[u8]) -> &OsStr {
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    OsStr::from_bytes(&payload[..end])
}

/// Serves the request in `header`/`payload` and writes the reply headers
/// (and the reply's payload) back into them.
pub fn serve(fs: &VdiskFs, header: &mut [u8], payload: &mut [u8]) {
    let h = InHeader::decode(header);
    let (_, in_len) = abi::ent_in_out(header);
    let in_len = (in_len as usize).min(payload.len());
    let result = dispatch(fs, &h, header, payload, in_len);
    let (error, len) = match result {
        Ok(len) => (0, len as u32),
        Err(e) => (e.code(), 0),
    };
    abi::encode_reply(header, h.unique, error, len);
}

fn dispatch(
    fs: &VdiskFs,
    h: &InHeader,
    header: &[u8],
    payload: &mut [u8],
    in_len: usize,
) -> Result<usize, Errno> {
    let arg = &header[abi::IN_OUT_SZ..abi::ENT_IN_OUT_OFF];
    let valid = fs.tree.ttl().as_secs();
    let ino = h.nodeid;
    match h.opcode {
        op::LOOKUP => {
            let a = fs.tree.lookup(ino, name(&payload[..in_len]))?;
            let mut o = Out::new(payload);
            abi::put_entry_out(&mut o, &attr(&a), valid);
            Ok(o.len())
        }
        op::GETATTR => {
            let a = fs.tree.getattr(ino)?;
            let mut o = Out::new(payload);
            abi::put_attr_out(&mut o, &attr(&a), valid);
            Ok(o.len())
        }
        op::SETATTR => {
            let size = (u32_at(arg, 0) & abi::FATTR_SIZE != 0).then(|| u64_at(arg, 16));
            let a = fs.tree.setattr(ino, size)?;
            let mut o = Out::new(payload);
            abi::put_attr_out(&mut o, &attr(&a), valid);
            Ok(o.len())
        }
        op::OPEN => {
            let flags = u32_at(arg, 0) as i32;
            fs.tree
                .open(ino, flags & libc::O_ACCMODE != libc::O_RDONLY)?;
            // Every change goes through this mount or drops the pages it
            // changed (`VdiskFs::changed_around`), so the kernel may keep
            // what it read across opens (as on the classic path).
            let mut o = Out::new(payload);
            o.u64(0).u32(abi::FOPEN_KEEP_CACHE).u32(0);
            Ok(o.len())
        }
        op::OPENDIR => {
            let mut o = Out::new(payload);
            o.u64(0).u32(0).u32(0);
            Ok(o.len())
        }
        op::READ => {
            let offset = u64_at(arg, 8);
            let size = (u32_at(arg, 16) as usize).min(payload.len());
            Ok(fs.tree.read(ino, offset, &mut payload[..size])?)
        }
        op::WRITE => {
            let offset = u64_at(arg, 8);
            let size = u32_at(arg, 16) as usize;
            if size > in_len {
                return Err(Errno::EINVAL);
            }
            // fuse_write_in.write_flags bit 0: FUSE_WRITE_CACHE.
            let from_cache = u32_at(arg, 20) & 1 != 0;
            let n = fs.tree.write(ino, offset, &payload[..size], from_cache)?;
            let mut o = Out::new(payload);
            o.u32(n).u32(0);
            Ok(o.len())
        }
        op::FSYNC => fs.tree.fsync(ino).map(|()| 0).map_err(Errno::from),
        op::FALLOCATE => {
            let (offset, length, mode) = (u64_at(arg, 8), u64_at(arg, 16), u32_at(arg, 24));
            fs.tree.fallocate(ino, offset, length, mode as i32)?;
            Ok(0)
        }
        op::LSEEK => {
            let (offset, whence) = (u64_at(arg, 8) as i64, u32_at(arg, 16) as i32);
            let pos = fs.tree.lseek(ino, offset, whence)?;
            let mut o = Out::new(payload);
            o.u64(pos as u64);
            Ok(o.len())
        }
        op::GETXATTR | op::LISTXATTR => {
            let size = u32_at(arg, 0);
            let x = if h.opcode == op::GETXATTR {
                fs.tree.getxattr(ino, name(&payload[..in_len]), size)?
            } else {
                fs.tree.listxattr(ino, size)?
            };
            let mut o = Out::new(payload);
            match x {
                Xattr::Size(n) => o.u32(n).u32(0),
                Xattr::Data(v) if v.len() <= o.buf_len() => o.bytes(&v),
                Xattr::Data(_) => return Err(Errno::ERANGE),
            };
            Ok(o.len())
        }
        op::READDIR => {
            let offset = u64_at(arg, 8);
            let room = (u32_at(arg, 16) as usize).min(payload.len());
            let entries = fs.tree.readdir(ino)?;
            let mut o = Out::new(payload);
            for (i, (e_ino, dir, n)) in entries.iter().enumerate().skip(offset as usize) {
                let left = room - o.len();
                if !abi::put_dirent(&mut o, left, *e_ino, i as u64 + 1, *dir, n.as_bytes()) {
                    break;
                }
            }
            Ok(o.len())
        }
        op::STATFS => {
            let (blocks, files) = fs.tree.statfs();
            let mut o = Out::new(payload);
            abi::put_statfs(&mut o, blocks, files);
            Ok(o.len())
        }
        op::RELEASE | op::RELEASEDIR | op::FLUSH | op::FSYNCDIR | op::ACCESS => Ok(0),
        _ => Err(Errno::ENOSYS),
    }
}
